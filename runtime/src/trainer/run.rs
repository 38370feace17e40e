//! The run loop and what it reports: step records, validation and checkpoints in order, the
//! metrics file, and where the run's time went (goodput).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::Trainer;
use crate::checkpoint::{CheckpointRecord, Persisted};
use crate::error::{Result, RuntimeError};
use crate::metrics::{JobMetrics, RankMetrics};
use crate::records::{unix_ms, Goodput, StepRecord, Summary};

/// Receives progress; `ops` draws it.
pub trait Observer {
    fn on_step(&mut self, _rec: &StepRecord) {}
    fn on_eval(&mut self, _step: u64, _val_loss: f32) {}
    fn on_checkpoint(&mut self, _rec: &CheckpointRecord) {}
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
            job.update(|v| v.checkpoint = Some((p.step, unix_ms())));
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
