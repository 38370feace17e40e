//! The planner: live slots and a fixed (tp, pp) to a data-parallel degree, a place for every
//! rank, and each replica's share of the global batch. A pure function: no I/O, no clock.
//!
//! A tensor-parallel group always lives on one node (in production its ranks talk over NVLink),
//! so the unit of placement is a *block*: `tp` slots of one node, holding one pipeline stage of
//! one replica. A replica is `pp` blocks, one per stage. Workers that survive a membership
//! change keep their stage and tensor rank, so they continue from the state in their memory;
//! only their replica number may change. Replicas that lost a block are dissolved, and their
//! surviving blocks, with any new ones, form as many whole replicas as they can; a block that
//! takes a stage it did not hold receives that stage's state from a healthy replica (peer
//! transfer). The global batch stays exactly the same: its microbatches are split as evenly as
//! possible, the first replicas taking one more when they do not divide.

use std::collections::{BTreeMap, BTreeSet};

use marathon_model::{ParallelLayout, Place, Shard};
use serde::{Deserialize, Serialize};

/// One slot: a worker process a node can run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub node: String,
    pub index: usize,
}

/// Where one block of the plan is, and where its state comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub replica: usize,
    pub stage: usize,
    /// The `tp` slots, in tensor-rank order, all on one node.
    pub slots: Vec<Slot>,
    pub state: StateSource,
}

/// Where a block's state comes from at the start of the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateSource {
    /// The block held this stage in the previous generation and keeps its memory.
    Kept,
    /// The block of the same stage in this replica of the plan sends it (peer transfer).
    Peer(usize),
    /// No live block holds the stage: it comes from the newest committed checkpoint (or, at
    /// the start of a job without one, from initialisation).
    Storage,
}

/// A generation's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    /// Every block, by replica then stage.
    pub blocks: Vec<Block>,
    /// Microbatches of each replica; they add up to the global batch's.
    pub microbatches: Vec<usize>,
    /// Blocks left out that still hold a stage's state (what survived of a broken replica):
    /// a later plan uses them first for that stage, with no transfer.
    pub standby: Vec<(usize, Vec<Slot>)>,
}

impl Plan {
    /// The block holding stage `stage` of replica `replica`.
    pub fn block(&self, replica: usize, stage: usize) -> &Block {
        &self.blocks[replica * self.pp + stage]
    }

    /// The layout the plan runs.
    pub fn layout(&self) -> ParallelLayout {
        ParallelLayout::new(self.tp, self.pp, self.dp)
    }

    /// Where each slot's rank sits.
    pub fn roles(&self) -> BTreeMap<Slot, Place> {
        let mut out = BTreeMap::new();
        for b in &self.blocks {
            for (t, s) in b.slots.iter().enumerate() {
                let place = Place {
                    tp: self.tp,
                    pp: self.pp,
                    dp: self.dp,
                    tp_rank: t,
                    stage: b.stage,
                    replica: b.replica,
                };
                out.insert(s.clone(), place);
            }
        }
        out
    }

    /// The part of the model each slot holds in memory while this plan runs: its rank's, or
    /// its standby block's.
    pub fn held(&self) -> BTreeMap<Slot, Shard> {
        let mut out: BTreeMap<Slot, Shard> = self
            .roles()
            .into_iter()
            .map(|(s, p)| (s, p.shard()))
            .collect();
        for (stage, slots) in &self.standby {
            for (t, s) in slots.iter().enumerate() {
                let shard = Shard {
                    tp: self.tp,
                    tp_rank: t,
                    pp: self.pp,
                    stage: *stage,
                };
                out.insert(s.clone(), shard);
            }
        }
        out
    }

