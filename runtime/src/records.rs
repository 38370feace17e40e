//! What a run records, and what an elastic job's goodput is accounted from: each step's record
//! and where its time went, the run's summary, and the records a job's generations leave under
//! its keys (step commits, losses, plans). Plain data with no I/O, below the trainer, the worker,
//! live metrics, job status and reports, which all read or write it.

use std::time::Duration;

use marathon_elastic::plan::Slot;
use marathon_elastic::JobKey;
use serde::{Deserialize, Serialize};

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean loss over the global batch.
    pub loss: f32,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub batch: u64,
    /// Tokens consumed by all steps up to and including this one.
    pub tokens_consumed: u64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Time the step waited on collectives (data-parallel gradient and loss sums, the
    /// distributed optimizer's gather): communication not hidden behind compute.
    #[serde(default)]
    pub comm_wait_ms: f64,
    /// Time collectives ran on the communication thread while backward went on.
    #[serde(default)]
    pub comm_overlapped_ms: f64,
    /// Time in tensor-parallel collectives inside forward and backward.
    #[serde(default)]
    pub tp_comm_ms: f64,
    /// Time blocked sending to or receiving from neighbouring pipeline stages: the pipeline
    /// bubble plus the transfers.
    #[serde(default)]
    pub pipeline_wait_ms: f64,
    /// When the step's update was applied, in Unix milliseconds.
    #[serde(default)]
    pub at_ms: u64,
}

impl StepRecord {
    /// Words of a record as it travels in [`StepRecord::words`].
    pub(crate) const WORDS: usize = 13;

    /// The record as words (floats by their bits), to travel in a gather of u64s.
    pub(crate) fn words(&self) -> [u64; Self::WORDS] {
        [
            self.step,
            u64::from(self.loss.to_bits()),
            self.lr.to_bits(),
            self.grad_norm.to_bits(),
            self.batch,
            self.tokens_consumed,
            self.step_ms.to_bits(),
            self.tokens_per_s.to_bits(),
            self.comm_wait_ms.to_bits(),
            self.comm_overlapped_ms.to_bits(),
            self.tp_comm_ms.to_bits(),
            self.pipeline_wait_ms.to_bits(),
            self.at_ms,
        ]
    }

    /// The record [`StepRecord::words`] wrote; `None` for the words of no record (step 0).
    pub(crate) fn from_words(w: &[u64]) -> Option<Self> {
        let f = |i: usize| f64::from_bits(w[i]);
        (w[0] != 0).then(|| StepRecord {
            step: w[0],
            loss: f32::from_bits(w[1] as u32),
            lr: f(2),
            grad_norm: f(3),
            batch: w[4],
            tokens_consumed: w[5],
            step_ms: f(6),
            tokens_per_s: f(7),
            comm_wait_ms: f(8),
            comm_overlapped_ms: f(9),
            tp_comm_ms: f(10),
            pipeline_wait_ms: f(11),
            at_ms: w[12],
        })
    }
}

/// The end of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    /// NaN when the job's last generation ran no step and its predecessor committed none
    /// (JSON writes it as null, and reads null back as NaN).
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f32,
    pub final_val_loss: Option<f32>,
    pub tokens_consumed: u64,
    pub elapsed_s: f64,
    /// Where the run's time went.
    #[serde(default)]
    pub goodput: Goodput,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Where a run's wall time went: training steps, validation, checkpoint stalls (the staging
/// copy and any wait for the previous persist) and the wait for the last checkpoint to commit.
/// `effective_fraction` is the share spent in training steps.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Goodput {
    pub training_s: f64,
    pub eval_s: f64,
    pub checkpoint_stall_s: f64,
    pub final_checkpoint_s: f64,
    pub effective_fraction: f64,
    /// Elastic jobs: from the first plan to the first generation's reconciled replicas
    /// (rendezvous, building the model, loading a checkpoint).
    #[serde(default)]
    pub startup_s: f64,
    /// Elastic jobs: from the last committed step before a failure to its detection; the
    /// dropped step's work is part of it.
    #[serde(default)]
    pub detection_s: f64,
    /// Elastic jobs: from a failure's detection (or a growth's step boundary) to the new
    /// generation's process groups: the settling window, planning and rendezvous.
    #[serde(default)]
    pub reform_s: f64,
    /// Elastic jobs: reconciling the replicas of a new generation: peer state transfer, or
    /// the reload from storage.
    #[serde(default)]
    pub transfer_s: f64,
    /// Elastic jobs: steps run again after a reload from storage, and their time.
    #[serde(default)]
    pub recomputed_steps: u64,
    #[serde(default)]
    pub recomputed_s: f64,
    /// Elastic jobs: ranks flagged as stragglers.
    #[serde(default)]
    pub stragglers: u64,
}

/// Where a step's time went, beyond compute.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StepTimes {
    pub comm_wait: Duration,
    pub comm_overlapped: Duration,
    pub tp_comm: Duration,
    pub pipeline_wait: Duration,
}

/// A generation's record of progress, committed by its rank 0 after each step (and once when
/// it starts) under `gen-<g>/committed`, fenced by the generation. Times are Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepCommit {
    pub generation: u64,
    /// Steps completed.
    pub step: u64,
    /// Samples consumed by those steps: the data order's position.
    pub consumed_samples: u64,
    /// The last step's loss; `None` in the record that starts the generation.
    pub loss: Option<f32>,
    pub dp: usize,
    /// The step the generation started from.
    pub first_step: u64,
    /// When the worker was told to start the generation, when its groups formed, when the
    /// replicas were reconciled, and when this record was written.
    pub told_at_ms: u64,
    pub groups_at_ms: u64,
    pub ready_at_ms: u64,
    pub at_ms: u64,
    /// The checkpoint step the generation reloaded from storage, if it did (0: none existed).
    pub reloaded: Option<u64>,
    /// This generation's time in kept steps, validation and checkpoint stalls.
    pub training_s: f64,
    pub eval_s: f64,
    pub checkpoint_stall_s: f64,
    /// Steps this generation ran that an earlier one had already committed (after a reload
    /// from storage), and their time.
    pub recomputed_steps: u64,
    pub recomputed_s: f64,
    /// The ranks of this generation flagged as stragglers so far (`marathon_elastic::pace`).
    #[serde(default)]
    pub stragglers: Vec<FlaggedStraggler>,
}

