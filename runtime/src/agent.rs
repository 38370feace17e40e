//! The node agent: registers its node's slots under a lease, runs the membership core
//! (`marathon_elastic::membership`) against etcd, and supervises one worker process per slot
//! (`crate::worker`), carrying each through the job's generations without restarting it.
//!
//! What the agent sees and does:
//! - Its own workers' deaths, at once (it is their parent). It records the loss under the
//!   generation (`gen-<g>/lost/<node>/<slot>`, which every agent watches), so every member
//!   aborts its collectives without waiting for a timeout. The dead worker's slot is suspect (a
//!   bad GPU): the node stops offering that slot for `cooldown`, then offers it again and the
//!   job grows back at a step boundary. The node's other workers keep their processes, in the
//!   plan or idle. Only when `withdraw_after` of its workers die within one cooldown is the
//!   whole node suspect (a bad host): it offers no slots for the cooldown, and its workers stop.
//! - Every registration, the leader, every generation and every loss, by one watch on the
//!   job's keys. The leader plans; a plan commits with the generation counter in one
//!   compare-and-swap, which fences proposals from an older generation.
//! - Its workers' step progress: a worker with none for `hang` is declared hung, killed and
//!   recorded lost like a dead one.
//! - Its own lease: a lease that could not be kept alive means the job has presumed this node
//!   dead, so the agent kills its workers and exits rather than carry on as a zombie.
//!
//! The worker processes hold the agent's pipe as their stdin; when the agent dies, they exit.
//!
//! Where the workers run is the agent's [`Host`]: processes ([`Processes`]), or none at all
//! ([`Hollow`], which records what the agent asked of them), so that many agents can run in
//! one process against a real etcd (`marathon bench elastic`).
//!
//! The same agent runs three ways: on its own thread against etcd ([`run`]) or any
//! [`Cluster`] ([`run_with`]), waiting for its inputs; or turn by turn on a caller's
//! [`Clock`] ([`Stepped`]), without threads or waiting, as the coordination simulation
//! (`marathon_chaos::agents`) drives hundreds of them on simulated time.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;

use marathon_elastic::membership::{Action, Event, Membership, Timing};
use marathon_elastic::plan::{Offer, Plan, Slot};
use marathon_elastic::{
    job, retrying, Change, Changes, Cluster, Coordinator, ElasticError, EtcdCoordinator, JobKey,
    JobKeys, Lease,
};

use crate::error::{Result, RuntimeError};
use crate::metrics::{self, AgentMetrics, Endpoint, JobMetrics, JobView};
use crate::records::{unix_ms, FlaggedStraggler, LossCause, LostRecord, PlannedRecord, StepCommit};
use crate::status::JobStatus;
use crate::worker::{FromWorker, ToWorker};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub endpoints: Vec<String>,
    /// TLS and credentials for etcd.
    pub access: marathon_elastic::EtcdAccess,
    pub job: String,
    /// This node's name, unique in the job.
    pub node: String,
    pub slots: usize,
    pub tp: usize,
    pub pp: usize,
    /// Microbatches in the global batch.
    pub microbatches: usize,
    /// Time to live of the node's lease: a node that stops renewing it is dead this long after.
    pub lease_ttl: Duration,
    pub timing: Timing,
    /// How long the slot of a worker that died is not offered.
    pub cooldown: Duration,
    /// Worker deaths within one cooldown that withdraw the whole node (0: never).
    pub withdraw_after: usize,
    /// Live slots the job waits for before its first generation.
    pub wait_slots: usize,
    /// Whether a worker flagged as a straggler is evicted, as a hung one is.
    pub evict_stragglers: bool,
    /// Says nothing on stderr (many agents in one process).
    pub quiet: bool,
    /// Where the agent serves its metrics (and, while it leads, the job's) for Prometheus; its
    /// workers serve theirs on the following ports ([`metrics::worker_addr`]), and `/targets`
    /// lists them all for Prometheus's HTTP service discovery.
    pub metrics_addr: Option<SocketAddr>,
}

/// How often the agent looks at its worker processes, and the shortest it waits for a
/// deadline.
const TICK: Duration = Duration::from_millis(5);
/// How long workers have to exit after being told to stop, before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the agent keeps retrying an etcd call before it gives up; a longer outage costs
/// the node its lease anyway.
const OUTAGE_MAX: Duration = Duration::from_secs(30);
/// Generations a worker may leave on an error of its own with no step completed in between
/// before its agent gives up on the node.
const RETRIES_MAX: u32 = 3;

/// Where an agent reads the time: the wall clock, or a simulation's. It never goes back, and
/// it is the only time the agent's decisions read (records it writes for people carry wall
/// time).
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What reaches the agent's loop.
enum Input {
    Change(Change),
    WatchFailed(String),
    Worker {
        index: usize,
        pid: u32,
        event: FromWorker,
    },
}

/// Where a worker's reports go: the agent's loop.
pub struct WorkerEvents {
    tx: mpsc::Sender<Input>,
    index: usize,
}

impl std::fmt::Debug for WorkerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerEvents(slot {})", self.index)
    }
}

impl WorkerEvents {
    /// Passes on one report of the worker with `pid`; false once the agent is gone.
    pub fn send(&self, pid: u32, event: FromWorker) -> bool {
        self.tx
            .send(Input::Worker {
                index: self.index,
                pid,
                event,
            })
            .is_ok()
    }
}

