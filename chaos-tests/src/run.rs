//! One scenario against real processes: a three-member etcd cluster, a Garage store, and one
//! `marathon agent` per node with its workers, each node in a network namespace of its own
//! where the machine allows (else on loopback); the faults of the schedule injected as the job
//! reaches their steps; the invariants checked at the end, and every process it started
//! stopped, also when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use marathon_elastic::{JobKey, JobKeys};
use marathon_runtime::moments::Moment;
use marathon_runtime::records::{unix_ms, Summary};
use marathon_runtime::small_job::SmallJob;
use marathon_storage::{format, Reader, Store};
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::check;
use crate::cluster::{run_to_end, AgentSpec, CommitWatch, Node, Recorder};
use crate::garage::{Garage, GARAGE_BUCKET};
use crate::network::Network;
use crate::process::Process;
use crate::scenario::{Fault, Scenario, Timed};
use crate::servers::EtcdCluster;

/// How scenarios are run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `marathon` binary the agents and workers run.
    pub exe: PathBuf,
    /// Where each scenario's directory goes (kept); `None`: a temporary one, removed after.
    pub keep_in: Option<PathBuf>,
    /// A text corpus to train on; `None`: one drawn from the seed.
    pub corpus: Option<PathBuf>,
    /// A job with no step committed for this long has failed.
    pub stall: Duration,
    /// Say what happens as it happens, on stderr.
    pub verbose: bool,
    /// Raised to stop (Ctrl-C): the scenario in flight fails at once and cleans up.
    pub interrupted: Arc<AtomicBool>,
    /// Put each node in a network namespace of its own when this machine allows it (root);
    /// `false`: every node on loopback, and network faults are not injected.
    pub namespaces: bool,
}

/// A fault as it was injected.
#[derive(Debug, Clone, Serialize)]
pub struct Injected {
    pub fault: Fault,
    pub what: String,
    /// The step the schedule gave, and the step of the latest commit when it landed.
    pub at_step: u64,
    pub landed_at_step: u64,
    /// Why it was not injected, or what it found.
    pub note: Option<String>,
}

/// Where a scenario's time went: the elastic job's goodput accounting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lost {
    pub startup_s: f64,
    pub detection_s: f64,
    pub reform_s: f64,
    pub transfer_s: f64,
    pub recomputed_s: f64,
    pub checkpoint_stall_s: f64,
}

/// What happened in a scenario, and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: String,
    /// How the nodes were networked: namespaces, or loopback and why.
    pub network: String,
    pub injected: Vec<Injected>,
    /// Generations after the first: each a recovery or a growth.
    pub recoveries: u64,
    /// Agents started again after they exited or were killed.
    pub agent_restarts: usize,
    pub lost: Lost,
    pub recomputed_steps: u64,
    pub wall_s: f64,
    pub violations: Vec<String>,
    pub ok: bool,
    /// The scenario's directory, when kept.
    pub dir: Option<String>,
}

impl Outcome {
    /// The outcome of a scenario that could not be set up: failed, for `why`.
    pub fn not_set_up(seed: u64, why: String) -> Outcome {
        Outcome {
            seed,
            scenario: Scenario::from_seed(seed).shape(),
            network: String::new(),
            injected: Vec::new(),
            recoveries: 0,
            agent_restarts: 0,
            lost: Lost::default(),
            recomputed_steps: 0,
            wall_s: 0.0,
            violations: vec![why],
            ok: false,
            dir: None,
        }
    }
}