    /// The invariants every plan keeps, whoever made it, each broken one described (none: an
    /// empty list). The plan is `dp` whole replicas of `pp` blocks, in (replica, stage) order,
    /// each block `tp` slots of one node and no slot used twice; its microbatches cover the
    /// global batch's `microbatches` once, split as evenly as they go; a block takes its state
    /// from a peer only where that peer keeps the stage, and from storage only where no block
    /// keeps it. What a kept block holds is [`Plan::kept_problems`]'s.
    pub fn problems(&self, tp: usize, pp: usize, microbatches: usize) -> Vec<String> {
        let mut out = Vec::new();
        if (self.tp, self.pp) != (tp, pp) {
            out.push(format!(
                "a plan for tp {} x pp {}, not the job's tp {tp} x pp {pp}",
                self.tp, self.pp
            ));
        }
        if self.dp == 0 || self.blocks.len() != self.dp * pp {
            out.push(format!(
                "{} blocks for dp {} x pp {pp}",
                self.blocks.len(),
                self.dp
            ));
        }
        if self.microbatches.len() != self.dp
            || self.microbatches.iter().sum::<usize>() != microbatches
        {
            out.push(format!(
                "microbatches {:?} do not cover the global batch's {microbatches} once, one count \
                 a replica",
                self.microbatches
            ));
        }
        let (lo, hi) = (
            self.microbatches.iter().min(),
            self.microbatches.iter().max(),
        );
        if hi.zip(lo).is_some_and(|(h, l)| h - l > 1) {
            out.push(format!(
                "microbatches {:?} are not split evenly",
                self.microbatches
            ));
        }
        let mut seen = BTreeSet::new();
        let standby = self.standby.iter().map(|(_, s)| s);
        for slots in self.blocks.iter().map(|b| &b.slots).chain(standby) {
            if slots.len() != tp || slots.iter().any(|s| s.node != slots[0].node) {
                out.push(format!("a block is not {tp} slots of one node: {slots:?}"));
            }
            for s in slots {
                if !seen.insert(s) {
                    out.push(format!("slot {}/{} is used twice", s.node, s.index));
                }
            }
        }
        // The (replica, stage) of every kept block and the stages kept, each looked up once.
        let kept: BTreeSet<(usize, usize)> = self
            .blocks
            .iter()
            .filter(|b| b.state == StateSource::Kept)
            .map(|b| (b.replica, b.stage))
            .collect();
        let kept_stages: BTreeSet<usize> = kept.iter().map(|&(_, s)| s).collect();
        for (i, b) in self.blocks.iter().enumerate() {
            if (b.replica, b.stage) != (i / pp.max(1), i % pp.max(1)) {
                out.push(format!(
                    "block {i} is replica {} stage {}, out of (replica, stage) order",
                    b.replica, b.stage
                ));
            }
            match b.state {
                StateSource::Peer(q) => {
                    if !kept.contains(&(q, b.stage)) {
                        out.push(format!(
                            "replica {} stage {} copies from replica {q}, which keeps nothing of it",
                            b.replica, b.stage
                        ));
                    }
                }
                StateSource::Storage if kept_stages.contains(&b.stage) => out.push(format!(
                    "replica {} stage {} loads from storage though a replica keeps the stage",
                    b.replica, b.stage
                )),
                StateSource::Kept | StateSource::Storage => {}
            }
        }
        out
    }

    /// Each kept block holds what it held under `previous`, the plan this one follows (`None`:
    /// the first, which keeps nothing): the same stage and tensor rank, in a block or standing
    /// by. Each one that does not is described.
    pub fn kept_problems(&self, previous: Option<&Plan>) -> Vec<String> {
        let before = previous
            .filter(|p| (p.tp, p.pp) == (self.tp, self.pp))
            .map(Plan::held);
        let mut out = Vec::new();
        for b in self.blocks.iter().filter(|b| b.state == StateSource::Kept) {
            for (t, s) in b.slots.iter().enumerate() {
                let held = before.as_ref().and_then(|h| h.get(s));
                if held.is_none_or(|h| (h.stage, h.tp_rank) != (b.stage, t)) {
                    out.push(format!(
                        "slot {}/{} keeps stage {} tensor rank {t}, but held {}",
                        s.node,
                        s.index,
                        b.stage,
                        held.map_or("nothing".into(), |h| format!(
                            "stage {} tensor rank {}",
                            h.stage, h.tp_rank
                        ))
                    ));
                }
            }
        }
        out
    }
}

/// The slots a node offers: indices `0..slots`, less those cooling down after their worker
/// died. A node's registration in etcd carries it as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub slots: usize,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub cooling: BTreeSet<usize>,
}

impl Offer {
    /// Every one of `slots` slots.
    pub fn all(slots: usize) -> Self {
        Offer {
            slots,
            cooling: BTreeSet::new(),
        }
    }

    /// Whether slot `index` is offered.
    pub fn offers(&self, index: usize) -> bool {
        index < self.slots && !self.cooling.contains(&index)
    }

