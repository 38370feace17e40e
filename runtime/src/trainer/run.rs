//! The run loop and what it reports: step records, validation and checkpoints in order, the
//! metrics file, and where the run's time went (goodput).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Trainer;
use crate::checkpoint::{CheckpointRecord, Persisted};
use crate::error::{Result, RuntimeError};
use crate::metrics::{JobMetrics, RankMetrics};

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
    pub(super) const WORDS: usize = 13;

    /// The record as words (floats by their bits), to travel in a gather of u64s.
    pub(super) fn words(&self) -> [u64; Self::WORDS] {
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
    pub(super) fn from_words(w: &[u64]) -> Option<Self> {
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

/// Receives progress; `ops` draws it.
pub trait Observer {
    fn on_step(&mut self, _rec: &StepRecord) {}
    fn on_eval(&mut self, _step: u64, _val_loss: f32) {}
    fn on_checkpoint(&mut self, _rec: &CheckpointRecord) {}
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

impl Trainer {
    /// Runs the configured number of steps with periodic validation.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Summary> {
        let started = Instant::now();
        let mut goodput = Goodput::default();
        let mut last = f32::NAN;
        while self.step < self.cfg.train.steps {
            last = self.advance(observer, &mut goodput)?.loss;
            if let Some(job) = &self.live_job {
                let elapsed = started.elapsed().as_secs_f64();
                job.update(|v| {
                    (v.generation, v.dp) = (self.generation, self.cfg.parallel.dp);
                    v.lost_seconds = crate::metrics::lost_seconds(&goodput);
                    v.goodput = goodput.training_s / elapsed.max(1e-9);
                });
            }
        }
        let summary = self.conclude(started, goodput, last)?;
        self.write_record("goodput", &summary.goodput)?;
        self.write_report();
        Ok(summary)
    }

    /// On the rank that writes the metrics: writes the run's report beside them
    /// ([`crate::report::report_path`]). A report that cannot be written is a warning: the
    /// run it describes is done, and `marathon report` can draw it again.
    pub fn write_report(&mut self) {
        let (Some(m), Some(path)) = (&mut self.metrics, &self.cfg.train.metrics) else {
            return;
        };
        let out = crate::report::report_path(path);
        let written = m
            .flush()
            .map_err(|e| RuntimeError::io("write metrics", path, e))
            .and_then(|_| crate::report::write_run_report(path, &out));
        if let Err(e) = written {
            tracing::warn!("the run's report {} was not written: {e}", out.display());
        }
    }

    /// Reports every step, validation and checkpoint to `live` from now on.
    pub fn set_live_metrics(&mut self, live: Arc<RankMetrics>) {
        self.live = Some(live);
    }

    /// Reports where the job stands to `job` from now on, as [`Trainer::run`] goes: for a job
    /// outside an elastic one (whose leading agent reports it), on its rank 0.
    pub fn set_job_metrics(&mut self, job: Arc<JobMetrics>) {
        self.live_job = Some(job);
    }

    /// A persist of this rank finished: it goes to the live metrics and the metrics file.
    pub(super) fn persisted(&mut self, p: &Persisted) -> Result<()> {
        if let Some(live) = &self.live {
            live.on_persisted(p);
        }
        if let (Some(job), true) = (&self.live_job, p.committed) {
            job.update(|v| v.checkpoint = Some((p.step, crate::worker::unix_ms())));
        }
        self.write_record("persist", p)
    }

    /// Appends a record of `kind` to the metrics, on the rank that writes them.
    pub fn write_record(&mut self, kind: &str, data: &impl Serialize) -> Result<()> {
        self.write_metric(&serde_json::json!({ "kind": kind, "data": data }))
    }

    /// Runs one step, then the validation and the checkpoint it calls for, adding their times
    /// to `goodput`.
    pub fn advance(
        &mut self,
        observer: &mut dyn Observer,
        goodput: &mut Goodput,
    ) -> Result<StepRecord> {
        let _step = tracing::info_span!("step", step = self.step + 1).entered();
        let consumed = self.consumed_samples;
        let rec = self.train_step()?;
        goodput.training_s += rec.step_ms / 1e3;
        observer.on_step(&rec);
        if let Some(live) = &self.live {
            let tokens = (self.consumed_samples - consumed) * self.cfg.batch.seq_len as u64;
            live.on_step(&rec, tokens);
        }
        let every = self.cfg.train.eval_every_steps;
        if every > 0 && (self.step % every == 0 || self.step == self.cfg.train.steps) {
            let t0 = Instant::now();
            let val = self.evaluate()?;
            goodput.eval_s += t0.elapsed().as_secs_f64();
            if let Some(v) = val {
                observer.on_eval(self.step, v);
                if let Some(live) = &self.live {
                    live.on_eval(v);
                }
                self.last_val_loss = Some(v);
            }
        }
        let ckpt_every = self.ckpt.as_ref().map_or(0, |c| c.every_steps);
        let last_step = self.step == self.cfg.train.steps;
        if (ckpt_every > 0 && self.step % ckpt_every == 0) || last_step {
            if let Some(ck) = self.checkpoint()? {
                goodput.checkpoint_stall_s += ck.stall_ms / 1e3;
                observer.on_checkpoint(&ck);
                if let Some(live) = &self.live {
                    live.on_checkpoint(&ck);
                }
            }
        }
        Ok(rec)
    }

    /// Ends a run that started at `started`: waits until the last checkpoint is durable (and
    /// committed) and brings the state back from the device. Returns the run's summary, whose
    /// accounting the caller records ([`Trainer::write_record`]).
    pub fn conclude(
        &mut self,
        started: Instant,
        mut goodput: Goodput,
        last_loss: f32,
    ) -> Result<Summary> {
        let t0 = Instant::now();
        self.finish_checkpoints()?;
        self.fetch_state()?;
        goodput.final_checkpoint_s = t0.elapsed().as_secs_f64();
        let elapsed_s = started.elapsed().as_secs_f64();
        goodput.effective_fraction = if elapsed_s > 0.0 {
            goodput.training_s / elapsed_s
        } else {
            0.0
        };
        Ok(Summary {
            steps: self.step,
            final_loss: last_loss,
            final_val_loss: self.last_val_loss,
            tokens_consumed: self.consumed_samples * self.cfg.batch.seq_len as u64,
            elapsed_s,
            goodput,
        })
    }

    /// Writes one metrics line, whole: a process killed after a step loses nothing of it.
    pub(super) fn write_metric(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            let path = self.cfg.train.metrics.as_deref().unwrap_or(Path::new(""));
            writeln!(m, "{v}")
                .and_then(|_| m.flush())
                .map_err(|e| RuntimeError::io("write metrics", path, e))?;
        }
        Ok(())
    }
}

pub(super) fn open_metrics(path: &Path, resumed: bool) -> Result<BufWriter<File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("create directory", dir, e))?;
    }
    // A new run starts a new file (appending would mix runs with the same step numbers); a
    // resumed run continues its own.
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(path)
        .map_err(|e| RuntimeError::io("open metrics file", path, e))?;
    Ok(BufWriter::new(f))
}
