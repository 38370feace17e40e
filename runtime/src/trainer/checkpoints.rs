//! Checkpoints: resuming from the newest one every rank can read, snapshots into the writer's
//! staging buffer, and waiting for their persists.

use marathon_model::{AdamW, Gpt};
use marathon_storage::writer::PersistReport;
use marathon_storage::{CheckpointWriter, Reader};

use super::Trainer;
use crate::checkpoint::{self, CheckpointRecord, Checkpointing, RunState};
use crate::config::{Resume, TrainConfig};
use crate::error::{Result, RuntimeError};
use crate::groups::Groups;

impl Trainer {
    /// Continues from the newest committed checkpoint under `checkpoint.root`, if there is one
    /// and `checkpoint.resume` is `auto`: parameters, both Adam moments and the optimizer step,
    /// the data order's position and the schedules. A checkpoint that cannot be read on any
    /// rank (a damaged chunk, a torn manifest) is skipped for the one before it, with a
    /// warning; every rank agrees on the one it loads. Returns the step resumed from.
    pub(super) fn resume(&mut self) -> Result<Option<u64>> {
        let (Some(ck), Some(c)) = (&self.ckpt, &self.cfg.checkpoint) else {
            return Ok(None);
        };
        let url = ck.reader.store.url.clone();
        let steps = ck.reader.committed()?;
        let Some(&newest) = steps.last() else {
            return Ok(None);
        };
        if c.resume == Resume::Never {
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "checkpoint.resume".into(),
                reason: format!(
                    "is never, but {url} already holds committed checkpoints (the newest of step \
                     {newest}); writing a new run there would mix the two. Choose a new \
                     checkpoint.root, or set resume = \"auto\" to continue"
                ),
            });
        }
        for &step in steps.iter().rev() {
            let attempt = self.load_checkpoint(step);
            if let Err(e @ RuntimeError::Config { .. }) = attempt {
                // The same manifest gives every rank the same verdict.
                return Err(e);
            }
            let [failed] = self.sum_over_ranks([f32::from(attempt.is_err())])?;
            match attempt {
                Ok(state) if failed == 0.0 => {
                    self.step = state.step;
                    self.consumed_samples = state.consumed_samples;
                    self.opt.step = state.optimizer_step;
                    return Ok(Some(step));
                }
                Ok(_) => tracing::warn!(
                    "the checkpoint of step {step} under {url} could not be read on \
                     another rank; falling back to the one before"
                ),
                Err(e) => tracing::warn!(
                    "the checkpoint of step {step} under {url} cannot be loaded ({e}); \
                     falling back to the one before"
                ),
            }
        }
        Err(RuntimeError::Config {
            path: self.cfg.source.clone(),
            field: "checkpoint.root".into(),
            reason: format!(
                "none of the {} committed checkpoints under {url} could be loaded (see the \
                 warnings above); run `marathon ckpt verify`, or set checkpoint.resume = \
                 \"never\" with a new root to start afresh",
                steps.len()
            ),
        })
    }

    /// Reads this rank's state from the checkpoint of `step` into the model and optimizer.
    fn load_checkpoint(&mut self, step: u64) -> Result<RunState> {
        let ck = self.ckpt.as_ref().expect("resuming needs checkpointing");
        let m = ck.reader.manifest(step)?;
        let state: RunState = serde_json::from_value(m.run.clone()).map_err(|e| {
            marathon_storage::StorageError::BadManifest {
                path: format!("{}/step {step}", ck.reader.store.url),
                reason: format!("its run state does not parse: {e}"),
            }
        })?;
        checkpoint::check_compatible(&self.cfg, &state, &ck.reader.store.url)?;
        checkpoint::load_tensors(
            &ck.reader,
            &m,
            &self.model.layout,
            &mut self.model.params,
            &self.opt.shard,
            &mut self.opt.m,
            &mut self.opt.v,
        )?;
        Ok(state)
    }

    /// Snapshots this rank's state for a checkpoint of the current step and returns at once;
    /// the persist runs in the background (see `marathon_storage::writer`). Waits first if the
    /// previous persist is still running. `None` without `[checkpoint]`.
    pub fn checkpoint(&mut self) -> Result<Option<CheckpointRecord>> {
        let Some(ck) = self.ckpt.as_mut() else {
            return Ok(None);
        };
        let _span = tracing::info_span!("checkpoint", step = self.step).entered();
        let seq = self.cfg.batch.seq_len as u64;
        let state = RunState {
            step: self.step,
            consumed_samples: self.consumed_samples,
            tokens_consumed: self.consumed_samples * seq,
            data_seed: self.cfg.data.seed,
            samples_per_epoch: self.train.samples(seq as usize) as u64,
            init_seed: self.cfg.train.seed,
            optimizer_step: self.opt.step,
            lr: self.cfg.optim.lr.lr_at(self.consumed_samples * seq),
            model: self.cfg.model.clone(),
            layout: self.cfg.parallel,
            seq_len: self.cfg.batch.seq_len,
            origin: None,
        };
        let run = serde_json::to_value(&state).expect("the run state serialises");
        let Checkpointing {
            writer,
            pieces,
            last_step,
            ..
        } = ck;
        let staged: usize = pieces.iter().map(|(_, _, r)| r.len()).sum();
        let report =
            self.engine
                .snapshot(&self.model, &self.opt, writer, self.step, run, pieces)?;
        *last_step = Some(self.step);
        let rec = CheckpointRecord::new(self.step, 4 * staged as u64, &report);
        self.write_record("checkpoint", &rec)?;
        if let Some(p) = &rec.previous_persisted {
            self.persisted(p)?;
        }
        Ok(Some(rec))
    }

    /// As [`Trainer::checkpoint`], unless a checkpoint of the current step was taken already.
    pub fn checkpoint_once(&mut self) -> Result<Option<CheckpointRecord>> {
        if self
            .ckpt
            .as_ref()
            .is_some_and(|c| c.last_step == Some(self.step))
        {
            return Ok(None);
        }
        self.checkpoint()
    }

    /// Waits until the last checkpoint is durable (and, on rank 0, committed).
    pub fn finish_checkpoints(&mut self) -> Result<()> {
        self.wait_checkpoint().map(|_| ())
    }

    /// As [`Trainer::finish_checkpoints`], returning what the persist did, if one was running.
    /// A checkpoint of the same step that an earlier writer committed (an elastic job's
    /// earlier generation, which reached the last step before it was superseded) stays as it
    /// is, and is no error: that step's state is the same in every generation.
    pub fn wait_checkpoint(&mut self) -> Result<Option<PersistReport>> {
        match self.ckpt.as_mut().and_then(|ck| ck.writer.wait()) {
            Some(Err(e @ marathon_storage::StorageError::AlreadyCommitted { .. })) => {
                tracing::info!("{e}");
                Ok(None)
            }
            Some(done) => {
                let report = done?;
                self.persisted(&(&report).into())?;
                Ok(Some(report))
            }
            None => Ok(None),
        }
    }
}

/// A rank's checkpointing in its layout: its writer (Megatron's rank order; rank 0 commits)
/// and the pieces it stores. `None` without `[checkpoint]`.
pub(super) fn checkpointing(
    cfg: &TrainConfig,
    model: &Gpt<f32>,
    opt: &AdamW<f32>,
    groups: &Groups,
) -> Result<Option<Checkpointing>> {
    let Some(c) = &cfg.checkpoint else {
        return Ok(None);
    };
    let place = groups.place();
    let store = checkpoint::open_store(c)?;
    let writer = CheckpointWriter::new(
        store.clone(),
        place.rank(),
        place.layout().world_size(),
        checkpoint::writer_options(c),
    )?;
    let pieces = checkpoint::plan_pieces(
        &model.layout,
        &opt.shard,
        place,
        cfg.parallel.distributed_optimizer,
    );
    Ok(Some(Checkpointing {
        writer,
        reader: Reader::new(store),
        pieces,
        every_steps: c.every_steps,
        last_step: None,
    }))
}