    /// The offered slots, in index order.
    pub fn offered(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots).filter(|i| !self.cooling.contains(i))
    }

    /// How many slots are offered.
    pub fn count(&self) -> usize {
        self.offered().count()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("offers serialise")
    }

    /// A registration's value; `None` when it does not parse (the node then offers nothing).
    /// A bare count, as agents before offers registered, offers every slot.
    pub fn parse(value: &[u8]) -> Option<Self> {
        match serde_json::from_slice(value).ok()? {
            serde_json::Value::Number(n) => Some(Offer::all(n.as_u64()? as usize)),
            v => serde_json::from_value(v).ok(),
        }
    }
}

/// What the planner is asked.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    pub tp: usize,
    pub pp: usize,
    /// Microbatches in the global batch.
    pub microbatches: usize,
    /// The live slots, by node.
    pub live: &'a BTreeMap<String, Offer>,
    /// The plan of the generation before, if any: survivors keep their stage and tensor rank.
    pub previous: Option<&'a Plan>,
}

/// Why no plan is possible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{blocks} blocks of {tp} slots on one node are live, but one replica needs {pp} (tp {tp} x \
         pp {pp}); add nodes or slots, or choose a smaller layout"
    )]
    TooFewSlots { tp: usize, pp: usize, blocks: usize },
    #[error("the global batch has no microbatches")]
    NoMicrobatches,
}

