//! A deterministic simulation of the coordination protocol: every agent runs the membership
//! core (`marathon_elastic::membership`) against a simulated etcd on a simulated clock. The etcd
//! delivers each change to each agent after its own random delay, so agents see changes at
//! different times and in different orders relative to each other; each agent's own stream
//! keeps etcd's order, as a watch does. It loses some deliveries, and the agent then
//! resynchronises later (registrations, expiries, leader, generation), as a broken watch does.
//! It expires the leases of nodes that die. Nodes die, come back, and lose workers, all drawn
//! from one seed: a seed replays the same run. In some runs the job reaches its last step
//! while faults still come (its leader dies, others take over).
//!
//! Checked after every committed generation and at the end:
//! - at most one plan per generation, and the counter moves one at a time;
//! - every plan keeps tensor x pipeline units whole, assigns no slot twice, and covers the
//!   global batch;
//! - a block kept from the previous generation keeps its stage and tensor rank;
//! - a peer transfer's source keeps its state;
//! - each agent starts generations in increasing order, each the committed plan;
//! - a proposal from an old generation never commits;
//! - an agent that knows the job is done proposes and starts nothing;
//! - with every fault over, the job settles on the largest plan the live nodes allow (unless it
//!   is done).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use marathon_elastic::membership::{Action, Event, Membership, Timing};
use marathon_elastic::plan::{Offer, Plan, Slot};

use crate::rng::Rng;

/// The shape of a simulated cluster and how hard it is shaken.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    pub slots: usize,
    pub tp: usize,
    pub pp: usize,
    pub microbatches: usize,
    /// Simulated time with faults, then a quiet period in which the job must settle.
    pub faults_ms: u64,
    pub quiet_ms: u64,
    /// Chance per 10 ms tick of a node dying, a dead node returning, and a worker dying.
    pub p_node_death: f64,
    pub p_revival: f64,
    pub p_worker_death: f64,
    /// Chance that a delivery is lost (the agent resynchronises later).
    pub p_drop: f64,
    /// Deliveries take up to this long.
    pub delay_max_ms: u64,
    pub lease_ttl_ms: u64,
    pub settle_ms: u64,
    /// A planned worker with no progress for this long is declared hung (the simulation
    /// reports no progress).
    pub hang_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 6,
            slots: 2,
            tp: 2,
            pp: 2,
            microbatches: 8,
            faults_ms: 5_000,
            quiet_ms: 5_000,
            p_node_death: 0.004,
            p_revival: 0.01,
            p_worker_death: 0.004,
            p_drop: 0.02,
            delay_max_ms: 40,
            lease_ttl_ms: 300,
            settle_ms: 50,
            hang_ms: 3_600_000,
        }
    }
}

/// What a run did, and what it found wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub generations: u64,
    pub fenced_proposals: u64,
    pub node_deaths: u64,
    pub revivals: u64,
    pub worker_deaths: u64,
    pub dropped: u64,
    /// When the job reached its last step, if it did.
    pub done_at_ms: Option<u64>,
    pub violations: Vec<String>,
}

impl Report {
    /// Faults injected: node deaths, worker deaths, revivals, lost deliveries.
    pub fn faults(&self) -> u64 {
        self.node_deaths + self.worker_deaths + self.revivals + self.dropped
    }
}

/// Many seeds of a simulation, summed, and the seeds that broke an invariant.
#[derive(Debug, Default, Clone)]
pub struct Sweep {
    pub seeds: u64,
    pub generations: u64,
    pub faults: u64,
    pub fenced: u64,
    /// Runs in which the job reached its last step amid the faults.
    pub ended: u64,
    /// Each failed seed with what it broke.
    pub failed: Vec<(u64, Vec<String>)>,
    pub secs: f64,
}

impl Sweep {
    /// Runs `one` for every seed of `seeds`.
    pub fn run(seeds: impl IntoIterator<Item = u64>, mut one: impl FnMut(u64) -> Report) -> Sweep {
        let started = std::time::Instant::now();
        let mut sweep = Sweep::default();
        for seed in seeds {
            let r = one(seed);
            sweep.seeds += 1;
            sweep.generations += r.generations;
            sweep.faults += r.faults();
            sweep.fenced += r.fenced_proposals;
            sweep.ended += u64::from(r.done_at_ms.is_some());
            if !r.violations.is_empty() {
                sweep.failed.push((seed, r.violations));
            }
        }
        sweep.secs = started.elapsed().as_secs_f64();
        sweep
    }

