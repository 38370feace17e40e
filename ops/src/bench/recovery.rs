//! `marathon bench recovery`: what one worker's death costs an elastic job, beside the same job
//! recovering the way a fail-stop launcher does (stop every worker, start them all again, resume
//! from the newest checkpoint), measured in the same run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use marathon_chaos::process::Process;
use marathon_elastic::{Coordinator, EtcdCoordinator, JobKey, JobKeys};
use marathon_runtime::config::CheckpointConfig;
use marathon_runtime::records::{unix_ms, LostRecord, PlannedRecord, StepCommit};
use marathon_runtime::TrainConfig;

use crate::flags::LayoutFlags;

#[derive(Debug, Args)]
#[command(mut_arg("tp", |a| a.default_value("2")), mut_arg("pp", |a| a.default_value("1")),
          mut_arg("dp", |a| a.default_value("4")))]
pub struct RecoveryArgs {
    /// etcd endpoints for the elastic job, comma-separated.
    #[arg(long)]
    etcd: String,
    /// The job's configuration (its data, model and batch); steps, metrics and checkpoints
    /// are the bench's.
    #[arg(long)]
    config: PathBuf,
    /// The job's layout: one data-parallel replica per node, killed in the last node.
    #[command(flatten)]
    layout: LayoutFlags,
    /// Kill the worker once this many steps are committed.
    #[arg(long, default_value_t = 12)]
    kill_after: u64,
    /// The baseline's checkpoint interval, in steps.
    #[arg(long, default_value_t = 5)]
    ckpt_every: u64,
}

/// A child whose stderr lines are kept, each with when it arrived.
struct Watched {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    fn start(cmd: &mut Command) -> Result<Watched> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start marathon")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (l, stderr) = (lines.clone(), child.stderr.take().expect("piped"));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Watched { child, lines })
    }

    /// The pid in the first line starting with `prefix` and ending with "pid <n>".
    /// The process the first line starting with `prefix` names by its last word, held as soon
    /// as the line is seen (a pid learnt and signalled minutes later may be another's).
    fn process(&self, prefix: &str, timeout: Duration) -> Result<Process> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok());
            if let Some(pid) = found {
                return Process::open(pid).with_context(|| format!("process {pid} is gone"));
            }
            if Instant::now() > deadline {
                bail!("no line starting {prefix:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill9(p: &Process) -> Result<()> {
    if !p.signal(libc::SIGKILL) {
        bail!("kill -9 {}: the process is gone", p.pid());
    }
    Ok(())
}

/// The steps in a metrics file, in order.
fn metric_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["data"]["step"].as_u64())
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(unix_ms())
}

/// The figures of one recovery, in milliseconds after the kill.
#[derive(Debug, Default, serde::Serialize)]
struct Recovery {
    detected_ms: Option<i64>,
    replanned_ms: Option<i64>,
    first_step_ms: i64,
    steps_recomputed: u64,
}

