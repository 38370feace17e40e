//! `marathon bench ckpt`: what a checkpoint costs: the training stall beside memcpy, persist
//! beside this disk's own sequential write, a cold load beside cold reads of the same files,
//! compression with and without the byte shuffle.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use marathon_model::ParamLayout;
use marathon_runtime::{TrainConfig, Trainer};

use super::memcpy_seconds;

#[derive(Debug, Args)]
pub struct CkptArgs {
    #[arg(long)]
    config: PathBuf,
    /// Where the checkpoints go (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Checkpoints timed per codec.
    #[arg(long, default_value_t = 3)]
    checkpoints: u64,
    /// zstd level.
    #[arg(long, default_value_t = 1)]
    level: i32,
}

/// `marathon bench ckpt`: what a checkpoint of the configuration's model with AdamW state costs.
pub fn run(args: CkptArgs) -> Result<()> {
    use marathon_runtime::config::Compression;
    anyhow::ensure!(args.checkpoints > 0, "--checkpoints: must be at least 1");
    let mut cfg = TrainConfig::load(&args.config)?;
    // One short step fills the Adam moments with real values; its size does not matter here.
    cfg.batch.micro_batch = 1;
    cfg.batch.global_batch = 1;
    cfg.batch.seq_len = cfg.batch.seq_len.min(64);
    cfg.batch.rampup = None;
    cfg.train.metrics = None;
    cfg.parallel = Default::default();
    let tmp = tempfile::tempdir_in(".").context("create a temporary checkpoint root")?;
    let base = args
        .root
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    // The disk first, before any checkpoint fills the page cache or leaves dirty pages.
    let disk = Disk::measure(&base, 12 * ParamLayout::new(&cfg.model).numel())?;
    let mut figures = serde_json::Map::new();
    let mut lines = Vec::new();
    let mut state_bytes = 0u64;
    let mut resharded = None;
    for (name, compression) in [
        ("none", Compression::None),
        ("zstd-shuffle", Compression::ZstdShuffle),
    ] {
        let root = base.join(format!("bench-{name}-{}", nanos_now()));
        let (timed, t) = time_checkpoints(&cfg, &root, compression, &args)?;
        state_bytes = timed.state_bytes;
        lines.push(timed.line(name));
        figures.insert(name.into(), timed.json());
        if name == "none" {
            resharded = Some(resharded_load(&cfg, &root, args.checkpoints + 1)?);
        }
        if name == "zstd-shuffle" {
            for (key, ratio, mb_per_s) in codec_ratios(&t, args.level)? {
                lines.push(format!(
                    "  {key:<20} ratio {ratio:.3}, {mb_per_s:.0} MB/s on one thread"
                ));
                figures.insert(
                    key,
                    serde_json::json!({ "ratio": ratio, "mb_per_s": mb_per_s }),
                );
            }
        }
    }
    let memcpy_ms = memcpy_seconds(state_bytes as usize, 3) * 1e3;
    let disk_gbs = disk.write_gbs();
    let f = |k: &str, field: &str| figures[k][field].as_f64().unwrap_or(f64::NAN);
    let report = serde_json::json!({
        "state_bytes": state_bytes,
        "memcpy_ms": memcpy_ms,
        "disk": disk,
        "disk_fsync_gbs": disk_gbs,
        "stall_over_memcpy": f("zstd-shuffle", "stall_ms") / memcpy_ms,
        "persist_over_disk_uncompressed": f("none", "persist_gbs") / disk_gbs,
        "persist_over_disk_compressed": f("zstd-shuffle", "persist_gbs") / disk_gbs,
        "load_over_cold_read_uncompressed": f("none", "load_over_cold_read"),
        "resharded_load": resharded,
        "codecs": figures,
    });
    println!(
        "bench ckpt: {} parameters with AdamW state, {:.1} MB per checkpoint\n  \
         memcpy of the same bytes {memcpy_ms:.1} ms\n  \
         the disk, measured first after a sync, in 8 MiB blocks: write {:.2} GB/s direct and \
         {:.2} GB/s through the page cache, each with fsync\n{}\n  \
         stall {:.2}x memcpy; persist {:.2}x the disk's write uncompressed, {:.2}x compressed; \
         load and verify {:.2}x the faster cold read of its files uncompressed\n  \
         {}",
        ParamLayout::new(&cfg.model).numel(),
        state_bytes as f64 / 1e6,
        disk.direct_write_gbs,
        disk.buffered_write_gbs,
        lines.join("\n"),
        report["stall_over_memcpy"].as_f64().unwrap_or(f64::NAN),
        report["persist_over_disk_uncompressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
        report["persist_over_disk_compressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
        report["load_over_cold_read_uncompressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
        resharded.map_or(String::new(), |r| r.line()),
    );
    println!("{report}");
    Ok(())
}

/// What checkpoints of one codec cost: medians over the timed ones.
struct Timed {
    state_bytes: u64,
    stall_ms: f64,
    persist_s: f64,
    stored_bytes: u64,
    load_s: f64,
    /// The same files read cold in 8 MiB blocks, around the page cache and through it: the
    /// bar the load is held to.
    reads: ColdReads,
}

/// Cold reads of a checkpoint's files, each the median of five, timed between its loads.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct ColdReads {
    direct_s: f64,
    cached_s: f64,
}

impl ColdReads {
    /// The faster of the two.
    fn best_s(&self) -> f64 {
        self.direct_s.min(self.cached_s)
    }
}

impl Timed {
    fn persist_gbs(&self) -> f64 {
        self.state_bytes as f64 / self.persist_s / 1e9
    }

    fn load_gbs(&self) -> f64 {
        self.state_bytes as f64 / self.load_s / 1e9
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "stall_ms": self.stall_ms,
            "persist_s": self.persist_s,
            "persist_gbs": self.persist_gbs(),
            "stored_bytes": self.stored_bytes,
            "load_s": self.load_s,
            "load_gbs": self.load_gbs(),
            "cold_read": self.reads,
            "load_over_cold_read": self.reads.best_s() / self.load_s,
        })
    }

    fn line(&self, name: &str) -> String {
        format!(
            "  {name:<13} stall {:.1} ms, persist {:.2} s ({:.2} GB/s), stored {:.1} MB, load and \
             verify cold {:.2} s ({:.2} GB/s); its files read cold {:.2} s direct, {:.2} s \
             through the page cache",
            self.stall_ms,
            self.persist_s,
            self.persist_gbs(),
            self.stored_bytes as f64 / 1e6,
            self.load_s,
            self.load_gbs(),
            self.reads.direct_s,
            self.reads.cached_s,
        )
    }
}

