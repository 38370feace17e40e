//! `marathon bench ckpt`: what a checkpoint costs: the training stall beside memcpy, persist
//! and load beside this disk's own sequential bandwidth, compression with and without the byte
//! shuffle.

use std::path::PathBuf;
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
    use marathon_runtime::config::{CheckpointConfig, Compression, Resume};
    use marathon_storage::codec::{encode, Codec};
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
    for (name, compression) in [
        ("none", Compression::None),
        ("zstd-shuffle", Compression::ZstdShuffle),
    ] {
        let root = base.join(format!("bench-{name}-{}", nanos_now()));
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
        let mut t = Trainer::new(cfg.clone())?;
        t.train_step()?;
        let (mut stalls, mut persists) = (Vec::new(), Vec::new());
        for k in 0..=args.checkpoints {
            t.seek(k + 1);
            let rec = t.checkpoint()?.expect("checkpointing is configured");
            let persist = t.wait_checkpoint()?.expect("a persist ran");
            state_bytes = rec.staged_bytes;
            // The first snapshot allocates the staging buffer; it is not timed.
            if k > 0 {
                stalls.push(rec.stall_ms);
                persists.push(persist.committed.unwrap_or(persist.upload).as_secs_f64());
            }
        }
        let stall = median(&mut stalls);
        let persist_s = median(&mut persists);
        let stored: u64 =
            dir_bytes(&root.join(marathon_storage::format::step_dir(args.checkpoints + 1)));
        // Load: read, decode and verify every chunk of the newest checkpoint.
        let reader = marathon_storage::Reader::new(marathon_storage::Store::open(
            &root.display().to_string(),
        )?);
        let m = reader.manifest(args.checkpoints + 1)?;
        let t0 = Instant::now();
        reader.verify(&m)?;
        let load_s = t0.elapsed().as_secs_f64();
        figures.insert(
            name.into(),
            serde_json::json!({
                "stall_ms": stall,
                "persist_s": persist_s,
                "persist_gbs": state_bytes as f64 / persist_s / 1e9,
                "stored_bytes": stored,
                "load_s": load_s,
                "load_gbs": state_bytes as f64 / load_s / 1e9,
            }),
        );
        lines.push(format!(
            "  {name:<13} stall {stall:.1} ms, persist {persist_s:.2} s ({:.2} GB/s), stored {:.1} MB, load and verify {load_s:.2} s ({:.2} GB/s)",
            state_bytes as f64 / persist_s / 1e9,
            stored as f64 / 1e6,
            state_bytes as f64 / load_s / 1e9,
        ));
        if name == "zstd-shuffle" {
            // Compression of each family, with and without the shuffle, one thread.
            let [params, m, v] = t.state();
            for (family, data) in [("params", params), ("adam_m", m), ("adam_v", v)] {
                let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                for codec in [Codec::Zstd, Codec::ZstdShuffle4] {
                    let (mut out, mut scratch, mut stored) = (Vec::new(), Vec::new(), 0usize);
                    let t0 = Instant::now();
                    for chunk in raw.chunks(4 << 20) {
                        encode(codec, args.level, chunk, &mut out, &mut scratch)?;
                        stored += out.len();
                    }
                    let secs = t0.elapsed().as_secs_f64();
                    let key = format!(
                        "{family}_{}",
                        if codec == Codec::Zstd {
                            "zstd"
                        } else {
                            "zstd_shuffle"
                        }
                    );
                    let ratio = raw.len() as f64 / stored as f64;
                    figures.insert(key.clone(), serde_json::json!({ "ratio": ratio, "mb_per_s": raw.len() as f64 / secs / 1e6 }));
                    lines.push(format!(
                        "  {key:<20} ratio {ratio:.3}, {:.0} MB/s on one thread",
                        raw.len() as f64 / secs / 1e6
                    ));
                }
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
        "load_over_disk_read_uncompressed": f("none", "load_gbs") / disk.direct_read_gbs,
        "codecs": figures,
    });
    println!(
        "bench ckpt: {} parameters with AdamW state, {:.1} MB per checkpoint\n  \
         memcpy of the same bytes {memcpy_ms:.1} ms\n  \
         the disk, measured first after a sync, in 8 MiB blocks: write {:.2} GB/s direct and \
         {:.2} GB/s through the page cache, each with fsync; cold read {:.2} GB/s direct\n{}\n  \
         stall {:.2}x memcpy; persist {:.2}x the disk's write uncompressed, {:.2}x compressed; \
         load and verify {:.2}x its cold read uncompressed",
        ParamLayout::new(&cfg.model).numel(),
        state_bytes as f64 / 1e6,
        disk.direct_write_gbs,
        disk.buffered_write_gbs,
        disk.direct_read_gbs,
        lines.join("\n"),
        report["stall_over_memcpy"].as_f64().unwrap_or(f64::NAN),
        report["persist_over_disk_uncompressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
        report["persist_over_disk_compressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
        report["load_over_disk_read_uncompressed"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    println!("{report}");
    Ok(())
}

/// This disk's sequential bandwidth for `bytes` in 8 MiB blocks, as a well-configured writer
/// would get it, measured before any checkpoint and after syncing what was dirty.
#[derive(Debug, serde::Serialize)]
struct Disk {
    /// Written around the page cache, then fsync'd.
    direct_write_gbs: f64,
    /// The same file read back around the page cache: the disk's cold read.
    direct_read_gbs: f64,
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
        let t0 = Instant::now();
        for at in (0..bytes).step_by(BLOCK) {
            let n = BLOCK.min(bytes - at);
            std::hint::black_box(marathon_storage::direct::read_range(&path, at as u64, n)?);
        }
        let direct_read_gbs = gbs(t0);
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
            direct_read_gbs,
            buffered_write_gbs,
        })
    }

    /// The faster of the two writes: the bar a persist is held to.
    fn write_gbs(&self) -> f64 {
        self.direct_write_gbs.max(self.buffered_write_gbs)
    }
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