/// Where an agent's workers run.
pub trait Host: Send {
    /// Starts the worker of slot `index`, whose reports go to `events`; returns its pid.
    fn spawn(&mut self, index: usize, events: WorkerEvents) -> Result<u32>;
    /// Sends one command. A worker that cannot hear is dead or dying; its exit is seen.
    fn send(&mut self, index: usize, cmd: &ToWorker);
    /// Kills the worker now.
    fn kill(&mut self, index: usize);
    /// How the worker ended, once it has (and is reaped).
    fn exited(&mut self, index: usize) -> Result<Option<String>>;
    /// The node registered under its lease.
    fn registered(&mut self) {}
    /// This node started generation `generation` (placed in its plan or not).
    fn started(&mut self, _generation: u64) {}
    /// How long the agent may wait for its inputs before it looks at its workers again.
    fn poll_interval(&self) -> Duration {
        TICK
    }
}

/// The workers as processes of a program: each holds the agent's pipe as its stdin and writes
/// its reports as JSON lines on its stdout. Every one left is killed and reaped when the host
/// goes, however the agent ends.
#[derive(Debug)]
pub struct Processes {
    /// The program and arguments that start one worker.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Environment for the workers.
    pub env: Vec<(String, String)>,
    /// Environment of each slot's worker on top of it (a GPU job's device for the slot);
    /// empty for none.
    pub slot_env: Vec<Vec<(String, String)>>,
    children: BTreeMap<usize, (Child, ChildStdin)>,
}

impl Processes {
    pub fn new(
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        slot_env: Vec<Vec<(String, String)>>,
    ) -> Self {
        Processes {
            program,
            args,
            env,
            slot_env,
            children: BTreeMap::new(),
        }
    }
}

impl Host for Processes {
    fn spawn(&mut self, index: usize, events: WorkerEvents) -> Result<u32> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .envs(self.slot_env.get(index).into_iter().flatten().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| RuntimeError::io("start a worker from", &self.program, e))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Ok(event) = serde_json::from_str::<FromWorker>(&line) {
                    if !events.send(pid, event) {
                        return;
                    }
                }
            }
        });
        let stdin = child.stdin.take().expect("stdin is piped");
        self.children.insert(index, (child, stdin));
        Ok(pid)
    }

    fn send(&mut self, index: usize, cmd: &ToWorker) {
        if let Some((_, stdin)) = self.children.get_mut(&index) {
            let line = serde_json::to_string(cmd).expect("commands serialise");
            let _ = writeln!(stdin, "{line}").and_then(|_| stdin.flush());
        }
    }

    fn kill(&mut self, index: usize) {
        if let Some((child, _)) = self.children.get_mut(&index) {
            let _ = child.kill();
        }
    }

    fn exited(&mut self, index: usize) -> Result<Option<String>> {
        let Some((child, _)) = self.children.get_mut(&index) else {
            return Ok(Some("exited".into()));
        };
        let status = child
            .try_wait()
            .map_err(|e| RuntimeError::io("wait for a worker from", &self.program, e))?;
        Ok(status.map(|s| {
            self.children.remove(&index);
            format!("exited ({s})")
        }))
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (child, _) in self.children.values_mut() {
            let _ = child.kill();
        }
        for (child, _) in self.children.values_mut() {
            let _ = child.wait();
        }
    }
}

/// When each node of a [`Hollow`] host registered (generation 0) and started each generation.
pub type Starts = Arc<Mutex<Vec<(String, u64, Instant)>>>;

/// No workers at all: a worker is "started" by name only, never reports, and ends when the
/// agent stops or kills it. It records when its node started each generation, for a bench of
/// many agents.
#[derive(Debug)]
pub struct Hollow {
    node: String,
    running: BTreeSet<usize>,
    starts: Starts,
}

impl Hollow {
    pub fn new(node: &str, starts: Starts) -> Self {
        Hollow {
            node: node.to_owned(),
            running: BTreeSet::new(),
            starts,
        }
    }
}

impl Host for Hollow {
    fn spawn(&mut self, index: usize, _events: WorkerEvents) -> Result<u32> {
        self.running.insert(index);
        Ok(0)
    }

    fn send(&mut self, index: usize, cmd: &ToWorker) {
        if matches!(cmd, ToWorker::Stop) {
            self.running.remove(&index);
        }
    }

    fn kill(&mut self, index: usize) {
        self.running.remove(&index);
    }

    fn exited(&mut self, index: usize) -> Result<Option<String>> {
        Ok((!self.running.contains(&index)).then(|| "stopped".to_string()))
    }

    fn registered(&mut self) {
        self.started(0);
    }

    fn started(&mut self, generation: u64) {
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        starts.push((self.node.clone(), generation, Instant::now()));
    }

    /// Nothing to look at: the agent wakes for its inputs and its deadlines.
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// One worker, as the agent sees it.
struct Worker {
    pid: u32,
    /// The agent stopped it on purpose: its exit is no failure.
    stopping: bool,
    /// Why the agent killed it, when it was evicted.
    evicted: Option<(LossCause, String)>,
}

/// The node's workers and where they run.
struct Workers {
    host: Box<dyn Host>,
    running: BTreeMap<usize, Worker>,
}

impl Workers {
    fn send_all(&mut self, cmd: &ToWorker) {
        for &index in self.running.keys() {
            self.host.send(index, cmd);
        }
    }
}

/// Runs an agent whose workers are processes of `host` until the job is done (`Ok`), or until
/// this node is presumed dead or something it cannot retry fails.
pub fn run(opts: AgentOptions, host: Processes) -> Result<()> {
    let coord: Arc<dyn Cluster> = Arc::new(EtcdCoordinator::connect_with(
        &opts.endpoints,
        Duration::from_secs(10),
        &opts.access,
    )?);
    run_with(coord, opts, Box::new(host), None)
}

/// Runs an agent over `coord` (etcd, or the in-process coordinator for agents that are threads
/// of one process) with its workers on `host`. When `crash` turns true the agent
/// stops at once as a crashed node would: its lease is not revoked but runs out, and its
/// workers are gone.
pub fn run_with(
    coord: Arc<dyn Cluster>,
    opts: AgentOptions,
    host: Box<dyn Host>,
    crash: Option<Arc<AtomicBool>>,
) -> Result<()> {
    Agent::new(coord, opts, host, crash, Arc::new(WallClock), Drive::Waits)?.run()
}

/// An agent driven one turn at a time by its caller, on the caller's clock: the code of
/// [`run_with`] without a thread or a wait. Each [`Stepped::step`] reads what its watch has
/// delivered and its workers reported, and does what is due by the clock.
pub struct Stepped {
    agent: Agent,
}

impl std::fmt::Debug for Stepped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stepped({})", self.agent.opts.node)
    }
}

