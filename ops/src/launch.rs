//! Running a job: in this process when its layout is one rank, else as one worker process per
//! rank on this machine, rendezvousing through a directory coordinator.
//!
//! The launcher shows one progress display (rank 0 reports its steps as JSON lines on stdout),
//! keeps the last lines each worker wrote to stderr, and when a worker dies stops the others
//! and exits non-zero naming the rank, its exit status and those lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use marathon_elastic::DirCoordinator;
use marathon_runtime::checkpoint::CheckpointRecord;
use marathon_runtime::comm::GroupSpec;
use marathon_runtime::metrics::RankEndpoint;
use marathon_runtime::records::{StepRecord, Summary};
use marathon_runtime::trainer::{preflight, Observer};
use marathon_runtime::Groups;
use marathon_runtime::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use crate::flags::TrainFlags;
use crate::progress::Progress;

/// Lines of each worker's stderr kept for the report when it dies.
const TAIL_LINES: usize = 20;
/// Exit status of a worker whose group lost a peer (or was aborted): collateral damage of
/// another worker's failure.
pub const EXIT_PEER_LOST: i32 = 3;
/// Exit status of a worker whose launcher went away (its stdin closed).
pub const EXIT_LAUNCHER_GONE: i32 = 4;
/// How long the launcher waits, after seeing only collateral failures, for the worker that
/// really failed to be seen exiting.
const COLLATERAL_WAIT: Duration = Duration::from_secs(2);
/// The most worker processes a one-machine launch starts.
const LOCAL_RANKS_MAX: usize = 64;
/// How long workers wait for each other to form their groups, and for each operation.
const GROUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What a worker tells the launcher, one JSON object per line on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Step(StepRecord),
    Eval { step: u64, val_loss: f32 },
    Checkpoint(CheckpointRecord),
    Resumed { step: u64 },
    Summary(Summary),
}

/// `marathon train` without `--etcd`: one process, or a launch of one process per rank on this
/// machine (`elastic::train` runs it with `--etcd`).
pub fn train(config: &Path, flags: &TrainFlags, metrics_addr: Option<SocketAddr>) -> Result<()> {
    let mut cfg = TrainConfig::load(config)?;
    flags.apply(&mut cfg)?;
    let m = &cfg.model;
    tracing::info!(
        "model: {} parameters, {} layers, hidden {}, {} heads, vocabulary {} (padded {})",
        crate::plan::step_cost(&cfg).params,
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.vocab_size,
        m.padded_vocab_size()
    );
    if cfg.parallel.world_size() == 1 {
        let mut trainer = Trainer::new(cfg)
            .with_context(|| format!("start training from {}", config.display()))?;
        let _live = serve_metrics(&mut trainer, metrics_addr, true)?;
        let mut progress = Progress::new(&trainer.cfg);
        if let Some(step) = trainer.resumed_from() {
            progress.on_resumed(step, &trainer.cfg);
        }
        let summary = trainer.run(&mut progress)?;
        progress.finish();
        report_goodput(&summary);
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    launch(config, flags, &cfg, metrics_addr)
}

/// Refuses a `--metrics-addr` whose `count` ports from its own do not all exist, or whose
/// port is 0 (the processes after the first find theirs from it).
pub(crate) fn check_ports(addr: SocketAddr, count: usize) -> Result<()> {
    if addr.port() == 0 || usize::from(addr.port()) + count - 1 > usize::from(u16::MAX) {
        bail!(
            "--metrics-addr {addr}: this job's {count} processes serve metrics on the ports \
             from it, one each; give a fixed port of at most {}",
            usize::from(u16::MAX) + 1 - count
        );
    }
    Ok(())
}

/// Serves `trainer`'s metrics on `addr`, and the job's where `job` says this rank reports
/// them; the endpoint stops when the returned value is dropped.
fn serve_metrics(
    trainer: &mut Trainer,
    addr: Option<SocketAddr>,
    job: bool,
) -> Result<Option<RankEndpoint>> {
    let Some(addr) = addr else { return Ok(None) };
    let live = RankEndpoint::serve(addr)?;
    trainer.set_live_metrics(live.rank.clone());
    if job {
        trainer.set_job_metrics(live.job.clone());
    }
    tracing::info!("metrics: http://{}/metrics", live.endpoint.addr());
    Ok(Some(live))
}

/// `marathon worker`: one rank of a launched job.
pub fn worker(
    config: &Path,
    flags: &TrainFlags,
    rank: usize,
    coord_dir: &Path,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    let span = tracing::info_span!("worker", rank);
    let _worker = span.clone().entered();
    // The launcher holds our stdin open; when it goes away, so do we, rather than training on
    // with nobody to report to.
    std::thread::spawn(move || {
        let _worker = span.entered();
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        tracing::info!("the launcher is gone; stopping");
        std::process::exit(EXIT_LAUNCHER_GONE);
    });
    let mut cfg = TrainConfig::load(config)?;
    flags.apply(&mut cfg)?;
    // This rank's tensor, pipeline, data and embedding groups, from its place in the layout.
    let place = cfg.parallel.place(rank);
    let mut template = GroupSpec::loopback("local", "", 0, 1, GROUP_TIMEOUT);
    template.rendezvous_timeout = GROUP_TIMEOUT;
    let groups = Groups::connect(&DirCoordinator::new(coord_dir), place, &template)?;
    let mut trainer = Trainer::with_groups(cfg, groups)?;
    let _live = serve_metrics(&mut trainer, metrics_addr, rank == 0)?;
    // The launch's directory is named afresh for every launch: its ranks' checkpoint persists
    // share it as their epoch, which no earlier launch's persists of the same steps had.
    let epoch = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        coord_dir.hash(&mut h);
        h.finish()
    };
    trainer.set_checkpoint_epoch(epoch);
    let mut report = Reporter { enabled: rank == 0 };
    if let Some(step) = trainer.resumed_from() {
        report.send(&Event::Resumed { step });
    }
    let summary = trainer.run(&mut report)?;
    report.send(&Event::Summary(summary));
    Ok(())
}