    /// Why the runs were too quiet to show much, if they were: a sweep is shaken, with
    /// re-plans in every run and, over many seeds, jobs ending amid the faults.
    pub fn too_quiet(&self) -> Option<String> {
        if self.generations <= self.seeds * 2 {
            return Some(format!(
                "{} generations in {} seeds",
                self.generations, self.seeds
            ));
        }
        (self.seeds > 100 && self.ended <= self.seeds / 5)
            .then(|| format!("{} of {} runs ended amid faults", self.ended, self.seeds))
    }
}

impl std::fmt::Display for Sweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} seeds in {:.1} s ({:.0} seeds/s): {} generations, {} faults, {} fenced \
             proposals, {} runs in which the job ended amid the faults, {} failed",
            self.seeds,
            self.secs,
            self.seeds as f64 / self.secs.max(1e-9),
            self.generations,
            self.faults,
            self.fenced,
            self.ended,
            self.failed.len()
        )
    }
}

pub(crate) struct Agent {
    m: Membership,
    alive: bool,
    /// Deliveries due: (when, order of sending, event).
    inbox: Vec<(u64, u64, Event)>,
    /// When the last delivery queued is due: a watch delivers in order.
    last_at: u64,
    started: Vec<u64>,
    /// The agent was told the job is done.
    knows_done: bool,
}

/// The simulated etcd and every agent on one clock; [`run`] shakes it with random faults, and
/// [`crate::weeks`] drives it one failure at a time.
pub(crate) struct World {
    cfg: SimConfig,
    rng: Rng,
    t0: Instant,
    now_ms: u64,
    sent: u64,
    generation: u64,
    plans: BTreeMap<u64, Plan>,
    /// Registered nodes and when their lease runs out (`None`: kept alive).
    leases: BTreeMap<String, Option<u64>>,
    /// What each node's registration offers.
    offers: BTreeMap<String, Offer>,
    /// Deliveries are due, or a change was delivered so recently that the leader may still be
    /// settling, until this time.
    active_until: u64,
    /// When the last agent started the newest generation.
    started_ms: u64,
    leader: Option<String>,
    agents: BTreeMap<String, Agent>,
    /// The job's done key exists.
    done: bool,
    report: Report,
}

fn node(i: usize) -> String {
    format!("n{i}")
}

/// Runs one simulation from `seed`.
pub fn run(seed: u64, cfg: &SimConfig) -> Report {
    let mut w = World::new(seed, cfg);
    // From a stream of its own, so the runs of every seed before it are unchanged.
    let mut ends = Rng(seed ^ 0x646f_6e65_5f61_7421);
    let done_at = ends
        .chance(0.3)
        .then(|| 10 * ends.within(cfg.faults_ms / 40, cfg.faults_ms / 10));
    for i in 0..cfg.nodes {
        w.join(&node(i));
    }
    let end = cfg.faults_ms + cfg.quiet_ms;
    while w.now_ms < end {
        w.now_ms += 10;
        if w.now_ms < cfg.faults_ms {
            w.faults();
        }
        if done_at == Some(w.now_ms) {
            w.done = true;
            w.report.done_at_ms = done_at;
            w.broadcast(Event::Done);
        }
        w.expire_leases();
        w.deliver();
    }
    w.check_settled();
    w.report.generations = w.generation;
    w.report
}

