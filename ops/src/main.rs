//! `marathon`: the operator's command line.
//!
//! Parses arguments, draws progress and prints reports; everything it runs lives in the library
//! crates. Errors reach the user through `anyhow` with the file, field or step they concern.

mod bench;
mod chaos;
mod ckpt;
mod elastic;
mod flags;
mod job;
mod launch;
mod logs;
mod plan;
mod progress;
mod sample;
mod sim;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use marathon_runtime::data::{prepare, PrepareOptions};
use marathon_runtime::RuntimeError;

#[derive(Debug, Parser)]
#[command(
    name = "marathon",
    version,
    about = "Train GPT models with 3D parallelism, for weeks"
)]
struct Cli {
    /// How log lines are written: human (default) or json, one object per line. Workers and
    /// agents this process starts write the same. `RUST_LOG` filters them (`info` by default).
    #[arg(long, global = true, value_enum)]
    log_format: Option<logs::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model from a TOML configuration; a layout of several ranks starts one worker
    /// process per rank on this machine.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        layout: flags::TrainFlags,
        #[command(flatten)]
        etcd: elastic::TrainEtcdFlags,
        /// Serve live metrics for Prometheus at HOST:PORT (`/metrics`). A launch of several
        /// ranks serves rank r on PORT + r; with --etcd, agent i serves on
        /// PORT + i x (slots + 1) and its workers on the ports after it.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Run one node of an elastic job: register its slots in etcd, take part in planning, and
    /// run and supervise a worker process per slot through the job's generations.
    Agent(elastic::AgentArgs),
    /// One slot of a node that `marathon agent` runs.
    #[command(hide = true)]
    ElasticWorker(elastic::WorkerArgs),
    /// One rank of a job that `marathon train` launched.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        coord_dir: PathBuf,
        #[command(flatten)]
        layout: flags::TrainFlags,
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Text from a checkpoint, on the CPU: greedy, or sampled with a temperature and top-k.
    Sample(sample::SampleArgs),
    /// Corpus preparation.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Checkpoints: list, inspect, verify, collect.
    Ckpt {
        #[command(subcommand)]
        command: ckpt::CkptCommand,
    },
    /// Failure injection: scenarios of faults drawn from a seed against real processes (a
    /// three-member etcd cluster, a Garage store, agents and workers), checked for the
    /// invariants of an elastic job; and the simulation of the coordination protocol.
    Chaos {
        #[command(subcommand)]
        command: chaos::ChaosCommand,
    },
    /// Size a configuration's parallel layout (parameters, memory per rank, FLOPs per step),
    /// its checkpoints (bytes, stall, persist, interval) and its goodput at a failure rate under
    /// checkpoint-restart and under in-place recovery.
    Plan(plan::PlanArgs),
    /// A running elastic job, from its keys in etcd.
    Job {
        #[command(subcommand)]
        command: job::JobCommand,
    },
    /// Simulate a configuration's job over weeks: every agent's membership core and the planner
    /// against a simulated etcd, failures drawn from a seed and a published failure model, the
    /// time lost per cause and the effective training time ratio beside checkpoint-restart's.
    Sim(sim::SimArgs),
    /// Draw a run's report, one self-contained HTML page with SVG plots, from its metrics (a
    /// run writes it at its end too): losses, throughput, step time, goodput, checkpoints, and
    /// an elastic job's generations and faults.
    Report {
        /// The run's directory (its metrics.jsonl is read) or its metrics file.
        run: PathBuf,
        /// Where to write the page; by default beside the metrics (report.html).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Tokenize text (.txt, .md, ...) and JSON-lines (.jsonl, a "text" field per line) corpora
    /// with GPT-2 BPE into train.bin and val.bin.
    Prepare {
        /// Input files or directories (searched recursively); repeat for several.
        #[arg(long = "input", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of tokens held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logs::init(cli.log_format) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // A worker that failed because its group broke says so in its status, so the
            // launcher can name the worker that really failed.
            let peer_failure = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<RuntimeError>(),
                    Some(
                        RuntimeError::PeerLost { .. }
                            | RuntimeError::Aborted { .. }
                            | RuntimeError::CommTimeout { .. }
                    )
                )
            });
            if peer_failure {
                ExitCode::from(launch::EXIT_PEER_LOST as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            layout,
            etcd,
            metrics_addr,
        } if etcd.enabled() => elastic::train(&config, &layout, &etcd, metrics_addr),
        Command::Train {
            config,
            layout,
            metrics_addr,
            ..
        } => launch::train(&config, &layout, metrics_addr),
        Command::Agent(args) => elastic::agent(args),
        Command::ElasticWorker(args) => elastic::worker(args),
        Command::Worker {
            config,
            rank,
            coord_dir,
            layout,
            metrics_addr,
        } => launch::worker(&config, &layout, rank, &coord_dir, metrics_addr),
        Command::Data {
            command:
                DataCommand::Prepare {
                    inputs,
                    out,
                    val_fraction,
                },
        } => {
            let report = prepare(&PrepareOptions {
                inputs,
                out_dir: out,
                val_fraction,
            })?;
            let val = match &report.val_path {
                Some(p) => format!("{} validation tokens in {}", report.val_tokens, p.display()),
                None => "no validation split".to_string(),
            };
            println!(
                "prepared {} files, {} documents: {} training tokens in {}, {val}",
                report.files,
                report.docs,
                report.train_tokens,
                report.train_path.display(),
            );
            Ok(())
        }
        Command::Bench { command } => bench::run(command),
        Command::Ckpt { command } => ckpt::run(command),
        Command::Chaos { command } => chaos::run_command(command),
        Command::Sample(args) => sample::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Job { command } => job::run(command),
        Command::Sim(args) => sim::run(args),
        Command::Report { run, out } => report(&run, out),
    }
}

fn report(run: &Path, out: Option<PathBuf>) -> Result<()> {
    let metrics = if run.is_dir() {
        let m = run.join("metrics.jsonl");
        if !m.is_file() {
            bail!(
                "{}: no metrics.jsonl in this directory; name the run's metrics file (its \
                 configuration's train.metrics) instead",
                run.display()
            );
        }
        m
    } else {
        run.to_path_buf()
    };
    let out = out.unwrap_or_else(|| marathon_runtime::report::report_path(&metrics));
    let plots = marathon_runtime::report::write_run_report(&metrics, &out)?;
    println!("{}: report with {plots} plots", out.display());
    Ok(())
}
