//! The membership core: who is live, which generation runs, and what to do when that changes.
//! No I/O and no clock: events and the current time go in, actions come out, so the protocol
//! can be tested exhaustively and simulated deterministically. Each agent runs one; the agent
//! turns its actions into etcd transactions, process-group aborts and worker commands.
//!
//! The protocol. Every agent sees the same registrations (by watch) and the same committed
//! generations. When a node's lease expires, a worker exits or the step watchdog declares a
//! worker hung, every agent whose workers are in the running plan aborts their collectives at
//! once, so nobody waits for a timeout. After a short settling window, which gathers failures
//! that happen together, the leader plans the next generation from the live slots and the
//! running plan and proposes it as a compare-and-swap on the generation counter: a proposal from
//! an old generation fails, which fences it. When a generation commits, every agent starts it:
//! surviving workers keep their stage and state, moved blocks receive theirs from a peer, and
//! only a stage with no live copy comes from storage.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::plan::{plan, Offer, Plan, PlanError, PlanRequest, Slot, StateSource};

/// What an agent observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node registered (or re-registered) offering these slots.
    Registered { node: String, offer: Offer },
    /// A node's registration is gone: its lease expired or it left.
    Expired { node: String },
    /// A worker process exited; its slot is free again but its state is gone.
    WorkerExited { slot: Slot },
    /// A worker finished a step.
    Progress { slot: Slot },
    /// The leader election's result.
    Leader { node: String },
    /// A generation and its plan were committed.
    Committed { generation: u64, plan: Plan },
    /// A worker of `generation` left it for a reason of its own (its coordinator connection
    /// broke at rendezvous, say) while every member is still alive: the same members start a
    /// new generation and continue from memory.
    Retry { generation: u64 },
    /// The job reached its last step: nothing is planned or started from now on, whoever
    /// leads and whoever leaves.
    Done,
    /// Time passed.
    Tick,
}

/// What the agent must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Abort the running generation's process groups now: a member is gone.
    Abort { generation: u64 },
    /// Kill a worker the watchdog declared hung.
    Evict { slot: Slot },
    /// Leader only: commit `plan` as generation `to` if the counter still reads `from`.
    Propose { from: u64, to: u64, plan: Plan },
    /// Start generation `generation`: build its groups and run the plan. `from_storage` lists
    /// the stages with no live copy, which load from the newest committed checkpoint.
    Start {
        generation: u64,
        plan: Plan,
        from_storage: Vec<usize>,
    },
    /// Leader only: no plan is possible with the live slots; the job waits for more.
    CannotPlan { reason: String },
}

/// Timing of the protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long after a change the leader waits before planning, to gather changes that come
    /// together.
    pub settle: Duration,
    /// A worker in the plan silent for this long (no step, no heartbeat) is declared hung.
    pub hang: Duration,
}

/// One agent's view of the job.
#[derive(Debug)]
pub struct Membership {
    me: String,
    tp: usize,
    pp: usize,
    microbatches: usize,
    timing: Timing,
    live: BTreeMap<String, Offer>,
    leader: Option<String>,
    generation: u64,
    plan: Option<Plan>,
    /// Slots of the running plan whose worker died or hung since it started.
    lost: BTreeSet<Slot>,
    /// When the first change not yet planned for happened.
    changed_at: Option<Instant>,
    /// The generation this agent last proposed, so it proposes once per change.
    proposed: Option<u64>,
    last_progress: BTreeMap<Slot, Instant>,
    aborted: bool,
    /// Live slots to wait for before planning the first generation.
    wait_slots: usize,
    /// A change came after this agent's last proposal, which therefore does not cover it.
    changed_since_proposal: bool,
    /// The job reached its last step.
    done: bool,
}

