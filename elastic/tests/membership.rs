//! The membership protocol in a deterministic simulation: agents fed the same events, a
//! simulated coordinator that commits proposals by compare-and-swap, and failures at chosen
//! times. Checks that members abort at once, the leader re-plans after the settling window,
//! survivors keep their state, returning nodes get theirs from a peer, hung workers are evicted,
//! stale proposals are fenced, and storage is used only when no live copy of a stage is left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use marathon_elastic::membership::{Action, Event, Membership, Timing};
use marathon_elastic::plan::{Offer, Plan, Slot, StateSource};

const SETTLE: Duration = Duration::from_millis(100);
const HANG: Duration = Duration::from_secs(5);

/// Agents, the committed generation, and everything each agent was told to do.
struct Sim {
    t0: Instant,
    now: Duration,
    agents: BTreeMap<String, Membership>,
    generation: u64,
    committed: Option<Plan>,
    actions: BTreeMap<String, Vec<Action>>,
    leader: Option<String>,
}

impl Sim {
    fn new(nodes: &[&str], slots: usize, tp: usize, pp: usize) -> Sim {
        let mut sim = Sim {
            t0: Instant::now(),
            now: Duration::ZERO,
            agents: BTreeMap::new(),
            generation: 0,
            committed: None,
            actions: BTreeMap::new(),
            leader: None,
        };
        for n in nodes {
            sim.join(n, slots, tp, pp);
        }
        sim
    }

    fn join(&mut self, node: &str, slots: usize, tp: usize, pp: usize) {
        let timing = Timing {
            settle: SETTLE,
            hang: HANG,
        };
        let mut m = Membership::new(node, tp, pp, 8, timing);
        // A new agent learns the current state from etcd: registrations and the generation.
        let now = self.t0 + self.now;
        let live: Vec<(String, usize)> = self.agents.keys().map(|k| (k.clone(), slots)).collect();
        for (n, s) in live {
            m.handle(
                now,
                Event::Registered {
                    node: n,
                    offer: Offer::all(s),
                },
            );
        }
        if let Some(p) = &self.committed {
            m.handle(
                now,
                Event::Committed {
                    generation: self.generation,
                    plan: p.clone(),
                },
            );
        }
        self.agents.insert(node.to_owned(), m);
        self.broadcast(Event::Registered {
            node: node.to_owned(),
            offer: Offer::all(slots),
        });
        self.elect();
    }

    /// The lowest live node leads (etcd's election picks one; any deterministic rule will do).
    fn elect(&mut self) {
        let first = self.agents.keys().next().cloned();
        if first != self.leader {
            self.leader = first.clone();
            if let Some(l) = first {
                self.broadcast(Event::Leader { node: l });
            }
        }
    }

    fn broadcast(&mut self, e: Event) {
        let now = self.t0 + self.now;
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            let acts = self
                .agents
                .get_mut(&n)
                .expect("agent")
                .handle(now, e.clone());
            self.act(&n, acts);
        }
    }

    /// Carries out actions: proposals go through compare-and-swap and commits are broadcast.
    fn act(&mut self, node: &str, acts: Vec<Action>) {
        for a in acts {
            self.actions
                .entry(node.to_owned())
                .or_default()
                .push(a.clone());
            if let Action::Evict { slot } = &a {
                // The agent kills the hung worker and reports it lost to every agent.
                self.broadcast(Event::WorkerExited { slot: slot.clone() });
            }
            if let Action::Propose { from, to, plan } = a {
                if self.generation == from {
                    self.generation = to;
                    self.committed = Some(plan.clone());
                    self.broadcast(Event::Committed {
                        generation: to,
                        plan,
                    });
                }
            }
        }
    }

    /// Advances the clock by `d` in ticks of 10 ms, with step progress from every planned
    /// worker except `silent`.
    fn run(&mut self, d: Duration, silent: Option<&Slot>) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            if let Some(p) = self.committed.clone() {
                for b in &p.blocks {
                    for s in &b.slots {
                        if Some(s) != silent && self.agents.contains_key(&s.node) {
                            self.broadcast(Event::Progress { slot: s.clone() });
                        }
                    }
                }
            }
            self.broadcast(Event::Tick);
        }
    }

    fn kill_node(&mut self, node: &str) {
        self.agents.remove(node);
        self.elect();
        self.broadcast(Event::Expired {
            node: node.to_owned(),
        });
    }

    fn take(&mut self, node: &str) -> Vec<Action> {
        std::mem::take(self.actions.entry(node.to_owned()).or_default())
    }

    fn plan(&self) -> &Plan {
        self.committed.as_ref().expect("a committed plan")
    }
}