/// One elastic job of configuration `config`: one worker killed after `args.kill_after`
/// committed steps, and what its recovery took.
fn elastic_recovery(exe: &Path, config: &Path, args: &RecoveryArgs) -> Result<Recovery> {
    let job = format!("bench-recovery-{}", unix_ms());
    let keys = JobKeys::new(&job);
    let urls: Vec<String> = args.etcd.split(',').map(String::from).collect();
    let coord = EtcdCoordinator::connect(&urls, Duration::from_secs(10))?;
    let watch = coord.watch_prefix(keys.root())?;
    let commits: Arc<Mutex<Vec<(u64, StepCommit)>>> = Arc::default();
    {
        let (commits, keys) = (commits.clone(), keys.clone());
        std::thread::spawn(move || {
            while let Ok(next) = watch.next(Duration::from_secs(1)) {
                let Some(ch) = next else { continue };
                if let (JobKey::Committed(_), Some(v)) = (keys.parse(&ch.key), ch.value) {
                    if let Ok(c) = serde_json::from_slice::<StepCommit>(&v) {
                        commits
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((unix_ms(), c));
                    }
                }
            }
        });
    }
    let committed = |f: &dyn Fn(&StepCommit) -> bool| -> Option<(u64, StepCommit)> {
        commits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, c)| f(c))
            .cloned()
    };
    let last = format!("agent node-{}: slot 0: worker pid", args.layout().dp - 1);
    let job_run = Watched::start(
        Command::new(exe)
            .args(["train", "--config"])
            .arg(config)
            .args([
                "--etcd",
                &args.etcd,
                "--job",
                &job,
                "--cooldown-ms",
                "600000",
            ]),
    )?;
    let victim = job_run.process(&last, Duration::from_secs(60))?;
    let k = args.kill_after;
    wait_until("the elastic job's step", Duration::from_secs(300), || {
        committed(&|c| c.generation == 1 && c.step >= k && c.loss.is_some()).is_some()
    })?;
    let killed = unix_ms();
    kill9(&victim)?;
    let (first_at, first) = {
        wait_until(
            "the first step after the kill",
            Duration::from_secs(60),
            || committed(&|c| c.generation == 2 && c.loss.is_some()).is_some(),
        )?;
        committed(&|c| c.generation == 2 && c.loss.is_some()).expect("seen above")
    };
    let reached = commits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, c)| c.generation == 1)
        .map(|(_, c)| c.step)
        .max()
        .unwrap_or(0);
    let mut detected = None;
    for (k, v) in coord.list(keys.root())? {
        if let JobKey::Lost { .. } = keys.parse(&k) {
            let l: LostRecord = serde_json::from_slice(&v)?;
            detected = Some(l.detected_at_ms as i64 - killed as i64);
        }
    }
    let planned: Option<PlannedRecord> = coord
        .get(&keys.planned(2))?
        .and_then(|v| serde_json::from_slice(&v).ok());
    drop(job_run);
    Ok(Recovery {
        detected_ms: detected,
        replanned_ms: planned.map(|p| p.at_ms as i64 - killed as i64),
        first_step_ms: first_at as i64 - killed as i64,
        // The first step of generation 2 is the one after the last that was committed;
        // anything before it that generation 1 had done is done again.
        steps_recomputed: (reached + 1).saturating_sub(first.step),
    })
}

impl RecoveryArgs {
    fn layout(&self) -> marathon_model::ParallelLayout {
        self.layout.layout()
    }
}

pub fn run(args: RecoveryArgs) -> Result<()> {
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let dir = tempfile::tempdir().context("a scratch directory")?;
    let configs = Configs::write(&args, dir.path())?;
    let p = args.layout();
    eprintln!(
        "bench recovery: {} with tp {} x pp {} x dp {} ({} worker processes), one worker killed \
         after step {}",
        args.config.display(),
        p.tp,
        p.pp,
        p.dp,
        p.world_size(),
        args.kill_after
    );
    // The elastic job, without and with the distributed optimizer.
    let elastic = elastic_recovery(&exe, &configs.elastic, &args)?;
    let zero = elastic_recovery(&exe, &configs.zero, &args)?;
    let baseline = baseline_recovery(&exe, &configs, &args)?;
    print(&args, [&elastic, &zero, &baseline]);
    Ok(())
}

/// The bench's three configurations, written into its scratch directory.
struct Configs {
    elastic: PathBuf,
    zero: PathBuf,
    baseline: PathBuf,
    /// The baseline's metrics, where the bench watches its steps.
    baseline_metrics: PathBuf,
}

impl Configs {
    fn write(args: &RecoveryArgs, dir: &Path) -> Result<Configs> {
        let mut cfg = TrainConfig::load(&args.config)?;
        cfg.train.steps = 1_000_000;
        cfg.train.eval_every_steps = 0;
        cfg.train.samples_log = None;
        cfg.train.metrics = Some(dir.join("metrics.jsonl"));
        cfg.parallel = args.layout.over(cfg.parallel);
        cfg.parallel.distributed_optimizer = false;
        cfg.checkpoint = None;
        cfg.validate().map_err(|e| cfg.error(e))?;
        let write = |cfg: &TrainConfig, name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(
                &path,
                toml::to_string(cfg).context("write the bench's config")?,
            )?;
            Ok(path)
        };
        let mut zero = cfg.clone();
        zero.parallel.distributed_optimizer = true;
        let mut base = cfg.clone();
        let baseline_metrics = dir.join("base-metrics.jsonl");
        base.train.metrics = Some(baseline_metrics.clone());
        base.checkpoint = Some(CheckpointConfig {
            root: dir.join("ckpt").display().to_string(),
            every_steps: args.ckpt_every,
            ..toml::from_str("root = \"\"").context("checkpoint defaults")?
        });
        Ok(Configs {
            elastic: write(&cfg, "elastic.toml")?,
            zero: write(&zero, "zero.toml")?,
            baseline: write(&base, "base.toml")?,
            baseline_metrics,
        })
    }
}

