//! Where a running elastic job stands, read from its keys in the coordinator
//! (`marathon job status`): the generation and its plan, the nodes holding their leases, the
//! last committed step and checkpoint, the recoveries so far and the goodput accounting.

use std::collections::BTreeMap;

use marathon_elastic::plan::{Offer, Plan, StateSource};
use marathon_elastic::{job, Coordinator, JobKey, JobKeys};
use serde::Serialize;

use crate::trainer::Goodput;
use crate::worker::{goodput, unix_ms, LostRecord, Records};
use crate::{Result, RuntimeError};

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
    /// The newest step with a committed checkpoint record.
    pub checkpoint: Option<u64>,
    /// Generations after the first, and the workers lost along the way.
    pub recoveries: u64,
    pub losses: Vec<Loss>,
    pub goodput: Goodput,
    pub elapsed_s: f64,
    /// The job reached its last step.
    pub done: bool,
}

impl JobStatus {
    /// Reads job `name`'s keys from `coord`. A job with no keys at all is an error that says
    /// so, since a mistyped name would otherwise look like a job that has not started.
    pub fn read(coord: &dyn Coordinator, name: &str) -> Result<JobStatus> {
        let keys = JobKeys::new(name);
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
            recoveries: generation.saturating_sub(1),
            losses: Vec::new(),
            goodput: Goodput::default(),
            elapsed_s: 0.0,
            done: false,
        };
        let mut records = Records::default();
        let mut plan: Option<Plan> = None;
        for (key, value) in listed {
            let key = keys.parse(&key);
            records.add(&key, &value);
            match key {
                JobKey::Node(node) => {
                    let offer = Offer::parse(&value).unwrap_or_default();
                    s.nodes.insert(node, offer.offered().collect());
                }
                JobKey::Leader => s.leader = Some(String::from_utf8_lossy(&value).into_owned()),
                JobKey::Plan(g) if g == generation => plan = serde_json::from_slice(&value).ok(),
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
                JobKey::Checkpoint(step) => s.checkpoint = s.checkpoint.max(Some(step)),
                JobKey::Done => s.done = true,
                _ => {}
            }
        }
        if let Some(p) = plan {
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