fn slot(node: &str, index: usize) -> Slot {
    Slot {
        node: node.into(),
        index,
    }
}

fn starts(actions: &[Action]) -> Vec<(u64, Vec<usize>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start {
                generation,
                from_storage,
                ..
            } => Some((*generation, from_storage.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_lost_node_aborts_at_once_shrinks_and_regrows_by_peer_transfer() {
    // tp 2 x pp 2 on four nodes of two slots: two replicas.
    let mut sim = Sim::new(&["a", "b", "c", "d"], 2, 2, 2);
    sim.run(SETTLE * 2, None);
    assert_eq!((sim.generation, sim.plan().dp), (1, 2));
    for n in ["a", "b", "c", "d"] {
        assert_eq!(starts(&sim.take(n)), vec![(1, vec![])], "node {n}");
    }
    // d dies: everyone in the plan aborts at the moment the expiry is seen, before any plan.
    sim.kill_node("d");
    for n in ["a", "b", "c"] {
        assert_eq!(
            sim.take(n),
            vec![Action::Abort { generation: 1 }],
            "node {n}"
        );
    }
    sim.run(SETTLE + Duration::from_millis(20), None);
    assert_eq!((sim.generation, sim.plan().dp), (2, 1));
    assert!(sim
        .plan()
        .blocks
        .iter()
        .all(|b| b.state == StateSource::Kept));
    assert_eq!(sim.plan().standby.len(), 1, "{:?}", sim.plan());
    assert_eq!(starts(&sim.take("a")), vec![(2, vec![])]);
    // d returns: the standby block keeps its stage, d receives the other from replica 0.
    sim.join("d", 2, 2, 2);
    sim.run(SETTLE * 2, None);
    assert_eq!((sim.generation, sim.plan().dp), (3, 2));
    let new: Vec<_> = sim
        .plan()
        .blocks
        .iter()
        .filter(|b| b.replica == 1)
        .collect();
    assert_eq!(
        new.iter().filter(|b| b.state == StateSource::Kept).count(),
        1
    );
    assert!(new
        .iter()
        .any(|b| b.state == StateSource::Peer(0) && b.slots[0].node == "d"));
}

#[test]
fn a_dead_or_hung_worker_is_replaced_and_its_state_comes_from_a_peer() {
    let mut sim = Sim::new(&["a", "b", "c", "d"], 2, 2, 2);
    sim.run(SETTLE * 2, None);
    for n in ["a", "b", "c", "d"] {
        sim.take(n);
    }
    // A worker on c exits: its block lost its state; the slot is restarted fresh.
    sim.broadcast(Event::WorkerExited { slot: slot("c", 1) });
    assert_eq!(sim.take("a"), vec![Action::Abort { generation: 1 }]);
    sim.run(SETTLE * 2, None);
    assert_eq!((sim.generation, sim.plan().dp), (2, 2));
    let c = sim
        .plan()
        .blocks
        .iter()
        .find(|b| b.slots[0].node == "c")
        .expect("c's block");
    assert!(matches!(c.state, StateSource::Peer(_)), "{c:?}");
    // A worker on b stops making progress: declared hung after HANG, evicted by b's agent.
    sim.take("b");
    sim.run(HANG + SETTLE * 2, Some(&slot("b", 0)));
    let b = sim.take("b");
    assert!(b.contains(&Action::Evict { slot: slot("b", 0) }), "{b:?}");
    assert!(b.contains(&Action::Abort { generation: 2 }), "{b:?}");
    assert!(
        !sim.take("a")
            .iter()
            .any(|a| matches!(a, Action::Evict { .. })),
        "only b's agent evicts"
    );
    assert_eq!(sim.generation, 3);
}

#[test]
fn a_stale_proposal_is_fenced() {
    let mut sim = Sim::new(&["a", "b"], 2, 2, 1);
    sim.run(SETTLE * 2, None);
    let proposals: Vec<Action> = sim
        .take("a")
        .into_iter()
        .filter(|a| matches!(a, Action::Propose { .. }))
        .collect();
    assert_eq!(proposals.len(), 1);
    // Replaying the leader's old proposal after the generation moved on changes nothing.
    sim.kill_node("b");
    sim.run(SETTLE * 2, None);
    let (generation, plan) = (sim.generation, sim.plan().clone());
    sim.act("a", proposals);
    assert_eq!((sim.generation, sim.plan()), (generation, &plan));
}

#[test]
fn a_stage_with_no_live_copy_comes_from_storage() {
    // tp 2 x pp 2, two replicas on a, b (replica 0) and c, d (replica 1).
    let mut sim = Sim::new(&["a", "b", "c", "d"], 2, 2, 2);
    sim.run(SETTLE * 2, None);
    let stage_of = |p: &Plan, node: &str| {
        p.blocks
            .iter()
            .find(|b| b.slots[0].node == node)
            .map(|b| b.stage)
    };
    // Kill both holders of stage 1 at once.
    let holders: Vec<String> = ["a", "b", "c", "d"]
        .into_iter()
        .filter(|n| stage_of(sim.plan(), n) == Some(1))
        .map(String::from)
        .collect();
    assert_eq!(holders.len(), 2);
    for n in &holders {
        sim.kill_node(n);
    }
    let survivor = ["a", "b", "c", "d"]
        .into_iter()
        .find(|n| !holders.iter().any(|h| h == n))
        .expect("a survivor");
    sim.take(survivor);
    sim.run(SETTLE * 2, None);
    assert_eq!(sim.plan().dp, 1);
    assert_eq!(starts(&sim.take(survivor)), vec![(2, vec![1])]);
}

#[test]
fn a_generation_left_on_a_workers_own_error_starts_over_with_the_same_members() {
    let mut sim = Sim::new(&["a", "b", "c"], 2, 2, 1);
    sim.run(SETTLE * 2, None);
    assert_eq!((sim.generation, sim.plan().dp), (1, 3));
    for n in ["a", "b", "c"] {
        sim.take(n);
    }
    // A worker's coordinator connection broke at rendezvous: nobody died.
    sim.broadcast(Event::Retry { generation: 1 });
    for n in ["a", "b", "c"] {
        assert_eq!(
            sim.take(n),
            vec![Action::Abort { generation: 1 }],
            "node {n}"
        );
    }
    sim.run(SETTLE * 2, None);
    assert_eq!((sim.generation, sim.plan().dp), (2, 3));
    assert!(sim
        .plan()
        .blocks
        .iter()
        .all(|b| b.state == StateSource::Kept));
    // A retry of a generation that is over changes nothing.
    sim.broadcast(Event::Retry { generation: 1 });
    sim.run(SETTLE * 2, None);
    assert_eq!(sim.generation, 2);
}

#[test]
fn a_node_that_registers_while_a_plan_is_in_flight_is_planned_for_next() {
    let timing = Timing {
        settle: SETTLE,
        hang: HANG,
    };
    let t0 = Instant::now();
    let mut m = Membership::new("a", 1, 1, 4, timing);
    m.handle(t0, Event::Leader { node: "a".into() });
    m.handle(
        t0,
        Event::Registered {
            node: "a".into(),
            offer: Offer::all(1),
        },
    );
    let acts = m.handle(t0 + SETTLE, Event::Tick);
    let [Action::Propose { plan, .. }] = acts.as_slice() else {
        panic!("{acts:?}")
    };
    assert_eq!(plan.dp, 1);
    // b registers after the proposal and before its commit.
    m.handle(
        t0 + SETTLE,
        Event::Registered {
            node: "b".into(),
            offer: Offer::all(1),
        },
    );
    let plan = plan.clone();
    let mut acts = m.handle(
        t0 + SETTLE,
        Event::Committed {
            generation: 1,
            plan,
        },
    );
    acts.extend(m.handle(t0 + SETTLE * 3, Event::Tick));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Propose { to: 2, plan, .. } if plan.dp == 2)),
        "{acts:?}"
    );
}

