//! The job's side of a scenario: its nodes, each a real `marathon agent` process with its worker
//! processes, a recorder of every change to the job's keys in etcd, and a watch of the
//! checkpoints committed in the store.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use marathon_elastic::{EtcdCoordinator, JobKey, JobKeys};
use marathon_runtime::moments::MOMENTS_ENV;
use marathon_runtime::records::{unix_ms, StepCommit};
use marathon_storage::{Reader, Store};

use crate::process::Process;

/// How an agent is started: everything but its name.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub etcd: String,
    pub job: String,
    pub slots: usize,
    pub wait_slots: usize,
    pub tp: usize,
    pub pp: usize,
    pub lease_ttl_ms: u64,
    pub hang_ms: u64,
    pub cooldown_ms: u64,
    /// Where moments are armed and hit (`marathon_runtime::moments`).
    pub moments: PathBuf,
    pub group_timeout_ms: u64,
    /// Each node's network namespace and address, by node index; `None`: every node on
    /// loopback.
    pub namespaces: Option<Vec<(String, String)>>,
}

/// A worker an agent started: its slot, and the process held.
pub type Worker = (usize, Arc<Process>);

/// One node: its agent process (when running) and every line it and its workers wrote, over
/// all its lives.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    index: usize,
    child: Option<Child>,
    /// Held open: the agent runs with `--tied`, and goes with this process.
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    /// Every agent this node had, and every worker they started (by slot), oldest first: each
    /// held from the moment it was started, so a signal never reaches another process that
    /// took its pid later.
    agents: Vec<Arc<Process>>,
    workers: Arc<Mutex<Vec<Worker>>>,
    /// Times its agent was started again after it exited or was killed.
    pub restarts: usize,
}

impl Node {
    /// Starts node `index`'s agent.
    pub fn start(spec: &AgentSpec, index: usize) -> Result<Node> {
        let mut n = Node {
            name: format!("node-{index}"),
            index,
            child: None,
            stdin: None,
            lines: Arc::new(Mutex::new(Vec::new())),
            agents: Vec::new(),
            workers: Arc::new(Mutex::new(Vec::new())),
            restarts: 0,
        };
        n.spawn(spec)?;
        Ok(n)
    }

    fn spawn(&mut self, spec: &AgentSpec) -> Result<()> {
        let flags = [
            ("--slots", spec.slots as u64),
            ("--wait-slots", spec.wait_slots as u64),
            ("--tp", spec.tp as u64),
            ("--pp", spec.pp as u64),
            ("--lease-ttl-ms", spec.lease_ttl_ms),
            ("--hang-ms", spec.hang_ms),
            ("--cooldown-ms", spec.cooldown_ms),
            ("--group-timeout-ms", spec.group_timeout_ms),
        ];
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join(format!("{}.out", self.name)))?;
        let mut command = match &spec.namespaces {
            Some(ns) => {
                let (ns, host) = &ns[self.index];
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&spec.exe);
                c.args(["agent", "--host", host]);
                c
            }
            None => {
                let mut c = Command::new(&spec.exe);
                c.arg("agent");
                c
            }
        };
        let mut child = command
            .args(["--etcd", &spec.etcd, "--job", &spec.job])
            .args(["--node", &self.name, "--config", "c.toml", "--tied"])
            .args(
                flags
                    .iter()
                    .flat_map(|(f, v)| [f.to_string(), v.to_string()]),
            )
            .env("MARATHON_WORKER_THREADS", "1")
            .env(MOMENTS_ENV, &spec.moments)
            // The harness reads the agents' human lines (worker pids, steps), whatever the
            // format and filter the command was given.
            .env("MARATHON_LOG_FORMAT", "human")
            .env("RUST_LOG", "info")
            .current_dir(&spec.dir)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start agent {} from {}", self.name, spec.exe.display()))?;
        // Held before anything can reap it.
        let agent = Process::open(child.id()).context("hold the agent process")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let (lines, workers) = (self.lines.clone(), self.workers.clone());
        let marker = format!("agent {}: slot ", self.name);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join(format!("{}.log", self.name)))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                // The agent names each worker as it starts it: held now, while the pid is
                // surely that worker's.
                if let Some((slot, pid)) = worker_started(&marker, &line) {
                    if let Some(w) = Process::open(pid) {
                        let mut all = workers.lock().unwrap_or_else(|e| e.into_inner());
                        all.push((slot, Arc::new(w)));
                    }
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        self.agents.push(Arc::new(agent));
        self.stdin = child.stdin.take();
        self.child = Some(child);
        Ok(())
    }

    /// Starts the agent again under the same name.
    pub fn restart(&mut self, spec: &AgentSpec) -> Result<()> {
        self.kill();
        self.restarts += 1;
        self.spawn(spec)
    }

    /// Whether the agent process is running; reaps it when it exited.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Every agent and worker this node ever had.
    pub fn every_process(&self) -> Vec<Arc<Process>> {
        let mut all = self.agents.clone();
        all.extend(self.workers().into_iter().map(|(_, w)| w));
        all
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last `n` lines, for a message.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n    ")
    }

    /// Every worker any of its agents started: (slot, process), oldest first.
    pub fn workers(&self) -> Vec<Worker> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The newest worker of `slot`, if it runs.
    pub fn worker(&self, slot: usize) -> Option<Arc<Process>> {
        self.workers()
            .into_iter()
            .rev()
            .find(|(s, _)| *s == slot)
            .map(|(_, p)| p)
            .filter(|p| p.running())
    }

    /// The agent and its workers that still run.
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let agent = self.agents.last().filter(|_| self.child.is_some()).cloned();
        let mut all: Vec<Arc<Process>> = agent.into_iter().collect();
        all.extend(self.workers().into_iter().map(|(_, w)| w));
        all.retain(|p| p.running());
        all
    }

    /// Signals the agent and every running worker (`libc::SIGKILL`, `SIGSTOP`, `SIGCONT`).
    pub fn signal_all(&self, sig: libc::c_int) {
        for p in self.processes() {
            p.signal(sig);
        }
    }

    /// Kills the agent and its workers (SIGKILL), as a lost machine.
    pub fn kill(&mut self) {
        self.signal_all(libc::SIGKILL);
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the agent to exit by itself; kills it after that. Whether it
    /// exited by itself.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() > deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The slot and pid of the worker an agent's line says it started (`agent NODE: slot S: worker
/// pid P`), `marker` being its start up to the slot.
fn worker_started(marker: &str, line: &str) -> Option<(usize, u32)> {
    let rest = line.strip_prefix(marker)?;
    let (slot, pid) = rest.split_once(": worker pid ")?;
    Some((slot.parse().ok()?, pid.trim().parse().ok()?))
}

/// A change seen: when (Unix milliseconds), the key, its new value (`None`: deleted).
pub type Seen = (u64, String, Option<Vec<u8>>);

/// Every change to a job's keys, in etcd's order, from one watch that is renewed when it
/// breaks (an etcd member lost, etcd unavailable).
#[derive(Debug)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Times the watch broke and was renewed: changes in such a gap are not seen.
    gaps: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
    keys: JobKeys,
}

