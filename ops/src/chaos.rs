//! `marathon chaos`: failure-injection scenarios against real processes (`run`, `soak`), and
//! the simulation of the coordination protocol (`sim`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use marathon_chaos::report::Report;
use marathon_chaos::run::{run, Outcome, RunOptions};
use marathon_chaos::scenario::Scenario;
use marathon_chaos::sim::{self, SimConfig};

#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Run the scenario of one seed: its layout, model, steps and faults are drawn from the
    /// seed, so the same seed replays the same schedule. Exits non-zero when an invariant is
    /// broken, naming it.
    Run {
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run scenarios of successive seeds until the duration is up (the scenario in flight
    /// finishes), then print the report.
    Soak {
        /// How long: 30m, 2h, 90s.
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// The first seed; the next scenarios take the seeds after it.
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run the coordination protocol under simulation for a range of seeds.
    Sim {
        /// Seeds 1 to this.
        #[arg(long, default_value_t = 2000)]
        seeds: u64,
        /// One seed only.
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Run each node's agent itself (its loop, leases, watches, cooldowns) on the
        /// simulated clock, rather than its membership core alone.
        #[arg(long)]
        agents: bool,
    },
    /// Print the scenario a seed draws, without running it.
    Show {
        #[arg(long)]
        seed: u64,
    },
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Keep each scenario's directory (configuration, logs, servers' data) under this one.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// With --keep, keep only the directories of scenarios that failed (a soak's passing
    /// scenarios take about half a gigabyte each).
    #[arg(long, requires = "keep")]
    keep_failed: bool,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as an HTML page with plots here too; with --keep it is written to
    /// chaos-report.html in that directory unless this names another place.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Train on this text file instead of one drawn from the seed.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// A job with no step committed for this many seconds has failed.
    #[arg(long, default_value_t = 120)]
    stall_s: u64,
    /// Print only the report.
    #[arg(long)]
    quiet: bool,
    /// Run every node on loopback, without network namespaces (which need root); network
    /// faults are then not injected.
    #[arg(long)]
    loopback: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s}: write a duration as a number and a unit: 90s, 30m, 2h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

pub fn run_command(command: ChaosCommand) -> Result<()> {
    match command {
        ChaosCommand::Run { seed, common } => scenarios(&common, |i| (i == 0).then_some(seed)),
        ChaosCommand::Soak {
            duration,
            first_seed,
            common,
        } => {
            let until = Instant::now() + duration;
            eprintln!(
                "chaos soak: scenarios from seed {first_seed} for {}",
                humanize(duration)
            );
            scenarios(&common, |i| {
                (Instant::now() < until).then_some(first_seed + i as u64)
            })
        }
        ChaosCommand::Sim {
            seeds,
            seed,
            agents: false,
        } => simulate(seed.map_or(1..=seeds, |s| s..=s), |seed| {
            sim::run(seed, &SimConfig::default())
        }),
        ChaosCommand::Sim {
            seeds,
            seed,
            agents: true,
        } => simulate(seed.map_or(1..=seeds, |s| s..=s), |seed| {
            marathon_chaos::agents::run(seed, &Default::default()).report
        }),
        ChaosCommand::Show { seed } => {
            let s = Scenario::from_seed(seed);
            println!("seed {seed}: {}", s.shape());
            for t in &s.faults {
                println!("  {t}");
            }
            Ok(())
        }
    }
}

/// Scenarios in a row that could not be set up before a soak stops.
const SETUP_FAILURES_MAX: usize = 3;

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s >= 60 && s % 60 == 0 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Runs the scenarios `next` gives (the i-th seed, or `None` to stop), prints the report, and
/// fails when any scenario broke an invariant. Ctrl-C stops after cleaning up the scenario in
/// flight.
fn scenarios(common: &CommonArgs, next: impl Fn(usize) -> Option<u64>) -> Result<()> {
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let interrupted = on_interrupt()?;
    let opts = RunOptions {
        exe,
        interrupted: interrupted.clone(),
        keep_in: common.keep.clone(),
        corpus: common.corpus.clone(),
        stall: Duration::from_secs(common.stall_s),
        verbose: !common.quiet,
        namespaces: !common.loopback,
    };
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut i = 0;
    let mut unset = 0;
    while let Some(seed) = next(i) {
        if interrupted.load(Ordering::Relaxed) {
            eprintln!("chaos: interrupted; reporting the scenarios that finished");
            break;
        }
        // A scenario that could not be set up fails; a soak goes on with the next, unless
        // the machine cannot set up any (a server missing).
        let mut o = match run(seed, &opts) {
            Ok(o) => {
                unset = 0;
                o
            }
            Err(e) => {
                unset += 1;
                Outcome::not_set_up(seed, format!("setting up the scenario: {e:#}"))
            }
        };
        if let (true, true, Some(dir)) = (o.ok, common.keep_failed, &o.dir) {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("chaos: could not remove {dir}: {e}");
            }
            o.dir = None;
        }
        eprintln!(
            "chaos: seed {seed}: {} in {:.0} s{}",
            if o.ok { "ok" } else { "FAILED" },
            o.wall_s,
            o.violations
                .iter()
                .map(|v| format!("\n  - {v}"))
                .collect::<String>()
        );
        outcomes.push(o);
        i += 1;
        if unset == SETUP_FAILURES_MAX {
            eprintln!("chaos: {unset} scenarios in a row could not be set up; stopping");
            break;
        }
    }
    let report = Report::new(outcomes, started.elapsed().as_secs_f64());
    print!("{}", report.table());
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write the report to {}", path.display()))?;
    }
    let html =
        (common.html.clone()).or_else(|| Some(common.keep.as_ref()?.join("chaos-report.html")));
    if let Some(path) = html {
        report.write_html(&path)?;
        eprintln!("chaos: report written to {}", path.display());
    }
    if !report.failed.is_empty() {
        bail!(
            "invariants broken in the scenarios of seeds {:?}; replay one with `marathon chaos \
             run --seed <seed> --keep <dir>`",
            report.failed
        );
    }
    Ok(())
}

/// A flag raised by Ctrl-C or SIGTERM. The processes a scenario started share this one's
/// process group, so Ctrl-C reaches them as well; the scenario then fails fast, and its
/// cleanup stops whatever is left.
fn on_interrupt() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        f.store(true, Ordering::Relaxed);
        eprintln!("chaos: interrupted; stopping after the scenario in flight is cleaned up");
    });
    Ok(flag)
}

fn simulate(seeds: std::ops::RangeInclusive<u64>, run: impl Fn(u64) -> sim::Report) -> Result<()> {
    let sweep = sim::Sweep::run(seeds, run);
    for (seed, broke) in &sweep.failed {
        println!("seed {seed}: FAILED");
        for v in broke {
            println!("  - {v}");
        }
    }
    println!("{sweep}");
    if !sweep.failed.is_empty() {
        let failed: Vec<u64> = sweep.failed.iter().map(|(s, _)| *s).collect();
        bail!("the protocol's invariants broke in seeds {failed:?}; replay one with --seed");
    }
    Ok(())
}