impl Stepped {
    /// Registers the node and reads the job's keys, as an agent starting does.
    pub fn start(
        coord: Arc<dyn Cluster>,
        opts: AgentOptions,
        host: Box<dyn Host>,
        clock: Arc<dyn Clock>,
    ) -> Result<Stepped> {
        let mut agent = Agent::new(coord, opts, host, None, clock, Drive::Steps(None))?;
        agent.begin()?;
        Ok(Stepped { agent })
    }

    /// Handles every change delivered and every worker report, then what is due by the clock.
    /// True once the agent has ended (the job is done and its workers stopped).
    pub fn step(&mut self) -> Result<bool> {
        let a = &mut self.agent;
        while let Ok(input) = a.inputs.try_recv() {
            if a.turn(Some(input))? {
                return Ok(true);
            }
        }
        // One change a turn, as the waiting agent takes them.
        loop {
            let next = match &a.drive {
                Drive::Steps(Some(watch)) => watch.next(Duration::ZERO),
                _ => Ok(None),
            };
            let input = match next {
                Ok(Some(c)) => Input::Change(c),
                Ok(None) => break,
                Err(e) => {
                    // The turn watches again.
                    a.drive = Drive::Steps(None);
                    Input::WatchFailed(e.to_string())
                }
            };
            if a.turn(Some(input))? {
                return Ok(true);
            }
        }
        a.turn(None)
    }

    /// Stops at once as a crashed node: its lease is not revoked but runs out.
    pub fn crash(mut self) {
        if let Some(r) = self.agent.registration.take() {
            r.abandon();
        }
    }
}

/// How the agent's inputs reach it.
enum Drive {
    /// It waits on its channel, into which a thread passes its watch's changes.
    Waits,
    /// Its caller steps it ([`Stepped`]), and the watch is read at each step.
    Steps(Option<Box<dyn Changes>>),
}

struct Agent {
    opts: AgentOptions,
    coord: Arc<dyn Cluster>,
    keys: JobKeys,
    membership: Membership,
    registration: Option<Box<dyn Lease>>,
    workers: Workers,
    crash: Option<Arc<AtomicBool>>,
    clock: Arc<dyn Clock>,
    drive: Drive,
    /// Set when the agent ends, for the threads it started.
    gone: Arc<AtomicBool>,
    inputs: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    /// Until when each slot whose worker died is not offered.
    cooling: BTreeMap<usize, Instant>,
    /// When this node's workers died, within the last cooldown.
    deaths: Vec<Instant>,
    /// Until when this node offers no slots at all, after too many of its workers died.
    withdrawn_until: Option<Instant>,
    /// The reason last given for not planning, so it is said once.
    cannot_plan: Option<String>,
    /// The newest generation this agent aborted.
    aborted: u64,
    /// Generations left on errors of a worker's own since the last completed step.
    retries: u32,
    /// A worker of this node lost a peer that nobody has reported lost: if nobody does by the
    /// time given (a partition between live nodes), the same members start over.
    suspect: Option<(u64, Instant, Slot, String)>,
    done: bool,
    /// The stragglers already acted on, by generation and slot.
    stragglers: BTreeSet<(u64, Slot)>,
    /// When this agent learned the job is done.
    done_at: Option<Instant>,
    /// An operator asked the job to stop (`marathon job stop`).
    finishing: bool,
    /// The metrics endpoint, when it serves one.
    live: Option<Live>,
    /// A write under the node's lease found it gone.
    lease_ran_out: bool,
}

/// What the agent's metrics endpoint shares with its loop.
struct Live {
    _endpoint: Endpoint,
    agent: Arc<AgentMetrics>,
    leads: Arc<AtomicBool>,
    /// The slots whose workers run, for `/targets`.
    running: Arc<Mutex<Vec<usize>>>,
}

impl Live {
    fn start(opts: &AgentOptions, coord: &Arc<dyn Cluster>) -> Result<Option<Live>> {
        let Some(addr) = opts.metrics_addr else {
            return Ok(None);
        };
        let mut registry = Registry::default();
        let agent = AgentMetrics::register(&mut registry);
        let job = JobMetrics::register(&mut registry);
        let leads = Arc::new(AtomicBool::new(false));
        let running: Arc<Mutex<Vec<usize>>> = Arc::default();
        let refresh: metrics::Refresh = {
            let (coord, agent, leads, name) = (
                coord.clone(),
                agent.clone(),
                leads.clone(),
                opts.job.clone(),
            );
            Box::new(move || {
                agent.coordinator_errors(coord.request_errors());
                if !leads.load(Ordering::SeqCst) {
                    job.set(None);
                } else if let Ok(s) = JobStatus::read(coord.keys(), &name) {
                    job.set(Some(JobView::of(&s)));
                }
            })
        };
        let targets: metrics::Page = {
            let (running, job, node) = (running.clone(), opts.job.clone(), opts.node.clone());
            Box::new(move || {
                let base = |role: &str| {
                    vec![
                        ("marathon_job", job.clone()),
                        ("node", node.clone()),
                        ("role", role.to_owned()),
                    ]
                };
                let mut targets = vec![(addr, base("agent"))];
                for &slot in running.lock().expect("never poisoned").iter() {
                    let mut labels = base("worker");
                    labels.push(("slot", slot.to_string()));
                    targets.push((metrics::worker_addr(addr, slot), labels));
                }
                metrics::targets_json(&targets)
            })
        };
        let endpoint = Endpoint::serve(
            addr,
            registry,
            Some(refresh),
            [("/targets", targets)].into(),
        )?;
        Ok(Some(Live {
            _endpoint: endpoint,
            agent,
            leads,
            running,
        }))
    }
}

