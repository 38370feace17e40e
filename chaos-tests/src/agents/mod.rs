//! The node agent's own code (`marathon_runtime::agent`) for every node of a job, on a
//! simulated clock against a simulated etcd: the agents' loops, leases, campaigns, watches,
//! cooldowns, withdrawals, restarts under an old name and the end of the job run as they do
//! on real nodes, turn by turn ([`Stepped`]), with no thread and no wall-clock wait, so a seed
//! replays the same run.
//!
//! The etcd here keeps etcd's contract for what agents use: atomic transactions, leases whose
//! keys go when they run out or are revoked, a campaign for a key held under a lease, and a
//! watch per agent that delivers every change under the job in order, each after its own random
//! delay. It breaks some watches, as a lost connection does: the agent watches again and reads
//! the job's keys, as it does against etcd. Nodes die (their leases run out), come back under
//! their old names, and lose workers; the job sometimes reaches its last step amid it all.
//!
//! Checked throughout, and at the end:
//! - each generation commits once, from the one before, its plan keeping tensor x pipeline
//!   units whole, assigning no slot twice, covering the global batch, using slots that exist,
//!   and keeping the stage and tensor rank of every block kept from the generation before;
//! - every agent starts generations in increasing order, each with the committed plan;
//! - an agent that has read that the job is done proposes and starts nothing, and every agent
//!   ends with its workers stopped;
//! - no agent fails;
//! - with every fault over, every live node's agent runs the largest plan the live nodes allow.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use marathon_elastic::membership::Timing;
use marathon_elastic::plan::{Plan, Slot};
use marathon_elastic::{Cluster, JobKeys};
use marathon_runtime::agent::{AgentOptions, Clock, Host, Stepped, WorkerEvents};
use marathon_runtime::worker::ToWorker;

use crate::rng::Rng;
use crate::sim::{Report, SimConfig};

mod etcd;
use etcd::{Etcd, Store};

/// The simulated job's name.
const JOB: &str = "sim";
/// One turn of every agent per tick of the clock.
const TICK_MS: u64 = 5;

/// A job of agents under simulation: the protocol's shaking ([`SimConfig`]) and what the
/// agents are configured with beyond it.
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    pub sim: SimConfig,
    /// How long a slot whose worker died is not offered.
    pub cooldown_ms: u64,
    /// Worker deaths within one cooldown that withdraw a node (0: never).
    pub withdraw_after: usize,
    /// Chance per 10 ms that a live node's lease runs out while it runs (its keep-alives
    /// stopped reaching etcd): its keys go at once, and its agent learns it up to a third of
    /// the lease later, as its keep-alive does at the next renewal.
    pub p_lease_loss: f64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            sim: SimConfig::default(),
            cooldown_ms: 1_000,
            withdraw_after: 2,
            p_lease_loss: 0.002,
        }
    }
}

/// What a run did: the simulation's report, and every commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentsRun {
    pub report: Report,
    pub commits: Vec<Committed>,
    /// Nodes whose agent stopped on learning its lease had run out.
    pub leases_lost: u64,
}

/// One committed generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub at_ms: u64,
    /// The node whose agent committed it.
    pub leader: String,
    pub generation: u64,
    pub dp: usize,
}

/// Runs one simulation of real agents from `seed`.
pub fn run(seed: u64, cfg: &AgentsConfig) -> AgentsRun {
    let mut w = World::new(seed, cfg);
    let mut ends = Rng(seed ^ 0x646f_6e65_5f61_7421);
    let done_at = ends
        .chance(0.3)
        .then(|| 10 * ends.within(cfg.sim.faults_ms / 40, cfg.sim.faults_ms / 10));
    for i in 0..cfg.sim.nodes {
        w.join(&format!("n{i}"));
    }
    let end = cfg.sim.faults_ms + cfg.sim.quiet_ms;
    // The fault rates are per 10 ms, as in the core's simulation.
    let mut faults_at = 10;
    let mut done_at = done_at;
    while w.now_ms() < end {
        w.advance();
        if w.now_ms() >= faults_at && w.now_ms() < cfg.sim.faults_ms {
            faults_at += 10;
            w.faults();
        }
        if done_at.is_some_and(|t| w.now_ms() >= t) {
            done_at = None;
            w.finish();
        }
        w.turns();
    }
    w.check_end();
    w.into_run()
}

