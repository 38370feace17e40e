//! `marathon bench train`: how fast a training step runs, and how close that is to the speed
//! the GEMM library reaches on the step's largest matrix product on this machine.
//! `marathon bench comm`: all-reduce bus bandwidth of the TCP process groups beside this
//! machine's memcpy bandwidth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use marathon_elastic::Topology;
use marathon_model::cost::flops_per_token;
use marathon_model::ParamLayout;
use marathon_runtime::comm::{GroupSpec, ProcessGroup};
use marathon_runtime::metrics::RankEndpoint;
use marathon_runtime::records::StepRecord;
use marathon_runtime::trainer::Observer;
use marathon_runtime::{Groups, TrainConfig, Trainer};
use std::sync::Arc;

use crate::flags::LayoutFlags;

#[derive(Debug, Args)]
#[command(mut_arg("tp", |a| a.default_value("1")), mut_arg("pp", |a| a.default_value("1")),
          mut_arg("dp", |a| a.default_value("1")))]
pub struct TrainArgs {
    #[arg(long)]
    config: PathBuf,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Untimed steps first (allocation, page faults, caches).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Sequences per step (sets batch.micro_batch and batch.global_batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence (sets batch.seq_len).
    #[arg(long)]
    seq: Option<usize>,
    /// Sequences per step when they are split into several microbatches of --batch
    /// (sets batch.global_batch).
    #[arg(long)]
    global_batch: Option<usize>,
    /// The layout timed (1 x 1 x 1 unless given). Every rank runs as a thread of this process
    /// sharing its cores, with real TCP process groups.
    #[command(flatten)]
    layout: LayoutFlags,
    /// Where the model computes: `cpu`, or `cuda` (ranks share this machine's GPUs
    /// round-robin, with the host-staged transport between them).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Instead: the cost of `--metrics-addr`, two identical one-process trainers stepping in
    /// turn, one serving its metrics to a scraper that reads them every 100 ms.
    #[arg(long)]
    metrics: bool,
}

pub fn train(args: TrainArgs) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps: must be at least 1 timed step");
    let mut cfg = TrainConfig::load(&args.config)?;
    if let Some(b) = args.batch {
        cfg.batch.micro_batch = b;
        cfg.batch.global_batch = b;
    }
    if let Some(s) = args.seq {
        cfg.batch.seq_len = s;
    }
    if let Some(g) = args.global_batch {
        cfg.batch.global_batch = g;
    }
    cfg.parallel = args.layout.over(cfg.parallel);
    cfg.batch.rampup = None;
    cfg.train.steps = args.warmup + args.steps;
    cfg.train.eval_every_steps = 0;
    cfg.train.metrics = None;
    cfg.train.device = args.device.parse().map_err(anyhow::Error::msg)?;
    let on_gpu = cfg.train.device == marathon_runtime::device::Device::Cuda;
    cfg.validate().map_err(|e| cfg.error(e))?;
    if args.metrics {
        anyhow::ensure!(
            cfg.parallel.world_size() == 1,
            "--metrics: measured on one rank; drop --tp, --pp and --dp"
        );
        return metrics_overhead(&cfg, args.warmup, args.steps);
    }
    let (b, t) = (cfg.batch.global_batch, cfg.batch.seq_len);
    let p = cfg.parallel;
    let world = p.world_size();
    let threads = rayon::current_num_threads();
    let ranks = if world == 1 {
        vec![run_steps(
            Trainer::new(cfg.clone())?,
            args.warmup,
            args.steps,
        )?]
    } else {
        run_ranks(&cfg, args.warmup, args.steps, (threads / world).max(1))?
    };
    // Every rank ends a step at the same collective, so rank 0's step time is the job's; the
    // communication and pipeline figures are means over ranks, as fractions of the step.
    let n = (ranks.len() * ranks[0].len()) as f64;
    let mean_all = |f: fn(&StepRecord) -> f64| ranks.iter().flatten().map(f).sum::<f64>() / n;
    let records = &ranks[0];
    let mean_ms = records.iter().map(|r| r.step_ms).sum::<f64>() / records.len() as f64;
    let min_ms = records
        .iter()
        .map(|r| r.step_ms)
        .fold(f64::INFINITY, f64::min);
    let step_all = mean_all(|r| r.step_ms);
    let frac = |f: fn(&StepRecord) -> f64| mean_all(f) / step_all;
    let (wait, overlapped, tp_comm, bubble) = (
        frac(|r| r.comm_wait_ms),
        frac(|r| r.comm_overlapped_ms),
        frac(|r| r.tp_comm_ms),
        frac(|r| r.pipeline_wait_ms),
    );
    // 1F1B's idle share with m microbatches per replica and p stages: (p - 1) / (m + p - 1).
    let m_per_replica = (b / cfg.batch.micro_batch).div_ceil(p.dp) as f64;
    let ideal_bubble = (p.pp as f64 - 1.0) / (m_per_replica + p.pp as f64 - 1.0);
    let tokens = (b * t) as f64;
    let step_gflops = flops_per_token(&cfg.model, t) * tokens / 1e9;
    let achieved = step_gflops / (mean_ms / 1e3);
    if on_gpu {
        return report_gpu(
            &cfg,
            &ranks,
            mean_ms,
            step_gflops,
            [wait, overlapped, tp_comm],
        );
    }
    // The largest matrix product of the step is the tied output head: (B*T, C) x (C, Vp).
    let (m, k, n) = (
        cfg.batch.micro_batch * t,
        cfg.model.n_embd,
        cfg.model.padded_vocab_size(),
    );
    let limit = gemm_gflops(m, k, n);
    let report = serde_json::json!({
        "impl": "marathon-cpu-fp32",
        "threads": threads,
        "tp": p.tp,
        "pp": p.pp,
        "dp": p.dp,
        "batch": b,
        "micro_batch": cfg.batch.micro_batch,
        "seq": t,
        "params": ParamLayout::new(&cfg.model).numel(),
        "ms_per_step": mean_ms,
        "ms_per_step_min": min_ms,
        "tokens_per_s": tokens / (mean_ms / 1e3),
        "gflop_per_step": step_gflops,
        "achieved_gflops": achieved,
        "gemm_shape": [m, k, n],
        "gemm_gflops": limit,
        "fraction_of_gemm_limit": achieved / limit,
        "comm_wait_fraction": wait,
        "comm_overlapped_fraction": overlapped,
        "tp_comm_fraction": tp_comm,
        "pipeline_bubble_fraction": bubble,
        "pipeline_bubble_ideal": ideal_bubble,
    });
    println!(
        "bench train: {} layers, hidden {}, batch {b} x seq {t}, tp {} x pp {} x dp {}, {threads} threads\n  \
         {mean_ms:.1} ms/step (min {min_ms:.1}), {:.0} tokens/s, {achieved:.1} GFLOP/s achieved\n  \
         GEMM limit {limit:.1} GFLOP/s on ({m} x {k}) @ ({k} x {n}): the step runs at {:.0}% of it\n  \
         communication: tensor-parallel {:.1}% of the step; {:.1}% waiting in the step's closing \
         collectives (gradient sums, norm, gather; includes waiting for slower stages), {:.1}% \
         overlapped with backward\n  \
         pipeline: {:.1}% of the step waiting on neighbouring stages (1F1B's bubble alone would be {:.1}%)",
        cfg.model.n_layer,
        cfg.model.n_embd,
        p.tp,
        p.pp,
        p.dp,
        tokens / (mean_ms / 1e3),
        100.0 * achieved / limit,
        100.0 * tp_comm,
        100.0 * wait,
        100.0 * overlapped,
        100.0 * bubble,
        100.0 * ideal_bubble,
    );
    println!("{report}");
    Ok(())
}