/// Plans a generation. Deterministic: the same request gives the same plan on every member.
pub fn plan(req: &PlanRequest<'_>) -> Result<Plan, PlanError> {
    let (tp, pp) = (req.tp, req.pp);
    assert!(tp > 0 && pp > 0, "tp and pp are at least 1");
    if req.microbatches == 0 {
        return Err(PlanError::NoMicrobatches);
    }
    // Blocks that survive from the previous plan, with the stage they hold, by old replica.
    let mut kept: BTreeMap<usize, Vec<(usize, Vec<Slot>)>> = BTreeMap::new();
    let mut used: BTreeSet<Slot> = BTreeSet::new();
    let alive = |slots: &[Slot]| {
        slots
            .iter()
            .all(|s| req.live.get(&s.node).is_some_and(|o| o.offers(s.index)))
    };
    let mut spares: Vec<(Option<usize>, Vec<Slot>)> = Vec::new();
    if let Some(prev) = req.previous.filter(|p| p.tp == tp && p.pp == pp) {
        for b in prev.blocks.iter().filter(|b| alive(&b.slots)) {
            kept.entry(b.replica)
                .or_default()
                .push((b.stage, b.slots.clone()));
            used.extend(b.slots.iter().cloned());
        }
        for (stage, slots) in prev.standby.iter().filter(|(_, s)| alive(s)) {
            spares.push((Some(*stage), slots.clone()));
            used.extend(slots.iter().cloned());
        }
    }
    // Whole replicas survive as they are; the blocks of broken ones are spares that remember
    // the stage they hold.
    let mut whole: Vec<Vec<(usize, Vec<Slot>)>> = Vec::new();
    for (_, mut blocks) in kept {
        if blocks.len() == pp {
            blocks.sort_by_key(|(stage, _)| *stage);
            whole.push(blocks);
        } else {
            spares.extend(
                blocks
                    .into_iter()
                    .map(|(stage, slots)| (Some(stage), slots)),
            );
        }
    }
    // New blocks from the free slots of each node, in node and slot order.
    for (node, offer) in req.live {
        let free: Vec<Slot> = offer
            .offered()
            .map(|index| Slot {
                node: node.clone(),
                index,
            })
            .filter(|s| !used.contains(s))
            .collect();
        for chunk in free.chunks_exact(tp) {
            spares.push((None, chunk.to_vec()));
        }
    }
    let blocks_live = whole.len() * pp + spares.len();
    // Never more replicas than microbatches: a replica with none would only wait.
    let new_replicas = (spares.len() / pp).min(req.microbatches.saturating_sub(whole.len()));
    if whole.len() + new_replicas == 0 {
        return Err(PlanError::TooFewSlots {
            tp,
            pp,
            blocks: blocks_live,
        });
    }
    let whole_count = whole.len().min(req.microbatches);
    // Whole replicas beyond the microbatches' count stand by, holding their state.
    let mut pool = spares;
    for replica in whole.drain(whole_count..) {
        pool.extend(
            replica
                .into_iter()
                .map(|(stage, slots)| (Some(stage), slots)),
        );
    }
    // Fill the new replicas' stages: first with spares that already hold the stage, then
    // with any spare, which will receive the stage's state.
    let mut wanted: Vec<(usize, usize)> = (0..new_replicas)
        .flat_map(|r| (0..pp).map(move |s| (r, s)))
        .collect();
    // Per new replica and stage: the block's slots, and whether it must receive the state.
    type Filled = Option<(Vec<Slot>, bool)>;
    let mut fresh: Vec<Vec<Filled>> = vec![vec![None; pp]; new_replicas];
    wanted.retain(
        |&(r, s)| match pool.iter().position(|(held, _)| *held == Some(s)) {
            Some(i) => {
                let (_, slots) = pool.remove(i);
                fresh[r][s] = Some((slots, false));
                false
            }
            None => true,
        },
    );
    for (r, s) in wanted {
        // Spares that hold no stage first, so blocks with state stay usable for later plans.
        let i = pool
            .iter()
            .position(|(held, _)| held.is_none())
            .unwrap_or(0);
        let (_, slots) = pool.remove(i);
        fresh[r][s] = Some((slots, true));
    }
    let dp = whole.len() + new_replicas;
    let mut blocks = Vec::with_capacity(dp * pp);
    for (r, replica) in whole.into_iter().enumerate() {
        for (stage, slots) in replica {
            blocks.push(Block {
                replica: r,
                stage,
                slots,
                state: StateSource::Kept,
            });
        }
    }
    let mut needs = Vec::new();
    for (k, replica) in fresh.into_iter().enumerate() {
        for (stage, filled) in replica.into_iter().enumerate() {
            let (slots, transfer) = filled.expect("every stage of a new replica is filled");
            if transfer {
                needs.push(blocks.len());
            }
            blocks.push(Block {
                replica: whole_count + k,
                stage,
                slots,
                // Until a source is found below.
                state: if transfer {
                    StateSource::Storage
                } else {
                    StateSource::Kept
                },
            });
        }
    }
    // A block that takes a stage it does not hold receives it from the first replica that
    // keeps that stage; with none left, from storage.
    for i in needs {
        let stage = blocks[i].stage;
        let source = blocks
            .iter()
            .find(|b| b.stage == stage && b.state == StateSource::Kept)
            .map(|b| b.replica);
        blocks[i].state = source.map_or(StateSource::Storage, StateSource::Peer);
    }
    let microbatches = (0..dp)
        .map(|r| req.microbatches / dp + usize::from(r < req.microbatches % dp))
        .collect();
    let standby = pool
        .into_iter()
        .filter_map(|(held, slots)| held.map(|stage| (stage, slots)))
        .collect();
    let p = Plan {
        tp,
        pp,
        dp,
        blocks,
        microbatches,
        standby,
    };
    // Paired with the checks of every plan that agents start ([`crate::membership`]): a plan
    // that breaks an invariant is never proposed.
    let mut broken = p.problems(tp, pp, req.microbatches);
    broken.extend(p.kept_problems(req.previous));
    broken.extend(
        p.held()
            .keys()
            .filter(|s| !req.live.get(&s.node).is_some_and(|o| o.offers(s.index)))
            .map(|s| format!("slot {}/{} is not offered", s.node, s.index)),
    );
    assert!(
        broken.is_empty(),
        "the planner broke its invariants: {broken:?}\n{req:?}\n{p:?}"
    );
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64) for the property tests.
    struct Gen(u64);

    impl Gen {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    /// Checks what this planner promises beyond the invariants `plan` asserts of every plan
    /// ([`Plan::problems`]): as many replicas as the live blocks allow, and survivors keep
    /// their stage and tensor rank.
    fn check(req: &PlanRequest<'_>, p: &Plan, seed: u64) {
        let ctx = format!("seed {seed}: {req:?}\n{p:?}");
        let mut broken = p.problems(req.tp, req.pp, req.microbatches);
        broken.extend(p.kept_problems(req.previous));
        assert_eq!(broken, Vec::<String>::new(), "{ctx}");
        let blocks_live: usize = req.live.values().map(|o| o.count() / req.tp).sum();
        assert_eq!(p.dp, (blocks_live / req.pp).min(req.microbatches), "{ctx}");
        // Survivors keep their stage and tensor rank whenever their block is in the plan.
        if let Some(prev) = req.previous {
            let old = prev.held();
            let new = p.roles();
            for (slot, place) in &new {
                let (stage, rank) = (place.stage, place.tp_rank);
                if let Some(&Shard {
                    stage: s0,
                    tp_rank: r0,
                    ..
                }) = old.get(slot)
                {
                    let kept = p
                        .blocks
                        .iter()
                        .any(|b| b.slots.contains(slot) && b.state == StateSource::Kept);
                    if kept {
                        assert_eq!((stage, rank), (s0, r0), "{ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_clusters_and_failures_give_valid_sticky_plans() {
        for seed in 0..3000u64 {
            let mut g = Gen(seed);
            let tp = [1, 2, 4][g.below(3) as usize];
            let pp = 1 + g.below(4) as usize;
            let microbatches = 1 + g.below(40) as usize;
            let mut live: BTreeMap<String, Offer> = (0..1 + g.below(12))
                .map(|n| (format!("node-{n:02}"), Offer::all(g.below(10) as usize)))
                .collect();
            let mut previous: Option<Plan> = None;
            for _generation in 0..4 {
                let req = PlanRequest {
                    tp,
                    pp,
                    microbatches,
                    live: &live,
                    previous: previous.as_ref(),
                };
                match plan(&req) {
                    Ok(p) => {
                        check(&req, &p, seed);
                        previous = Some(p);
                    }
                    Err(PlanError::TooFewSlots { blocks, .. }) => {
                        assert!(blocks < pp, "seed {seed}: refused with {blocks} blocks");
                    }
                    Err(e) => panic!("seed {seed}: {e}"),
                }
                // A node dies, loses slots, cools one slot down or offers its slots again, or
                // a node joins.
                match g.below(5) {
                    0 if !live.is_empty() => {
                        let k = live
                            .keys()
                            .nth(g.below(live.len() as u64) as usize)
                            .cloned();
                        live.remove(&k.expect("a node"));
                    }
                    1 if !live.is_empty() => {
                        let k = live
                            .keys()
                            .nth(g.below(live.len() as u64) as usize)
                            .cloned();
                        let o = live.get_mut(&k.expect("a node")).expect("the node");
                        o.slots = o.slots.saturating_sub(1 + g.below(3) as usize);
                    }
                    2 if !live.is_empty() => {
                        let k = live
                            .keys()
                            .nth(g.below(live.len() as u64) as usize)
                            .cloned();
                        let o = live.get_mut(&k.expect("a node")).expect("the node");
                        let slot = g.below(o.slots.max(1) as u64) as usize;
                        o.cooling.insert(slot);
                    }
                    3 => live.values_mut().for_each(|o| o.cooling.clear()),
                    _ => {
                        live.insert(
                            format!("node-new-{}", g.below(1000)),
                            Offer::all(g.below(10) as usize),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_lost_node_shrinks_data_parallelism_and_its_return_regrows_it_by_peer_transfer() {
        // MT-NLG's shape in miniature: 8 slots a node, tp 8, pp 2, 4 replicas on 8 nodes.
        let mut live: BTreeMap<String, Offer> =
            (0..8).map(|n| (format!("n{n}"), Offer::all(8))).collect();
        let req = |live: &BTreeMap<String, Offer>, prev: Option<&Plan>| {
            plan(&PlanRequest {
                tp: 8,
                pp: 2,
                microbatches: 30,
                live,
                previous: prev,
            })
            .expect("a plan")
        };
        let first = req(&live, None);
        assert_eq!(first.dp, 4);
        assert!(first.blocks.iter().all(|b| b.state == StateSource::Storage));
        let first = Plan {
            blocks: first
                .blocks
                .into_iter()
                .map(|b| Block {
                    state: StateSource::Kept,
                    ..b
                })
                .collect(),
            ..first
        };
        live.remove("n3");
        let second = req(&live, Some(&first));
        assert_eq!(second.dp, 3);
        assert_eq!(second.microbatches, vec![10, 10, 10]);
        // Every block kept its stage: nothing moves, nothing is transferred; the broken
        // replica's surviving block waits as a spare.
        assert!(second.blocks.iter().all(|b| b.state == StateSource::Kept));
        live.insert("n3".into(), Offer::all(8));
        let third = req(&live, Some(&second));
        assert_eq!(third.dp, 4);
        assert_eq!(third.microbatches, vec![8, 8, 7, 7]);
        // The spare kept its stage; the returning node takes the other and receives it.
        let new = &third.blocks[6..];
        assert_eq!(
            new.iter().filter(|b| b.state == StateSource::Kept).count(),
            1
        );
        assert_eq!(
            new.iter()
                .filter(|b| matches!(b.state, StateSource::Peer(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_cooling_slot_costs_its_block_and_the_node_keeps_the_others() {
        // Two nodes of 4 slots, tp 2 x pp 1: four replicas. Slot 1 of node a cools down.
        let mut live: BTreeMap<String, Offer> =
            ["a", "b"].map(|n| (n.to_string(), Offer::all(4))).into();
        let req = |live: &BTreeMap<String, Offer>, prev: Option<&Plan>| {
            plan(&PlanRequest {
                tp: 2,
                pp: 1,
                microbatches: 8,
                live,
                previous: prev,
            })
            .expect("a plan")
        };
        let first = req(&live, None);
        assert_eq!(first.dp, 4);
        live.get_mut("a").expect("a").cooling.insert(1);
        let second = req(&live, Some(&first));
        assert_eq!(second.dp, 3);
        // Node a's other block (slots 2 and 3) stays where it was, with its state.
        let a: Vec<&Block> = second
            .blocks
            .iter()
            .filter(|b| b.slots[0].node == "a")
            .collect();
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0].slots.iter().map(|s| s.index).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(a[0].state, StateSource::Kept);
        live.get_mut("a").expect("a").cooling.clear();
        assert_eq!(req(&live, Some(&second)).dp, 4);
    }

    #[test]
    fn every_broken_invariant_of_a_plan_is_named() {
        // Two nodes of 4 slots, tp 2 x pp 2: two replicas, each bent out of shape in turn.
        let live: BTreeMap<String, Offer> =
            ["a", "b"].map(|n| (n.to_string(), Offer::all(4))).into();
        let first = plan(&PlanRequest {
            tp: 2,
            pp: 2,
            microbatches: 5,
            live: &live,
            previous: None,
        })
        .expect("a plan");
        assert!(first.problems(2, 2, 5).is_empty() && first.kept_problems(None).is_empty());
        let broken = |f: &dyn Fn(&mut Plan), previous: Option<&Plan>, expect: &str| {
            let mut p = first.clone();
            f(&mut p);
            let mut found = p.problems(2, 2, 5);
            found.extend(p.kept_problems(previous));
            assert!(
                found.iter().any(|m| m.contains(expect)),
                "{expect:?} not among {found:?}"
            );
        };
        broken(
            &|p| p.blocks[1].slots[0] = p.blocks[0].slots[0].clone(),
            None,
            "used twice",
        );
        broken(
            &|p| p.blocks[1].slots[1].node = "b".into(),
            None,
            "not 2 slots of one node",
        );
        broken(&|p| p.microbatches = vec![3, 3], None, "do not cover");
        broken(&|p| p.microbatches = vec![1, 4], None, "not split evenly");
        broken(
            &|p| p.blocks.swap(0, 1),
            None,
            "out of (replica, stage) order",
        );
        broken(&|p| p.blocks.truncate(3), None, "3 blocks for dp 2 x pp 2");
        broken(&|p| p.tp = 4, None, "not the job's tp 2 x pp 2");
        broken(
            &|p| p.blocks[2].state = StateSource::Peer(0),
            None,
            "keeps nothing",
        );
        broken(
            &|p| p.blocks[0].state = StateSource::Kept,
            None,
            "but held nothing",
        );
        let mut moved = first.clone();
        moved.blocks[0].stage = 1;
        moved.blocks[1].stage = 0;
        broken(
            &|p| p.blocks[0].state = StateSource::Kept,
            Some(&moved),
            "but held stage 1",
        );
        broken(
            &|p| {
                p.blocks[0].state = StateSource::Kept;
                p.blocks[2].state = StateSource::Storage;
            },
            Some(&first),
            "loads from storage though a replica keeps the stage",
        );
    }

    #[test]
    fn offers_travel_as_json() {
        let mut o = Offer::all(4);
        assert_eq!(Offer::parse(&o.to_json()), Some(o.clone()));
        o.cooling.insert(2);
        assert_eq!(o.offered().collect::<Vec<_>>(), [0, 1, 3]);
        assert_eq!(Offer::parse(&o.to_json()), Some(o));
        assert_eq!(Offer::parse(b"4"), Some(Offer::all(4)));
        assert_eq!(Offer::parse(b"four"), None);
    }

    #[test]
    fn too_few_slots_for_one_replica_is_refused_with_the_reason() {
        let live: BTreeMap<String, Offer> = [("a".to_string(), Offer::all(7))].into();
        let err = plan(&PlanRequest {
            tp: 8,
            pp: 1,
            microbatches: 4,
            live: &live,
            previous: None,
        })
        .expect_err("no block of 8 fits in 7 slots");
        assert_eq!(
            err.to_string().split(';').next(),
            Some("0 blocks of 8 slots on one node are live, but one replica needs 1 (tp 8 x pp 1)")
        );
    }
}