/// One step, then `args.checkpoints` timed checkpoints under `root` (after an untimed first,
/// which allocates the staging buffer), and five cold loads that read, decode and verify
/// every chunk of the newest. Returns the figures and the trainer, whose state the codecs measure.
fn time_checkpoints(
    cfg: &TrainConfig,
    root: &Path,
    compression: marathon_runtime::config::Compression,
    args: &CkptArgs,
) -> Result<(Timed, Trainer)> {
    use marathon_runtime::config::{CheckpointConfig, Resume};
    let mut cfg = cfg.clone();
    cfg.checkpoint = Some(CheckpointConfig {
        root: root.display().to_string(),
        every_steps: 0,
        keep_last: 1000,
        keep_every: 0,
        compression,
        level: args.level,
        resume: Resume::Never,
        abandoned_after_s: 3600,
        options: Default::default(),
        faults: None,
        single_writer: false,
        record: None,
    });
    let mut t = Trainer::new(cfg)?;
    t.train_step()?;
    let (mut stalls, mut persists, mut state_bytes) = (Vec::new(), Vec::new(), 0);
    for k in 0..=args.checkpoints {
        t.seek(k + 1);
        let rec = t.checkpoint()?.expect("checkpointing is configured");
        let persist = t.wait_checkpoint()?.expect("a persist ran");
        state_bytes = rec.staged_bytes;
        if k > 0 {
            stalls.push(rec.stall_ms);
            persists.push(persist.committed.unwrap_or(persist.upload).as_secs_f64());
        }
    }
    let newest = args.checkpoints + 1;
    let stored_bytes = dir_bytes(&root.join(marathon_storage::format::step_dir(newest)));
    let reader =
        marathon_storage::Reader::new(marathon_storage::Store::open(&root.display().to_string())?);
    let m = reader.manifest(newest)?;
    // Cold, the median of five: nothing of the checkpoint in the page cache before each,
    // and its files read cold the two plain ways between the loads, as a well-configured
    // reader of those bytes would read them.
    let step_dir = root.join(marathon_storage::format::step_dir(newest));
    let files = files_under(&step_dir)?;
    let (mut loads, mut direct, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        for (times, read) in [
            (&mut direct, read_direct as fn(&Path, usize) -> Result<bool>),
            (&mut cached, read_sequential),
        ] {
            files
                .iter()
                .try_for_each(|f| marathon_storage::direct::forget(f))?;
            let t0 = Instant::now();
            let mut read_all = true;
            for f in &files {
                read_all &= read(f, 8 << 20)?;
            }
            // NaN where the filesystem refuses direct reads.
            times.push(if read_all {
                t0.elapsed().as_secs_f64()
            } else {
                f64::NAN
            });
        }
        files
            .iter()
            .try_for_each(|f| marathon_storage::direct::forget(f))?;
        let t0 = Instant::now();
        reader.verify(&m)?;
        loads.push(t0.elapsed().as_secs_f64());
    }
    let timed = Timed {
        state_bytes,
        stall_ms: median(&mut stalls),
        persist_s: median(&mut persists),
        stored_bytes,
        load_s: median(&mut loads),
        reads: ColdReads {
            direct_s: median(&mut direct),
            cached_s: median(&mut cached),
        },
    };
    Ok((timed, t))
}