/// Rank 0's observer: every event as a JSON line on stdout, for the launcher.
struct Reporter {
    enabled: bool,
}

impl Reporter {
    fn send(&self, e: &Event) {
        if self.enabled {
            println!("{}", serde_json::to_string(e).expect("events serialise"));
        }
    }
}

impl Observer for Reporter {
    fn on_step(&mut self, rec: &StepRecord) {
        self.send(&Event::Step(rec.clone()));
    }
    fn on_eval(&mut self, step: u64, val_loss: f32) {
        self.send(&Event::Eval { step, val_loss });
    }
    fn on_checkpoint(&mut self, rec: &CheckpointRecord) {
        self.send(&Event::Checkpoint(rec.clone()));
    }
}

/// A running worker: its process, the write end of its stdin (its tie to the launcher), and
/// the thread keeping the last lines it wrote to stderr.
struct Worker {
    rank: usize,
    child: Child,
    _stdin: Option<ChildStdin>,
    tail: Arc<Mutex<VecDeque<String>>>,
    tail_reader: Option<std::thread::JoinHandle<()>>,
}

/// The workers of a launch. Dropping it kills and reaps every worker still running, so no
/// path out of the launcher, error or panic, leaves a process behind.
struct Workers(Vec<Worker>);

impl Drop for Workers {
    fn drop(&mut self) {
        stop_all(&mut self.0);
    }
}

/// Removes the coordinator directory however the launch ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn launch(
    config: &Path,
    flags: &TrainFlags,
    cfg: &TrainConfig,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    // Refuse what every worker would refuse before starting any of them.
    preflight(cfg).with_context(|| format!("start training from {}", config.display()))?;
    let world = cfg.parallel.world_size();
    if world > LOCAL_RANKS_MAX {
        bail!(
            "{}: parallel layout of {world} ranks: a one-machine launch starts one process per rank, \
             at most {LOCAL_RANKS_MAX}; lower parallel.tp, parallel.pp or parallel.dp",
            config.display()
        );
    }
    if let Some(a) = metrics_addr {
        check_ports(a, world)?;
    }
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let coord_dir = RemoveDir(std::env::temp_dir().join(format!(
        "marathon-{}-{}",
        std::process::id(),
        nanos()
    )));
    std::fs::create_dir_all(&coord_dir.0)
        .with_context(|| format!("create {}", coord_dir.0.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / world).max(1);
    let p = cfg.parallel;
    tracing::info!(
        "launching {world} workers (tp {} x pp {} x dp {}), {threads} threads each",
        p.tp,
        p.pp,
        p.dp
    );
    let (events_tx, events) = mpsc::channel::<Event>();
    let mut workers = Workers(Vec::with_capacity(world));
    for rank in 0..world {
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--config")
            .arg(config)
            .args(["--rank", &rank.to_string()])
            .arg("--coord-dir")
            .arg(&coord_dir.0)
            .args(flags.args())
            .args(metrics_addr.into_iter().flat_map(|a| {
                let a = SocketAddr::new(a.ip(), a.port() + rank as u16);
                ["--metrics-addr".to_string(), a.to_string()]
            }))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start worker rank {rank} from {}", exe.display()))?;
        tracing::info!("worker rank {rank}: pid {}", child.id());
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let t = tail.clone();
        let tail_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let tx = events_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(e) = serde_json::from_str::<Event>(&line) {
                    let _ = tx.send(e);
                }
            }
        });
        let stdin = child.stdin.take();
        workers.0.push(Worker {
            rank,
            child,
            _stdin: stdin,
            tail,
            tail_reader: Some(tail_reader),
        });
    }
    drop(events_tx);
    let summary = supervise(&mut workers.0, &events, cfg)?;
    report_goodput(&summary);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Says on stderr where the run's time went.
