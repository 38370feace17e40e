//! A weeks-long run in simulation: a job of many nodes over simulated days, every agent's
//! membership core (`marathon_elastic::membership`) and the leader's planner running against
//! the simulated etcd of [`crate::sim`], with failures drawn from a seed and a failure model.
//!
//! The protocol runs for real: each failure is a node that stops (its lease runs out after its
//! time to live) or a worker that exits (its slot cools down), each repair a node that
//! registers again, and the time from each of these to every agent running the next committed
//! plan is what the simulated etcd and the agents took. What the simulation cannot run at this
//! scale it takes from [`Assumptions`]: forming the groups, moving state, a step, a
//! checkpoint's stall, persist and load. The same trace of failures is then charged to
//! checkpoint-restart at its optimal interval, which stops every process at each failure,
//! restarts the job once it has all its nodes, and loads its newest committed checkpoint.
//!
//! Time lost is kept per cause. The invariants of the coordination simulation (one plan per
//! generation, whole units, no slot twice, kept blocks keep their place, plans that settle on
//! the largest the live nodes allow) are checked throughout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use marathon_elastic::plan::{Offer, Slot, StateSource};
use marathon_model::goodput::{Assumptions, Goodput};
use serde::Serialize;

use crate::rng::Rng;
use crate::sim::{SimConfig, World};

/// A failure model from published figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FailureModel {
    pub name: &'static str,
    /// Mean time between failures of one GPU, in hours.
    pub gpu_mtbf_hours: f64,
    /// The share of failures that take their node away for repair; the rest end a worker
    /// process, whose slot cools down and is offered again.
    pub hardware_fraction: f64,
    /// Where the figures come from.
    pub source: &'static str,
}

/// The presets by name.
pub const PRESETS: &[FailureModel] = &[FailureModel {
    name: "llama3",
    gpu_mtbf_hours: marathon_model::goodput::LLAMA3_GPU_MTBF_HOURS,
    hardware_fraction: marathon_model::goodput::LLAMA3_HARDWARE_FRACTION,
    source: "Llama 3 405B pre-training: 419 unexpected interruptions in 54 days on 16,384 \
             GPUs, about 78% of them hardware (Dubey et al. 2024, section 3.3.4)",
}];

/// What is simulated.
#[derive(Debug, Clone)]
pub struct WeeksConfig {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub distributed_optimizer: bool,
    /// Microbatches per step: the most replicas a plan can have.
    pub microbatches: usize,
    pub days: f64,
    pub seed: u64,
    /// Failures per GPU-hour come from here; the hardware share from the assumptions.
    pub gpu_mtbf_hours: f64,
    /// How long a slot whose worker died is not offered.
    pub cooldown_s: f64,
    /// The lease of a node that stops runs out this long after.
    pub lease_ttl_ms: u64,
    /// Assumptions for what the protocol simulation does not run; its `job_mtbf_s` is unused
    /// (failures come from `gpu_mtbf_hours`).
    pub assumptions: Assumptions,
    /// The checkpoint's figures under these assumptions.
    pub goodput: Goodput,
}

/// Time lost by one way of recovering, per cause, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ledger {
    pub lost_s: BTreeMap<&'static str, f64>,
    pub ettr: f64,
}

impl Ledger {
    fn add(&mut self, cause: &'static str, s: f64) {
        if s > 0.0 {
            *self.lost_s.entry(cause).or_default() += s;
        }
    }

    fn total(&self) -> f64 {
        self.lost_s.values().sum()
    }
}

/// What a simulated run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WeeksReport {
    pub seed: u64,
    pub days: f64,
    pub nodes: usize,
    pub spare_nodes: usize,
    pub hardware_failures: u64,
    pub worker_failures: u64,
    pub repairs: u64,
    pub generations: u64,
    /// Deliveries the simulated etcd lost, each followed by a resynchronisation.
    pub dropped: u64,
    pub marathon: Ledger,
    pub restart: Ledger,
    /// (hours, data-parallel degree) at every change; 0 while the job cannot run.
    pub dp_over_time: Vec<(f64, usize)>,
    /// The data-parallel degree averaged over the run, and its least.
    pub dp_mean: f64,
    pub dp_min: usize,
    pub violations: Vec<String>,
    pub wall_s: f64,
}