impl Membership {
    pub fn new(me: &str, tp: usize, pp: usize, microbatches: usize, timing: Timing) -> Self {
        Membership {
            me: me.to_owned(),
            tp,
            pp,
            microbatches,
            timing,
            live: BTreeMap::new(),
            leader: None,
            generation: 0,
            plan: None,
            lost: BTreeSet::new(),
            changed_at: None,
            proposed: None,
            last_progress: BTreeMap::new(),
            aborted: false,
            wait_slots: 0,
            changed_since_proposal: false,
            done: false,
        }
    }

    /// Plans the first generation only once `slots` slots are live, so a job started on many
    /// nodes at once starts at its full size rather than growing into it.
    pub fn wait_for_slots(mut self, slots: usize) -> Self {
        self.wait_slots = slots;
        self
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this agent leads the job, as far as it knows.
    pub fn leads(&self) -> bool {
        self.leader.as_deref() == Some(self.me.as_str())
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Feeds one event observed at `now`; returns what to do, in order.
    ///
    /// # Panics
    /// If the protocol breaks an invariant (see [`Membership::check`]), or on a committed plan
    /// that does not fit this core's layout and batch, which its caller refuses first
    /// ([`Plan::problems`]).
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let before = self.generation;
        let mut out = Vec::new();
        match event {
            Event::Registered { node, offer } => {
                // A plan using a slot no longer offered is stale, and so is one the offers now
                // allow to grow; a change that alters neither (a slot offered again that forms
                // no block) re-plans nothing.
                if self.live.insert(node, offer.clone()) != Some(offer)
                    && (self.plan.is_none() || self.stale())
                {
                    self.changed(now);
                }
            }
            Event::Expired { node } => {
                if self.live.remove(&node).is_some() {
                    let gone: Vec<Slot> = self.planned_slots().filter(|s| s.node == node).collect();
                    self.lose(gone, &mut out);
                    self.changed(now);
                }
            }
            Event::WorkerExited { slot } => {
                if self.planned_slots().any(|s| s == slot) {
                    self.lose(vec![slot], &mut out);
                    self.changed(now);
                }
            }
            Event::Progress { slot } => {
                // Only the running plan's workers are watched: a late beat from a worker that
                // was stopped, or from a standby one, starts no watch.
                if let Some(t) = self.last_progress.get_mut(&slot) {
                    *t = now;
                }
            }
            Event::Leader { node } => {
                let now_me = node == self.me && self.leader.as_deref() != Some(&self.me);
                self.leader = Some(node);
                // A new leader plans for what its predecessor left undone.
                if now_me && self.stale() {
                    self.changed(now);
                }
            }
            Event::Committed { generation, plan } => {
                if generation > self.generation && self.done {
                    self.generation = generation;
                    self.plan = Some(plan);
                } else if generation > self.generation {
                    // Paired with the planner's own check: the plan this agent starts keeps
                    // every invariant, and its kept blocks hold what they held in the plan it
                    // follows (known when this agent ran the generation before).
                    let mut broken = plan.problems(self.tp, self.pp, self.microbatches);
                    if generation == self.generation + 1 {
                        broken.extend(plan.kept_problems(self.plan.as_ref()));
                    }
                    assert!(
                        broken.is_empty(),
                        "{}: generation {generation} was committed with a broken plan: {broken:?}",
                        self.me
                    );
                    let first = self.generation == 0;
                    self.generation = generation;
                    self.lost.clear();
                    self.aborted = false;
                    self.proposed = None;
                    // Changes after the plan was made are planned for again, whoever made it.
                    let stale = self.changed_since_proposal || self.stale_plan(&plan);
                    self.changed_since_proposal = false;
                    self.changed_at = if stale {
                        self.changed_at.or(Some(now))
                    } else {
                        None
                    };
                    let from_storage = if first {
                        Vec::new()
                    } else {
                        let mut s: Vec<usize> = plan
                            .blocks
                            .iter()
                            .filter(|b| b.state == StateSource::Storage)
                            .map(|b| b.stage)
                            .collect();
                        s.dedup();
                        s
                    };
                    // Only an agent sees its own workers' progress, so only they are watched.
                    self.last_progress = plan
                        .blocks
                        .iter()
                        .flat_map(|b| b.slots.iter())
                        .filter(|s| s.node == self.me)
                        .map(|s| (s.clone(), now))
                        .collect();
                    self.plan = Some(plan.clone());
                    out.push(Action::Start {
                        generation,
                        plan,
                        from_storage,
                    });
                }
            }
            Event::Retry { generation } => {
                if generation == self.generation && generation > 0 {
                    if !self.aborted {
                        self.aborted = true;
                        out.push(Action::Abort { generation });
                    }
                    self.changed(now);
                }
            }
            Event::Done => {
                // The workers finish their last checkpoint and stop: they make no more
                // progress, and none of them is hung for it.
                self.done = true;
                self.changed_at = None;
                self.last_progress.clear();
            }
            Event::Tick => {}
        }
        self.watchdog(now, &mut out);
        self.maybe_propose(now, &mut out);
        self.check(before, &out);
        out
    }

    /// The protocol's invariants over one event, asserted in every run and every test as in
    /// the simulation: generations only increase; an abort is of the running generation; only
    /// the leader proposes, and only the generation after the one it runs; a start is of the
    /// generation just committed. (The plans themselves are checked where they are made,
    /// [`plan`], and where they are started, [`Event::Committed`].)
    fn check(&self, before: u64, out: &[Action]) {
        assert!(
            self.generation >= before,
            "{}: generation {before} went back to {}",
            self.me,
            self.generation
        );
        for a in out {
            match a {
                Action::Abort { generation } => assert_eq!(
                    *generation, self.generation,
                    "{}: aborted a generation it does not run",
                    self.me
                ),
                Action::Propose { from, to, .. } => assert!(
                    self.leads() && *from == self.generation && *to == from + 1,
                    "{}: proposed generation {to} from {from}, running {} and leading: {}",
                    self.me,
                    self.generation,
                    self.leads()
                ),
                Action::Start { generation, .. } => assert!(
                    *generation == self.generation && *generation > before,
                    "{}: started generation {generation} after {before}",
                    self.me
                ),
                Action::Evict { .. } | Action::CannotPlan { .. } => {}
            }
        }
    }

    /// Whether the running plan must be replaced: it lost a worker, uses a slot no longer
    /// live, or the live slots allow more replicas.
    fn stale(&self) -> bool {
        !self.lost.is_empty() || self.plan.as_ref().is_some_and(|p| self.stale_plan(p))
    }

    fn stale_plan(&self, plan: &Plan) -> bool {
        if plan_misses(plan, &self.live) {
            return true;
        }
        // No more replicas than whole blocks allow: then the planner need not be asked.
        let blocks: usize = self.live.values().map(|o| o.count() / self.tp).sum();
        if (blocks / self.pp).min(self.microbatches) <= plan.dp {
            return false;
        }
        let req = PlanRequest {
            tp: self.tp,
            pp: self.pp,
            microbatches: self.microbatches,
            live: &self.live,
            previous: Some(plan),
        };
        crate::plan::plan(&req).is_ok_and(|best| best.dp > plan.dp)
    }

    fn planned_slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.plan
            .iter()
            .flat_map(|p| p.blocks.iter().flat_map(|b| b.slots.iter().cloned()))
    }