/// Loading a checkpoint into one process from the layout that wrote it, and from the same
/// state stored as tp2 x dp2 (four ranks' pieces, each tensor split in two and its rows shared
/// between two replicas), uncompressed and from the page cache, best of three each.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct ReshardedLoad {
    same_layout_s: f64,
    resharded_s: f64,
    ratio: f64,
}

impl ReshardedLoad {
    fn line(&self) -> String {
        format!(
            "resharded load, saved as tp2 x dp2 and loaded in one process: {:.2} s beside {:.2} \
             s from the layout that wrote it ({:.2}x)",
            self.resharded_s, self.same_layout_s, self.ratio
        )
    }
}

fn resharded_load(cfg: &TrainConfig, root: &Path, step: u64) -> Result<ReshardedLoad> {
    use marathon_runtime::checkpoint::load_tensors;
    use marathon_storage::{codec::Codec, Reader, Store};
    let open = |p: &Path| Store::open(&p.display().to_string());
    let same = Reader::new(open(root)?);
    let other_root = root.with_extension("tp2-dp2");
    let target = marathon_model::ParallelLayout {
        tp: 2,
        pp: 1,
        dp: 2,
        distributed_optimizer: false,
    };
    target
        .validate(&cfg.model)
        .context("the resharded load needs a model that tp 2 divides")?;
    marathon_runtime::reshard::reshard(
        &same,
        step,
        || Ok(open(&other_root)?),
        target,
        Codec::Raw,
        true,
        &mut |_, _| {},
    )?;
    let other = Reader::new(open(&other_root)?);
    let layout = ParamLayout::new(&cfg.model);
    let n = layout.numel();
    let (mut p, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    // Each load also digests what it read: both must give the same state, bit for bit.
    let mut load = |reader: &Reader| -> Result<(f64, u64)> {
        let manifest = reader.manifest(step)?;
        let t0 = Instant::now();
        load_tensors(reader, &manifest, &layout, &mut p, &(0..n), &mut m, &mut v)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for x in p.iter().chain(&m).chain(&v) {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
        }
        Ok((secs, h))
    };
    // From the page cache, as labelled: both checkpoints' files read through it first.
    for dir in [root, &other_root] {
        for f in files_under(&dir.join(marathon_storage::format::step_dir(step)))? {
            std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
        }
    }
    let (mut same_s, mut resharded_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let (a, same_digest) = load(&same)?;
        let (b, resharded_digest) = load(&other)?;
        anyhow::ensure!(
            same_digest == resharded_digest,
            "the checkpoint of step {step} resharded to tp2 x dp2 under {} loads other values \
             than the one it came from",
            other_root.display()
        );
        same_s = same_s.min(a);
        resharded_s = resharded_s.min(b);
    }
    Ok(ReshardedLoad {
        same_layout_s: same_s,
        resharded_s,
        ratio: resharded_s / same_s,
    })
}

/// Each state family compressed with zstd, with and without the byte shuffle, on one thread:
/// (`<family>_<codec>`, ratio, MB/s).
fn codec_ratios(t: &Trainer, level: i32) -> Result<Vec<(String, f64, f64)>> {
    use marathon_storage::codec::{encode, Codec};
    let mut out = Vec::new();
    let [params, m, v] = t.state();
    for (family, data) in [("params", params), ("adam_m", m), ("adam_v", v)] {
        let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        for (codec, name) in [(Codec::Zstd, "zstd"), (Codec::ZstdShuffle4, "zstd_shuffle")] {
            let (mut buf, mut scratch, mut stored) = (Vec::new(), Vec::new(), 0usize);
            let t0 = Instant::now();
            for chunk in raw.chunks(4 << 20) {
                encode(codec, level, chunk, &mut buf, &mut scratch)?;
                stored += buf.len();
            }
            let secs = t0.elapsed().as_secs_f64();
            let ratio = raw.len() as f64 / stored as f64;
            out.push((
                format!("{family}_{name}"),
                ratio,
                raw.len() as f64 / secs / 1e6,
            ));
        }
    }
    Ok(out)
}

/// This disk's sequential bandwidth for `bytes` in 8 MiB blocks, as a well-configured writer
/// would get it, measured before any checkpoint and after syncing what was dirty.
#[derive(Debug, serde::Serialize)]
struct Disk {
    /// Written around the page cache, then fsync'd.
    direct_write_gbs: f64,
    /// Written through the page cache, then fsync'd.
    buffered_write_gbs: f64,
}

impl Disk {
    fn measure(dir: &std::path::Path, bytes: usize) -> Result<Disk> {
        use std::io::Write;
        const BLOCK: usize = 8 << 20;
        let block = vec![0x5au8; BLOCK];
        let gbs = |t0: Instant| bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;
        // SAFETY: sync takes no arguments and only flushes dirty data.
        unsafe { libc::sync() };
        let path = dir.join(format!("disk-probe-{}", nanos_now()));
        let t0 = Instant::now();
        let mut f = marathon_storage::direct::DirectFile::create(&path)
            .with_context(|| format!("create {}", path.display()))?;
        for at in (0..bytes).step_by(BLOCK) {
            f.write_all(&block[..BLOCK.min(bytes - at)])?;
        }
        f.finish()?;
        std::fs::File::open(&path)?.sync_all()?;
        let direct_write_gbs = gbs(t0);
        std::fs::remove_file(&path)?;
        let t0 = Instant::now();
        {
            let mut f = std::fs::File::create(&path)?;
            for at in (0..bytes).step_by(BLOCK) {
                f.write_all(&block[..BLOCK.min(bytes - at)])?;
            }
            f.sync_all()?;
        }
        let buffered_write_gbs = gbs(t0);
        std::fs::remove_file(&path)?;
        Ok(Disk {
            direct_write_gbs,
            buffered_write_gbs,
        })
    }

    /// The faster of the two writes: the bar a persist is held to.
    fn write_gbs(&self) -> f64 {
        self.direct_write_gbs.max(self.buffered_write_gbs)
    }
}

/// Reads `path` whole around the page cache, `block` bytes at a time; false where the
/// filesystem refuses direct I/O.
fn read_direct(path: &Path, block: usize) -> Result<bool> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    let open = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let file = match open {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        f => f.with_context(|| format!("open {} for direct reads", path.display()))?,
    };
    let mut buf = vec![0u8; block + ALIGN];
    let skip = buf.as_ptr().align_offset(ALIGN);
    let buf = &mut buf[skip..skip + block];
    let mut at = 0u64;
    loop {
        let n = file.read_at(buf, at)?;
        at += n as u64;
        // A short read ended at the end of the file.
        if n < block {
            return Ok(true);
        }
    }
}

/// Reads `path` whole through the page cache, `block` bytes at a time, sequentially.
fn read_sequential(path: &Path, block: usize) -> Result<bool> {
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    let mut file = std::fs::File::open(path)?;
    // SAFETY: fadvise on a descriptor this function owns, with no pointers passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut buf = vec![0u8; block];
    while file.read(&mut buf)? > 0 {}
    Ok(true)
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_under(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

fn median(x: &mut [f64]) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