impl Agent {
    fn new(
        coord: Arc<dyn Cluster>,
        opts: AgentOptions,
        host: Box<dyn Host>,
        crash: Option<Arc<AtomicBool>>,
        clock: Arc<dyn Clock>,
        drive: Drive,
    ) -> Result<Self> {
        let keys = JobKeys::new(&opts.job);
        check_running_plan(coord.keys(), &keys, &opts)?;
        let membership =
            Membership::new(&opts.node, opts.tp, opts.pp, opts.microbatches, opts.timing)
                .wait_for_slots(opts.wait_slots);
        let registration = coord.register(
            &keys.node(&opts.node),
            &Offer::all(opts.slots).to_json(),
            opts.lease_ttl,
        )?;
        let live = Live::start(&opts, &coord)?;
        let mut host = host;
        host.registered();
        let (tx, inputs) = mpsc::channel();
        Ok(Agent {
            opts,
            coord,
            keys,
            membership,
            registration: Some(registration),
            workers: Workers {
                host,
                running: BTreeMap::new(),
            },
            crash,
            clock,
            drive,
            gone: Arc::default(),
            inputs,
            tx,
            cooling: BTreeMap::new(),
            deaths: Vec::new(),
            withdrawn_until: None,
            cannot_plan: None,
            aborted: 0,
            retries: 0,
            suspect: None,
            done: false,
            stragglers: BTreeSet::new(),
            done_at: None,
            finishing: false,
            live,
            lease_ran_out: false,
        })
    }

    fn log(&self, msg: impl std::fmt::Display) {
        if self.opts.quiet {
            return;
        }
        let (job, node) = (&self.opts.job, &self.opts.node);
        tracing::info_span!("agent", job = %job, node = %node).in_scope(|| tracing::info!("{msg}"));
    }

    /// The node's registration, held from the start until a crash.
    fn registration(&self) -> &dyn Lease {
        self.registration
            .as_deref()
            .expect("registered until it crashes")
    }

    fn run(mut self) -> Result<()> {
        self.begin()?;
        loop {
            let input = self.inputs.recv_timeout(self.next_wait()).ok();
            if self.turn(input)? {
                return Ok(());
            }
        }
    }

    /// What an agent does once registered: says so, and reads the job's keys.
    fn begin(&mut self) -> Result<()> {
        self.log(format_args!(
            "registered {} slots for job {} at {} under a lease of {} s",
            self.opts.slots,
            self.opts.job,
            self.opts.endpoints.join(","),
            self.registration().ttl().as_secs()
        ));
        self.resync()
    }

