//! A scenario: a layout, a model, a number of steps, the store's misbehaviour and a schedule
//! of faults, all drawn from one seed. The same seed gives the same scenario on every machine.

use std::fmt;

use marathon_runtime::moments::Moment;
use serde::Serialize;

use crate::rng::Rng;

/// One fault, and what undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL of one worker process.
    KillWorker { node: usize, slot: usize },
    /// SIGSTOP of one worker process: its agent declares it hung and evicts it.
    HangWorker { node: usize, slot: usize },
    /// One worker process throttled to a `slowdown`-th of its speed for `ms`
    /// ([`crate::throttle`]): alive, but a straggler.
    SlowWorker {
        node: usize,
        slot: usize,
        slowdown: u32,
        ms: u64,
    },
    /// SIGKILL of a node's agent and its workers; the agent starts again under its name after
    /// `down_ms`.
    KillNode { node: usize, down_ms: u64 },
    /// SIGSTOP of a node's agent and workers for `ms`, then SIGCONT. Longer than the lease,
    /// the node is presumed dead, and must find itself fenced when it wakes; its agent is
    /// started again once it has exited.
    StopNode { node: usize, ms: u64 },
    /// SIGKILL of one etcd member, started again after `down_ms`.
    KillEtcdMember { member: usize, down_ms: u64 },
    /// Every etcd member stopped (SIGSTOP) for `ms`: etcd wholly unavailable.
    EtcdOutage { ms: u64 },
    /// The object store stopped (SIGSTOP) for `ms`.
    StopStore { ms: u64 },
    /// The object store killed (SIGKILL), started again after `down_ms`.
    KillStore { down_ms: u64 },
    /// One bit flipped in a shard of the newest committed checkpoint.
    FlipBit,
    /// A node cut off the network (its link down) for `ms`: from etcd, the store and the
    /// other nodes.
    Partition { node: usize, ms: u64 },
    /// A node's traffic delayed and lost for `ms`.
    SlowLink { node: usize, ms: u64 },
    /// Connections forged to every process-group listener of the generation being formed, by a
    /// process that knows the job's and groups' names but not the generation's secret. Not
    /// drawn: the harness adds it at every rendezvous moment.
    ForgeRendezvous,
}

impl Fault {
    /// The fault's kind, for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillWorker { .. } => "kill-worker",
            Fault::HangWorker { .. } => "hang-worker",
            Fault::SlowWorker { .. } => "slow-worker",
            Fault::KillNode { .. } => "kill-node",
            Fault::StopNode { .. } => "stop-node",
            Fault::KillEtcdMember { .. } => "kill-etcd-member",
            Fault::EtcdOutage { .. } => "etcd-outage",
            Fault::StopStore { .. } => "stop-store",
            Fault::KillStore { .. } => "kill-store",
            Fault::FlipBit => "flip-bit",
            Fault::Partition { .. } => "partition",
            Fault::SlowLink { .. } => "slow-link",
            Fault::ForgeRendezvous => "forge-rendezvous",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillWorker { node, slot } => write!(f, "kill -9 worker node-{node}/{slot}"),
            Fault::HangWorker { node, slot } => write!(f, "kill -STOP worker node-{node}/{slot}"),
            Fault::SlowWorker {
                node,
                slot,
                slowdown,
                ms,
            } => write!(
                f,
                "worker node-{node}/{slot} throttled {slowdown}x for {ms} ms"
            ),
            Fault::KillNode { node, down_ms } => {
                write!(
                    f,
                    "kill -9 node-{node} (agent and workers), back after {down_ms} ms"
                )
            }
            Fault::StopNode { node, ms } => write!(f, "kill -STOP node-{node} for {ms} ms"),
            Fault::KillEtcdMember { member, down_ms } => {
                write!(f, "kill -9 etcd member m{member}, back after {down_ms} ms")
            }
            Fault::EtcdOutage { ms } => write!(f, "every etcd member stopped for {ms} ms"),
            Fault::StopStore { ms } => write!(f, "object store stopped for {ms} ms"),
            Fault::KillStore { down_ms } => {
                write!(f, "kill -9 object store, back after {down_ms} ms")
            }
            Fault::FlipBit => write!(f, "flip a bit in the newest committed checkpoint"),
            Fault::Partition { node, ms } => write!(f, "partition node-{node} for {ms} ms"),
            Fault::SlowLink { node, ms } => {
                write!(f, "slow node-{node}'s network for {ms} ms")
            }
            Fault::ForgeRendezvous => write!(
                f,
                "connections forged to the rendezvous's listeners, without the group secret"
            ),
        }
    }
}

