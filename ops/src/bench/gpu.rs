//! `marathon bench gpu`: every GPU check and the GPU bench in one run
//! ([`marathon_runtime::selftest`]), ending with a short table (`scripts/gpu-check.sh` builds
//! marathon and runs it). Progress goes to stderr, the tables to stdout.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use marathon_runtime::selftest::{self, Bench, Check, Options, Progress};

#[derive(Debug, Args)]
pub struct GpuArgs {
    /// The model to time.
    #[arg(long, default_value = "configs/gpt2-124m.toml")]
    config: PathBuf,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Timed steps (after three untimed ones).
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Text to train the equivalence check on (files or folders of .md/.txt).
    #[arg(long = "corpus", default_values = ["README.md", "ARCHITECTURE.md", "docs"])]
    corpus: Vec<PathBuf>,
    /// Skip the bench, run the checks only.
    #[arg(long)]
    checks_only: bool,
    /// Write every figure here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: GpuArgs) -> Result<()> {
    let options = Options {
        config: args.config,
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        corpus: args.corpus,
        checks_only: args.checks_only,
    };
    // The layouts run as `marathon train` worker processes of this very binary.
    let exe = std::env::current_exe().context("finding the marathon binary")?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let report = selftest::run(&options, &exe, dir.path(), &mut show)?;
    if let Some(path) = &args.json {
        let v = serde_json::json!({ "checks": &report.checks, "bench": &report.bench });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!();
    println!("| check | precision | error | tolerance | result |");
    println!("|---|---|---|---|---|");
    for c in &report.checks {
        println!(
            "| {} | {} | {:.2e} | {:.0e} | {} |",
            c.name,
            c.precision,
            c.error,
            c.tolerance,
            verdict(c)
        );
    }
    if let Some(b) = &report.bench {
        println!();
        print_bench(b);
    }
    let failed: Vec<_> = report
        .checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| &c.name)
        .collect();
    if !failed.is_empty() {
        bail!("{} GPU checks failed: {failed:?}", failed.len());
    }
    Ok(())
}

/// Writes what the checks report on the way to stderr, notes indented under the device line.
fn show(p: Progress<'_>) {
    match p {
        Progress::Device(name) => eprintln!("device: {name}"),
        Progress::Kernel(c) => eprintln!(
            "  {:<34} {:<5} error {:.2e} (tolerance {:.0e}) {}",
            c.name,
            c.precision,
            c.error,
            c.tolerance,
            verdict(c)
        ),
        Progress::Note(line) => eprintln!("  {line}"),
        Progress::Detail(line) => eprintln!("    {line}"),
    }
}

fn verdict(c: &Check) -> &'static str {
    if c.passed() {
        "ok"
    } else {
        "FAILED"
    }
}

fn print_bench(b: &Bench) {
    println!(
        "| GPT-2 124M on {}, batch {} x {} | value |",
        b.device, b.batch, b.seq
    );
    println!("|---|---|");
    println!("| ms/step (median) | {:.1} |", b.ms_per_step);
    println!("| tokens/s | {:.0} |", b.tokens_per_s);
    println!("| TFLOP/s (6 N + attention) | {:.0} |", b.tflops);
    println!(
        "| model FLOP utilisation (of 989 TFLOP/s dense bf16) | {:.1}% |",
        100.0 * b.mfu
    );
    println!(
        "| snapshot: {:.2} GB, training stalled | {:.2} ms |",
        b.snapshot_bytes as f64 / 1e9,
        b.snapshot_stall_ms
    );
    println!(
        "| step running beside the snapshot copy | {:.1} ms |",
        b.step_after_snapshot_ms
    );
    println!(
        "| pinned device-to-host copy of the same bytes | {:.1} ms ({:.1} GB/s) |",
        b.pinned_d2h_ms, b.pinned_d2h_gbs
    );
}