impl World {
    pub(crate) fn new(seed: u64, cfg: &SimConfig) -> World {
        World {
            cfg: cfg.clone(),
            rng: Rng(seed),
            t0: Instant::now(),
            now_ms: 0,
            sent: 0,
            generation: 0,
            plans: BTreeMap::new(),
            leases: BTreeMap::new(),
            offers: BTreeMap::new(),
            active_until: 0,
            started_ms: 0,
            leader: None,
            agents: BTreeMap::new(),
            done: false,
            report: Report {
                seed,
                ..Report::default()
            },
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The newest committed plan.
    pub(crate) fn plan(&self) -> Option<&Plan> {
        self.plans.get(&self.generation)
    }

    /// When the last agent started the newest generation.
    pub(crate) fn started_ms(&self) -> u64 {
        self.started_ms
    }

    pub(crate) fn violations(&self) -> &[String] {
        &self.report.violations
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.report.dropped
    }

    /// Whether the newest plan's every slot is on a live node that offers it.
    pub(crate) fn plan_runs(&self) -> bool {
        self.plan().is_some_and(|p| {
            p.blocks.iter().flat_map(|b| &b.slots).all(|s| {
                self.agents.get(&s.node).is_some_and(|a| a.alive)
                    && self.offers.get(&s.node).is_some_and(|o| o.offers(s.index))
            })
        })
    }

    /// Node `name` stops: its agent hears nothing more, and its lease runs out.
    pub(crate) fn kill(&mut self, name: &str) {
        if let Some(a) = self.agents.get_mut(name) {
            a.alive = false;
        }
        let until = self.now_ms + self.cfg.lease_ttl_ms;
        if let Some(lease) = self.leases.get_mut(name) {
            *lease = Some(until);
        }
    }

    /// A live node registers again with `offer` (a slot cooling down after its worker died, or
    /// every slot once it is over).
    pub(crate) fn offer(&mut self, name: &str, offer: Offer) {
        self.offers.insert(name.to_owned(), offer.clone());
        self.broadcast(Event::Registered {
            node: name.to_owned(),
            offer,
        });
    }

    /// The worker in `slot` exited: its agent tells every other one.
    pub(crate) fn worker_exited(&mut self, slot: Slot) {
        self.broadcast(Event::WorkerExited { slot });
    }

    /// The next lease to run out, if one is running out.
    fn next_expiry(&self) -> Option<u64> {
        self.leases.values().flatten().min().copied()
    }

    /// Runs the protocol until nothing is due: every delivery made, no leader settling, no
    /// lease running out. Time jumps over stretches in which nothing can happen.
    pub(crate) fn run_until_quiet(&mut self) {
        loop {
            let idle = self.now_ms >= self.active_until;
            if idle {
                match self.next_expiry() {
                    None => return,
                    // Straight to the tick at which it runs out.
                    Some(t) => self.now_ms = self.now_ms.max(t.div_ceil(10) * 10),
                }
            } else {
                self.now_ms += 10;
            }
            self.expire_leases();
            self.deliver();
        }
    }

    /// Moves the clock to `t_ms` (ahead of it), everything due before then done first.
    pub(crate) fn advance_to(&mut self, t_ms: u64) {
        loop {
            self.run_until_quiet();
            if self.now_ms >= t_ms {
                return;
            }
            let next = self.next_expiry().unwrap_or(u64::MAX);
            if next >= t_ms {
                self.now_ms = t_ms.div_ceil(10) * 10;
                self.deliver();
                return;
            }
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms)
    }

    fn violation(&mut self, what: String) {
        self.report
            .violations
            .push(format!("at {} ms: {what}", self.now_ms));
    }

    /// Sends `e` to every live agent, each after its own delay; a lost delivery is followed by
    /// a resynchronisation.
    fn broadcast(&mut self, e: Event) {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            self.send(&n, e.clone());
        }
    }

    fn send(&mut self, to: &str, e: Event) {
        if !self.agents.get(to).is_some_and(|a| a.alive) {
            return;
        }
        if self.rng.chance(self.cfg.p_drop) {
            self.report.dropped += 1;
            let at = self.now_ms + self.cfg.delay_max_ms * 3 + self.rng.below(100);
            for e in self.snapshot(to) {
                self.push(to, at, e);
            }
            return;
        }
        let at = self.now_ms + self.rng.below(self.cfg.delay_max_ms + 1);
        self.push(to, at, e);
    }

    fn push(&mut self, to: &str, at: u64, e: Event) {
        self.sent += 1;
        let seq = self.sent;
        self.active_until = self
            .active_until
            .max(at + self.cfg.settle_ms + self.cfg.delay_max_ms + 20);
        if let Some(a) = self.agents.get_mut(to) {
            a.last_at = a.last_at.max(at);
            a.inbox.push((a.last_at, seq, e));
        }
    }

    /// What agent `to` reads when it resynchronises: every registration (and the expiry of
    /// every node it counts live that has none), the leader, the generation.
    fn snapshot(&self, to: &str) -> Vec<Event> {
        let mut out: Vec<Event> = self
            .agents
            .get(to)
            .map(|a| {
                a.m.live()
                    .keys()
                    .filter(|n| !self.leases.contains_key(*n))
                    .map(|n| Event::Expired { node: n.clone() })
                    .collect()
            })
            .unwrap_or_default();
        out.extend(self.leases.keys().map(|n| {
            Event::Registered {
                node: n.clone(),
                offer: self
                    .offers
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| Offer::all(self.cfg.slots)),
            }
        }));
        if let Some(l) = &self.leader {
            out.push(Event::Leader { node: l.clone() });
        }
        if let Some(p) = self.plans.get(&self.generation) {
            out.push(Event::Committed {
                generation: self.generation,
                plan: p.clone(),
            });
        }
        if self.done {
            out.push(Event::Done);
        }
        out
    }