/// A fault and when it lands: once the job has committed step `at_step`, `delay_ms` later
/// (which puts it anywhere in the step that follows: its forward, backward or collectives),
/// or, with `moment`, when a worker next reaches that moment. A fault of a worker or a node
/// then strikes the worker found there, or its node. A rendezvous and a transfer come with a
/// recovery, which `trigger` starts: that worker is killed first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    pub at_step: u64,
    pub delay_ms: u64,
    pub fault: Fault,
    pub moment: Option<Moment>,
    pub trigger: Option<(usize, usize)>,
}

impl fmt::Display for Timed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at step {} ", self.at_step)?;
        match (self.moment, self.trigger) {
            (None, _) => write!(f, "(+{} ms): {}", self.delay_ms, self.fault),
            (Some(m), None) => write!(f, "(at the next {}): {}", m.name(), self.fault),
            (Some(m), Some((node, slot))) => write!(
                f,
                "(kill -9 worker node-{node}/{slot}, then at the {} of its recovery): {}",
                m.name(),
                self.fault
            ),
        }
    }
}

/// How the store misbehaves for the whole run (`[checkpoint.faults]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreMisbehaviour {
    pub error_rate: f64,
    pub delay_ms: u64,
    /// The checkpoint step whose manifest put is torn, so that checkpoint never commits.
    pub torn_manifest: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub seed: u64,
    pub nodes: usize,
    pub slots: usize,
    pub tp: usize,
    pub pp: usize,
    pub n_layer: usize,
    pub steps: u64,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub store: StoreMisbehaviour,
    pub faults: Vec<Timed>,
}