/// The simulated clock, in whole milliseconds from the start of the run.
#[derive(Debug)]
struct SimClock {
    t0: Instant,
    ms: AtomicU64,
}

impl SimClock {
    fn ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

impl Clock for SimClock {
    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms())
    }
}

/// A node's workers, as the simulation sees them.
#[derive(Debug, Default)]
struct Workers {
    /// Each running worker's slot, pid, and why it exited once it did.
    running: BTreeMap<usize, (u32, Option<String>)>,
    /// The generations the agent started, in order, each with its plan.
    started: Vec<(u64, Plan)>,
}

/// Where a simulated node's agent runs its workers: nowhere, but their starts, stops and
/// deaths are real to the agent.
#[derive(Debug)]
struct SimHost {
    node: String,
    workers: Arc<Mutex<Workers>>,
    etcd: Etcd,
    next_pid: Arc<AtomicU64>,
}

impl SimHost {
    fn workers(&self) -> MutexGuard<'_, Workers> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exit(&mut self, index: usize, how: &str) {
        if let Some((_, exited)) = self.workers().running.get_mut(&index) {
            exited.get_or_insert_with(|| how.to_owned());
        }
    }
}

impl Host for SimHost {
    fn spawn(&mut self, index: usize, _events: WorkerEvents) -> marathon_runtime::Result<u32> {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst) as u32;
        self.workers().running.insert(index, (pid, None));
        Ok(pid)
    }

    fn send(&mut self, index: usize, cmd: &ToWorker) {
        match cmd {
            ToWorker::Start {
                generation, plan, ..
            } => {
                let mut etcd = self.etcd.lock();
                if etcd.knows_done.contains(&self.node) {
                    let what = format!(
                        "{} knew the job was done, and started generation {generation}",
                        self.node
                    );
                    etcd.violation(what);
                }
                drop(etcd);
                let mut w = self.workers();
                if w.started.last().is_none_or(|(g, _)| g != generation) {
                    w.started.push((*generation, plan.clone()));
                }
            }
            ToWorker::Stop => self.exit(index, "stopped"),
            _ => {}
        }
    }

    fn kill(&mut self, index: usize) {
        self.exit(index, "was killed by its agent");
    }

    fn exited(&mut self, index: usize) -> marathon_runtime::Result<Option<String>> {
        let mut w = self.workers();
        let how = match w.running.get(&index) {
            Some((_, how)) => how.clone(),
            // Reaped before, or never started: gone, as a process host says.
            None => return Ok(Some("is gone".into())),
        };
        if how.is_some() {
            w.running.remove(&index);
        }
        Ok(how)
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(TICK_MS)
    }
}

/// A node: its agent while it runs, and its workers.
struct Node {
    agent: Option<Stepped>,
    workers: Arc<Mutex<Workers>>,
    /// The generations checked so far of `workers.started`.
    checked: usize,
}

/// The simulated etcd and every node on one clock.
pub(crate) struct World {
    cfg: AgentsConfig,
    rng: Rng,
    clock: Arc<SimClock>,
    etcd: Etcd,
    next_pid: Arc<AtomicU64>,
    nodes: BTreeMap<String, Node>,
    /// The job's done key exists.
    done: bool,
    report: Report,
    leases_lost: u64,
}