    /// Node `name` starts (or returns) and registers every slot.
    pub(crate) fn join(&mut self, name: &str) {
        let timing = Timing {
            settle: Duration::from_millis(self.cfg.settle_ms),
            hang: Duration::from_millis(self.cfg.hang_ms),
        };
        let m = Membership::new(
            name,
            self.cfg.tp,
            self.cfg.pp,
            self.cfg.microbatches,
            timing,
        );
        self.agents.insert(
            name.to_owned(),
            Agent {
                m,
                alive: true,
                inbox: Vec::new(),
                last_at: 0,
                started: Vec::new(),
                knows_done: false,
            },
        );
        let at = self.now_ms;
        for e in self.snapshot(name) {
            self.push(name, at, e);
        }
        self.leases.insert(name.to_owned(), None);
        self.offers
            .insert(name.to_owned(), Offer::all(self.cfg.slots));
        self.broadcast(Event::Registered {
            node: name.to_owned(),
            offer: Offer::all(self.cfg.slots),
        });
        self.campaign();
    }

    /// The leader key goes with its holder's lease; the lowest registered node takes it.
    fn campaign(&mut self) {
        if self.leader.is_none() {
            if let Some(n) = self.leases.keys().next().cloned() {
                self.leader = Some(n.clone());
                self.broadcast(Event::Leader { node: n });
            }
        }
    }