/// Runs the scenario of `seed`. An error is a scenario that could not be set up (a server
/// missing, a port taken); what goes wrong in the job is a violation in the outcome.
pub fn run(seed: u64, opts: &RunOptions) -> Result<Outcome> {
    let scenario = Scenario::from_seed(seed);
    let tmp;
    let dir = match &opts.keep_in {
        Some(root) => {
            let d = root.join(format!("seed-{seed}"));
            if d.exists() {
                std::fs::remove_dir_all(&d)
                    .with_context(|| format!("clear {} for seed {seed}", d.display()))?;
            }
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            // Absolute: the agents and workers run elsewhere, and find the moments' directory
            // through this path.
            d.canonicalize()
                .with_context(|| format!("resolve {}", d.display()))?
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix(&format!("marathon-chaos-{seed}-"))
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let started = Instant::now();
    let mut h = Harness::start(&scenario, opts, &dir)?;
    let mut violations = h.drive(&scenario);
    let (summary, mut end) = h.finish(&scenario);
    violations.append(&mut end);
    let outcome = h.outcome(&scenario, summary, violations, started, opts);
    Ok(outcome)
}

struct Harness<'a> {
    opts: &'a RunOptions,
    dir: PathBuf,
    spec: AgentSpec,
    keys: JobKeys,
    root: String,
    etcd: EtcdCluster,
    store: Garage,
    nodes: Vec<Node>,
    recorder: Recorder,
    commits: CommitWatch,
    reference: Option<Child>,
    injected: Vec<Injected>,
    /// Checkpoint steps whose shard had a bit flipped, and when.
    flipped: Vec<(u64, u64)>,
    /// The forged rendezvous connections in flight, each with the index of its entry in
    /// `injected`: see [`forge`].
    forging: Vec<(usize, Forging)>,
    /// Each forged rendezvous connection that a listener answered: its local address, and
    /// whether the listener then closed it.
    forged: Vec<(String, bool)>,
    /// Every server process, for the check that nothing is left running.
    servers: Vec<Process>,
    /// Namespaces, or why the nodes run on loopback. Dropped last: the processes in the
    /// namespaces go first.
    network: Result<Network, String>,
}

impl<'a> Harness<'a> {
    fn start(s: &Scenario, opts: &'a RunOptions, dir: &Path) -> Result<Harness<'a>> {
        let network = if opts.namespaces {
            Network::setup(std::process::id() as u64 * 131 + s.seed, s.nodes)
                .map_err(|e| format!("loopback: network namespaces unavailable ({e:#})"))
        } else {
            Err("loopback (asked for)".to_string())
        };
        let host = network
            .as_ref()
            .map_or("127.0.0.1".to_string(), Network::server_ip);
        let etcd = EtcdCluster::start(dir, 3, &host)?;
        let store = Garage::start(&dir.join("garage"), &host)?;
        let client = etcd.connect(Duration::from_secs(30))?;
        let job = format!("chaos-{}", s.seed);
        let keys = JobKeys::new(&job);
        let recorder = Recorder::start(client, &keys)?;
        let root = format!("s3://{}/{job}", GARAGE_BUCKET);
        prepare(s, opts, dir, &root, &store)?;
        let commits = CommitWatch::start(Store::open_with(&root, store.options())?);
        // The fault-free reference of the same seed runs beside the job, in one process.
        let reference = Command::new(&opts.exe)
            .args(["train", "--config", "ref.toml"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("reference.log"))?)
            .spawn()
            .context("start the fault-free reference run")?;
        let spec = AgentSpec {
            exe: opts.exe.clone(),
            dir: dir.to_path_buf(),
            etcd: etcd.urls().join(","),
            job,
            slots: s.slots,
            wait_slots: s.nodes * s.slots,
            tp: s.tp,
            pp: s.pp,
            lease_ttl_ms: 3000,
            hang_ms: 3000,
            cooldown_ms: 2000,
            moments: dir.join("moments"),
            group_timeout_ms: 20_000,
            namespaces: network.as_ref().ok().map(|n| {
                (0..n.nodes())
                    .map(|i| (n.namespace(i), n.node_ip(i)))
                    .collect()
            }),
        };
        std::fs::create_dir_all(&spec.moments)?;
        // Held while they are children not yet reaped, so the pids are surely theirs.
        let servers = etcd
            .pids()
            .into_iter()
            .chain(store.pid())
            .filter_map(Process::open)
            .collect();
        let mut h = Harness {
            opts,
            dir: dir.to_path_buf(),
            spec,
            keys,
            root,
            etcd,
            store,
            nodes: Vec::new(),
            recorder,
            commits,
            reference: Some(reference),
            injected: Vec::new(),
            flipped: Vec::new(),
            forging: Vec::new(),
            forged: Vec::new(),
            servers,
            network,
        };
        for i in 0..s.nodes {
            let node = Node::start(&h.spec, i)?;
            h.nodes.push(node);
        }
        h.say(format_args!(
            "seed {}: {}; {}; {} faults scheduled",
            s.seed,
            s.shape(),
            h.network_mode(),
            s.faults.len()
        ));
        Ok(h)
    }

    fn network_mode(&self) -> String {
        match &self.network {
            Ok(n) => format!("each node in a network namespace on {}/24", n.server_ip()),
            Err(why) => why.clone(),
        }
    }

    fn say(&self, msg: impl std::fmt::Display) {
        if self.opts.verbose {
            eprintln!("chaos: {msg}");
        }
    }

    /// Injects the schedule's faults as the job reaches their steps, then waits for the job to
    /// end. Returns what went wrong on the way.
    fn drive(&mut self, s: &Scenario) -> Vec<String> {
        for t in &s.faults {
            if let Err(e) = self.wait(|r| r.progress().0 >= t.at_step) {
                return vec![e];
            }
            if self.recorder.done().is_some() {
                self.injected.push(Injected {
                    fault: t.fault.clone(),
                    what: t.fault.to_string(),
                    at_step: t.at_step,
                    landed_at_step: s.steps,
                    note: Some("not injected: the job had ended".into()),
                });
                continue;
            }
            let (fault, held, at) = match t.moment {
                None => {
                    std::thread::sleep(Duration::from_millis(t.delay_ms));
                    (t.fault.clone(), None, None)
                }
                Some(m) => match self.at_moment(t, m) {
                    Ok(Some((pid, node, slot, hit))) => (
                        aimed(&t.fault, node, slot),
                        Some(hit),
                        Some(format!(
                            "at the {} of node-{node}/{slot} (pid {pid})",
                            m.name()
                        )),
                    ),
                    Ok(None) => (
                        t.fault.clone(),
                        None,
                        Some(format!(
                            "no worker reached the {} within {MOMENT_WAIT:?}: landed then",
                            m.name()
                        )),
                    ),
                    Err(e) => return vec![e],
                },
            };
            let landed = self.recorder.progress().0;
            self.say(format_args!(
                "step {landed}: {fault}{}",
                at.as_deref().map(|a| format!(" ({a})")).unwrap_or_default()
            ));
            // While a worker is held at its rendezvous, its peers' listeners wait for it: an
            // impostor tries them first.
            if t.moment == Some(Moment::Rendezvous) && held.is_some() {
                let tried = self.forge_rendezvous(self.injected.len());
                self.injected.push(Injected {
                    fault: Fault::ForgeRendezvous,
                    what: Fault::ForgeRendezvous.to_string(),
                    at_step: t.at_step,
                    landed_at_step: landed,
                    note: Some(format!("{tried} connections")),
                });
            }
            // The worker held at the moment goes on just after the fault began (most
            // faults last a while; held that long, it would be declared hung instead).
            if let Some(hit) = held {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = std::fs::remove_file(hit);
                });
            }
            let note = match self.inject(&fault) {
                Ok(note) => note,
                Err(e) => return vec![format!("injecting `{fault}`: {e:#}")],
            };
            let note = match (at, note) {
                (Some(a), Some(n)) => Some(format!("{a}; {n}")),
                (a, n) => a.or(n),
            };
            self.injected.push(Injected {
                what: fault.to_string(),
                fault,
                at_step: t.at_step,
                landed_at_step: landed,
                note,
            });
        }
        match self.wait(|r| r.done().is_some()) {
            Ok(()) => Vec::new(),
            Err(e) => vec![e],
        }
    }

    /// Waits for `until`, restarting any agent that exited before the job ended (as a node's
    /// supervisor would), and fails when no step was committed for `stall`.
    fn wait(&mut self, until: impl Fn(&Recorder) -> bool) -> Result<(), String> {
        let mut last = (self.recorder.progress(), Instant::now());
        loop {
            if until(&self.recorder) {
                return Ok(());
            }
            if self.opts.interrupted.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            if self.recorder.done().is_none() {
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].alive() {
                        let n = &mut self.nodes[i];
                        let msg = format!("{} exited; starting its agent again", n.name);
                        n.restart(&self.spec).map_err(|e| format!("{e:#}"))?;
                        self.say(msg);
                    }
                }
            }
            let now = self.recorder.progress();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > self.opts.stall {
                let tails: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("  {}:\n    {}", n.name, n.tail(8)))
                    .collect();
                return Err(format!(
                    "the job cannot recover: no step committed for {:?} after step {} (the \
                     scenario's faults: {}); the agents' last lines:\n{}",
                    self.opts.stall,
                    now.0,
                    self.injected
                        .iter()
                        .map(|i| i.what.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                    tails.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Arms `moment`, starts a recovery first where the moment comes with one, and waits for
    /// a worker to reach it: that worker's pid, node and slot, and the file that holds it
    /// there. `None` when none did within [`MOMENT_WAIT`].
    fn at_moment(
        &mut self,
        t: &Timed,
        moment: Moment,
    ) -> Result<Option<(u32, usize, usize, PathBuf)>, String> {
        let dir = self.spec.moments.clone();
        let armed = dir.join(format!("{}.arm", moment.name()));
        std::fs::write(&armed, b"").map_err(|e| format!("arm {}: {e}", armed.display()))?;
        if let Some((node, slot)) = t.trigger {
            let fault = Fault::KillWorker { node, slot };
            let note = self.inject(&fault).map_err(|e| {
                let _ = std::fs::remove_file(&armed);
                format!("injecting `{fault}`: {e:#}")
            })?;
            let landed = self.recorder.progress().0;
            self.injected.push(Injected {
                what: fault.to_string(),
                fault,
                at_step: t.at_step,
                landed_at_step: landed,
                note: note.or(Some(format!(
                    "to start a recovery for its {}",
                    moment.name()
                ))),
            });
        }
        let deadline = Instant::now() + MOMENT_WAIT;
        let prefix = format!("{}.hit-", moment.name());
        self.wait(|r| {
            hit(&dir, &prefix).is_some() || r.done().is_some() || Instant::now() >= deadline
        })?;
        // Disarmed; a worker that claimed it meanwhile is found below.
        let _ = std::fs::remove_file(&armed);
        let Some((pid, path)) = hit(&dir, &prefix) else {
            return Ok(None);
        };
        let found = self.nodes.iter().enumerate().find_map(|(i, n)| {
            // The newest worker with that pid: an older one may have had it before.
            let slot = n
                .workers()
                .into_iter()
                .rev()
                .find(|(_, p)| p.pid() == pid)?
                .0;
            Some((pid, i, slot, path.clone()))
        });
        if found.is_none() {
            let _ = std::fs::remove_file(&path);
        }
        Ok(found)
    }

    fn inject(&mut self, fault: &Fault) -> Result<Option<String>> {
        let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
        match *fault {
            Fault::KillWorker { node, slot } | Fault::HangWorker { node, slot } => {
                let sig = if matches!(fault, Fault::KillWorker { .. }) {
                    libc::SIGKILL
                } else {
                    libc::SIGSTOP
                };
                match self.nodes[node].worker(slot) {
                    Some(w) if w.signal(sig) => {}
                    _ => return Ok(Some("not injected: the slot runs no worker".into())),
                }
            }
            Fault::SlowWorker {
                node,
                slot,
                slowdown,
                ms,
            } => match self.nodes[node].worker(slot) {
                Some(w) => {
                    let throttle = crate::throttle::Throttle::start(w, f64::from(slowdown));
                    sleep(ms);
                    drop(throttle);
                }
                None => return Ok(Some("not injected: the slot runs no worker".into())),
            },
            Fault::KillNode { node, down_ms } => {
                self.nodes[node].kill();
                sleep(down_ms);
                self.nodes[node].restart(&self.spec)?;
            }
            Fault::StopNode { node, ms } => {
                self.nodes[node].signal_all(libc::SIGSTOP);
                sleep(ms);
                self.nodes[node].signal_all(libc::SIGCONT);
            }
            Fault::KillEtcdMember { member, down_ms } => {
                self.etcd.kill(member);
                sleep(down_ms);
                self.etcd.restart(member)?;
                self.servers
                    .extend(self.etcd.pid(member).and_then(Process::open));
            }
            Fault::EtcdOutage { ms } => {
                let members: Vec<Process> = self
                    .etcd
                    .pids()
                    .into_iter()
                    .filter_map(Process::open)
                    .collect();
                let stopped = members.iter().filter(|m| m.signal(libc::SIGSTOP)).count();
                if stopped < self.etcd.size() {
                    // No outage of part of the cluster: those stopped go on at once.
                    members.iter().for_each(|m| {
                        m.signal(libc::SIGCONT);
                    });
                    bail!("{stopped} of {} etcd members run", self.etcd.size());
                }
                sleep(ms);
                members.iter().for_each(|m| {
                    m.signal(libc::SIGCONT);
                });
            }
            Fault::StopStore { ms } => {
                let store = self.store.pid().and_then(Process::open);
                let store = store.filter(|s| s.signal(libc::SIGSTOP));
                let store = store.context("the store is not running")?;
                sleep(ms);
                store.signal(libc::SIGCONT);
            }
            Fault::KillStore { down_ms } => {
                self.store.kill();
                sleep(down_ms);
                self.store.restart()?;
                self.servers
                    .extend(self.store.pid().and_then(Process::open));
            }
            Fault::FlipBit => return self.flip_bit(),
            Fault::ForgeRendezvous => {
                let tried = self.forge_rendezvous(self.injected.len());
                return Ok(Some(format!("{tried} connections")));
            }
            Fault::Partition { node, ms } | Fault::SlowLink { node, ms } => {
                let Ok(net) = &self.network else {
                    return Ok(Some(format!("not injected: {}", self.network_mode())));
                };
                if matches!(fault, Fault::Partition { .. }) {
                    net.partition(node)?;
                    sleep(ms);
                    net.heal(node)?;
                } else {
                    let how = net.slow(node)?;
                    sleep(ms);
                    net.unslow(node)?;
                    return Ok(Some(how));
                }
            }
        }
        Ok(None)
    }

    /// Connects to each process-group listener the newest generation published, as a process
    /// that knows the job's and the groups' names but not the generation's secret: a greeting
    /// that claims the rank above the listener's, then a proof of zeros. Each connection waits
    /// for its answer on a thread of its own (a listener may be busy connecting to the worker
    /// held at its rendezvous), and ends with its local address if a listener answered it,
    /// which the listener must then refuse, and log. Returns how many connections were made;
    /// `entry` is the index in `injected` their count of answers goes to.
    fn forge_rendezvous(&mut self, entry: usize) -> usize {
        // The addresses the newest planned generation's members published, once they have
        // begun their rendezvous (the held worker's peers publish theirs as it is held).
        let published = || {
            let seen = self.recorder.seen();
            let g = seen
                .iter()
                .filter_map(|(_, k, _)| match self.keys.parse(k) {
                    JobKey::Plan(g) => Some(g),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let prefix = format!("{}gen-{g}/pg/", self.keys.root());
            let mut out: BTreeMap<String, String> = BTreeMap::new();
            for (_, key, value) in seen {
                if let (true, Some(v)) = (key.starts_with(&prefix), value) {
                    out.insert(key, String::from_utf8_lossy(&v).into_owned());
                }
            }
            out
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        while published().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut tried = 0;
        for (key, addr) in published() {
            let (Ok(addr), Some(rank)) = (
                addr.parse::<std::net::SocketAddr>(),
                key.rsplit_once("/rank-")
                    .and_then(|(_, r)| r.parse::<u32>().ok()),
            ) else {
                continue;
            };
            let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                continue;
            };
            tried += 1;
            self.forging
                .push((entry, std::thread::spawn(move || forge(s, rank + 1))));
        }
        tried
    }

    /// Flips one bit in the middle of rank 0's shard of the newest committed checkpoint, and
    /// checks that `marathon ckpt verify` names that step.
    fn flip_bit(&mut self) -> Result<Option<String>> {
        let store = Store::open_with(&self.root, self.store.options())?;
        let reader = Reader::new(store.clone());
        // The newest checkpoint whose manifest reads: a torn manifest's object exists, but it
        // is no commit.
        let mut newest = None;
        for step in reader.committed()?.into_iter().rev() {
            match reader.manifest(step) {
                Ok(m) => {
                    newest = Some((step, m));
                    break;
                }
                Err(marathon_storage::StorageError::BadManifest { .. }) => {}
                // Retention removed it meanwhile.
                Err(e) if !reader.committed()?.contains(&step) => {
                    return Ok(Some(format!(
                        "not injected: step {step} was collected ({e})"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((step, manifest)) = newest else {
            return Ok(Some("not injected: no checkpoint committed yet".into()));
        };
        let Some(shard) = manifest.shard_of(0) else {
            bail!("the manifest of step {step} names no shard of rank 0");
        };
        let path = store.path(shard);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let flipped = rt.block_on(async {
            let mut bytes = store.inner.get(&path).await?.bytes().await?.to_vec();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x10;
            store.inner.put(&path, bytes.into()).await?;
            Ok::<_, object_store::Error>(at)
        });
        let at = match flipped {
            Ok(at) => at,
            // Retention removed it meanwhile.
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Some(format!("not injected: step {step} was collected")))
            }
            Err(e) => return Err(e.into()),
        };
        self.flipped.push((step, unix_ms()));
        let (ok, out, _) = run_to_end(&self.opts.exe, &self.dir, &self.verify_args(Some(step)))?;
        if ok || !out.contains(&format!("step {step}: FAILED")) {
            bail!(
                "a bit flipped in {path} (byte {at}) went unnoticed: `marathon ckpt verify \
                 --step {step}` said:\n{out}"
            );
        }
        Ok(Some(format!(
            "checkpoint of step {step}, byte {at} of rank 0's shard; ckpt verify names it"
        )))
    }

    fn verify_args(&self, step: Option<u64>) -> Vec<String> {
        let mut args = vec!["ckpt".into(), "verify".into(), self.root.clone()];
        if let Some(s) = step {
            args.extend(["--step".into(), s.to_string()]);
        }
        for (k, v) in self.store.options() {
            args.extend(["--option".into(), format!("{k}={v}")]);
        }
        args
    }

    /// After the job: the agents' exit, the reference run, the checkpoints in the store, and
    /// every process stopped. The job's summary, and what went wrong.
    fn finish(&mut self, s: &Scenario) -> (Option<Summary>, Vec<String>) {
        let mut v = Vec::new();
        let mut answered: BTreeMap<usize, usize> = BTreeMap::new();
        for (entry, forging) in std::mem::take(&mut self.forging) {
            if let Ok(Some(answered_one)) = forging.join() {
                self.forged.push(answered_one);
                *answered.entry(entry).or_default() += 1;
            }
        }
        for (i, injected) in self.injected.iter_mut().enumerate() {
            if injected.fault == Fault::ForgeRendezvous {
                let n = answered.get(&i).copied().unwrap_or(0);
                let note = injected.note.take().unwrap_or_default();
                injected.note = Some(format!("{note}, {n} answered by a listener"));
            }
        }
        // The job's keys as they changed, for whoever reads a kept scenario's directory.
        let history: String = self
            .recorder
            .seen()
            .iter()
            .map(|(at, key, value)| {
                let value = value.as_deref().map(String::from_utf8_lossy);
                format!(
                    "{}\n",
                    serde_json::json!({ "at_ms": at, "key": key, "value": value })
                )
            })
            .collect();
        if let Err(e) = std::fs::write(self.dir.join("etcd-history.jsonl"), history) {
            v.push(format!("writing the etcd history: {e}"));
        }
        let summary = self.recorder.done().map(|raw| {
            serde_json::from_slice::<Summary>(&raw).map_err(|e| format!("the job's summary: {e}"))
        });
        let summary = match summary {
            Some(Ok(sm)) => Some(sm),
            Some(Err(e)) => {
                v.push(e);
                None
            }
            None => None,
        };
        if summary.is_some() {
            for n in &mut self.nodes {
                if !n.finish(Duration::from_secs(30)) {
                    v.push(format!(
                        "{}: its agent was still running 30 s after the job ended",
                        n.name
                    ));
                }
            }
        }
        match summary.as_ref() {
            Some(sm) if sm.steps != s.steps => v.push(format!(
                "the job ended at step {}, not its target {}",
                sm.steps, s.steps
            )),
            _ => {}
        }
        let reference_ok = match self.reference.take() {
            // A job that did not end has nothing to compare.
            Some(mut r) if summary.is_none() => {
                let _ = r.kill();
                let _ = r.wait();
                false
            }
            Some(mut r) => match r.wait() {
                Ok(st) if st.success() => true,
                _ => {
                    v.push(format!(
                        "the fault-free reference run failed; see {}",
                        self.dir.join("reference.log").display()
                    ));
                    false
                }
            },
            None => false,
        };
        if summary.is_some() && reference_ok {
            v.extend(check::against_reference(&self.dir, s.steps));
            v.extend(self.check_checkpoints(s));
        }
        v.extend(check::fencing(&self.keys, &self.recorder.seen()));
        v.extend(self.check_logs(s));
        // Everything stops: nodes, servers; then nothing may be left running.
        let mut all: Vec<Arc<Process>> = Vec::new();
        for n in &mut self.nodes {
            all.extend(n.every_process());
            n.kill();
        }
        for i in 0..self.etcd.size() {
            self.etcd.kill(i);
        }
        self.store.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        let running = || -> Vec<&Process> {
            let nodes = all.iter().map(|p| &**p);
            self.servers
                .iter()
                .chain(nodes)
                .filter(|p| p.running())
                .collect()
        };
        let mut left = running();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = running();
        }
        if !left.is_empty() {
            let pids: Vec<u32> = left.iter().map(|p| p.pid()).collect();
            v.push(format!(
                "processes left running after the scenario: {pids:?}"
            ));
            for p in left {
                p.signal(libc::SIGKILL);
            }
        }
        (summary, v)
    }

    /// Every checkpoint in the store verifies, except one whose bit was flipped and that was
    /// not written again; of the checkpoints ever committed, the newest `keep_last` are all
    /// there (retention lost none it should keep), and the last step's is one of them.
    fn check_checkpoints(&self, s: &Scenario) -> Vec<String> {
        let (_, out, err) = match run_to_end(&self.opts.exe, &self.dir, &self.verify_args(None)) {
            Ok(r) => r,
            Err(e) => return vec![format!("marathon ckpt verify: {e:#}")],
        };
        check::checkpoints_in_store(
            (&out, &err),
            &self.keys,
            &self.recorder.seen(),
            &self.flipped,
            s.store.torn_manifest,
            self.commits.seen(),
            s.keep_last,
            s.steps,
        )
    }

    /// From the agents' logs and the history of the job's keys: no rendezvous ran out its
    /// deadline, and no generation loaded a torn or damaged checkpoint (see [`check`]).
    fn check_logs(&self, s: &Scenario) -> Vec<String> {
        let lines: Vec<String> = self.nodes.iter().flat_map(|n| n.lines()).collect();
        let mut v = check::rendezvous_deadlines(lines.iter().map(String::as_str));
        let (forged, logged) =
            check::forged_refused(&self.forged, lines.iter().map(String::as_str));
        v.extend(forged);
        if !self.forged.is_empty() {
            self.say(format_args!(
                "{} forged rendezvous connections answered, all closed; {logged} refusals logged",
                self.forged.len()
            ));
        }
        v.extend(check::checkpoint_loads(
            &self.keys,
            &self.recorder.seen(),
            s.store.torn_manifest,
            &self.flipped,
        ));
        v
    }

    fn outcome(
        &self,
        s: &Scenario,
        summary: Option<Summary>,
        violations: Vec<String>,
        started: Instant,
        opts: &RunOptions,
    ) -> Outcome {
        let plans = self
            .recorder
            .seen()
            .iter()
            .filter(|(_, k, v)| matches!(self.keys.parse(k), JobKey::Plan(_)) && v.is_some())
            .count() as u64;
        let g = summary
            .as_ref()
            .map(|sm| sm.goodput.clone())
            .unwrap_or_default();
        Outcome {
            seed: s.seed,
            scenario: s.shape(),
            network: self.network_mode(),
            injected: self.injected.clone(),
            recoveries: plans.saturating_sub(1),
            agent_restarts: self.nodes.iter().map(|n| n.restarts).sum(),
            lost: Lost {
                startup_s: g.startup_s,
                detection_s: g.detection_s,
                reform_s: g.reform_s,
                transfer_s: g.transfer_s,
                recomputed_s: g.recomputed_s,
                checkpoint_stall_s: g.checkpoint_stall_s,
            },
            recomputed_steps: g.recomputed_steps,
            wall_s: started.elapsed().as_secs_f64(),
            ok: violations.is_empty(),
            violations,
            dir: opts
                .keep_in
                .as_ref()
                .map(|_| self.dir.display().to_string()),
        }
    }
}

/// How long a fault waits for its moment before it lands anyway.
const MOMENT_WAIT: Duration = Duration::from_secs(20);

/// The worker held at a moment, from the file that holds it: its pid and the file.
fn hit(dir: &Path, prefix: &str) -> Option<(u32, PathBuf)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let pid = name.strip_prefix(prefix)?.parse().ok()?;
        Some((pid, e.path()))
    })
}

/// A forged rendezvous connection waiting for its listener: see [`forge`].
type Forging = std::thread::JoinHandle<Option<(String, bool)>>;

/// One forged rendezvous connection on `s`: a greeting claiming `rank`, and, once a listener
/// answers with its nonce and proof, a proof of zeros. If it was answered: its local address,
/// and whether the listener then closed it without a byte more (refused; a listener that took
/// it as a member would keep it open and send it a collective's data).
fn forge(mut s: std::net::TcpStream, rank: u32) -> Option<(String, bool)> {
    use std::io::{Read, Write};
    let mut hello = b"MRT2".to_vec();
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&[7u8; 16]);
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.write_all(&hello).ok()?;
    let mut answer = [0u8; 48];
    s.read_exact(&mut answer).ok()?;
    let local = s.local_addr().ok()?.to_string();
    let _ = s.write_all(&[0u8; 32]);
    let closed = match s.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    Some((local, closed))
}

/// `fault` aimed at the worker found at a moment (node-`node`, slot `slot`), or at its node;
/// faults of the servers are as they were.
fn aimed(fault: &Fault, node: usize, slot: usize) -> Fault {
    match *fault {
        Fault::KillWorker { .. } => Fault::KillWorker { node, slot },
        Fault::HangWorker { .. } => Fault::HangWorker { node, slot },
        Fault::SlowWorker { slowdown, ms, .. } => Fault::SlowWorker {
            node,
            slot,
            slowdown,
            ms,
        },
        Fault::KillNode { down_ms, .. } => Fault::KillNode { node, down_ms },
        Fault::StopNode { ms, .. } => Fault::StopNode { node, ms },
        Fault::Partition { ms, .. } => Fault::Partition { node, ms },
        Fault::SlowLink { ms, .. } => Fault::SlowLink { node, ms },
        ref other => other.clone(),
    }
}

/// The corpus, the job's configuration `c.toml` (checkpoints in the store, with the scenario's
/// store faults) and the reference's `ref.toml` (one process, no faults, its own logs).
fn prepare(s: &Scenario, opts: &RunOptions, dir: &Path, root: &str, store: &Garage) -> Result<()> {
    let text = match &opts.corpus {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("corpus.txt");
            std::fs::write(&p, crate::corpus::text(s.seed, 120_000))?;
            p
        }
    };
    marathon_runtime::data::prepare(&marathon_runtime::data::PrepareOptions {
        inputs: vec![text],
        out_dir: dir.join("corpus"),
        val_fraction: 0.0,
    })
    .context("prepare the scenario's corpus")?;
    let job = |train_lines: String, sections: String| {
        SmallJob {
            n_layer: s.n_layer,
            micro_batch: s.micro_batch,
            global_batch: s.global_batch,
            decay_tokens: 40960,
            steps: s.steps,
            train_lines,
            sections,
            ..SmallJob::default()
        }
        .toml()
    };
    let options: String = store
        .options()
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let st = &s.store;
    let torn = st.torn_manifest.map_or(String::new(), |t| {
        format!("tear_puts_to = \"{}\"\n", format::manifest_name(t))
    });
    let checkpoint = format!(
        "[checkpoint]\nroot = \"{root}\"\nevery_steps = {}\nkeep_last = {}\n\
         [checkpoint.options]\n{options}\
         [checkpoint.faults]\nerror_rate = {}\ndelay_ms = {}\nseed = {}\n{torn}",
        s.checkpoint_every, s.keep_last, st.error_rate, st.delay_ms, s.seed
    );
    let logs = |prefix: &str| {
        format!("metrics = \"{prefix}metrics.jsonl\"\nsamples_log = \"{prefix}samples.jsonl\"\n")
    };
    std::fs::write(dir.join("c.toml"), job(logs(""), checkpoint))?;
    let reference = job(logs("ref-"), String::new());
    std::fs::write(dir.join("ref.toml"), reference)?;
    Ok(())
}