    fn changed(&mut self, now: Instant) {
        self.changed_at.get_or_insert(now);
        if self.proposed.is_some() {
            self.changed_since_proposal = true;
        }
    }

    /// When this core next has something to do without an event (a settled change for the
    /// leader to plan, its own worker's hang deadline): an [`Event::Tick`] then does it. A time
    /// already past means it waits on something else too (slots at the start, a proposal's
    /// commit), so the caller keeps ticking.
    pub fn next_due(&self) -> Option<Instant> {
        let settle = self
            .changed_at
            .filter(|_| self.leads() && !self.done)
            .map(|t| t + self.timing.settle);
        let hang = self
            .last_progress
            .iter()
            .filter(|(s, _)| !self.lost.contains(*s))
            .map(|(_, &t)| t + self.timing.hang)
            .min();
        settle.into_iter().chain(hang).min()
    }

    /// The nodes this agent counts as live, with their slots.
    pub fn live(&self) -> &BTreeMap<String, Offer> {
        &self.live
    }

    /// Marks `slots` lost; the first loss in a generation aborts its groups.
    fn lose(&mut self, slots: Vec<Slot>, out: &mut Vec<Action>) {
        if slots.is_empty() {
            return;
        }
        self.lost.extend(slots);
        if !self.aborted && self.generation > 0 {
            self.aborted = true;
            out.push(Action::Abort {
                generation: self.generation,
            });
        }
    }

