//! Where a running elastic job stands, read from its keys in the coordinator
//! (`marathon job status`): the generation and its plan, the nodes holding their leases, the
//! last committed step and checkpoint, the recoveries so far and the goodput accounting.

use std::collections::{BTreeMap, BTreeSet};

use marathon_elastic::plan::{Offer, Plan, StateSource};
use marathon_elastic::{job, Coordinator, JobKey, JobKeys};
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::records::{goodput, unix_ms, Goodput, LossCause, LostRecord, Records};

/// One member of the running plan.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub node: String,
    pub slots: Vec<usize>,
    pub replica: usize,
    pub stage: usize,
    /// Where its state came from when the generation started: kept, a peer, or storage.
    pub state: String,
}

/// A worker the job lost, and in which generation.
#[derive(Debug, Clone, Serialize)]
pub struct Loss {
    pub generation: u64,
    pub node: String,
    pub slot: usize,
    pub reason: String,
    pub detected_at_ms: u64,
}

/// What `marathon job status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    /// 0 before the first plan.
    pub generation: u64,
    pub leader: Option<String>,
    /// Nodes holding their leases, with the slots each offers (those cooling down left out).
    pub nodes: BTreeMap<String, Vec<usize>>,
    /// The running plan's layout and members; `None` before the first.
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    pub dp: Option<usize>,
    pub members: Vec<Member>,
    /// Standby blocks: (stage they remember, node, slots).
    pub standby: Vec<(usize, String, Vec<usize>)>,
    /// The newest step any generation committed, its loss and the data's position.
    pub step: Option<u64>,
    pub loss: Option<f32>,
    pub consumed_samples: Option<u64>,
    /// The newest step with a committed checkpoint record, and when it was recorded (Unix
    /// milliseconds).
    pub checkpoint: Option<u64>,
    pub checkpoint_at_ms: Option<u64>,
    /// Generations begun after a failure, in all and by cause (see [`recovery_causes`]), and
    /// the workers lost along the way.
    pub recoveries: u64,
    pub recoveries_by_cause: BTreeMap<String, u64>,
    /// Generations begun to grow the job, nothing having failed.
    pub resizes: u64,
    pub losses: Vec<Loss>,
    pub goodput: Goodput,
    pub elapsed_s: f64,
    /// The job reached its last step.
    pub done: bool,
}