/// Regression: once the job reached its last step the first nodes to finish left, the
/// leadership passed to the last one still stopping its workers, and it planned a generation
/// of its own, which trained the job again after it had ended.
#[test]
fn nothing_is_planned_or_started_once_the_job_is_done() {
    let mut sim = Sim::new(&["a", "b", "c"], 2, 2, 1);
    sim.run(SETTLE * 2, None);
    assert_eq!(sim.generation, 1);
    for n in ["a", "b", "c"] {
        sim.take(n);
    }
    sim.broadcast(Event::Done);
    // The leader and the next one leave; the workers, stopping, make no progress.
    sim.kill_node("a");
    sim.kill_node("b");
    sim.run(HANG + SETTLE * 4, Some(&slot("c", 0)));
    assert_eq!(sim.generation, 1, "{:?}", sim.committed);
    let c = sim.take("c");
    assert!(
        !c.iter().any(|a| matches!(
            a,
            Action::Propose { .. } | Action::Start { .. } | Action::Evict { .. }
        )),
        "{c:?}"
    );
    // A generation committed before the news arrived starts nothing either.
    let plan = sim.plan().clone();
    let acts = sim.agents.get_mut("c").expect("c").handle(
        sim.t0 + sim.now,
        Event::Committed {
            generation: 2,
            plan,
        },
    );
    assert!(acts.is_empty(), "{acts:?}");
}