    fn faults(&mut self) {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            let alive = self.agents[&n].alive;
            if alive && self.rng.chance(self.cfg.p_node_death) {
                self.report.node_deaths += 1;
                self.kill(&n);
            } else if !alive && self.rng.chance(self.cfg.p_revival) {
                if self.leases.contains_key(&n) {
                    continue; // its old lease has not expired yet
                }
                self.report.revivals += 1;
                self.join(&n);
            } else if alive && self.rng.chance(self.cfg.p_worker_death) {
                let planned: Vec<Slot> = self
                    .plans
                    .get(&self.generation)
                    .into_iter()
                    .flat_map(|p| p.blocks.iter().flat_map(|b| b.slots.iter()))
                    .filter(|s| s.node == n)
                    .cloned()
                    .collect();
                if !planned.is_empty() {
                    self.report.worker_deaths += 1;
                    let k = self.rng.below(planned.len() as u64) as usize;
                    self.broadcast(Event::WorkerExited {
                        slot: planned[k].clone(),
                    });
                }
            }
        }
    }

    fn expire_leases(&mut self) {
        let now = self.now_ms;
        let gone: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, until)| until.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.leases.remove(&n);
            self.offers.remove(&n);
            self.broadcast(Event::Expired { node: n.clone() });
            if self.leader.as_deref() == Some(&n) {
                self.leader = None;
                self.campaign();
            }
        }
    }

    fn deliver(&mut self) {
        let now = self.now();
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            let due: Vec<Event> = {
                let a = self.agents.get_mut(&n).expect("agent");
                if !a.alive {
                    a.inbox.clear();
                    continue;
                }
                a.inbox.sort_by_key(|(at, seq, _)| (*at, *seq));
                let k = a.inbox.partition_point(|(at, _, _)| *at <= self.now_ms);
                a.inbox.drain(..k).map(|(_, _, e)| e).collect()
            };
            let mut actions = Vec::new();
            for e in due.into_iter().chain([Event::Tick]) {
                let a = self.agents.get_mut(&n).expect("agent");
                a.knows_done |= e == Event::Done;
                let knew = a.knows_done;
                actions.extend(a.m.handle(now, e).into_iter().map(|act| (knew, act)));
            }
            for (knew_done, act) in actions {
                if knew_done && matches!(act, Action::Propose { .. } | Action::Start { .. }) {
                    self.violation(format!("{n} knew the job was done, and did {act:?}"));
                }
                self.act(&n, act);
            }
        }
    }

    fn act(&mut self, agent: &str, act: Action) {
        match act {
            Action::Propose { from, to, plan } => {
                if to != from + 1 {
                    self.violation(format!("{agent} proposed generation {to} from {from}"));
                }
                if from != self.generation {
                    self.report.fenced_proposals += 1;
                    return;
                }
                if self.plans.contains_key(&to) {
                    self.violation(format!("a second plan for generation {to}"));
                    return;
                }
                self.check_plan(to, &plan);
                self.generation = to;
                self.plans.insert(to, plan.clone());
                self.broadcast(Event::Committed {
                    generation: to,
                    plan,
                });
            }
            Action::Start {
                generation, plan, ..
            } => {
                if self.plans.get(&generation) != Some(&plan) {
                    self.violation(format!(
                        "{agent} started generation {generation} with a plan that was not committed"
                    ));
                }
                let a = self.agents.get_mut(agent).expect("agent");
                if a.started.last().is_some_and(|&g| g >= generation) {
                    let last = a.started.last().copied().unwrap_or(0);
                    self.violation(format!(
                        "{agent} started generation {generation} after {last}"
                    ));
                }
                let a = self.agents.get_mut(agent).expect("agent");
                a.started.push(generation);
                if generation == self.generation {
                    self.started_ms = self.now_ms;
                }
            }
            Action::Abort { .. } | Action::Evict { .. } | Action::CannotPlan { .. } => {}
        }
    }

    /// The invariants every plan keeps ([`Plan::problems`], [`Plan::kept_problems`] against
    /// the generation before), and its slots exist on their nodes. The core asserts them too;
    /// here they are named for the simulation's report.
    fn check_plan(&mut self, g: u64, plan: &Plan) {
        let cfg = &self.cfg;
        let mut problems = plan.problems(cfg.tp, cfg.pp, cfg.microbatches);
        problems.extend(plan.kept_problems(self.plans.get(&(g - 1))));
        for s in plan.held().keys() {
            if s.index >= cfg.slots {
                problems.push(format!("slot {s:?} does not exist"));
            }
        }
        for p in problems {
            self.violation(format!("plan of generation {g}: {p}"));
        }
    }

    /// After the quiet period every live node is known to all and the plan is the largest the
    /// live slots allow.
    pub(crate) fn check_settled(&mut self) {
        if self.done {
            return;
        }
        let live: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.alive)
            .map(|(n, _)| n.clone())
            .collect();
        let blocks = live.len() * (self.cfg.slots / self.cfg.tp);
        let dp_max = (blocks / self.cfg.pp).min(self.cfg.microbatches);
        let Some(plan) = self.plans.get(&self.generation).cloned() else {
            if dp_max > 0 {
                self.violation("no plan at all".into());
            }
            return;
        };
        if dp_max == 0 {
            return;
        }
        let stale = plan
            .blocks
            .iter()
            .flat_map(|b| &b.slots)
            .any(|s| !live.contains(&s.node));
        if stale || plan.dp != dp_max {
            let views: Vec<String> = self
                .agents
                .iter()
                .filter(|(_, a)| a.alive)
                .map(|(n, a)| {
                    format!(
                        "{n}: generation {}, live {:?}",
                        a.m.generation(),
                        a.m.live()
                    )
                })
                .collect();
            self.violation(format!(
                "leader {:?}, etcd leases {:?}; views: {}",
                self.leader,
                self.leases,
                views.join("; ")
            ));
            self.violation(format!(
                "did not settle: generation {} has dp {} on {:?}, the live nodes {live:?} allow \
                 dp {dp_max}",
                self.generation,
                plan.dp,
                plan.blocks
                    .iter()
                    .map(|b| b.slots[0].node.as_str())
                    .collect::<Vec<_>>()
            ));
        }
    }
}
