//! `marathon bench train`: how fast a training step runs, and how close that is to the speed
//! the GEMM library reaches on the step's largest matrix product on this machine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use marathon_model::cost::flops_per_token;
use marathon_runtime::{TrainConfig, Trainer};

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
    cfg.batch.rampup = None;
    cfg.train.steps = args.warmup + args.steps;
    cfg.train.eval_every_steps = 0;
    cfg.train.metrics = None;
    cfg.validate().map_err(|e| cfg.error(e))?;
    let (b, t) = (cfg.batch.global_batch, cfg.batch.seq_len);
    let threads = rayon::current_num_threads();
    let mut trainer = Trainer::new(cfg.clone())?;
    for _ in 0..args.warmup {
        trainer.train_step()?;
    }
    let mut times = Vec::with_capacity(args.steps as usize);
    for _ in 0..args.steps {
        times.push(trainer.train_step()?.step_ms);
    }
    let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
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
        "batch": b,
        "seq": t,
        "params": trainer.model.layout.numel(),
        "ms_per_step": mean_ms,
        "ms_per_step_min": min_ms,
        "tokens_per_s": tokens / (mean_ms / 1e3),
        "gflop_per_step": step_gflops,
        "achieved_gflops": achieved,
        "gemm_shape": [m, k, n],
        "gemm_gflops": limit,
        "fraction_of_gemm_limit": achieved / limit,
    });
    println!(
        "bench train: {} layers, hidden {}, batch {b} x seq {t}, {threads} threads\n  \
         {mean_ms:.1} ms/step (min {min_ms:.1}), {:.0} tokens/s, {achieved:.1} GFLOP/s achieved\n  \
         GEMM limit {limit:.1} GFLOP/s on ({m} x {k}) @ ({k} x {n}): the step runs at {:.0}% of it",
        cfg.model.n_layer,
        cfg.model.n_embd,
        tokens / (mean_ms / 1e3),
        100.0 * achieved / limit
    );
    println!("{report}");
    Ok(())
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