#[test]
fn the_core_says_when_it_next_has_something_to_do() {
    let t0 = Instant::now();
    let timing = Timing {
        settle: SETTLE,
        hang: HANG,
    };
    let offer = Offer::all(2);
    let mut leader = Membership::new("a", 1, 1, 8, timing);
    let mut follower = Membership::new("b", 1, 1, 8, timing);
    for m in [&mut leader, &mut follower] {
        assert_eq!(
            m.next_due(),
            None,
            "nothing is pending before anything happened"
        );
        m.handle(t0, Event::Leader { node: "a".into() });
        m.handle(
            t0,
            Event::Registered {
                node: "a".into(),
                offer: offer.clone(),
            },
        );
    }
    // The leader plans once the change settled; the follower has nothing of its own to do.
    assert_eq!(leader.next_due(), Some(t0 + SETTLE));
    assert_eq!(follower.next_due(), None);
    let actions = leader.handle(t0 + SETTLE, Event::Tick);
    let Some(Action::Propose { to, plan, .. }) = actions.into_iter().next() else {
        panic!("the settled leader proposes");
    };
    // Committed: the leader watches its own workers until their hang deadline, the follower
    // (with no worker in the plan) nothing.
    let at = t0 + SETTLE * 2;
    for m in [&mut leader, &mut follower] {
        m.handle(
            at,
            Event::Committed {
                generation: to,
                plan: plan.clone(),
            },
        );
    }
    assert_eq!(leader.next_due(), Some(at + HANG));
    assert_eq!(follower.next_due(), None);
    let slot = Slot {
        node: "a".into(),
        index: 0,
    };
    leader.handle(at + SETTLE, Event::Progress { slot });
    assert!(
        leader.next_due().unwrap() >= at + HANG,
        "{:?}",
        leader.next_due()
    );
}

/// The core asserts what it starts, as the planner asserts what it makes: a committed plan that
/// breaks an invariant (here one microbatch too many) stops the agent instead of reaching its
/// workers.
#[test]
#[should_panic(expected = "generation 1 was committed with a broken plan")]
fn a_committed_plan_that_breaks_an_invariant_is_never_started() {
    let live: BTreeMap<String, Offer> = [("a".to_string(), Offer::all(2))].into();
    let mut plan = marathon_elastic::plan::plan(&marathon_elastic::plan::PlanRequest {
        tp: 1,
        pp: 1,
        microbatches: 8,
        live: &live,
        previous: None,
    })
    .expect("a plan");
    assert_eq!(plan.microbatches, [4, 4]);
    plan.microbatches[1] = 5;
    let timing = Timing {
        settle: SETTLE,
        hang: HANG,
    };
    let mut m = Membership::new("a", 1, 1, 8, timing);
    m.handle(
        Instant::now(),
        Event::Committed {
            generation: 1,
            plan,
        },
    );
}