/// What is waiting to happen to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Repaired(String),
    Cooled(String),
}

fn node(i: usize) -> String {
    format!("n{i:04}")
}

/// What `node` offers while `cooling` slots of it cool down.
fn offer_of(cooling: &BTreeMap<String, BTreeMap<usize, f64>>, node: &str, slots: usize) -> Offer {
    let mut offer = Offer::all(slots);
    offer.cooling.extend(
        cooling
            .get(node)
            .into_iter()
            .flat_map(|c| c.keys().copied()),
    );
    offer
}

/// Training since the newest committed checkpoint, `since` seconds after a start from one:
/// snapshots every `interval`, each committed `persist` after it is taken.
fn rework(since: f64, interval: f64, persist: f64) -> f64 {
    if since < interval + persist {
        return since;
    }
    let x = since % interval;
    if x < persist {
        x + interval
    } else {
        x
    }
}

/// An exponentially distributed wait with the given mean.
fn exponential(rng: &mut Rng, mean: f64) -> f64 {
    let u = ((rng.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -u.ln() * mean
}

/// A uniform draw in [0, 1).
fn uniform(rng: &mut Rng) -> f64 {
    (rng.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// Checkpoint-restart on the trace: the nodes it runs on, when it last resumed from a
/// checkpoint, and since when it has waited for nodes.
struct Restarting {
    nodes: BTreeSet<String>,
    size: usize,
    resumed: f64,
    waiting_since: Option<f64>,
}

impl Restarting {
    /// Takes nodes that are up and unused until it has its size.
    fn fill(&mut self, up: &BTreeSet<String>) -> bool {
        for n in up {
            if self.nodes.len() >= self.size {
                break;
            }
            if !self.nodes.contains(n) {
                self.nodes.insert(n.clone());
            }
        }
        self.nodes.len() == self.size
    }

    /// Starts again at `now`, loading the newest committed checkpoint.
    fn restart(&mut self, now: f64, a: &Assumptions, g: &Goodput, ledger: &mut Ledger) {
        ledger.add("restart", a.restart_s);
        ledger.add("checkpoint loads", g.load_s);
        self.resumed = now + a.restart_s + g.load_s;
    }
}

/// Runs the simulation.
pub fn run(cfg: &WeeksConfig) -> WeeksReport {
    let started = Instant::now();
    let (a, g) = (&cfg.assumptions, &cfg.goodput);
    let gpn = a.gpus_per_node;
    assert!(
        cfg.tp <= gpn && gpn % cfg.tp == 0,
        "a tensor-parallel group fits in a node"
    );
    let job_nodes = (cfg.tp * cfg.pp * cfg.dp).div_ceil(gpn);
    let nodes = job_nodes + a.spare_nodes;
    let sim = SimConfig {
        nodes,
        slots: gpn,
        tp: cfg.tp,
        pp: cfg.pp,
        // The planner grows the job up to its configured degree, no further.
        microbatches: cfg.microbatches.min(cfg.dp),
        faults_ms: 0,
        quiet_ms: 0,
        p_node_death: 0.0,
        p_revival: 0.0,
        p_worker_death: 0.0,
        p_drop: 0.001,
        delay_max_ms: 40,
        lease_ttl_ms: cfg.lease_ttl_ms,
        settle_ms: 50,
        // No progress is simulated, so no worker may ever count as hung.
        hang_ms: 20 * 365 * 86_400_000,
    };
    let mut w = World::new(cfg.seed, &sim);
    let mut rng = Rng(cfg.seed ^ 0x7765_656b_735f_7275);
    for i in 0..nodes {
        w.join(&node(i));
    }
    w.run_until_quiet();
    let full_dp = w.plan().map_or(0, |p| p.dp);
    let t0_ms = w.now_ms();
    let at_ms = |t: f64| t0_ms + (t * 1e3) as u64;
    let secs = |w: &World| (w.now_ms() - t0_ms) as f64 / 1e3;
    let horizon = cfg.days * 86_400.0;
    let ttl = cfg.lease_ttl_ms as f64 / 1e3;
    let link = a.link_gbps * 1e9;
    let mut report = WeeksReport {
        seed: cfg.seed,
        days: cfg.days,
        nodes: job_nodes,
        spare_nodes: a.spare_nodes,
        dp_over_time: vec![(0.0, full_dp)],
        dp_min: full_dp,
        ..WeeksReport::default()
    };

    let mut m = Ledger::default();
    let (mut dp, mut dp_since, mut dp_area) = (full_dp, 0.0f64, 0.0f64);
    let mut r = Ledger::default();
    let mut cr = Restarting {
        nodes: (0..job_nodes).map(node).collect(),
        size: job_nodes,
        resumed: 0.0,
        waiting_since: None,
    };
    let mut up: BTreeSet<String> = (0..nodes).map(node).collect();
    // Each node's slots cooling down after their workers died, and until when.
    let mut cooling: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    let mut due: BTreeMap<(u64, u64), Due> = BTreeMap::new();
    let mut seq = 0u64;
    let failure_mean = |up: usize| cfg.gpu_mtbf_hours * 3600.0 / (up.max(1) * gpn) as f64;
    let mut next_failure = exponential(&mut rng, failure_mean(up.len()));

    loop {
        let next_due = due.first_key_value().map(|(&(at, _), _)| at);
        let event = match next_due {
            Some(at) if at < at_ms(next_failure) => due.pop_first().map(|(_, d)| d),
            _ => None,
        };
        let t = next_due
            .filter(|_| event.is_some())
            .map_or(next_failure, |at| (at - t0_ms) as f64 / 1e3);
        if t >= horizon {
            break;
        }
        w.advance_to(at_ms(t));
        let now = secs(&w);
        let generation = w.generation();
        // What the failure, if this is one, costs beyond the protocol: detection, and the step
        // it interrupted.
        let (mut detect, mut lost_step) = (0.0, 0.0);
        match event {
            None => {
                next_failure = now + exponential(&mut rng, failure_mean(up.len()));
                let k = rng.below(up.len() as u64) as usize;
                let Some(victim) = up.iter().nth(k).cloned() else {
                    continue;
                };
                let planned: Vec<Slot> = w
                    .plan()
                    .into_iter()
                    .flat_map(|p| p.blocks.iter().flat_map(|b| b.slots.iter()))
                    .filter(|s| s.node == victim)
                    .cloned()
                    .collect();
                let partial = uniform(&mut rng) * a.step_s;
                let hardware = rng.chance(a.hardware_fraction);
                if !planned.is_empty() {
                    lost_step = partial;
                }
                if hardware {
                    report.hardware_failures += 1;
                    up.remove(&victim);
                    cooling.remove(&victim);
                    w.kill(&victim);
                    detect = ttl;
                    seq += 1;
                    let back = now + exponential(&mut rng, a.repair_s);
                    due.insert((at_ms(back), seq), Due::Repaired(victim.clone()));
                } else {
                    report.worker_failures += 1;
                    if let Some(slot) = planned.get(rng.below(planned.len() as u64) as usize) {
                        let until = now + cfg.cooldown_s;
                        cooling
                            .entry(victim.clone())
                            .or_default()
                            .insert(slot.index, until);
                        w.worker_exited(slot.clone());
                        w.offer(&victim, offer_of(&cooling, &victim, gpn));
                        seq += 1;
                        due.insert(
                            (at_ms(now + cfg.cooldown_s), seq),
                            Due::Cooled(victim.clone()),
                        );
                    }
                }
                // Checkpoint-restart stops at any failure on its nodes; a node lost in
                // hardware leaves its nodes (while it waits for others, too) and is replaced
                // from those that are up, or it waits for one.
                let member = cr.nodes.contains(&victim);
                if hardware {
                    cr.nodes.remove(&victim);
                }
                if member && cr.waiting_since.is_none() {
                    r.add("detection", if hardware { ttl } else { 0.0 });
                    r.add(
                        "training done again",
                        rework((now - cr.resumed).max(0.0), g.interval_s, g.persist_s),
                    );
                    if cr.fill(&up) {
                        cr.restart(now + detect, a, g, &mut r);
                    } else {
                        cr.waiting_since = Some(now);
                    }
                }
            }
            Some(Due::Repaired(n)) => {
                report.repairs += 1;
                up.insert(n.clone());
                w.join(&n);
                if let Some(since) = cr.waiting_since {
                    if cr.fill(&up) {
                        r.add("waiting for capacity", now - since);
                        cr.restart(now, a, g, &mut r);
                        cr.waiting_since = None;
                    }
                }
            }
            Some(Due::Cooled(n)) => {
                if let Some(slots) = cooling.get_mut(&n) {
                    slots.retain(|_, until| *until > now + 1e-3);
                }
                if up.contains(&n) {
                    w.offer(&n, offer_of(&cooling, &n, gpn));
                }
            }
        }

        // marathon: the protocol runs to its next plan, or finds none to make. Every member
        // stops at the failure (its collectives fail, or hang until the lease runs out) or at
        // the new plan's commit, and trains again once the last agent started the plan, its
        // groups formed and its state moved.
        w.run_until_quiet();
        if w.generation() > generation {
            let plan = w.plan().expect("a committed plan").clone();
            let protocol = (w.started_ms() - t0_ms) as f64 / 1e3 - now - detect;
            m.add("detection", detect);
            m.add("re-forming", protocol.max(0.0) + a.reform_s);
            if plan
                .blocks
                .iter()
                .any(|b| matches!(b.state, StateSource::Peer(_)))
            {
                m.add("transfer", g.checkpoint.join_bytes / link);
            }
            if cfg.distributed_optimizer && plan.dp != dp && dp > 0 {
                m.add("transfer", g.in_place.transfer_s);
            }
            m.add("recomputation", lost_step);
            if plan.blocks.iter().any(|b| b.state == StateSource::Storage) && generation > 0 {
                m.add(
                    "storage reloads",
                    g.load_s + rework(now, g.interval_s, g.persist_s),
                );
            }
        }
        let new_dp = if w.plan_runs() {
            w.plan().map_or(0, |p| p.dp)
        } else {
            0
        };
        if new_dp != dp {
            dp_area += dp as f64 * (now - dp_since);
            report.dp_over_time.push((now / 3600.0, new_dp));
            report.dp_min = report.dp_min.min(new_dp);
            dp = new_dp;
            dp_since = now;
        }
    }
    dp_area += dp as f64 * (horizon - dp_since);
    if let Some(since) = cr.waiting_since {
        r.add("waiting for capacity", horizon - since);
    }
    report.dp_mean = dp_area / horizon;
    // Replicas missing: their share of the job's time.
    m.add(
        "waiting for capacity",
        (1.0 - report.dp_mean / full_dp.max(1) as f64) * horizon,
    );
    for l in [&mut m, &mut r] {
        let training = (horizon - l.total()).max(0.0);
        l.add("checkpoint stalls", training * g.checkpoint_fraction);
        l.ettr = (1.0 - l.total() / horizon).max(0.0);
    }

    // Past the horizon: slots cooling are offered again and the job must settle on the
    // largest plan the live nodes allow.
    for (n, _) in std::mem::take(&mut cooling) {
        if up.contains(&n) {
            w.offer(&n, Offer::all(gpn));
        }
    }
    w.run_until_quiet();
    w.check_settled();
    report.generations = w.generation();
    report.dropped = w.dropped();
    report.violations = w.violations().to_vec();
    report.marathon = m;
    report.restart = r;
    report.wall_s = started.elapsed().as_secs_f64();
    report
}
