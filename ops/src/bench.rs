//! `marathon bench train`: how fast a training step runs, and how close that is to the speed
//! the GEMM library reaches on the step's largest matrix product on this machine.
//! `marathon bench comm`: all-reduce bus bandwidth of the TCP process groups beside this
//! machine's memcpy bandwidth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use marathon_elastic::Topology;
use marathon_model::cost::flops_per_token;
use marathon_model::ParamLayout;
use marathon_runtime::comm::{GroupSpec, ProcessGroup};
use marathon_runtime::trainer::StepRecord;
use marathon_runtime::{Groups, TrainConfig, Trainer};

#[derive(Debug, Args)]
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
    /// Tensor-parallel size. Every rank runs as a thread of this process sharing its cores,
    /// with real TCP process groups.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data-parallel replicas.
    #[arg(long, default_value_t = 1)]
    dp: usize,
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
    cfg.parallel.tp = args.tp;
    cfg.parallel.pp = args.pp;
    cfg.parallel.dp = args.dp;
    cfg.batch.rampup = None;
    cfg.train.steps = args.warmup + args.steps;
    cfg.train.eval_every_steps = 0;
    cfg.train.metrics = None;
    cfg.validate().map_err(|e| cfg.error(e))?;
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

/// Runs `warmup` untimed steps and returns the records of `steps` timed ones.
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