/// `bench train --device cuda`: tokens/s of the layout on this GPU, the share of the step in
/// collectives, and the host-staged transport's all-reduce bandwidth beside this GPU's pinned
/// device-to-host bandwidth, measured here and now on the gradient buffer's size.
#[cfg(feature = "cuda")]
fn report_gpu(
    cfg: &TrainConfig,
    ranks: &[Vec<StepRecord>],
    mean_ms: f64,
    step_gflops: f64,
    [wait, overlapped, tp_comm]: [f64; 3],
) -> Result<()> {
    let p = cfg.parallel;
    let (b, t) = (cfg.batch.global_batch, cfg.batch.seq_len);
    let tokens = (b * t) as f64;
    let bubble = {
        let n = (ranks.len() * ranks[0].len()) as f64;
        let step: f64 = ranks.iter().flatten().map(|r| r.step_ms).sum::<f64>() / n;
        ranks
            .iter()
            .flatten()
            .map(|r| r.pipeline_wait_ms)
            .sum::<f64>()
            / n
            / step
    };
    // The largest buffer a rank all-reduces: its gradients.
    let shard = marathon_model::Shard {
        tp: p.tp,
        tp_rank: 0,
        pp: p.pp,
        stage: 0,
    };
    let bytes = 4 * ParamLayout::sharded(&cfg.model, shard).numel();
    let world = p.world_size().max(2);
    let staged = marathon_runtime::selftest::staged_allreduce(world, bytes)?;
    let device = marathon_model::cuda::Gpu::new(0)?.name().to_string();
    let report = serde_json::json!({
        "impl": "marathon-cuda-bf16",
        "device": device,
        "tp": p.tp,
        "pp": p.pp,
        "dp": p.dp,
        "batch": b,
        "micro_batch": cfg.batch.micro_batch,
        "seq": t,
        "ms_per_step": mean_ms,
        "tokens_per_s": tokens / (mean_ms / 1e3),
        "tflops": step_gflops / (mean_ms / 1e3) / 1e3,
        "comm_wait_fraction": wait,
        "comm_overlapped_fraction": overlapped,
        "tp_comm_fraction": tp_comm,
        "pipeline_wait_fraction": bubble,
        "staged_allreduce": staged,
    });
    println!(
        "bench train (cuda, {device}): {} layers, hidden {}, batch {b} x seq {t}, tp {} x pp {} \
         x dp {}\n  {mean_ms:.1} ms/step, {:.0} tokens/s\n  collectives: tensor-parallel {:.1}% \
         of the step, closing collectives {:.1}%, pipeline waits {:.1}%\n  host-staged \
         all-reduce of {:.1} MB across {world} ranks on this GPU: {:.2} GB/s bus bandwidth; \
         pinned device-to-host copy of the same bytes: {:.1} GB/s",
        cfg.model.n_layer,
        cfg.model.n_embd,
        p.tp,
        p.pp,
        p.dp,
        tokens / (mean_ms / 1e3),
        100.0 * tp_comm,
        100.0 * wait,
        100.0 * bubble,
        bytes as f64 / 1e6,
        staged.bus_gbs,
        staged.d2h_gbs,
    );
    println!("{report}");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn report_gpu(
    _cfg: &TrainConfig,
    _ranks: &[Vec<StepRecord>],
    _mean_ms: f64,
    _step_gflops: f64,
    _fractions: [f64; 3],
) -> Result<()> {
    unreachable!("a build without CUDA cannot train on a GPU")
}

/// Runs `warmup` untimed steps and returns the records of `steps` timed ones.
/// `bench train --metrics`: two identical trainers step in turn, one reporting every step to
/// a metrics endpoint that a scraper reads every 100 ms (Prometheus's default is every 15 s),
/// the other to nothing; prints the mean step time of each and their ratio.
fn metrics_overhead(cfg: &TrainConfig, warmup: u64, steps: u64) -> Result<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Nothing;
    impl Observer for Nothing {}
    let mut cfg = cfg.clone();
    cfg.checkpoint = None;
    let mut plain = Trainer::new(cfg.clone())?;
    let mut served = Trainer::new(cfg.clone())?;
    let live = RankEndpoint::serve("127.0.0.1:0".parse()?)?;
    served.set_live_metrics(live.rank.clone());
    served.set_job_metrics(live.job.clone());
    let (addr, stop) = (live.endpoint.addr(), Arc::new(AtomicBool::new(false)));
    let halt = stop.clone();
    let scraper = std::thread::spawn(move || -> Result<(u64, usize)> {
        let (mut scrapes, mut bytes) = (0, 0);
        while !halt.load(Ordering::SeqCst) {
            let mut c = std::net::TcpStream::connect(addr)?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            let mut answer = String::new();
            c.read_to_string(&mut answer)?;
            anyhow::ensure!(
                answer.contains("marathon_step "),
                "a scrape without marathon_step"
            );
            (scrapes, bytes) = (scrapes + 1, answer.len());
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((scrapes, bytes))
    });
    let mut goodput = Default::default();
    for _ in 0..warmup {
        plain.advance(&mut Nothing, &mut goodput)?;
        served.advance(&mut Nothing, &mut goodput)?;
    }
    let (mut without, mut with) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..steps {
        let t0 = Instant::now();
        plain.advance(&mut Nothing, &mut goodput)?;
        let t1 = Instant::now();
        served.advance(&mut Nothing, &mut goodput)?;
        (without, with) = (without + (t1 - t0), with + t1.elapsed());
    }
    stop.store(true, Ordering::SeqCst);
    let (scrapes, bytes) = scraper.join().expect("the scraper does not panic")?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
    let (a, b) = (ms(without), ms(with));
    println!(
        "bench train --metrics: {} layers, hidden {}, batch {} x seq {}, {steps} steps each in \
         turn\n  without an endpoint {a:.2} ms/step; with one, scraped {scrapes} times \
         ({bytes} bytes each) {b:.2} ms/step: {:.3}x",
        cfg.model.n_layer,
        cfg.model.n_embd,
        cfg.batch.global_batch,
        cfg.batch.seq_len,
        b / a
    );
    let report = serde_json::json!({
        "ms_per_step_without": a,
        "ms_per_step_with": b,
        "ratio": b / a,
        "scrapes": scrapes,
        "scrape_bytes": bytes,
        "steps": steps,
    });
    println!("{report}");
    Ok(())
}

fn run_steps(mut trainer: Trainer, warmup: u64, steps: u64) -> Result<Vec<StepRecord>> {
    for _ in 0..warmup {
        trainer.train_step()?;
    }
    (0..steps).map(|_| Ok(trainer.train_step()?)).collect()
}

/// Runs every rank of `cfg`'s layout on a thread of this process, each with its own pool of
/// `threads` compute threads and real TCP process groups; returns each rank's timed records,
/// in rank order.
fn run_ranks(
    cfg: &TrainConfig,
    warmup: u64,
    steps: u64,
    threads: usize,
) -> Result<Vec<Vec<StepRecord>>> {
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let p = cfg.parallel;
    let topology = Topology::new(p.tp, p.pp, p.dp);
    let ranks: Vec<_> = (0..topology.world_size())
        .map(|rank| {
            let (coord, cfg) = (coord.clone(), cfg.clone());
            std::thread::spawn(move || -> Result<Vec<StepRecord>> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let template = GroupSpec::loopback("bench", "", 0, 1, Duration::from_secs(600));
                let groups = Groups::connect(&*coord, topology, rank, &template)?;
                pool.install(|| run_steps(Trainer::with_groups(cfg, groups)?, warmup, steps))
            })
        })
        .collect();
    ranks
        .into_iter()
        .map(|r| {
            r.join()
                .map_err(|_| anyhow::anyhow!("a benchmark rank panicked"))?
        })
        .collect()
}

