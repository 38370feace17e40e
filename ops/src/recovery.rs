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

#[derive(Debug, Args)]
pub struct RecoveryArgs {
    /// etcd endpoints for the elastic job, comma-separated.
    #[arg(long)]
    etcd: String,
    /// The job's configuration (its data, model and batch); steps, metrics and checkpoints
    /// are the bench's.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 2)]
    tp: usize,
    #[arg(long, default_value_t = 4)]
    dp: usize,
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
    let last = format!("agent node-{}: slot 0: worker pid", args.dp - 1);
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

pub fn run(args: RecoveryArgs) -> Result<()> {
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let mut cfg = TrainConfig::load(&args.config)?;
    let dir = tempfile::tempdir().context("a scratch directory")?;
    cfg.train.steps = 1_000_000;
    cfg.train.eval_every_steps = 0;
    cfg.train.samples_log = None;
    cfg.train.metrics = Some(dir.path().join("metrics.jsonl"));
    cfg.parallel.tp = args.tp;
    cfg.parallel.dp = args.dp;
    cfg.checkpoint = None;
    let write = |cfg: &TrainConfig, name: &str| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            toml::to_string(cfg).context("write the bench's config")?,
        )?;
        Ok(path)
    };
    let elastic_cfg = write(&cfg, "elastic.toml")?;
    let mut zero = cfg.clone();
    zero.parallel.distributed_optimizer = true;
    let zero_cfg = write(&zero, "zero.toml")?;
    let mut base = cfg.clone();
    base.train.metrics = Some(dir.path().join("base-metrics.jsonl"));
    base.checkpoint = Some(CheckpointConfig {
        root: dir.path().join("ckpt").display().to_string(),
        every_steps: args.ckpt_every,
        ..toml::from_str("root = \"\"").context("checkpoint defaults")?
    });
    let base_cfg = write(&base, "base.toml")?;
    let world = args.tp * args.dp;
    eprintln!(
        "bench recovery: {} with tp {} x dp {} ({world} worker processes), one worker killed \
         after step {}",
        args.config.display(),
        args.tp,
        args.dp,
        args.kill_after
    );

    // The elastic job, without and with the distributed optimizer.
    let elastic = elastic_recovery(&exe, &elastic_cfg, &args)?;
    let zero = elastic_recovery(&exe, &zero_cfg, &args)?;

    // The fail-stop baseline: the launcher stops every worker when one dies; the bench starts
    // it again at once, and it resumes from the newest checkpoint.
    let metrics = dir.path().join("base-metrics.jsonl");
    let baseline = {
        let start = || {
            Watched::start(
                Command::new(&exe)
                    .args(["train", "--config"])
                    .arg(&base_cfg),
            )
        };
        let mut first = start()?;
        let victim = first.process(
            &format!("worker rank {}: pid", world - 1),
            Duration::from_secs(60),
        )?;
        let k = args.kill_after;
        wait_until("the baseline's step", Duration::from_secs(300), || {
            metric_steps(&metrics).last().is_some_and(|&s| s >= k)
        })?;
        let killed = unix_ms();
        kill9(&victim)?;
        let status = first.child.wait()?;
        let detected = unix_ms();
        let reached = metric_steps(&metrics).into_iter().max().unwrap_or(0);
        if status.success() {
            bail!("the baseline's launcher did not notice its worker's death");
        }
        let before = metric_steps(&metrics).len();
        let second = start()?;
        let restarted = unix_ms();
        let first_at = wait_until(
            "the baseline's first step after restarting",
            Duration::from_secs(300),
            || metric_steps(&metrics).len() > before,
        )?;
        let resumed_at = metric_steps(&metrics)[before];
        drop(second);
        Recovery {
            detected_ms: Some(detected as i64 - killed as i64),
            replanned_ms: Some(restarted as i64 - killed as i64),
            first_step_ms: first_at as i64 - killed as i64,
            steps_recomputed: (reached + 1).saturating_sub(resumed_at),
        }
    };

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
    let runs = [&elastic, &zero, &baseline];
    let [a, b, c] = runs.map(|r| ms(r.detected_ms));
    row("failure detected", a, b, c);
    let [a, b, c] = runs.map(|r| ms(r.replanned_ms));
    row("new generation planned / restarted", a, b, c);
    let [a, b, c] = runs.map(|r| ms(Some(r.first_step_ms)));
    row("first step completed", a, b, c);
    let [a, b, c] = runs.map(|r| r.steps_recomputed.to_string());
    row("steps recomputed", a, b, c);
    println!(
        "{}",
        serde_json::json!({ "elastic": elastic, "elastic_distributed_optimizer": zero,
            "stop_and_resume": baseline, "tp": args.tp, "dp": args.dp,
            "kill_after": args.kill_after, "ckpt_every": args.ckpt_every })
    );
    Ok(())
}