    /// Declares hung this node's planned workers with no progress for `timing.hang`. Only an
    /// agent sees its own workers' progress; it evicts the hung one and reports it lost, which
    /// reaches every other agent as [`Event::WorkerExited`].
    fn watchdog(&mut self, now: Instant, out: &mut Vec<Action>) {
        let hung: Vec<Slot> = self
            .last_progress
            .iter()
            .filter(|(s, &t)| now.duration_since(t) >= self.timing.hang && !self.lost.contains(*s))
            .map(|(s, _)| s.clone())
            .collect();
        for slot in hung {
            out.push(Action::Evict { slot: slot.clone() });
            self.last_progress.remove(&slot);
            self.lose(vec![slot], out);
            self.changed(now);
        }
    }

    fn maybe_propose(&mut self, now: Instant, out: &mut Vec<Action>) {
        let settled = self
            .changed_at
            .is_some_and(|t| now.duration_since(t) >= self.timing.settle);
        if !settled || self.done || self.leader.as_deref() != Some(self.me.as_str()) {
            return;
        }
        if self.generation == 0
            && self.live.values().map(Offer::count).sum::<usize>() < self.wait_slots
        {
            return;
        }
        let to = self.generation + 1;
        if self.proposed == Some(to) {
            return;
        }
        // Blocks that lost a member lost their state: they are planned as if new.
        let previous = self.plan.as_ref().map(|p| without_lost(p, &self.lost));
        let req = PlanRequest {
            tp: self.tp,
            pp: self.pp,
            microbatches: self.microbatches,
            live: &self.live,
            previous: previous.as_ref(),
        };
        match plan(&req) {
            Ok(plan) => {
                self.proposed = Some(to);
                self.changed_since_proposal = false;
                out.push(Action::Propose {
                    from: self.generation,
                    to,
                    plan,
                });
            }
            Err(e @ (PlanError::TooFewSlots { .. } | PlanError::NoMicrobatches)) => {
                // Asked again at the next change.
                self.changed_at = None;
                out.push(Action::CannotPlan {
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// `plan` with the blocks that lost a member left out, and their standby too.
fn without_lost(plan: &Plan, lost: &BTreeSet<Slot>) -> Plan {
    let keep = |slots: &[Slot]| !slots.iter().any(|s| lost.contains(s));
    Plan {
        blocks: plan
            .blocks
            .iter()
            .filter(|b| keep(&b.slots))
            .cloned()
            .collect(),
        standby: plan
            .standby
            .iter()
            .filter(|(_, s)| keep(s))
            .cloned()
            .collect(),
        ..plan.clone()
    }
}

/// Whether `plan` uses a slot that is no longer live.
fn plan_misses(plan: &Plan, live: &BTreeMap<String, Offer>) -> bool {
    plan.blocks
        .iter()
        .flat_map(|b| &b.slots)
        .any(|s| !live.get(&s.node).is_some_and(|o| o.offers(s.index)))
}