impl World {
    pub(crate) fn new(seed: u64, cfg: &AgentsConfig) -> World {
        let clock = Arc::new(SimClock {
            t0: Instant::now(),
            ms: AtomicU64::new(0),
        });
        let store = Store {
            clock: clock.clone(),
            rng: Rng(seed ^ 0x6574_6364),
            delay_max_ms: cfg.sim.delay_max_ms,
            p_break: cfg.sim.p_drop,
            keys: JobKeys::new(JOB),
            map: BTreeMap::new(),
            next_id: 0,
            leases: BTreeMap::new(),
            watches: BTreeMap::new(),
            caller: String::new(),
            knows_done: BTreeSet::new(),
            lost: BTreeMap::new(),
            commits: BTreeMap::new(),
            fenced: 0,
            broken: 0,
            violations: Vec::new(),
        };
        World {
            cfg: cfg.clone(),
            rng: Rng(seed),
            clock,
            etcd: Etcd(Arc::new(Mutex::new(store))),
            next_pid: Arc::new(AtomicU64::new(1000)),
            nodes: BTreeMap::new(),
            done: false,
            report: Report {
                seed,
                ..Report::default()
            },
            leases_lost: 0,
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.ms()
    }

    fn violation(&mut self, what: String) {
        self.etcd.lock().violation(what);
    }

    /// The clock moves one tick; leases that ran out go.
    pub(crate) fn advance(&mut self) {
        self.clock.ms.fetch_add(TICK_MS, Ordering::SeqCst);
        self.etcd.lock().expire();
    }

    fn options(&self, node: &str) -> AgentOptions {
        let c = &self.cfg.sim;
        AgentOptions {
            endpoints: vec!["simulated".into()],
            access: Default::default(),
            job: JOB.into(),
            node: node.into(),
            slots: c.slots,
            tp: c.tp,
            pp: c.pp,
            microbatches: c.microbatches,
            lease_ttl: Duration::from_millis(c.lease_ttl_ms),
            timing: Timing {
                settle: Duration::from_millis(c.settle_ms),
                hang: Duration::from_millis(c.hang_ms),
            },
            cooldown: Duration::from_millis(self.cfg.cooldown_ms),
            withdraw_after: self.cfg.withdraw_after,
            wait_slots: 0,
            evict_stragglers: false,
            quiet: true,
            metrics_addr: None,
        }
    }

    /// Node `name` starts (or comes back under its old name): its agent registers.
    pub(crate) fn join(&mut self, name: &str) {
        let workers: Arc<Mutex<Workers>> = Arc::default();
        let host = SimHost {
            node: name.to_owned(),
            workers: workers.clone(),
            etcd: self.etcd.clone(),
            next_pid: self.next_pid.clone(),
        };
        self.etcd.lock().caller = name.to_owned();
        let coord: Arc<dyn Cluster> = Arc::new(self.etcd.clone());
        let agent = match Stepped::start(
            coord,
            self.options(name),
            Box::new(host),
            self.clock.clone(),
        ) {
            Ok(a) => Some(a),
            Err(e) => {
                self.violation(format!("{name}'s agent could not start: {e}"));
                None
            }
        };
        self.nodes.insert(
            name.to_owned(),
            Node {
                agent,
                workers,
                checked: 0,
            },
        );
    }

    /// Node `name` dies: its agent and workers stop, and its lease runs out.
    pub(crate) fn kill(&mut self, name: &str) {
        if let Some(a) = self.nodes.get_mut(name).and_then(|n| n.agent.take()) {
            a.crash();
        }
        if let Some(n) = self.nodes.get(name) {
            n.workers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .running
                .clear();
        }
    }

    /// The worker in slot `index` of node `name` dies.
    pub(crate) fn kill_worker(&mut self, name: &str, index: usize) {
        if let Some(n) = self.nodes.get(name) {
            let mut w = n.workers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, how)) = w.running.get_mut(&index) {
                how.get_or_insert_with(|| "was killed by signal 9 (SIGKILL)".into());
            }
        }
    }

    /// The job reaches its last step: rank 0 of the running generation writes the done key,
    /// fenced by its generation as a worker does. Nothing runs before the first generation.
    pub(crate) fn finish(&mut self) {
        let keys = JobKeys::new(JOB);
        let generation = {
            let mut s = self.etcd.lock();
            s.caller = "a worker".into();
            s.commits.keys().next_back().copied()
        };
        let Some(g) = generation else { return };
        let done = keys.done();
        let wrote = marathon_elastic::job::fenced_put(&self.etcd, &keys, g, &[(&done, b"{}")]);
        if wrote.unwrap_or(false) {
            self.done = true;
            self.report.done_at_ms = Some(self.now_ms());
        }
    }

    fn faults(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let node_key = |n: &str| JobKeys::new(JOB).node(n);
        for n in names {
            let alive = self.nodes[&n].agent.is_some();
            if alive && self.rng.chance(self.cfg.sim.p_node_death) {
                self.report.node_deaths += 1;
                self.kill(&n);
            } else if !alive && self.rng.chance(self.cfg.sim.p_revival) {
                // Perhaps before its old lease has run out: its agent restarts under its name.
                self.report.revivals += 1;
                self.join(&n);
            } else if alive && self.rng.chance(self.cfg.p_lease_loss) {
                let lag = self.rng.below(self.cfg.sim.lease_ttl_ms / 3 + 1);
                self.etcd.lock().lose_lease_of(&node_key(&n), lag);
            } else if alive && self.rng.chance(self.cfg.sim.p_worker_death) {
                let running: Vec<usize> = {
                    let w = self.nodes[&n]
                        .workers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    w.running.keys().copied().collect()
                };
                if !running.is_empty() {
                    self.report.worker_deaths += 1;
                    let k = running[self.rng.below(running.len() as u64) as usize];
                    self.kill_worker(&n, k);
                }
            }
        }
    }

    /// Every live agent takes its turn, in name order; what it started is checked.
    pub(crate) fn turns(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let Some(agent) = self.nodes.get_mut(&name).and_then(|n| n.agent.as_mut()) else {
                continue;
            };
            self.etcd.lock().caller = name.clone();
            let outcome = agent.step();
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    let n = self.nodes.get_mut(&name).expect("node");
                    n.agent = None;
                    let left = n
                        .workers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .running
                        .len();
                    if !self.done {
                        self.violation(format!("{name}'s agent ended, but the job is not done"));
                    } else if left > 0 {
                        self.violation(format!("{name}'s agent ended with {left} workers left"));
                    }
                }
                // Its lease ran out under it: it stops its workers and ends, as it must.
                Err(marathon_runtime::RuntimeError::Argument { name: "lease", .. }) => {
                    self.leases_lost += 1;
                    self.kill(&name);
                }
                Err(e) => {
                    self.violation(format!("{name}'s agent failed: {e}"));
                    self.kill(&name);
                }
            }
            self.check_starts(&name);
        }
    }

    /// Each generation node `name` started since the last look: newer than the one before,
    /// with the committed plan.
    fn check_starts(&mut self, name: &str) {
        let n = self.nodes.get_mut(name).expect("node");
        let started: Vec<(u64, Plan)> = {
            let w = n.workers.lock().unwrap_or_else(|e| e.into_inner());
            w.started[n.checked..].to_vec()
        };
        let before = n.checked.checked_sub(1).map(|i| {
            let w = n.workers.lock().unwrap_or_else(|e| e.into_inner());
            w.started[i].0
        });
        n.checked += started.len();
        let mut last = before;
        for (g, plan) in started {
            if last.is_some_and(|l| l >= g) {
                self.violation(format!("{name} started generation {g} after {last:?}"));
            }
            last = Some(g);
            let committed = self.etcd.lock().commits.get(&g).map(|c| c.plan.clone());
            if committed.as_ref() != Some(&plan) {
                self.violation(format!(
                    "{name} started generation {g} with a plan that was not committed"
                ));
            }
        }
    }

    /// Every committed plan keeps the plan invariants; at the end, a job not done runs the
    /// largest plan its live nodes allow on every one of them, and a done job's agents ended.
    pub(crate) fn check_end(&mut self) {
        let c = self.cfg.sim.clone();
        let commits: Vec<(u64, Plan)> = {
            let s = self.etcd.lock();
            s.commits
                .iter()
                .map(|(g, c)| (*g, c.plan.clone()))
                .collect()
        };
        let mut before: Option<Plan> = None;
        for (g, plan) in &commits {
            let mut problems = plan.problems(c.tp, c.pp, c.microbatches);
            problems.extend(plan.kept_problems(before.as_ref()));
            problems.extend(
                plan.held()
                    .keys()
                    .filter(|s| s.index >= c.slots)
                    .map(|s| format!("slot {s:?} does not exist")),
            );
            for p in problems {
                self.violation(format!("plan of generation {g}: {p}"));
            }
            before = Some(plan.clone());
        }
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.agent.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        if self.done {
            if !live.is_empty() {
                self.violation(format!(
                    "the job is done, but the agents of {live:?} run on"
                ));
            }
            return;
        }
        let blocks = live.len() * (c.slots / c.tp);
        let dp_max = (blocks / c.pp).min(c.microbatches);
        let Some((g, plan)) = commits.last().cloned() else {
            if dp_max > 0 {
                self.violation("no plan at all".into());
            }
            return;
        };
        if dp_max == 0 {
            return; // too few nodes live for any plan: the last one waits for them
        }
        let on: BTreeSet<&str> = plan
            .blocks
            .iter()
            .flat_map(|b| &b.slots)
            .map(|s: &Slot| s.node.as_str())
            .collect();
        if on.iter().any(|n| !live.iter().any(|l| l == n)) || plan.dp != dp_max {
            self.violation(format!(
                "did not settle: generation {g} has dp {} on {on:?}, the live nodes {live:?} \
                 allow dp {dp_max}",
                plan.dp
            ));
        }
        for n in on {
            let runs = self.nodes.get(n).is_some_and(|node| {
                let w = node.workers.lock().unwrap_or_else(|e| e.into_inner());
                w.started.last().is_some_and(|(s, _)| *s == g)
            });
            if !runs {
                self.violation(format!(
                    "{n} is in generation {g}'s plan but did not start it"
                ));
            }
        }
    }

    /// Runs every agent's turns for `ms` more, with no faults.
    #[cfg(test)]
    pub(crate) fn run_for(&mut self, ms: u64) {
        let until = self.now_ms() + ms;
        while self.now_ms() < until {
            self.advance();
            self.turns();
        }
    }

    pub(crate) fn into_run(self) -> AgentsRun {
        let s = self.etcd.lock();
        let mut report = self.report.clone();
        report.generations = s.commits.keys().next_back().copied().unwrap_or(0);
        report.fenced_proposals = s.fenced;
        report.dropped = s.broken;
        report.violations = s.violations.clone();
        let commits = s
            .commits
            .iter()
            .map(|(g, c)| Committed {
                at_ms: c.at_ms,
                leader: c.by.clone(),
                generation: *g,
                dp: c.plan.dp,
            })
            .collect();
        AgentsRun {
            report,
            commits,
            leases_lost: self.leases_lost,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each check of the simulation, fed a case that breaks it.

    use super::*;
    use marathon_elastic::Coordinator;

    /// Four nodes of 2 slots (tp 2 x pp 2): dp 2 once they have settled.
    fn settled() -> World {
        let cfg = AgentsConfig::default();
        let mut w = World::new(1, &cfg);
        for i in 0..4 {
            w.join(&format!("n{i}"));
        }
        w.run_for(500);
        w
    }

    fn violations(w: World) -> Vec<String> {
        w.into_run().report.violations
    }

    fn generation(w: &World) -> u64 {
        w.etcd
            .lock()
            .commits
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// Writes generation `to` with `plan` as an operator would by hand, outside the protocol.
    fn write_by_hand(w: &World, to: u64, plan: &Plan, counted: bool) {
        let keys = JobKeys::new(JOB);
        let (counter, json) = (keys.generation(), serde_json::to_vec(plan).unwrap());
        w.etcd.lock().caller = "an operator".into();
        let to = to.to_string();
        if counted {
            let puts: [(&str, &[u8]); 2] = [
                (&keys.plan(to.parse().unwrap()), &json),
                (&counter, to.as_bytes()),
            ];
            assert!(w.etcd.transact(&[], &puts).unwrap());
        } else {
            w.etcd.put(&keys.plan(to.parse().unwrap()), &json).unwrap();
            w.etcd.put(&counter, to.as_bytes()).unwrap();
        }
    }

    #[test]
    fn a_quiet_job_of_real_agents_settles_and_breaks_nothing() {
        let mut w = settled();
        assert_eq!(generation(&w), 1);
        w.check_end();
        assert_eq!(violations(w), Vec::<String>::new());
    }

    #[test]
    fn a_generation_that_skips_one_is_caught() {
        let w = settled();
        let plan = w.etcd.lock().commits[&1].plan.clone();
        write_by_hand(&w, 3, &plan, true);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("generation 3 committed after 1")),
            "{v:?}"
        );
    }

    #[test]
    fn a_plan_that_breaks_a_block_is_caught() {
        let mut w = settled();
        let mut plan = w.etcd.lock().commits[&1].plan.clone();
        plan.blocks[0].slots.pop();
        write_by_hand(&w, 2, &plan, true);
        w.check_end();
        let v = violations(w);
        assert!(
            v.iter().any(|v| v.contains("plan of generation 2")),
            "{v:?}"
        );
    }

    #[test]
    fn a_start_of_a_plan_never_committed_is_caught() {
        let mut w = settled();
        let plan = w.etcd.lock().commits[&1].plan.clone();
        write_by_hand(&w, 2, &plan, false);
        w.run_for(200);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("started generation 2 with a plan that was not committed")),
            "{v:?}"
        );
    }

    #[test]
    fn a_proposal_after_the_job_is_done_is_caught() {
        let mut w = settled();
        w.finish();
        w.run_for(200);
        // Every agent read the done key and ended; one now proposes anyway.
        assert!(w.nodes.values().all(|n| n.agent.is_none()));
        let plan = w.etcd.lock().commits[&1].plan.clone();
        let keys = JobKeys::new(JOB);
        w.etcd.lock().caller = "n0".into();
        let json = serde_json::to_vec(&plan).unwrap();
        let puts: [(&str, &[u8]); 2] = [(&keys.plan(2), &json), (&keys.generation(), b"2")];
        w.etcd.transact(&[], &puts).unwrap();
        w.check_end();
        let v = violations(w);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("n0 knew the job was done, and proposed"),
            "{v:?}"
        );
    }

    #[test]
    fn a_job_that_has_not_settled_is_caught() {
        let mut w = settled();
        w.kill("n3");
        w.check_end();
        let v = violations(w);
        assert!(v.iter().any(|v| v.contains("did not settle")), "{v:?}");
    }

    #[test]
    fn an_agent_that_fails_is_caught() {
        let mut w = settled();
        // A plan for another layout: every agent refuses it and stops.
        let mut plan = w.etcd.lock().commits[&1].plan.clone();
        plan.tp = 4;
        write_by_hand(&w, 2, &plan, true);
        w.run_for(200);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("agent failed") && v.contains("tp 4")),
            "{v:?}"
        );
    }

    #[test]
    fn a_node_whose_worker_dies_loses_one_slot_and_the_job_grows_back() {
        let mut w = settled();
        let pids = |w: &World, n: &str| -> Vec<u32> {
            w.nodes[n]
                .workers
                .lock()
                .unwrap()
                .running
                .values()
                .map(|(p, _)| *p)
                .collect()
        };
        let before = pids(&w, "n0");
        assert_eq!(before.len(), 2);
        w.kill_worker("n0", 0);
        w.run_for(300);
        // Slot 0 cools down: its block is broken, the job shrinks to dp 1; slot 1's worker
        // keeps its process.
        assert_eq!(w.etcd.lock().commits.values().last().unwrap().plan.dp, 1);
        assert!(pids(&w, "n0").contains(&before[1]));
        w.run_for(1_500);
        let last = w.etcd.lock().commits.values().last().unwrap().plan.clone();
        assert_eq!(last.dp, 2, "the job grew back once the cooldown was over");
        w.check_end();
        assert_eq!(violations(w), Vec::<String>::new());
    }

    #[test]
    fn a_second_plan_for_a_generation_is_caught() {
        let w = settled();
        let plan = w.etcd.lock().commits[&1].plan.clone();
        write_by_hand(&w, 1, &plan, true);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("a second plan for generation 1")),
            "{v:?}"
        );
    }

    #[test]
    fn a_job_with_no_plan_is_caught() {
        let mut w = World::new(1, &AgentsConfig::default());
        for i in 0..4 {
            w.join(&format!("n{i}"));
        }
        w.check_end();
        let v = violations(w);
        assert!(v.iter().any(|v| v.contains("no plan at all")), "{v:?}");
    }

    #[test]
    fn a_node_that_did_not_start_its_generation_is_caught() {
        let mut w = settled();
        w.nodes["n0"].workers.lock().unwrap().started.clear();
        w.check_end();
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("n0 is in generation 1's plan but did not start it")),
            "{v:?}"
        );
    }

    #[test]
    fn starts_out_of_order_are_caught() {
        let mut w = settled();
        let plan = w.etcd.lock().commits[&1].plan.clone();
        w.nodes["n0"]
            .workers
            .lock()
            .unwrap()
            .started
            .push((1, plan));
        w.check_starts("n0");
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("n0 started generation 1 after Some(1)")),
            "{v:?}"
        );
    }

    #[test]
    fn agents_that_end_before_the_job_is_done_are_caught() {
        let mut w = settled();
        // The done key written outside the job: the agents end, but no worker finished it.
        w.etcd.put(&JobKeys::new(JOB).done(), b"{}").unwrap();
        w.run_for(200);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("ended, but the job is not done")),
            "{v:?}"
        );
    }

    #[test]
    fn a_start_after_the_job_is_done_is_caught() {
        let mut w = settled();
        w.etcd.lock().knows_done.insert("n0".into());
        let plan = w.etcd.lock().commits[&1].plan.clone();
        write_by_hand(&w, 2, &plan, true);
        w.run_for(200);
        let v = violations(w);
        assert!(
            v.iter()
                .any(|v| v.contains("n0 knew the job was done, and started generation 2")),
            "{v:?}"
        );
    }

    #[test]
    fn a_node_whose_lease_runs_out_under_it_stops_and_the_job_replans_without_it() {
        let mut w = settled();
        let key = JobKeys::new(JOB).node("n3");
        assert!(w.etcd.lock().lose_lease_of(&key, 50));
        w.run_for(1_000);
        assert!(w.nodes["n3"].agent.is_none(), "n3's agent stopped");
        let last = w.etcd.lock().commits.values().last().unwrap().plan.clone();
        assert_eq!(last.dp, 1);
        assert!(last
            .blocks
            .iter()
            .flat_map(|b| &b.slots)
            .all(|s| s.node != "n3"));
        w.check_end();
        let run = w.into_run();
        assert_eq!(run.leases_lost, 1);
        assert_eq!(run.report.violations, Vec::<String>::new());
    }

    #[test]
    fn a_job_done_by_its_workers_ends_every_agent_with_its_workers_stopped() {
        let mut w = settled();
        w.finish();
        assert!(w.done);
        w.run_for(300);
        assert!(w.nodes.values().all(|n| n.agent.is_none()));
        assert!(w
            .nodes
            .values()
            .all(|n| n.workers.lock().unwrap().running.is_empty()));
        w.check_end();
        assert_eq!(violations(w), Vec::<String>::new());
    }
}