pub(crate) fn report_goodput(s: &Summary) {
    let g = &s.goodput;
    tracing::info!(
        "effective training time {:.1}% of {:.1} s: steps {:.1} s, validation {:.1} s, checkpoint \
         stalls {:.2} s, waiting for the last checkpoint {:.2} s",
        100.0 * g.effective_fraction,
        s.elapsed_s,
        g.training_s,
        g.eval_s,
        g.checkpoint_stall_s,
        g.final_checkpoint_s
    );
    let elastic = g.startup_s + g.detection_s + g.reform_s + g.transfer_s + g.recomputed_s;
    if elastic > 0.0 {
        tracing::info!(
            "elastic: start-up {:.2} s, failure detection (with the dropped step) {:.2} s, \
             re-forming {:.2} s, state transfer {:.2} s, {} steps recomputed in {:.2} s, {} \
             stragglers flagged",
            g.startup_s,
            g.detection_s,
            g.reform_s,
            g.transfer_s,
            g.recomputed_steps,
            g.recomputed_s,
            g.stragglers
        );
    }
}

/// Shows rank 0's progress until every worker has exited; stops them all when one fails.
fn supervise(
    workers: &mut [Worker],
    events: &mpsc::Receiver<Event>,
    cfg: &TrainConfig,
) -> Result<Summary> {
    let mut progress = Progress::new(cfg);
    let mut summary = None;
    let mut exited: Vec<Option<ExitStatus>> = vec![None; workers.len()];
    loop {
        match events.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Step(rec)) => progress.on_step(&rec),
            Ok(Event::Eval { step, val_loss }) => progress.on_eval(step, val_loss),
            Ok(Event::Checkpoint(rec)) => progress.on_checkpoint(&rec),
            Ok(Event::Resumed { step }) => progress.on_resumed(step, cfg),
            Ok(Event::Summary(s)) => summary = Some(s),
            Err(_) => {}
        }
        poll_exits(workers, &mut exited)?;
        if exited.iter().flatten().any(|s| !s.success()) {
            // A worker that failed because a peer vanished is collateral: give the one that
            // really died a moment to be seen, and name it.
            let patience = std::time::Instant::now() + COLLATERAL_WAIT;
            while !exited
                .iter()
                .flatten()
                .any(|s| !s.success() && !is_collateral(*s))
                && std::time::Instant::now() < patience
            {
                std::thread::sleep(Duration::from_millis(10));
                poll_exits(workers, &mut exited)?;
            }
            let culprit = (0..workers.len())
                .filter(|&i| exited[i].is_some_and(|s| !s.success()))
                .min_by_key(|&i| (exited[i].is_some_and(is_collateral), i))
                .expect("a worker failed");
            let status = exited[culprit].expect("it exited");
            stop_all(workers);
            progress.finish();
            let w = &mut workers[culprit];
            if let Some(reader) = w.tail_reader.take() {
                let _ = reader.join(); // its stderr closed when it exited
            }
            let tail: Vec<String> = w
                .tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            bail!(
                "worker rank {} (pid {}) {}; stopped the other workers. Its last lines:\n  {}",
                w.rank,
                w.child.id(),
                describe(status),
                if tail.is_empty() {
                    "(none)".to_string()
                } else {
                    tail.join("\n  ")
                }
            );
        }
        if exited.iter().all(Option::is_some) {
            // Every stdout reader ends with its worker; take all rank 0 wrote.
            for e in events.iter() {
                if let Event::Summary(s) = e {
                    summary = Some(s);
                }
            }
            progress.finish();
            return summary.context("rank 0 exited without reporting a summary");
        }
    }
}

fn poll_exits(workers: &mut [Worker], exited: &mut [Option<ExitStatus>]) -> Result<()> {
    for (w, e) in workers.iter_mut().zip(exited.iter_mut()) {
        if e.is_none() {
            *e = w
                .child
                .try_wait()
                .with_context(|| format!("wait for worker rank {}", w.rank))?;
        }
    }
    Ok(())
}

/// Whether a worker exited because a peer or the launcher went away, not by its own fault.
fn is_collateral(s: ExitStatus) -> bool {
    matches!(s.code(), Some(EXIT_PEER_LOST) | Some(EXIT_LAUNCHER_GONE))
}

/// Kills every worker still running and reaps them all, so no process is left behind.
fn stop_all(workers: &mut [Worker]) {
    for w in workers.iter_mut() {
        let _ = w.child.kill();
    }
    for w in workers.iter_mut() {
        let _ = w.child.wait();
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({s})"),
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