/// The fail-stop baseline: the launcher stops every worker when one dies; the bench starts it
/// again at once, and it resumes from the newest checkpoint.
fn baseline_recovery(exe: &Path, configs: &Configs, args: &RecoveryArgs) -> Result<Recovery> {
    let metrics = &configs.baseline_metrics;
    let start = || {
        Watched::start(
            Command::new(exe)
                .args(["train", "--config"])
                .arg(&configs.baseline),
        )
    };
    let mut first = start()?;
    let victim = first.process(
        &format!("worker rank {}: pid", args.layout().world_size() - 1),
        Duration::from_secs(60),
    )?;
    let k = args.kill_after;
    wait_until("the baseline's step", Duration::from_secs(300), || {
        metric_steps(metrics).last().is_some_and(|&s| s >= k)
    })?;
    let killed = unix_ms();
    kill9(&victim)?;
    let status = first.child.wait()?;
    let detected = unix_ms();
    let reached = metric_steps(metrics).into_iter().max().unwrap_or(0);
    if status.success() {
        bail!("the baseline's launcher did not notice its worker's death");
    }
    // The restarted run's steps alone: a run that resumes appends to its metrics file, one
    // that starts over (no checkpoint yet) truncates it.
    let killed_run = metrics.with_extension("before-kill.jsonl");
    std::fs::rename(metrics, &killed_run)
        .with_context(|| format!("move {} aside", metrics.display()))?;
    let second = start()?;
    let restarted = unix_ms();
    let first_at = wait_until(
        "the baseline's first step after restarting",
        Duration::from_secs(300),
        || !metric_steps(metrics).is_empty(),
    )?;
    let resumed_at = metric_steps(metrics)[0];
    drop(second);
    Ok(Recovery {
        detected_ms: Some(detected as i64 - killed as i64),
        replanned_ms: Some(restarted as i64 - killed as i64),
        first_step_ms: first_at as i64 - killed as i64,
        steps_recomputed: (reached + 1).saturating_sub(resumed_at),
    })
}

/// The table, then every figure as one JSON line.
fn print(args: &RecoveryArgs, runs: [&Recovery; 3]) {
    let ms = |v: Option<i64>| v.map_or("-".into(), |v| format!("{v} ms"));
    let row = |what: &str, a: String, b: String, c: String| {
        println!("  {what:<34} {a:>20} {b:>26} {c:>32}");
    };
    row(
        "after the kill",
        "elastic (marathon)".into(),
        "elastic, distributed opt.".into(),
        "stop all, resume from checkpoint".into(),
    );
    let [a, b, c] = runs.map(|r| ms(r.detected_ms));
    row("failure detected", a, b, c);
    let [a, b, c] = runs.map(|r| ms(r.replanned_ms));
    row("new generation planned / restarted", a, b, c);
    let [a, b, c] = runs.map(|r| ms(Some(r.first_step_ms)));
    row("first step completed", a, b, c);
    let [a, b, c] = runs.map(|r| r.steps_recomputed.to_string());
    row("steps recomputed", a, b, c);
    let p = args.layout();
    println!(
        "{}",
        serde_json::json!({ "elastic": runs[0], "elastic_distributed_optimizer": runs[1],
            "stop_and_resume": runs[2], "tp": p.tp, "pp": p.pp, "dp": p.dp,
            "kill_after": args.kill_after, "ckpt_every": args.ckpt_every })
    );
}