impl JobStatus {
    /// Reads job `name`'s keys from `coord`; a job with no keys at all is an error.
    pub fn read(coord: &dyn Coordinator, name: &str) -> Result<JobStatus> {
        let keys = JobKeys::new(name);
        let listed = job_keys(coord, &keys, name)?;
        let generation = job::generation(coord, &keys)?;
        let mut s = JobStatus {
            job: name.to_owned(),
            generation,
            leader: None,
            nodes: BTreeMap::new(),
            tp: None,
            pp: None,
            dp: None,
            members: Vec::new(),
            standby: Vec::new(),
            step: None,
            loss: None,
            consumed_samples: None,
            checkpoint: None,
            checkpoint_at_ms: None,
            recoveries: 0,
            recoveries_by_cause: BTreeMap::new(),
            resizes: 0,
            losses: Vec::new(),
            goodput: Goodput::default(),
            elapsed_s: 0.0,
            done: false,
        };
        let mut records = Records::default();
        let mut plans: BTreeMap<u64, Plan> = BTreeMap::new();
        let mut retried: Vec<(u64, LostRecord)> = Vec::new();
        let mut checkpoints: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (key, value) in listed {
            let key = keys.parse(&key);
            records.add(&key, &value);
            match key {
                JobKey::Node(node) => {
                    let offer = Offer::parse(&value).unwrap_or_default();
                    s.nodes.insert(node, offer.offered().collect());
                }
                JobKey::Leader => s.leader = Some(String::from_utf8_lossy(&value).into_owned()),
                JobKey::Plan(g) => {
                    plans.extend(serde_json::from_slice(&value).ok().map(|p| (g, p)));
                }
                JobKey::Retry { generation, .. } => {
                    retried.extend(serde_json::from_slice(&value).ok().map(|l| (generation, l)));
                }
                JobKey::Lost { generation, slot } => {
                    if let Ok(l) = serde_json::from_slice::<LostRecord>(&value) {
                        s.losses.push(Loss {
                            generation,
                            node: slot.node.clone(),
                            slot: slot.index,
                            reason: l.reason.clone(),
                            detected_at_ms: l.detected_at_ms,
                        });
                    }
                }
                JobKey::Checkpoint(step) => {
                    checkpoints.insert(step, value);
                }
                JobKey::Done => s.done = true,
                _ => {}
            }
        }
        if let Some((&step, record)) = checkpoints.last_key_value() {
            s.checkpoint = Some(step);
            s.checkpoint_at_ms = serde_json::from_slice::<serde_json::Value>(record)
                .ok()
                .and_then(|v| v["at_ms"].as_u64());
        }
        let causes = recovery_causes(generation, &records.lost, &retried, &plans);
        for cause in causes.into_iter().flatten() {
            *s.recoveries_by_cause
                .entry(cause.name().to_owned())
                .or_default() += 1;
            s.recoveries += 1;
        }
        s.resizes = generation.saturating_sub(1) - s.recoveries;
        if let Some(p) = plans.remove(&generation) {
            (s.tp, s.pp, s.dp) = (Some(p.tp), Some(p.pp), Some(p.dp));
            for b in &p.blocks {
                s.members.push(Member {
                    node: b.slots.first().map(|x| x.node.clone()).unwrap_or_default(),
                    slots: b.slots.iter().map(|x| x.index).collect(),
                    replica: b.replica,
                    stage: b.stage,
                    state: match b.state {
                        StateSource::Kept => "kept".into(),
                        StateSource::Peer(r) => format!("from replica {r}"),
                        StateSource::Storage => "from storage".into(),
                    },
                });
            }
            for (stage, slots) in &p.standby {
                let node = slots.first().map(|x| x.node.clone()).unwrap_or_default();
                s.standby
                    .push((*stage, node, slots.iter().map(|x| x.index).collect()));
            }
        }
        let commits = &records.commits;
        if let Some(newest) = commits.iter().max_by_key(|c| (c.step, c.generation)) {
            s.step = Some(newest.step);
            s.loss = commits
                .iter()
                .filter(|c| c.step == newest.step)
                .find_map(|c| c.loss);
            s.consumed_samples = Some(newest.consumed_samples);
        }
        (s.goodput, s.elapsed_s) = goodput(commits, &records.lost, &records.planned, unix_ms());
        s.losses.sort_by_key(|l| (l.generation, l.detected_at_ms));
        Ok(s)
    }
}

/// Every key of job `name`. None at all is an error that says so, since a mistyped name would
/// otherwise look like a job that has not started.
fn job_keys(coord: &dyn Coordinator, keys: &JobKeys, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let listed = coord.list(keys.root())?;
    if listed.is_empty() {
        return Err(RuntimeError::Argument {
            name: "job",
            reason: format!(
                "no job {name} in the coordinator: nothing under {}; check --job and --etcd",
                keys.root()
            ),
        });
    }
    Ok(listed)
}

/// What asking a job to stop found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The request is recorded; the job's workers end it at their next step boundary.
    Requested,
    /// An earlier request is still pending.
    Pending,
    /// The job had ended already.
    Done,
}

/// Asks job `name` to end at its next step boundary, on a checkpoint of that step
/// (`marathon job stop`): records `stop` with who asked and when, unless the job ended or was
/// asked already. A job with no keys at all is an error.
pub fn request_stop(coord: &dyn Coordinator, name: &str, by: &str) -> Result<StopRequest> {
    let keys = JobKeys::new(name);
    job_keys(coord, &keys, name)?;
    if coord.get(&keys.done())?.is_some() {
        return Ok(StopRequest::Done);
    }
    let value = serde_json::json!({ "by": by, "at_ms": unix_ms() }).to_string();
    let stop = keys.stop();
    if coord.transact(&[(&stop, None)], &[(&stop, value.as_bytes())])? {
        Ok(StopRequest::Requested)
    } else {
        Ok(StopRequest::Pending)
    }
}