/// GFLOP/s of the GEMM library on `(m, k) @ (k, n)` in f32 with all threads, best of several runs.
fn gemm_gflops(m: usize, k: usize, n: usize) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        // SAFETY: a, b, c are exactly (m, k), (k, n) and (m, n), row-major, and distinct.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (m * k * n) as f64 / best / 1e9
}

#[derive(Debug, Args)]
pub struct CommArgs {
    /// Group sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8])]
    ranks: Vec<usize>,
    /// Smallest message, in KiB.
    #[arg(long, default_value_t = 1)]
    min_kib: usize,
    /// Largest message, in MiB.
    #[arg(long, default_value_t = 256)]
    max_mib: usize,
}

/// Bytes each timed size moves at least, so small messages are timed over many operations.
const COMM_BYTES_PER_SIZE: usize = 256 << 20;

pub fn comm(args: CommArgs) -> Result<()> {
    anyhow::ensure!(
        args.ranks.iter().all(|&p| p >= 2),
        "--ranks: every group needs at least 2 ranks"
    );
    anyhow::ensure!(
        args.min_kib >= 1 && args.min_kib * 1024 <= args.max_mib << 20,
        "--min-kib must be at least 1 and at most --max-mib"
    );
    let mut sizes = Vec::new();
    let mut size = args.min_kib << 10;
    while size <= args.max_mib << 20 {
        sizes.push(size);
        size *= 4;
    }
    let memcpy = memcpy_gbs(*sizes.last().expect("at least one size"));
    println!(
        "memcpy: {memcpy:.2} GB/s on {} MiB buffers",
        sizes.last().copied().unwrap_or(0) >> 20
    );
    println!("all-reduce over TCP on loopback, one thread per rank; bus bandwidth = bytes / time x 2 (p - 1) / p");
    println!(
        "{:>6} {:>12} {:>8} {:>12} {:>12} {:>10}",
        "ranks", "bytes", "iters", "time (us)", "busbw GB/s", "of memcpy"
    );
    for &p in &args.ranks {
        for row in allreduce_times(p, &sizes)? {
            let (bytes, iters, secs) = row;
            let busbw = bytes as f64 / secs * 2.0 * (p - 1) as f64 / p as f64 / 1e9;
            println!(
                "{p:>6} {bytes:>12} {iters:>8} {:>12.1} {busbw:>12.3} {:>9.1}%",
                secs * 1e6,
                100.0 * busbw / memcpy
            );
            let line = serde_json::json!({"ranks": p, "bytes": bytes, "iters": iters, "time_us": secs * 1e6, "busbw_gbs": busbw, "memcpy_gbs": memcpy, "fraction_of_memcpy": busbw / memcpy});
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// Mean seconds per all-reduce of each size on a group of `p` threads over loopback TCP.
fn allreduce_times(p: usize, sizes: &[usize]) -> Result<Vec<(usize, usize, f64)>> {
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let sizes = sizes.to_vec();
    let members: Vec<_> = (0..p)
        .map(|rank| {
            let (coord, sizes) = (coord.clone(), sizes.clone());
            std::thread::spawn(move || -> Result<Vec<(usize, usize, f64)>> {
                let spec = GroupSpec::loopback(
                    "bench",
                    &format!("allreduce-{p}"),
                    rank,
                    p,
                    Duration::from_secs(600),
                );
                let mut g = ProcessGroup::connect(&*coord, spec)?;
                let mut buf = vec![1.0f32; sizes.iter().max().copied().unwrap_or(0) / 4];
                let mut rows = Vec::new();
                for &bytes in &sizes {
                    let iters = (COMM_BYTES_PER_SIZE / bytes).clamp(2, 200);
                    let b = &mut buf[..bytes / 4];
                    g.all_reduce(b)?; // warm-up, and lines the members up
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        g.all_reduce(b)?;
                    }
                    rows.push((bytes, iters, t0.elapsed().as_secs_f64() / iters as f64));
                }
                Ok(rows)
            })
        })
        .collect();
    let mut results = Vec::new();
    for m in members {
        results.push(
            m.join()
                .map_err(|_| anyhow::anyhow!("a benchmark rank panicked"))??,
        );
    }
    // A collective ends when its slowest member does.
    let mut rows = results[0].clone();
    for r in &results[1..] {
        for (row, other) in rows.iter_mut().zip(r) {
            row.2 = row.2.max(other.2);
        }
    }
    Ok(rows)
}

/// GB/s of copying `bytes` between two buffers, best of several copies.
fn memcpy_gbs(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

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
pub fn ckpt(args: CkptArgs) -> Result<()> {
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
    let memcpy_ms = memcpy_time(state_bytes as usize) * 1e3;
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

/// Seconds a plain copy of `bytes` takes, best of three, after a first touch of both buffers.
fn memcpy_time(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    best
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