impl Recorder {
    pub fn start(c: EtcdCoordinator, keys: &JobKeys) -> Result<Recorder> {
        let mut watch = c.watch_prefix(keys.root())?;
        let (seen, gaps, stop) = Default::default();
        let r = Recorder {
            seen,
            gaps,
            stop,
            keys: keys.clone(),
        };
        let (s, g, st, root) = (
            r.seen.clone(),
            r.gaps.clone(),
            r.stop.clone(),
            keys.root().to_string(),
        );
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match watch.next(Duration::from_millis(200)) {
                    Ok(Some(ch)) => s.lock().unwrap_or_else(|e| e.into_inner()).push((
                        unix_ms(),
                        ch.key,
                        ch.value,
                    )),
                    Ok(None) => {}
                    Err(_) => {
                        *g.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        loop {
                            if st.load(Ordering::Relaxed) {
                                return;
                            }
                            if let Ok(w) = c.watch_prefix(&root) {
                                watch = w;
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            }
        });
        Ok(r)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn gaps(&self) -> usize {
        *self.gaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every step commit seen, in order.
    pub fn commits(&self) -> Vec<(u64, StepCommit)> {
        self.seen()
            .into_iter()
            .filter(|(_, k, _)| matches!(self.keys.parse(k), JobKey::Committed(_)))
            .filter_map(|(t, _, v)| Some((t, serde_json::from_slice(v.as_ref()?).ok()?)))
            .collect()
    }

    /// The step of the latest commit of a completed step (after a reload it can be lower than
    /// an earlier one), and when that commit was seen; zeros before the first.
    pub fn progress(&self) -> (u64, u64) {
        self.commits()
            .iter()
            .filter(|(_, c)| c.loss.is_some())
            .map(|(t, c)| (c.step, *t))
            .max_by_key(|(s, t)| (*t, *s))
            .unwrap_or((0, 0))
    }

    /// The job's summary, once it is done.
    pub fn done(&self) -> Option<Vec<u8>> {
        self.seen()
            .into_iter()
            .find(|(_, k, v)| matches!(self.keys.parse(k), JobKey::Done) && v.is_some())
            .and_then(|(_, _, v)| v)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `exe` with `args` in `dir` to the end: its status and stdout, stderr.
pub fn run_to_end(exe: &Path, dir: &Path, args: &[String]) -> Result<(bool, String, String)> {
    let out = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} {}", exe.display(), args.join(" ")))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every checkpoint step that was ever committed in the store, from a listing every half a
/// second while the job runs: retention collects the older ones, and the check at the end
/// needs them all. A listing that fails (the store killed or stopped) is tried again.
#[derive(Debug)]
pub struct CommitWatch {
    seen: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
}

impl CommitWatch {
    pub fn start(store: Store) -> CommitWatch {
        let w = CommitWatch {
            seen: Default::default(),
            stop: Default::default(),
        };
        let (seen, stop) = (w.seen.clone(), w.stop.clone());
        std::thread::spawn(move || {
            let reader = Reader::new(store);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(steps) = reader.committed() {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).extend(steps);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        w
    }

    pub fn seen(&self) -> BTreeSet<u64> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for CommitWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