/// A rank flagged as a straggler: where it runs, and how slow it was when flagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlaggedStraggler {
    pub slot: Slot,
    pub rank: usize,
    /// The step at which it was flagged.
    pub step: u64,
    /// Its compute time per microbatch over its peers' median, at that step.
    pub ratio: f64,
}

/// A worker lost in a generation, recorded by the agent that saw it under
/// `gen-<g>/lost/<node>/<slot>` (or `gen-<g>/retry/...` for a live one that left it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LostRecord {
    pub detected_at_ms: u64,
    pub reason: String,
    /// Why its agent reports it (records of older builds: a worker that died).
    #[serde(default)]
    pub cause: LossCause,
}

/// Why a worker was lost, as its agent saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// Its process exited or was killed.
    #[default]
    WorkerDied,
    /// The watchdog saw no progress from it and its agent killed it.
    Hung,
    /// Flagged as a straggler and evicted.
    Straggler,
    /// It left its generation on an error of its own, and the same members start over.
    Restarted,
    /// Its node went: the lease ran out, or its agent restarted.
    NodeLost,
}

impl LossCause {
    pub fn name(self) -> &'static str {
        match self {
            LossCause::WorkerDied => "worker_died",
            LossCause::Hung => "hung",
            LossCause::Straggler => "straggler",
            LossCause::Restarted => "restarted",
            LossCause::NodeLost => "node_lost",
        }
    }
}

impl LostRecord {
    /// The record of a loss seen now, as its key's value.
    pub fn now(reason: String, cause: LossCause) -> Vec<u8> {
        let record = LostRecord {
            detected_at_ms: unix_ms(),
            reason,
            cause,
        };
        serde_json::to_vec(&record).expect("records serialise")
    }
}

/// A generation's planning, written by the leader with the plan under `gen-<g>/planned`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedRecord {
    pub at_ms: u64,
    pub dp: usize,
    pub leader: String,
}

/// The current time in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The records of a job's generations that its goodput is accounted from: step commits,
/// losses and plans, as read from its keys.
#[derive(Debug, Default)]
pub struct Records {
    pub commits: Vec<StepCommit>,
    pub lost: Vec<(u64, LostRecord)>,
    pub planned: Vec<PlannedRecord>,
}

impl Records {
    /// Takes the record that `key` holds, if it is one of these.
    pub fn add(&mut self, key: &JobKey, value: &[u8]) {
        match key {
            JobKey::Committed(_) => self.commits.extend(serde_json::from_slice(value).ok()),
            JobKey::Lost { generation, .. } => {
                if let Ok(l) = serde_json::from_slice::<LostRecord>(value) {
                    self.lost.push((*generation, l));
                }
            }
            JobKey::Planned(_) => self.planned.extend(serde_json::from_slice(value).ok()),
            _ => {}
        }
    }
}

/// Where an elastic job's time went, from its generations' records: training in kept steps,
/// validation, checkpoint stalls, and for each change of generation the time from the last
/// committed step to the failure's detection (the dropped step's work included), from there to
/// the new generation's groups (re-forming), and from there to reconciled replicas (peer
/// transfer, or the reload from storage), plus steps run again after a reload. Returns it with
/// the job's elapsed seconds, from its first plan to `end_ms`.
pub fn goodput(
    commits: &[StepCommit],
    lost: &[(u64, LostRecord)],
    planned: &[PlannedRecord],
    end_ms: u64,
) -> (Goodput, f64) {
    let mut commits: Vec<&StepCommit> = commits.iter().collect();
    commits.sort_by_key(|c| c.generation);
    let start_ms = planned
        .iter()
        .map(|p| p.at_ms)
        .chain(commits.first().map(|c| c.told_at_ms))
        .min()
        .unwrap_or(end_ms);
    let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    let mut g = Goodput::default();
    let mut previous: Option<&StepCommit> = None;
    for c in &commits {
        g.training_s += c.training_s;
        g.eval_s += c.eval_s;
        g.checkpoint_stall_s += c.checkpoint_stall_s;
        g.recomputed_s += c.recomputed_s;
        g.recomputed_steps += c.recomputed_steps;
        g.stragglers += c.stragglers.len() as u64;
        match previous {
            None => g.startup_s += s(start_ms, c.ready_at_ms),
            Some(p) => {
                let detected = lost
                    .iter()
                    .filter(|(gen, _)| *gen == p.generation)
                    .map(|(_, l)| l.detected_at_ms)
                    .min();
                let from = match detected {
                    Some(d) => {
                        g.detection_s += s(p.at_ms, d);
                        d
                    }
                    None => p.at_ms,
                };
                g.reform_s += s(from, c.groups_at_ms);
                g.transfer_s += s(c.groups_at_ms, c.ready_at_ms);
            }
        }
        previous = Some(c);
    }
    let elapsed_s = s(start_ms, end_ms);
    g.effective_fraction = if elapsed_s > 0.0 {
        g.training_s / elapsed_s
    } else {
        0.0
    };
    (g, elapsed_s)
}