/// Why each generation after the first began, in order: the cause of the first loss its
/// predecessor recorded; else a start over of the same members; else a node of the
/// predecessor's plan (a member or on standby) missing from its own, lost with its lease;
/// else `None`, a growth, nothing having failed.
pub fn recovery_causes(
    generation: u64,
    lost: &[(u64, LostRecord)],
    retried: &[(u64, LostRecord)],
    plans: &BTreeMap<u64, Plan>,
) -> Vec<Option<LossCause>> {
    let nodes = |g: u64| -> BTreeSet<&str> {
        plans
            .get(&g)
            .into_iter()
            .flat_map(|p| {
                let standby = p.standby.iter().flat_map(|(_, slots)| slots);
                p.blocks.iter().flat_map(|b| &b.slots).chain(standby)
            })
            .map(|s| s.node.as_str())
            .collect()
    };
    let first = |records: &[(u64, LostRecord)], g: u64| {
        records
            .iter()
            .filter(|(at, _)| *at == g)
            .min_by_key(|(_, l)| l.detected_at_ms)
            .map(|(_, l)| l.cause)
    };
    (2..=generation)
        .map(|g| {
            first(lost, g - 1)
                .or_else(|| first(retried, g - 1).map(|_| LossCause::Restarted))
                .or_else(|| {
                    let (before, after) = (nodes(g - 1), nodes(g));
                    (!before.is_subset(&after)).then_some(LossCause::NodeLost)
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use marathon_elastic::plan::{Block, Slot};

    fn plan(nodes: &[&str], standby: &[&str]) -> Plan {
        let slot = |node: &str| Slot {
            node: node.into(),
            index: 0,
        };
        Plan {
            tp: 1,
            pp: 1,
            dp: nodes.len(),
            blocks: nodes
                .iter()
                .enumerate()
                .map(|(replica, n)| Block {
                    replica,
                    stage: 0,
                    slots: vec![slot(n)],
                    state: StateSource::Kept,
                })
                .collect(),
            microbatches: vec![1; nodes.len()],
            standby: standby.iter().map(|n| (0, vec![slot(n)])).collect(),
        }
    }

    fn lost(generation: u64, at: u64, cause: LossCause) -> (u64, LostRecord) {
        let record = LostRecord {
            detected_at_ms: at,
            reason: String::new(),
            cause,
        };
        (generation, record)
    }

    #[test]
    fn each_generation_is_put_down_to_the_first_loss_a_start_over_a_lost_node_or_growth() {
        let plans: BTreeMap<u64, Plan> = [
            (1, plan(&["a", "b", "c"], &[])),
            // 1 -> 2: a worker of c hung, then one of b died; the first detected counts.
            (2, plan(&["a", "b"], &[])),
            // 2 -> 3: the same members start over.
            (3, plan(&["a", "b"], &["c"])),
            // 3 -> 4: c, on standby, went with its lease.
            (4, plan(&["a", "b"], &[])),
            // 4 -> 5: d joined.
            (5, plan(&["a", "b", "d"], &[])),
        ]
        .into();
        let losses = [
            lost(1, 20, LossCause::WorkerDied),
            lost(1, 10, LossCause::Hung),
        ];
        let retried = [lost(2, 30, LossCause::Restarted)];
        let causes = recovery_causes(5, &losses, &retried, &plans);
        assert_eq!(
            causes,
            [
                Some(LossCause::Hung),
                Some(LossCause::Restarted),
                Some(LossCause::NodeLost),
                None
            ]
        );
        assert!(recovery_causes(1, &losses, &retried, &plans).is_empty());
    }
}