    /// One turn of the agent's loop: handles `input`, if any, then whatever is due. True once
    /// the agent has ended: the job is done, or the node crashed. A crash or a lost lease is
    /// looked at first, so that nothing that arrived meanwhile is acted on for a dead node.
    fn turn(&mut self, input: Option<Input>) -> Result<bool> {
        if self
            .crash
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            if let Some(r) = self.registration.take() {
                r.abandon();
            }
            self.log("crashed: its lease runs out");
            return Ok(true);
        }
        if self.lease_ran_out || self.registration().lost() {
            self.log("lost its lease: the job presumes this node dead; stopping its workers");
            return Err(RuntimeError::Argument {
                name: "lease",
                reason: format!(
                    "node {} could not keep its lease alive within {} ms; its workers were \
                     stopped so they cannot act for a dead node. Check the connection to \
                     etcd, then start the agent again: it rejoins as a new node",
                    self.opts.node,
                    self.opts.lease_ttl.as_millis()
                ),
            });
        }
        match input {
            Some(Input::Change(c)) => self.on_change(c)?,
            Some(Input::WatchFailed(reason)) => {
                self.log(format_args!("the watch ended ({reason}); watching again"));
                self.resync()?;
            }
            Some(Input::Worker { index, pid, event }) => self.on_worker(index, pid, event)?,
            None => {}
        }
        self.reap()?;
        self.cooldown()?;
        if let Some((generation, due, slot, reason)) = self.suspect.clone() {
            if self.clock.now() >= due {
                self.suspect = None;
                if generation == self.membership.generation() && generation > self.aborted {
                    self.log(format_args!(
                        "nobody reported the peer that slot {} lost in generation \
                         {generation}; starting over",
                        slot.index
                    ));
                    self.start_over(generation, slot, reason)?;
                }
            }
        }
        self.feed(Event::Tick)?;
        self.report();
        if self.done && self.workers.running.is_empty() {
            self.log("the job is done");
            return Ok(true);
        }
        if self
            .done_at
            .is_some_and(|t| self.clock.now() > t + STOP_GRACE)
        {
            // Dropping the agent kills what is left.
            self.log(format_args!(
                "the job is done; {} workers still running {} s after it ended are stopped",
                self.workers.running.len(),
                STOP_GRACE.as_secs()
            ));
            return Ok(true);
        }
        Ok(false)
    }

    /// Brings the metrics endpoint's view of this node up to date.
    fn report(&self) {
        let Some(live) = &self.live else { return };
        let running: Vec<usize> = self.workers.running.keys().copied().collect();
        let leads = self.membership.leads();
        live.agent.set(
            self.current_offer().count(),
            running.len(),
            self.registration.as_ref().is_some_and(|r| !r.lost()),
            leads,
        );
        live.leads.store(leads, Ordering::SeqCst);
        *live.running.lock().expect("never poisoned") = running;
    }

    /// How long to wait for inputs: until the next deadline (the core's, a cooldown's, a suspect
    /// peer's, the stop grace), at least [`TICK`] and at most the host's poll interval.
    fn next_wait(&self) -> Duration {
        let poll = self.workers.host.poll_interval();
        self.next_due().map_or(poll, |t| {
            t.saturating_duration_since(self.clock.now())
                .clamp(TICK, poll.max(TICK))
        })
    }

    /// The agent's next deadline: the core's, a cooldown's, a suspect peer's, the stop grace.
    fn next_due(&self) -> Option<Instant> {
        [
            self.membership.next_due(),
            self.cooling.values().min().copied(),
            self.withdrawn_until,
            self.suspect.as_ref().map(|s| s.1),
            self.done_at.map(|t| t + STOP_GRACE),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Watches the job's keys, then reads them all: anything that changes between the two is
    /// seen twice, which the membership core takes calmly.
    fn resync(&mut self) -> Result<()> {
        let (coord, root) = (self.coord.clone(), self.keys.root().to_owned());
        let watch = retrying(OUTAGE_MAX, || coord.watch(&root))?;
        self.follow(watch);
        let mut listed = retrying(OUTAGE_MAX, || coord.list(&root))?;
        // Registrations and the generation first: a loss is read against the generation.
        // The job's end before all: an agent started after it starts nothing.
        listed.sort_by_key(|(k, _)| match self.keys.parse(k) {
            JobKey::Done => 0,
            JobKey::Node(_) => 1,
            JobKey::Leader | JobKey::Generation => 2,
            _ => 3,
        });
        // The job's end first of all, before anything could make a leader plan.
        let ended = listed
            .iter()
            .position(|(k, _)| self.keys.parse(k) != JobKey::Done)
            .unwrap_or(listed.len());
        let rest = listed.split_off(ended);
        for (key, value) in listed {
            self.on_change(Change {
                key,
                value: Some(value),
            })?;
        }
        // A node whose key went while nobody watched expired meanwhile.
        let gone: Vec<String> = self
            .membership
            .live()
            .keys()
            .filter(|n| {
                !rest
                    .iter()
                    .any(|(k, _)| self.keys.parse(k) == JobKey::Node((*n).clone()))
            })
            .cloned()
            .collect();
        for node in gone {
            self.feed(Event::Expired { node })?;
        }
        for (key, value) in rest {
            self.on_change(Change {
                key,
                value: Some(value),
            })?;
        }
        if retrying(OUTAGE_MAX, || coord.get(&self.keys.leader()))?.is_none() {
            self.campaign()?;
        }
        Ok(())
    }

    /// Passes the watch's changes to the loop: from a thread of its own while the agent waits
    /// for inputs, or at each step when it is stepped.
    fn follow(&mut self, watch: Box<dyn Changes>) {
        if let Drive::Steps(held) = &mut self.drive {
            *held = Some(watch);
            return;
        }
        let (tx, gone) = (self.tx.clone(), self.gone.clone());
        std::thread::spawn(move || loop {
            // The agent ended: so does its watch, within a second, change or not.
            if gone.load(Ordering::SeqCst) {
                return;
            }
            match watch.next(Duration::from_secs(1)) {
                Ok(Some(c)) => {
                    if tx.send(Input::Change(c)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Input::WatchFailed(e.to_string()));
                    return;
                }
            }
        });
    }

    fn campaign(&mut self) -> Result<()> {
        let (key, me) = (self.keys.leader(), self.opts.node.as_bytes());
        let reg = self.registration();
        let holder = retrying(OUTAGE_MAX, || {
            // A lost lease cannot lead; the next turn stops the agent.
            if reg.lost() {
                return Ok(Vec::new());
            }
            self.coord.campaign(&key, me, reg)
        });
        let holder = self.lease_gone(holder)?;
        if !holder.is_empty() {
            let node = String::from_utf8_lossy(&holder).into_owned();
            if node == self.opts.node {
                self.log("leads the job");
            }
            self.feed(Event::Leader { node })?;
        }
        Ok(())
    }

    fn on_change(&mut self, c: Change) -> Result<()> {
        match (self.keys.parse(&c.key), c.value) {
            (JobKey::Node(node), Some(v)) => {
                let offer = Offer::parse(&v).unwrap_or_default();
                self.feed(Event::Registered { node, offer })
            }
            (JobKey::Node(node), None) => self.feed(Event::Expired { node }),
            (JobKey::Leader, Some(v)) => {
                let node = String::from_utf8_lossy(&v).into_owned();
                self.feed(Event::Leader { node })
            }
            (JobKey::Leader, None) => self.campaign(),
            (JobKey::Generation, Some(v)) => {
                let generation = marathon_elastic::job::parse_generation(&c.key, &v)?;
                if generation <= self.membership.generation() {
                    return Ok(());
                }
                let read = || job::plan(&*self.coord, &self.keys, generation);
                let Some(plan) = retrying(OUTAGE_MAX, read)? else {
                    return Ok(());
                };
                fits(&self.opts, &self.keys.plan(generation), &plan)?;
                self.feed(Event::Committed { generation, plan })
            }
            (JobKey::Lost { generation, slot }, Some(_)) => {
                if generation == self.membership.generation() {
                    self.feed(Event::WorkerExited { slot })?;
                }
                Ok(())
            }
            (JobKey::Retry { generation, .. }, Some(_)) => self.feed(Event::Retry { generation }),
            (JobKey::Stop, Some(_)) => {
                if !self.finishing {
                    self.finishing = true;
                    self.log(
                        "the job was asked to stop: its workers end it at the next step boundary, \
                         on a checkpoint",
                    );
                    self.workers.send_all(&ToWorker::Finish);
                }
                Ok(())
            }
            (JobKey::Done, Some(_)) => {
                if !self.done {
                    self.done = true;
                    self.done_at = Some(self.clock.now());
                    self.log("the job reached its last step; stopping the workers");
                    for w in self.workers.running.values_mut() {
                        w.stopping = true;
                    }
                    self.workers.send_all(&ToWorker::Stop);
                }
                // From now on the core plans nothing, even when this agent comes to lead.
                self.feed(Event::Done)
            }
            (JobKey::Committed(generation), Some(v)) => {
                if let Ok(c) = serde_json::from_slice::<StepCommit>(&v) {
                    for f in c.stragglers {
                        self.on_straggler(generation, f);
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A rank flagged as a straggler by its generation's rank 0: the leader logs it, and the
    /// agent running it evicts it when so configured.
    fn on_straggler(&mut self, generation: u64, f: FlaggedStraggler) {
        if !self.stragglers.insert((generation, f.slot.clone())) {
            return;
        }
        let current = generation == self.membership.generation() && generation > self.aborted;
        let evicts = self.opts.evict_stragglers && current && !self.done;
        if self.membership.leads() {
            self.log(format_args!(
                "straggler in generation {generation}: node {} slot {} (rank {}), its compute \
                 per microbatch {:.1}x its peers' median, flagged at step {}{}",
                f.slot.node,
                f.slot.index,
                f.rank,
                f.ratio,
                f.step,
                if evicts { "; its agent evicts it" } else { "" }
            ));
        }
        if f.slot.node != self.opts.node || !evicts {
            return;
        }
        if let Some(w) = self.workers.running.get_mut(&f.slot.index) {
            w.evicted = Some((
                LossCause::Straggler,
                format!(
                    "was a straggler ({:.1}x its peers' compute at step {}) and was evicted",
                    f.ratio, f.step
                ),
            ));
            self.workers.host.kill(f.slot.index);
        }
    }

    fn on_worker(&mut self, index: usize, pid: u32, event: FromWorker) -> Result<()> {
        let slot = Slot {
            node: self.opts.node.clone(),
            index,
        };
        match &event {
            FromWorker::Step { .. } | FromWorker::Alive => {
                if matches!(event, FromWorker::Step { .. }) {
                    self.retries = 0;
                }
                self.feed(Event::Progress { slot })?;
            }
            FromWorker::Started {
                generation,
                place,
                step,
                reloaded,
                groups_ms,
                reconcile_ms,
                digest,
                storage_read_bytes,
            } => {
                self.feed(Event::Progress { slot })?;
                let (rank, dp) = (place.rank(), place.dp);
                self.log(format_args!(
                    "slot {index} (pid {pid}): generation {generation} as rank {rank} (replica \
                     {}, stage {}, tensor rank {}) at step {step}, state digest \
                     {digest:016x}, {storage_read_bytes} bytes read from storage so far",
                    place.replica, place.stage, place.tp_rank
                ));
                if rank == 0 {
                    let from = match reloaded {
                        Some(0) => ", from initialisation".to_string(),
                        Some(s) => format!(", from the checkpoint of step {s} (storage)"),
                        None => String::new(),
                    };
                    self.log(format_args!(
                        "generation {generation} started at step {step} with dp {dp}{from}: \
                         groups in {groups_ms:.0} ms, replicas reconciled in {reconcile_ms:.0} ms"
                    ));
                }
            }
            FromWorker::Interrupted {
                generation,
                step,
                reason,
                retry,
                peer,
            } => {
                self.log(format_args!(
                    "slot {index} (pid {pid}) left generation {generation} after step {step}: \
                     {reason}"
                ));
                // Left the running generation on an error of its own, not an abort and not a
                // newer generation: the same members start over from memory.
                let running =
                    *generation == self.membership.generation() && *generation > self.aborted;
                if running && *retry {
                    self.start_over(*generation, slot, reason.clone())?;
                } else if running && *peer && self.suspect.is_none() {
                    let due = self.clock.now() + self.opts.lease_ttl * 2 + self.opts.timing.settle;
                    self.suspect = Some((*generation, due, slot, reason.clone()));
                }
            }
            FromWorker::Finished { .. } => {}
        }
        Ok(())
    }

    /// Asks every member to start generation `generation` over with the same members, giving
    /// up on this node after [`RETRIES_MAX`] times in a row with no step completed.
    fn start_over(&mut self, generation: u64, slot: Slot, reason: String) -> Result<()> {
        self.retries += 1;
        if self.retries > RETRIES_MAX {
            return Err(RuntimeError::Argument {
                name: "worker",
                reason: format!(
                    "slot {} of node {} left {RETRIES_MAX} generations in a row without \
                     completing a step, the last time with: {reason}",
                    slot.index, self.opts.node
                ),
            });
        }
        let json = LostRecord::now(reason, LossCause::Restarted);
        let key = self.keys.retry(generation, &slot);
        retrying(OUTAGE_MAX, || self.coord.put(&key, &json))?;
        self.feed(Event::Retry { generation })
    }

    /// Records `slot` lost in the running generation, for every agent to see.
    fn record_lost(&mut self, slot: Slot, reason: String, cause: LossCause) -> Result<()> {
        let generation = self.membership.generation();
        if generation > 0 {
            let json = LostRecord::now(reason, cause);
            let key = self.keys.lost(generation, &slot);
            retrying(OUTAGE_MAX, || self.coord.put(&key, &json))?;
        }
        self.feed(Event::WorkerExited { slot })
    }

    /// Handles the exit of each worker that exited.
    fn reap(&mut self) -> Result<()> {
        let mut exited = Vec::new();
        for (&index, w) in self.workers.running.iter_mut() {
            if let Some(how) = self.workers.host.exited(index)? {
                exited.push((index, how, w.stopping, w.evicted.take(), w.pid));
            }
        }
        for (index, how, stopping, evicted, pid) in exited {
            self.workers.running.remove(&index);
            if stopping {
                continue;
            }
            let (cause, reason) = evicted.unwrap_or((LossCause::WorkerDied, how));
            self.log(format_args!("worker of slot {index} (pid {pid}) {reason}"));
            let slot = Slot {
                node: self.opts.node.clone(),
                index,
            };
            // A worker the plan does not use (idle, its block broken) died outside the job: its
            // slot cools down, and nothing else happens.
            let planned = self
                .membership
                .plan()
                .is_some_and(|p| p.roles().contains_key(&slot));
            if planned {
                self.record_lost(slot, reason, cause)?;
            }
            if !self.opts.cooldown.is_zero() {
                let now = self.clock.now();
                self.cooling.insert(index, now + self.opts.cooldown);
                self.deaths
                    .retain(|&t| now.duration_since(t) < self.opts.cooldown);
                if planned {
                    self.deaths.push(now);
                }
                let n = self.opts.withdraw_after;
                if n > 0 && self.deaths.len() >= n && self.withdrawn_until.is_none() {
                    self.log(format_args!(
                        "offers no slots for {} ms: {} of its workers died within it, so the \
                         node is suspect",
                        self.opts.cooldown.as_millis(),
                        self.deaths.len()
                    ));
                    self.withdrawn_until = Some(now + self.opts.cooldown);
                } else if self.withdrawn_until.is_none() {
                    self.log(format_args!(
                        "does not offer slot {index} for {} ms: a slot whose worker died is \
                         suspect; its other slots stay",
                        self.opts.cooldown.as_millis()
                    ));
                }
                self.offer()?;
            }
        }
        Ok(())
    }

    /// The slots this node offers now.
    fn current_offer(&self) -> Offer {
        let cooling = if self.withdrawn_until.is_some() {
            (0..self.opts.slots).collect()
        } else {
            self.cooling.keys().copied().collect()
        };
        Offer {
            slots: self.opts.slots,
            cooling,
        }
    }

    /// Re-registers the node with what it offers now. A lease found lost meanwhile ends the
    /// retries at once: the next turn stops the agent.
    fn offer(&mut self) -> Result<()> {
        let json = self.current_offer().to_json();
        let reg = self.registration();
        let updated = retrying(OUTAGE_MAX, || {
            if reg.lost() {
                return Ok(());
            }
            reg.update(&json)
        });
        self.lease_gone(updated)
    }

    /// `result` of a request under the node's lease: a lease found gone ends the agent at its
    /// next turn, whether or not its keep-alive has noticed yet.
    fn lease_gone<T: Default>(
        &mut self,
        result: std::result::Result<T, ElasticError>,
    ) -> Result<T> {
        match result {
            Err(ElasticError::LeaseLost { .. }) => {
                self.lease_ran_out = true;
                Ok(T::default())
            }
            r => Ok(r?),
        }
    }

    /// Offers again the slots (or the node) whose cooldown is over.
    fn cooldown(&mut self) -> Result<()> {
        let now = self.clock.now();
        let before = self.current_offer();
        if self.withdrawn_until.is_some_and(|t| now >= t) {
            self.withdrawn_until = None;
            self.log(format_args!("offers its {} slots again", self.opts.slots));
        }
        let over: Vec<usize> = self
            .cooling
            .iter()
            .filter(|(_, &t)| now >= t)
            .map(|(&i, _)| i)
            .collect();
        for index in over {
            self.cooling.remove(&index);
            if self.withdrawn_until.is_none() {
                self.log(format_args!("offers slot {index} again"));
            }
        }
        if self.current_offer() != before {
            self.offer()?;
        }
        Ok(())
    }

    fn feed(&mut self, event: Event) -> Result<()> {
        let actions = self.membership.handle(self.clock.now(), event);
        for a in actions {
            self.act(a)?;
        }
        Ok(())
    }

    fn act(&mut self, action: Action) -> Result<()> {
        match action {
            Action::Abort { generation } => {
                self.aborted = self.aborted.max(generation);
                self.workers.send_all(&ToWorker::Abort { generation });
            }
            Action::Evict { slot } => {
                if let Some(w) = self.workers.running.get_mut(&slot.index) {
                    w.evicted = Some((
                        LossCause::Hung,
                        format!(
                            "was declared hung (no step within {} ms) and killed",
                            self.opts.timing.hang.as_millis()
                        ),
                    ));
                    self.workers.host.kill(slot.index);
                }
            }
            Action::Propose { from, to, plan } => {
                let record = PlannedRecord {
                    at_ms: unix_ms(),
                    dp: plan.dp,
                    leader: self.opts.node.clone(),
                };
                let json = serde_json::to_vec(&record).expect("records serialise");
                let planned = self.keys.planned(to);
                let won = retrying(OUTAGE_MAX, || {
                    job::propose(
                        self.coord.keys(),
                        &self.keys,
                        from,
                        to,
                        &plan,
                        &[(&planned, &json)],
                    )
                })?;
                if won {
                    self.cannot_plan = None;
                    self.log(format_args!(
                        "planned generation {to}: dp {} (microbatches {:?})",
                        plan.dp, plan.microbatches
                    ));
                } else {
                    self.log(format_args!(
                        "the proposal of generation {to} was fenced: generation {from} is no \
                         longer the running one"
                    ));
                }
            }
            Action::Start {
                generation, plan, ..
            } => self.start(generation, plan)?,
            Action::CannotPlan { reason } => {
                if self.cannot_plan.as_deref() != Some(&reason) {
                    self.log(format_args!("cannot plan yet: {reason}"));
                    self.cannot_plan = Some(reason);
                }
            }
        }
        Ok(())
    }

    /// Runs this node's part of generation `generation`: starts a worker for each of its
    /// slots in the plan that has none, tells each its place, and stops the workers the plan
    /// neither uses nor keeps on standby.
    fn start(&mut self, generation: u64, plan: Plan) -> Result<()> {
        let me = &self.opts.node;
        let mine: BTreeSet<usize> = plan
            .blocks
            .iter()
            .flat_map(|b| &b.slots)
            .filter(|s| &s.node == me)
            .map(|s| s.index)
            .collect();
        let standby: BTreeSet<usize> = plan
            .standby
            .iter()
            .flat_map(|(_, s)| s)
            .filter(|s| &s.node == me)
            .map(|s| s.index)
            .collect();
        // A worker with no place in this plan stays, idle, while its slot is offered: a later
        // plan may use it again. Those of slots no longer offered stop.
        let offer = self.current_offer();
        for (index, w) in self.workers.running.iter_mut() {
            let placed = mine.contains(index) || standby.contains(index);
            if !placed && !offer.offers(*index) && !w.stopping {
                w.stopping = true;
                self.workers.host.kill(*index);
            }
        }
        // One command, its slot set for each worker in turn: the plan is not copied per slot.
        let mut start = ToWorker::Start {
            generation,
            plan,
            slot: Slot {
                node: me.clone(),
                index: 0,
            },
        };
        for &index in &mine {
            if !self.workers.running.contains_key(&index) {
                let events = WorkerEvents {
                    tx: self.tx.clone(),
                    index,
                };
                let pid = self.workers.host.spawn(index, events)?;
                self.log(format_args!("slot {index}: worker pid {pid}"));
                self.workers.running.insert(
                    index,
                    Worker {
                        pid,
                        stopping: false,
                        evicted: None,
                    },
                );
            }
            if let ToWorker::Start { slot, .. } = &mut start {
                slot.index = index;
            }
            self.workers.host.send(index, &start);
            if self.finishing {
                self.workers.host.send(index, &ToWorker::Finish);
            }
        }
        self.workers.host.started(generation);
        Ok(())
    }
}

/// Before an agent registers, the job's running plan: it must fit the agent's configuration
/// ([`fits`]), and an agent restarted under its old name finds its node in it. The workers it
/// ran there died with it, whatever its old lease still says: it records them lost, so every
/// agent re-plans without them.
fn check_running_plan(coord: &dyn Coordinator, keys: &JobKeys, opts: &AgentOptions) -> Result<()> {
    let generation = retrying(OUTAGE_MAX, || job::generation(coord, keys))?;
    if generation == 0 {
        return Ok(());
    }
    let Some(plan) = retrying(OUTAGE_MAX, || job::plan(coord, keys, generation))? else {
        return Ok(());
    };
    fits(opts, &keys.plan(generation), &plan)?;
    let node = &opts.node;
    let record = LostRecord::now("its agent restarted".into(), LossCause::NodeLost);
    for slot in plan.blocks.iter().flat_map(|b| &b.slots) {
        if &slot.node == node {
            let key = keys.lost(generation, slot);
            retrying(OUTAGE_MAX, || coord.put(&key, &record))?;
        }
    }
    Ok(())
}

/// Refuses a committed plan made for another layout or global batch: the job's agents were
/// started with different configurations, and this one cannot run its part.
fn fits(o: &AgentOptions, key: &str, plan: &Plan) -> Result<()> {
    let microbatches: usize = plan.microbatches.iter().sum();
    if (plan.tp, plan.pp, microbatches) != (o.tp, o.pp, o.microbatches) {
        return Err(RuntimeError::Argument {
            name: "plan",
            reason: format!(
                "{key} plans tp {} x pp {} over {microbatches} microbatches, but node {}'s \
                 configuration says tp {} x pp {} over {}; start every agent of job {} with \
                 the same configuration",
                plan.tp, plan.pp, o.node, o.tp, o.pp, o.microbatches, o.job
            ),
        });
    }
    Ok(())
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::SeqCst);
        // Workers told to stop get a moment to finish their last checkpoint; then `Workers`
        // kills what is left.
        // A stepped agent's caller moves its clock: nothing changes while it waits here.
        let waits = matches!(self.drive, Drive::Waits);
        let deadline = Instant::now() + STOP_GRACE;
        while waits && self.done && Instant::now() < deadline {
            let indices: Vec<usize> = self.workers.running.keys().copied().collect();
            let host = &mut self.workers.host;
            if indices
                .iter()
                .all(|&i| matches!(host.exited(i), Ok(Some(_)) | Err(_)))
            {
                break;
            }
            std::thread::sleep(TICK);
        }
    }
}