impl Scenario {
    /// The scenario of `seed`.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = Rng(seed ^ 0x6368_616f_735f_7331);
        let nodes = rng.within(3, 4) as usize;
        let slots = 2;
        let tp = rng.within(1, 2) as usize;
        let pp = if tp == 1 {
            rng.within(1, 2) as usize
        } else {
            1
        };
        let steps = rng.within(30, 48);
        let checkpoint_every = rng.within(4, 6);
        let store = StoreMisbehaviour {
            error_rate: [0.0, 0.0, 0.02, 0.05][rng.below(4) as usize],
            delay_ms: [0, 0, 5, 20][rng.below(4) as usize],
            torn_manifest: rng
                .chance(0.3)
                .then(|| checkpoint_every * rng.within(1, (steps / checkpoint_every).max(2) - 1)),
        };
        // Faults land at least six steps apart, from step 4 until six steps before the end.
        let count = rng.within(2, 4);
        let mut faults = Vec::new();
        let mut at = 4 + rng.below(4);
        // Network faults come from a stream of their own, so adding them kept the other
        // faults of every seed where they were.
        let mut net = Rng(seed ^ 0x6e65_7477_6f72_6b21);
        // So do the moments faults land at.
        let mut moments = Rng(seed ^ 0x6d6f_6d65_6e74_7321);
        // And the slow workers.
        let mut slow = Rng(seed ^ 0x736c_6f77_5f77_6b72);
        for _ in 0..count {
            if at + 6 > steps {
                break;
            }
            let mut fault = Self::draw(&mut rng, nodes, slots);
            if net.chance(0.15) {
                let node = net.below(nodes as u64) as usize;
                fault = if net.chance(0.6) {
                    Fault::Partition {
                        node,
                        ms: net.within(1000, 8000),
                    }
                } else {
                    Fault::SlowLink {
                        node,
                        ms: net.within(2000, 8000),
                    }
                };
            }
            if slow.chance(0.1) {
                fault = Fault::SlowWorker {
                    node: slow.below(nodes as u64) as usize,
                    slot: slow.below(slots as u64) as usize,
                    slowdown: slow.within(3, 6) as u32,
                    ms: slow.within(2000, 6000),
                };
            }
            let moment = moments
                .chance(0.3)
                .then(|| Moment::ALL[moments.below(Moment::ALL.len() as u64) as usize]);
            let trigger =
                matches!(moment, Some(Moment::Rendezvous | Moment::Transfer)).then(|| {
                    (
                        moments.below(nodes as u64) as usize,
                        moments.below(slots as u64) as usize,
                    )
                });
            faults.push(Timed {
                at_step: at,
                delay_ms: rng.below(400),
                fault,
                moment,
                trigger,
            });
            at += rng.within(6, 10);
        }
        Scenario {
            seed,
            nodes,
            slots,
            tp,
            pp,
            n_layer: 2 * pp,
            steps,
            global_batch: 24,
            micro_batch: 2,
            checkpoint_every,
            keep_last: 3,
            store,
            faults,
        }
    }

    fn draw(rng: &mut Rng, nodes: usize, slots: usize) -> Fault {
        let node = rng.below(nodes as u64) as usize;
        let slot = rng.below(slots as u64) as usize;
        match rng.below(12) {
            0 | 1 => Fault::KillWorker { node, slot },
            2 => Fault::HangWorker { node, slot },
            3 | 4 => Fault::KillNode {
                node,
                down_ms: rng.within(0, 4000),
            },
            5 => Fault::StopNode {
                node,
                ms: rng.within(500, 6000),
            },
            6 | 7 => Fault::KillEtcdMember {
                member: rng.below(3) as usize,
                down_ms: rng.within(500, 5000),
            },
            8 => Fault::EtcdOutage {
                ms: rng.within(500, 2500),
            },
            9 => Fault::StopStore {
                ms: rng.within(500, 4000),
            },
            10 => Fault::KillStore {
                down_ms: rng.within(0, 3000),
            },
            _ => Fault::FlipBit,
        }
    }

    /// The scenario in one line: its shape, without the faults.
    pub fn shape(&self) -> String {
        let mut s = format!(
            "{} nodes x {} slots, tp {} x pp {}, {} layers, {} steps, checkpoint every {}",
            self.nodes,
            self.slots,
            self.tp,
            self.pp,
            self.n_layer,
            self.steps,
            self.checkpoint_every
        );
        let st = &self.store;
        if st.error_rate > 0.0 || st.delay_ms > 0 {
            s += &format!(
                ", store errors {:.0}% and +{} ms",
                st.error_rate * 100.0,
                st.delay_ms
            );
        }
        if let Some(t) = st.torn_manifest {
            s += &format!(", manifest of step {t} torn");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_scenario_and_seeds_differ() {
        assert_eq!(Scenario::from_seed(11), Scenario::from_seed(11));
        let distinct: std::collections::BTreeSet<String> = (0..20)
            .map(|s| format!("{:?}", Scenario::from_seed(s)))
            .collect();
        assert_eq!(distinct.len(), 20);
    }

    #[test]
    fn faults_fit_the_run_and_every_kind_is_drawn() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..500 {
            let s = Scenario::from_seed(seed);
            assert!(!s.faults.is_empty(), "seed {seed}");
            for t in &s.faults {
                assert!(t.at_step + 6 <= s.steps, "seed {seed}: {t:?}");
                kinds.insert(t.fault.kind());
            }
            assert_eq!(s.n_layer % s.pp, 0);
            assert_eq!(s.slots % s.tp, 0);
        }
        assert_eq!(kinds.len(), 12, "{kinds:?}");
        let moments: std::collections::BTreeSet<_> = (0..500)
            .flat_map(|seed| Scenario::from_seed(seed).faults)
            .filter_map(|t| t.moment)
            .collect();
        assert_eq!(moments.len(), Moment::ALL.len(), "{moments:?}");
    }
}
