//! `marathon bench train`: how fast a training step runs, and how close that is to the speed
//! the GEMM library reaches on the step's largest matrix product on this machine; on the GPU,
//! the layout's tokens/s and the host-staged transport beside the bus; with `--metrics`, what
//! serving live metrics costs a step.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use marathon_model::cost::flops_per_token;
use marathon_model::ParamLayout;
use marathon_runtime::comm::GroupSpec;
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
    /// sharing its cores, with real process groups.
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

pub fn run(args: TrainArgs) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps: must be at least 1 timed step");
    let cfg = configure(&args)?;
    if args.metrics {
        anyhow::ensure!(
            cfg.parallel.world_size() == 1,
            "--metrics: measured on one rank; drop --tp, --pp and --dp"
        );
        return metrics_overhead(&cfg, args.warmup, args.steps);
    }
    let world = cfg.parallel.world_size();
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
    let times = Times::of(&ranks);
    let (b, t) = (cfg.batch.global_batch, cfg.batch.seq_len);
    let step_gflops = flops_per_token(&cfg.model, t) * (b * t) as f64 / 1e9;
    if cfg.train.device == marathon_runtime::device::Device::Cuda {
        let shares = [times.wait, times.overlapped, times.tp_comm];
        return report_gpu(&cfg, &ranks, times.mean_ms, step_gflops, shares);
    }
    report_cpu(&cfg, &times, step_gflops, threads);
    Ok(())
}

/// The configuration timed: the file's, with the flags' batch, layout and device, no rampup,
/// evaluation or metrics, and the warm-up and timed steps.
fn configure(args: &TrainArgs) -> Result<TrainConfig> {
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
    cfg.validate().map_err(|e| cfg.error(e))?;
    Ok(cfg)
}

/// What the timed steps took. Every rank ends a step at the same collective, so rank 0's step
/// time is the job's; the communication and pipeline figures are means over ranks, as
/// fractions of the step.
#[derive(Debug, Clone, Copy)]
struct Times {
    mean_ms: f64,
    min_ms: f64,
    /// Waiting in the step's closing collectives.
    wait: f64,
    /// Data-parallel reduction overlapped with backward.
    overlapped: f64,
    /// Tensor-parallel collectives.
    tp_comm: f64,
    /// Waiting on neighbouring pipeline stages.
    bubble: f64,
}

impl Times {
    fn of(ranks: &[Vec<StepRecord>]) -> Times {
        let n = (ranks.len() * ranks[0].len()) as f64;
        let mean_all = |f: fn(&StepRecord) -> f64| ranks.iter().flatten().map(f).sum::<f64>() / n;
        let records = &ranks[0];
        let step_all = mean_all(|r| r.step_ms);
        let frac = |f: fn(&StepRecord) -> f64| mean_all(f) / step_all;
        Times {
            mean_ms: records.iter().map(|r| r.step_ms).sum::<f64>() / records.len() as f64,
            min_ms: records
                .iter()
                .map(|r| r.step_ms)
                .fold(f64::INFINITY, f64::min),
            wait: frac(|r| r.comm_wait_ms),
            overlapped: frac(|r| r.comm_overlapped_ms),
            tp_comm: frac(|r| r.tp_comm_ms),
            bubble: frac(|r| r.pipeline_wait_ms),
        }
    }
}

/// The CPU step beside the GEMM library's speed on the step's largest matrix product, as
/// lines and then one JSON object.
fn report_cpu(cfg: &TrainConfig, times: &Times, step_gflops: f64, threads: usize) {
    let (b, t) = (cfg.batch.global_batch, cfg.batch.seq_len);
    let p = cfg.parallel;
    let Times {
        mean_ms,
        min_ms,
        wait,
        overlapped,
        tp_comm,
        bubble,
    } = *times;
    // 1F1B's idle share with m microbatches per replica and p stages: (p - 1) / (m + p - 1).
    let m_per_replica = (b / cfg.batch.micro_batch).div_ceil(p.dp) as f64;
    let ideal_bubble = (p.pp as f64 - 1.0) / (m_per_replica + p.pp as f64 - 1.0);
    let tokens = (b * t) as f64;
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
    let shard = p.place(0).shard();
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
/// `threads` compute threads and real process groups; returns each rank's timed records,
/// in rank order.
fn run_ranks(
    cfg: &TrainConfig,
    warmup: u64,
    steps: u64,
    threads: usize,
) -> Result<Vec<Vec<StepRecord>>> {
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let layout = cfg.parallel;
    let ranks: Vec<_> = (0..layout.world_size())
        .map(|rank| {
            let (coord, cfg) = (coord.clone(), cfg.clone());
            std::thread::spawn(move || -> Result<Vec<StepRecord>> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let template = GroupSpec::loopback("bench", "", 0, 1, Duration::from_secs(600));
                let groups = Groups::connect(&*coord, layout.place(rank), &template)?;
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
