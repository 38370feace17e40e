//! The single-process trainer: the step loop, validation and metrics.
//!
//! One step takes the global batch the schedule gives, runs it as microbatches through forward
//! and backward with every position's loss weighted by 1 / (tokens in the global batch), clips
//! the global gradient norm, and applies AdamW at the learning rate of the tokens consumed.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marathon_model::optim::{clip_grads, sum_squares};
use marathon_model::{AdamW, BatchRamp, Gpt, Shard};
use marathon_storage::writer::{CommitGuard, PersistReport};
use marathon_storage::{CheckpointWriter, Reader};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointRecord, Checkpointing, RunState, Source};
use crate::comm::{chunk_range, ProcessGroup};
use crate::config::{Resume, TrainConfig};
use crate::data::{DataOrder, TokenFile};
use crate::device::{Device, GpuModel};
use crate::groups::{Groups, TensorGroup};
use crate::{Result, RuntimeError};

/// Elements per block of the checkpoint snapshot's parallel copy (1 MiB).
const COPY_BLOCK: usize = 1 << 18;

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
}

#[derive(Debug)]
pub struct Trainer {
    pub cfg: TrainConfig,
    /// This rank's shard of the model: its pipeline stage, cut to its tensor-parallel slice.
    pub model: Gpt<f32>,
    pub opt: AdamW<f32>,
    train: TokenFile,
    val: Option<TokenFile>,
    order: DataOrder,
    ramp: BatchRamp,
    /// Steps completed.
    pub step: u64,
    /// Samples consumed by the completed steps: the data order's position.
    pub consumed_samples: u64,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The activation received from the previous stage and the gradient from the next one.
    act_in: Vec<f32>,
    grad_in: Vec<f32>,
    metrics: Option<BufWriter<File>>,
    groups: Groups,
    ckpt: Option<Checkpointing>,
    resumed_from: Option<u64>,
    /// Whether this rank holds the job's state: false for a rank joining a running job until
    /// a replica hands it over (see [`Trainer::reconcile`]).
    holds_state: bool,
    /// The model on the GPU when `train.device` is cuda; the host model then holds the state
    /// only when it is loaded or fetched.
    gpu: Option<GpuModel>,
    /// Raised by whoever wants the job to stop at the next step boundary (an elastic worker
    /// told of a new generation); see [`Trainer::set_stop_signal`].
    stop_signal: Option<Arc<AtomicBool>>,
    /// Whether any rank raised its stop signal before the last step's closing sum.
    stop_agreed: bool,
    /// The last validation loss.
    last_val_loss: Option<f32>,
    /// The elastic generation this trainer runs in (0 outside an elastic job).
    generation: u64,
    /// Where this rank appends the samples its replica feeds (`train.samples_log`), on the
    /// first stage's first tensor rank of each replica.
    samples_log: Option<SamplesLog>,
    /// Asked before each checkpoint commit (see [`Trainer::set_commit_guard`]).
    commit_guard: Option<CommitGuard>,
}

/// `train.samples_log`, open on the rank that logs for its replica, and the sample ids it fed
/// in the step running.
#[derive(Debug)]
struct SamplesLog {
    file: File,
    fed: Vec<u64>,
}

/// Where a step's time went, beyond compute.
#[derive(Debug, Default, Clone, Copy)]
struct StepTimes {
    comm_wait: Duration,
    comm_overlapped: Duration,
    tp_comm: Duration,
    pipeline_wait: Duration,
}

impl Trainer {
    /// Opens the data, checks it against the configuration, and builds the model with fresh
    /// weights from `train.seed`, in one process (`parallel` must be all ones).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        Self::with_groups(cfg, Groups::default())
    }

    /// As [`Trainer::new`], as one data-parallel replica of `group`, whose size must be
    /// `parallel.dp` (tensor and pipeline parallelism 1).
    pub fn with_group(cfg: TrainConfig, group: Option<ProcessGroup>) -> Result<Self> {
        Self::with_groups(cfg, Groups::data(group))
    }

    /// As [`Trainer::new`], as one rank of a tensor x pipeline x data layout whose groups are
    /// `groups`; their sizes must be those of `parallel`. The rank holds its shard of the model:
    /// its stage's layers, cut to its tensor-parallel slice. Every data-parallel replica starts
    /// from the same weights and ends each step with the same ones, and together the shards
    /// compute what one process would.
    pub fn with_groups(cfg: TrainConfig, groups: Groups) -> Result<Self> {
        Self::build(cfg, groups, true)
    }

    /// As [`Trainer::with_groups`], for a rank joining a running job: it does not look for a
    /// checkpoint, because its state comes from a healthy replica through
    /// [`Trainer::reconcile`], which every rank of the new generation calls next. Until then
    /// its weights are the initial ones.
    pub fn joining(cfg: TrainConfig, groups: Groups) -> Result<Self> {
        Self::build(cfg, groups, false)
    }

    fn build(cfg: TrainConfig, groups: Groups, resume: bool) -> Result<Self> {
        let layout = cfg.parallel;
        let [(tp_rank, tp), (stage, pp), (replica, replicas)] = groups.coords();
        for (field, want, have) in [
            ("parallel.tp", layout.tp, tp),
            ("parallel.pp", layout.pp, pp),
            ("parallel.dp", layout.dp, replicas),
        ] {
            if want != have {
                return Err(RuntimeError::Config {
                    path: cfg.source.clone(),
                    field: field.into(),
                    reason: format!(
                        "{want} needs a group of {want} worker processes, but this trainer's \
                         group has {have}; `marathon train` starts the workers"
                    ),
                });
            }
        }
        if pp > 1 && groups.emb.is_none() == (stage == 0 || stage + 1 == pp) {
            return Err(RuntimeError::Config {
                path: cfg.source.clone(),
                field: "parallel.pp".into(),
                reason: "the first and last pipeline stages need their embedding group, and \
                         only they"
                    .into(),
            });
        }
        let on_gpu = cfg.train.device == Device::Cuda;
        if on_gpu && (tp, pp, replicas) != (1, 1, 1) {
            return Err(RuntimeError::Config {
                path: cfg.source.clone(),
                field: "train.device".into(),
                reason: format!(
                    "cuda trains on one GPU in one process so far; this layout has tp {tp}, pp \
                     {pp}, dp {replicas}: train it with device = \"cpu\", or on one GPU with \
                     tp = pp = dp = 1"
                ),
            });
        }
        let (train, val) = preflight(&cfg)?;
        let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
        let order = DataOrder::new(cfg.data.seed, train.samples(seq));
        let shard = Shard {
            tp,
            tp_rank,
            pp,
            stage,
        };
        // A 1F1B stage keeps at most one microbatch per later stage in flight, plus its own.
        let slots = pp - stage;
        // On a GPU the host model only holds the state: its activations are those of one token.
        let (hb, hs) = if on_gpu { (1, 1) } else { (mb, seq) };
        let mut model =
            Gpt::new_shard(cfg.model.clone(), shard, hb, hs, slots).map_err(|e| cfg.error(e))?;
        model.init_params(cfg.train.seed, cfg.optim.init_std);
        let gpu = if on_gpu {
            Some(GpuModel::open(&cfg, &model.params)?)
        } else {
            None
        };
        let opt_shard = if layout.distributed_optimizer {
            chunk_range(model.layout.numel(), replicas, replica)
        } else {
            0..model.layout.numel()
        };
        let opt = AdamW::for_shard(cfg.optim.adamw(), &model.layout, opt_shard);
        let ckpt = checkpointing(&cfg, &model, &opt, &groups)?;
        let ramp = cfg.batch_ramp();
        let hidden = mb * seq * cfg.model.n_embd;
        Ok(Trainer {
            cfg,
            model,
            opt,
            train,
            val,
            order,
            ramp,
            step: 0,
            consumed_samples: 0,
            inputs: vec![0; mb * seq],
            targets: vec![0; mb * seq],
            act_in: vec![0.0; if stage > 0 { hidden } else { 0 }],
            grad_in: vec![0.0; if stage + 1 < pp { hidden } else { 0 }],
            metrics: None,
            groups,
            ckpt,
            resumed_from: None,
            holds_state: resume,
            gpu,
            stop_signal: None,
            stop_agreed: false,
            last_val_loss: None,
            generation: 0,
            samples_log: None,
            commit_guard: None,
        })
        .and_then(|mut t| {
            if resume {
                t.resumed_from = t.resume()?;
            }
            if let (Some(g), Some(_)) = (t.gpu.as_mut(), t.resumed_from) {
                g.upload_state(&t.model.params, &t.opt.m, &t.opt.v, t.opt.step)?;
            }
            // One rank writes the metrics: every rank ends a step knowing the same numbers. A
            // resumed run, or a rank joining a running one, adds to the file of the run it
            // continues.
            if let (Some(p), true) = (
                &t.cfg.train.metrics,
                tp_rank == 0 && stage == 0 && replica == 0,
            ) {
                t.metrics = Some(open_metrics(p, t.resumed_from.is_some() || !resume)?);
            }
            t.open_samples_log()?;
            Ok(t)
        })
    }

    /// Continues from the newest committed checkpoint under `checkpoint.root`, if there is one
    /// and `checkpoint.resume` is `auto`: parameters, both Adam moments and the optimizer step,
    /// the data order's position and the schedules. A checkpoint that cannot be read on any
    /// rank (a damaged chunk, a torn manifest) is skipped for the one before it, with a
    /// warning; every rank agrees on the one it loads. Returns the step resumed from.
    fn resume(&mut self) -> Result<Option<u64>> {
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
                Ok(_) => eprintln!(
                    "warning: the checkpoint of step {step} under {url} could not be read on \
                     another rank; falling back to the one before"
                ),
                Err(e) => eprintln!(
                    "warning: the checkpoint of step {step} under {url} cannot be loaded ({e}); \
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

    /// The sums of `v` over every rank of the job: over the tensor, then pipeline, then data
    /// groups.
    fn sum_over_ranks<const N: usize>(&mut self, mut v: [f32; N]) -> Result<[f32; N]> {
        for g in [
            self.groups.tp.as_mut(),
            self.groups.pp.as_mut(),
            self.groups.dp.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            g.all_reduce(&mut v)?;
        }
        Ok(v)
    }

    /// Continues with new process groups: a new generation of the job, with the same tensor
    /// and pipeline layout and a data-parallel degree that may differ (a replica lost or added).
    /// The rank keeps its shard of the model and its optimizer state; the next step splits the
    /// global batch over the new replicas, so the data order continues exactly.
    ///
    /// Errors: a group whose tensor or pipeline size differs from the layout's, and the
    /// distributed optimizer, whose shards would have to move between replicas (not supported
    /// yet: resume from a checkpoint in the new layout instead).
    pub fn regroup(&mut self, groups: Groups) -> Result<()> {
        self.host_only("re-forming groups")?;
        let [(tp_rank, tp), (stage, pp), (_, dp)] = groups.coords();
        let shard = self.model.layout.shard;
        let bad = |reason: String| RuntimeError::Config {
            path: self.cfg.source.clone(),
            field: "parallel".into(),
            reason,
        };
        if (tp, tp_rank, pp, stage) != (shard.tp, shard.tp_rank, shard.pp, shard.stage) {
            return Err(bad(format!(
                "a new generation must keep each rank's shard: this rank holds tensor rank {} of \
                 {} and stage {} of {}, the new groups give {tp_rank} of {tp} and {stage} of {pp}",
                shard.tp_rank, shard.tp, shard.stage, shard.pp
            )));
        }
        if self.cfg.parallel.distributed_optimizer && dp != self.cfg.parallel.dp {
            return Err(bad(format!(
                "changing the data-parallel degree from {} to {dp} with the distributed \
                 optimizer would move optimizer shards between replicas, which is not supported \
                 yet; resume from a checkpoint in the new layout",
                self.cfg.parallel.dp
            )));
        }
        self.cfg.parallel.dp = dp;
        self.groups = groups;
        // The writers of the new generation are its ranks. A persist still running belongs to
        // the old one: it finishes (or fails, when a writer died) on its own thread, and the
        // newest checkpoint that committed is what a later resume finds.
        if let Some(mut old) = self.ckpt.take() {
            std::thread::spawn(move || {
                if let Some(Err(e)) = old.writer.wait() {
                    eprintln!(
                        "warning: a checkpoint of the previous generation did not commit: {e}"
                    );
                }
            });
        }
        self.ckpt = checkpointing(&self.cfg, &self.model, &self.opt, &self.groups)?;
        self.set_commit_guard(self.commit_guard.clone());
        if let (Some(ck), Some(signal)) = (self.ckpt.as_mut(), &self.stop_signal) {
            ck.writer.set_cancel(Some(signal.clone()));
        }
        // The first rank of the new generation writes the metrics, after the old one's lines.
        let first = self.groups.coords().iter().all(|&(rank, _)| rank == 0);
        self.metrics = match (&self.cfg.train.metrics, first, self.metrics.take()) {
            (Some(_), true, Some(m)) => Some(m),
            (Some(p), true, None) => Some(open_metrics(p, true)?),
            _ => None,
        };
        self.open_samples_log()
    }

    /// Reloads this rank's state from the newest committed checkpoint, as a fresh trainer
    /// would: every rank of the job calls it, together. `None` when there is none (the state
    /// is then the initial one, from step 0). The last resort of an elastic job whose
    /// some stage has no live copy left.
    pub fn reload(&mut self) -> Result<Option<u64>> {
        self.host_only("reloading a checkpoint into a running trainer")?;
        // Until the load completes, this rank's state is nobody's.
        self.holds_state = false;
        self.model
            .init_params(self.cfg.train.seed, self.cfg.optim.init_std);
        self.opt = AdamW::for_shard(
            self.cfg.optim.adamw(),
            &self.model.layout,
            self.opt.shard.clone(),
        );
        self.step = 0;
        self.consumed_samples = 0;
        self.resumed_from = self.resume()?;
        self.holds_state = true;
        Ok(self.resumed_from)
    }

    /// Sets the flag any holder may raise to stop the job at the next step boundary. Every
    /// rank adds its flag to the step's closing sum, so all ranks learn of a raise in the same
    /// step and stop after it together ([`Trainer::stop_agreed`]), with the step applied
    /// everywhere.
    /// The checkpoint writer's committer, waiting for ranks' shards, gives up on the same
    /// flag: a newer generation refuses its commit anyway.
    pub fn set_stop_signal(&mut self, signal: Arc<AtomicBool>) {
        if let Some(ck) = self.ckpt.as_mut() {
            ck.writer.set_cancel(Some(signal.clone()));
        }
        self.stop_signal = Some(signal);
    }

    /// Whether some rank raised its stop signal before the closing sum of the last step.
    pub fn stop_agreed(&self) -> bool {
        self.stop_agreed
    }

    /// A digest of this rank's state: parameters, both moments and the counters, bit for bit.
    /// Replicas of one shard that agree on it hold the same state.
    pub fn state_digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut mix = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
        for buf in [&self.model.params, &self.opt.m, &self.opt.v] {
            buf.iter().for_each(|x| mix(x.to_bits() as u64));
        }
        [self.step, self.consumed_samples, self.opt.step]
            .into_iter()
            .for_each(mix);
        h
    }

    /// Sets the guard the committing rank asks before each checkpoint commit: an elastic
    /// worker's says whether its generation still runs, so a checkpoint of an old generation is
    /// never committed.
    pub fn set_commit_guard(&mut self, guard: Option<CommitGuard>) {
        if let Some(ck) = self.ckpt.as_mut() {
            ck.writer.set_commit_guard(guard.clone());
        }
        self.commit_guard = guard;
    }

    /// Makes this rank's state that of replica `source` of its data-parallel group: parameters,
    /// both Adam moments, the optimizer step and the data order's position, broadcast over the
    /// group. A replica joining a running job receives its state this way from a healthy one,
    /// instead of from storage; every member of the group calls it.
    pub fn transfer_state(&mut self, source: usize) -> Result<()> {
        self.host_only("transferring state between replicas")?;
        let Some(dp) = self.groups.dp.as_mut() else {
            return Ok(());
        };
        // A transfer cut off halfway leaves a receiver with the source's parameters and its
        // own optimizer state: no one's state until the transfer completes.
        if dp.rank() != source {
            self.holds_state = false;
        }
        dp.broadcast(&mut self.model.params, source)?;
        crate::moments::reach(crate::moments::Moment::Transfer);
        dp.broadcast(&mut self.opt.m, source)?;
        dp.broadcast(&mut self.opt.v, source)?;
        // Counters travel bit for bit, as the f32s that share their bits.
        let words = |x: u64| [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)];
        let [a, b] = words(self.step);
        let [c, d] = words(self.consumed_samples);
        let [e, f] = words(self.opt.step);
        let mut counters = [a, b, c, d, e, f];
        dp.broadcast(&mut counters, source)?;
        let word = |lo: f32, hi: f32| lo.to_bits() as u64 | (hi.to_bits() as u64) << 32;
        self.step = word(counters[0], counters[1]);
        self.consumed_samples = word(counters[2], counters[3]);
        self.opt.step = word(counters[4], counters[5]);
        self.holds_state = true;
        Ok(())
    }

    /// Brings the replicas of this rank's shard to one step at the start of a generation. A
    /// peer that died in the middle of a step's last collective can leave some survivors with
    /// the step applied and others without it; every replica then takes the state of the most
    /// advanced one (the lowest-numbered when several are). Afterwards every rank of the job
    /// must be at the same step, or all of them fail with [`RuntimeError::Config`] naming the
    /// steps seen, and the job must resume from its newest checkpoint. The same happens when
    /// no replica of some shard holds state (every one of them joined with this generation):
    /// the initial weights are never taken for the job's. Every rank calls it. Returns the
    /// step the generation continues from.
    pub fn reconcile(&mut self) -> Result<u64> {
        self.host_only("reconciling replicas")?;
        let [_, _, (replica, replicas)] = self.groups.coords();
        let words = |x: u64| [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)];
        let word = |w: &[f32]| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32;
        let gather =
            |g: Option<&mut ProcessGroup>, step: u64, me: usize, n: usize| -> Result<Vec<u64>> {
                let mut all = vec![0f32; 2 * n];
                all[2 * me..2 * me + 2].copy_from_slice(&words(step));
                if let Some(g) = g {
                    g.all_gather(&mut all)?;
                }
                Ok(all.chunks_exact(2).map(word).collect())
            };
        // Step + 1 from a holder of state, 0 from a rank that holds none.
        let held = if self.holds_state { self.step + 1 } else { 0 };
        let held = gather(self.groups.dp.as_mut(), held, replica, replicas)?;
        let best = held.iter().copied().max().unwrap_or(held[replica]);
        let stateless = best == 0;
        if !stateless && held.iter().any(|&s| s != best) {
            let source = held.iter().position(|&s| s == best).unwrap_or(0);
            self.transfer_state(source)?;
        }
        // The replicas of each shard now agree; the shards must agree with each other.
        let [(tp_rank, tp), (stage, pp), _] = self.groups.coords();
        let step = self.step;
        let across_tp = gather(self.groups.tp.as_mut(), step, tp_rank, tp)?;
        let across_pp = gather(self.groups.pp.as_mut(), step, stage, pp)?;
        let differ = across_tp.iter().chain(&across_pp).any(|&s| s != step);
        let [differ_n, stateless_n] =
            self.sum_over_ranks([f32::from(differ), f32::from(stateless)])?;
        if differ_n + stateless_n > 0.0 {
            let reason = if stateless_n > 0.0 {
                format!(
                    "{stateless_n} ranks hold shards of which no replica holds state (every \
                     one joined with this generation), so the job must resume from its newest \
                     checkpoint"
                )
            } else {
                format!(
                    "the shards of the model stopped at different steps (this rank's tensor \
                     group: {across_tp:?}, pipeline group: {across_pp:?}); no replica holds \
                     every shard at one step, so the job must resume from its newest checkpoint"
                )
            };
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "parallel".into(),
                reason,
            });
        }
        Ok(step)
    }

    /// The step this run resumed from, if it did.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Snapshots this rank's state for a checkpoint of the current step and returns at once;
    /// the persist runs in the background (see `marathon_storage::writer`). Waits first if the
    /// previous persist is still running. `None` without `[checkpoint]`.
    pub fn checkpoint(&mut self) -> Result<Option<CheckpointRecord>> {
        let Some(ck) = self.ckpt.as_mut() else {
            return Ok(None);
        };
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
        if let Some(gpu) = self.gpu.as_mut() {
            // The device copies into the staging buffer on its copy stream; the persist waits
            // for the copy, training does not.
            let list: Vec<_> = pieces.iter().map(|(_, s, r)| (*s, r.clone())).collect();
            let mut failed = None;
            let report = writer.snapshot_fenced(
                self.step,
                run,
                pieces.iter().map(|(p, _, _)| p.clone()).collect(),
                |buf| match gpu.snapshot(buf, &list) {
                    Ok(fence) => Some(fence),
                    Err(e) => {
                        let reason = e.to_string();
                        failed = Some(e);
                        Some(Box::new(move || Err(reason)))
                    }
                },
            );
            if let Some(e) = failed {
                return Err(e);
            }
            *last_step = Some(self.step);
            return Ok(Some(CheckpointRecord::new(
                self.step,
                4 * staged as u64,
                &report,
            )));
        }
        let (params, m, v) = (&self.model.params, &self.opt.m, &self.opt.v);
        let report = writer.snapshot(
            self.step,
            run,
            pieces.iter().map(|(p, _, _)| p.clone()).collect(),
            |buf| {
                // Training waits for this copy, so it uses every core: each piece's
                // destination, copied in blocks in parallel.
                let mut jobs: Vec<(&mut [f32], &[f32])> = Vec::with_capacity(pieces.len());
                let mut rest = buf;
                for (_, source, r) in pieces.iter() {
                    let (dst, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
                    let src = match source {
                        Source::Params => &params[r.clone()],
                        Source::AdamM => &m[r.clone()],
                        Source::AdamV => &v[r.clone()],
                    };
                    jobs.push((dst, src));
                    rest = tail;
                }
                jobs.into_par_iter().for_each(|(dst, src)| {
                    dst.par_chunks_mut(COPY_BLOCK)
                        .zip(src.par_chunks(COPY_BLOCK))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                });
            },
        );
        *last_step = Some(self.step);
        Ok(Some(CheckpointRecord::new(
            self.step,
            4 * staged as u64,
            &report,
        )))
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
                eprintln!("note: {e}");
                Ok(None)
            }
            Some(done) => Ok(Some(done?)),
            None => Ok(None),
        }
    }

    /// Parameters and both Adam moments of this rank, for tools that look at the state. On a
    /// GPU these are the host's copies, current after [`Trainer::fetch_state`] (which
    /// [`Trainer::run`] calls at its end).
    pub fn state(&self) -> [&[f32]; 3] {
        [&self.model.params, &self.opt.m, &self.opt.v]
    }

    /// Copies the GPU's fp32 master weights and moments into the host's buffers; nothing to do
    /// on the CPU.
    pub fn fetch_state(&mut self) -> Result<()> {
        match &self.gpu {
            Some(g) => g.download_state(&mut self.model.params, &mut self.opt.m, &mut self.opt.v),
            None => Ok(()),
        }
    }

    /// The model on the GPU, when training on one.
    pub fn gpu(&mut self) -> Option<&mut GpuModel> {
        self.gpu.as_mut()
    }

    /// The GPU's name, when training on one.
    pub fn device_name(&self) -> Option<&str> {
        self.gpu.as_ref().map(|g| g.name())
    }

    fn host_only(&self, what: &str) -> Result<()> {
        match self.gpu {
            Some(_) => Err(RuntimeError::Device(format!(
                "{what} is not supported on the CUDA backend yet"
            ))),
            None => Ok(()),
        }
    }

    /// Positions the trainer after `step` completed steps, as a resumed run is: the data order
    /// and both schedules continue from there. Parameters and optimizer state (including
    /// `opt.step`) are the caller's to restore, from a checkpoint or a peer.
    pub fn seek(&mut self, step: u64) {
        self.step = step;
        self.consumed_samples = self.ramp.consumed_before(step);
    }

    /// The global batch, in sequences, of the next step.
    pub fn next_batch(&self) -> u64 {
        self.ramp.batch_at(self.consumed_samples)
    }

    /// The elastic generation this trainer runs in, which the samples log records.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Opens `train.samples_log` for appending on the rank that logs for its replica (the first
    /// stage's first tensor rank); closes it on the others.
    fn open_samples_log(&mut self) -> Result<()> {
        let [(tp_rank, _), (stage, _), _] = self.groups.coords();
        self.samples_log = None;
        if let (Some(p), true) = (&self.cfg.train.samples_log, tp_rank == 0 && stage == 0) {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| RuntimeError::io("open the samples log", p, e))?;
            self.samples_log = Some(SamplesLog {
                file,
                fed: Vec::new(),
            });
        }
        Ok(())
    }

    /// Runs one optimizer step. With `train.samples_log`, the samples this replica will feed
    /// are logged before any of its gradients leave it: a replica that dies after sending them
    /// has its samples in a step the others apply, and its line must already be there. A step
    /// that completes checks that what it fed is what it logged.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        if self.samples_log.is_none() {
            return self.step_once();
        }
        let planned = self.replica_samples();
        let [_, _, (replica, _)] = self.groups.coords();
        let line = serde_json::json!({
            "generation": self.generation,
            "step": self.step + 1,
            "replica": replica,
            "samples": &planned,
        });
        let log = self.samples_log.as_mut().expect("checked above");
        // One write per line: appends from several processes stay whole lines.
        if let Err(e) = log.file.write_all(format!("{line}\n").as_bytes()) {
            let path = self.cfg.train.samples_log.clone().unwrap_or_default();
            return Err(RuntimeError::io("append to the samples log", path, e));
        }
        let done = self.step_once();
        let log = self.samples_log.as_mut().expect("still open");
        let fed = std::mem::take(&mut log.fed);
        if done.is_ok() {
            assert_eq!(
                fed, planned,
                "step {}: the samples fed are not those logged",
                self.step
            );
        }
        done
    }

    /// The ids of the samples this replica feeds in the next step, in the order it feeds them.
    fn replica_samples(&mut self) -> Vec<u64> {
        let mb = self.cfg.batch.micro_batch;
        let micro_steps = self.next_batch() as usize / mb;
        let [_, _, (replica, replicas)] = self.groups.coords();
        let first = self.consumed_samples;
        chunk_range(micro_steps, replicas, replica)
            .flat_map(|m| m * mb..(m + 1) * mb)
            .map(|j| self.order.sample(first + j as u64) as u64)
            .collect()
    }

    fn step_once(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let batch = self.next_batch();
        let micro_steps = batch as usize / mb;
        let dloss = 1.0 / (batch as f32 * seq as f32);
        if self.gpu.is_some() {
            return self.gpu_step(started, batch, micro_steps, dloss);
        }
        self.model.zero_grad();
        // This replica's microbatches: a contiguous run, one more on the first replicas when
        // they do not divide evenly. Which replica runs a microbatch changes nothing else.
        let [_, _, (replica, replicas)] = self.groups.coords();
        // Without the distributed optimizer, the last microbatch's backward overlaps with the
        // all-reduce of the gradient buckets it has finished.
        let overlap = self.groups.dp.is_some() && !self.cfg.parallel.distributed_optimizer;
        let mine = chunk_range(micro_steps, replicas, replica);
        let mut times = StepTimes::default();
        let loss_sum = self.pipeline(mine.clone(), dloss, overlap, &mut times)?;
        crate::moments::reach(crate::moments::Moment::MidStep);
        let sync_started = Instant::now();
        if let (true, true, Some(group)) = (overlap, mine.is_empty(), &mut self.groups.dp) {
            // No backward to overlap with; reduce the same buckets in the same order as the
            // replicas that have one, since collectives pair up by order.
            for bucket in self.model.layout.backward_buckets() {
                group.all_reduce(&mut self.model.grads[bucket])?;
            }
        }
        let (loss_sum, shard, grad_norm) = self.sync_gradients(loss_sum, overlap)?;
        let loss = (loss_sum / micro_steps as f64) as f32;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            // Refuse the update: the parameters stay those of the last good step.
            return Err(RuntimeError::Diverged {
                step: self.step + 1,
                loss,
                grad_norm,
            });
        }
        let grads = &mut self.model.grads[shard.clone()];
        clip_grads(grads, grad_norm, self.cfg.optim.grad_clip);
        let tokens_consumed = (self.consumed_samples + batch) * seq as u64;
        let lr = self.cfg.optim.lr.lr_at(tokens_consumed);
        self.opt.update(&mut self.model.params[shard], grads, lr);
        if let (Some(g), true) = (&mut self.groups.dp, self.cfg.parallel.distributed_optimizer) {
            g.all_gather(&mut self.model.params)?;
        }
        if self.groups.dp.is_some() || self.groups.pp.is_some() || self.groups.tp.is_some() {
            times.comm_wait += sync_started.elapsed();
        }
        self.finish_step(started, batch, loss, lr, grad_norm, times)
    }

    /// Closes a step whose update is applied: advances the data order and the step count, and
    /// records the step (returned, and written to the metrics).
    fn finish_step(
        &mut self,
        started: Instant,
        batch: u64,
        loss: f32,
        lr: f64,
        grad_norm: f64,
        times: StepTimes,
    ) -> Result<StepRecord> {
        let seq = self.cfg.batch.seq_len as u64;
        self.consumed_samples += batch;
        self.step += 1;
        let step_ms = started.elapsed().as_secs_f64() * 1e3;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rec = StepRecord {
            step: self.step,
            loss,
            lr,
            grad_norm,
            batch,
            tokens_consumed: self.consumed_samples * seq,
            step_ms,
            tokens_per_s: (batch * seq) as f64 / (step_ms / 1e3),
            comm_wait_ms: ms(times.comm_wait),
            comm_overlapped_ms: ms(times.comm_overlapped),
            tp_comm_ms: ms(times.tp_comm),
            pipeline_wait_ms: ms(times.pipeline_wait),
        };
        self.write_metric(&serde_json::json!({ "kind": "step", "data": &rec }))?;
        Ok(rec)
    }

    /// [`Trainer::train_step`] on the GPU: every microbatch's forward and backward, the
    /// gradient norm and the update run on the device; the host reads back the loss and the
    /// norm.
    fn gpu_step(
        &mut self,
        started: Instant,
        batch: u64,
        micro_steps: usize,
        dloss: f32,
    ) -> Result<StepRecord> {
        let seq = self.cfg.batch.seq_len;
        let gpu = self.gpu.as_mut().expect("a GPU step has a GPU");
        gpu.zero_grad()?;
        for m in 0..micro_steps {
            self.load_microbatch(m);
            let gpu = self.gpu.as_mut().expect("a GPU step has a GPU");
            gpu.forward(&self.inputs, &self.targets, dloss)?;
            gpu.backward()?;
        }
        let gpu = self.gpu.as_mut().expect("a GPU step has a GPU");
        let loss = (gpu.loss_sum()? / (batch as f64 * seq as f64)) as f32;
        let grad_norm = gpu.grad_norm_sq()?.sqrt();
        if !(loss.is_finite() && grad_norm.is_finite()) {
            return Err(RuntimeError::Diverged {
                step: self.step + 1,
                loss,
                grad_norm,
            });
        }
        let tokens_consumed = (self.consumed_samples + batch) * seq as u64;
        let lr = self.cfg.optim.lr.lr_at(tokens_consumed);
        gpu.update(&self.cfg.optim.adamw(), lr, self.cfg.optim.grad_clip)?;
        self.opt.step += 1;
        self.finish_step(started, batch, loss, lr, grad_norm, StepTimes::default())
    }

    /// Fills the input and target buffers with microbatch `m` of the current step.
    fn load_microbatch(&mut self, m: usize) {
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let first = self.consumed_samples + (m * mb) as u64;
        for j in 0..mb {
            let k = self.order.sample(first + j as u64);
            if let Some(log) = self.samples_log.as_mut() {
                log.fed.push(k as u64);
            }
            let r = j * seq..(j + 1) * seq;
            self.train
                .sample(k, &mut self.inputs[r.clone()], &mut self.targets[r]);
        }
    }

    /// Runs this replica's microbatches `mine` through this stage in Megatron's 1F1B order:
    /// warm-up forwards (one per later stage), then one forward and one backward at a time,
    /// then the remaining backwards. Neighbouring stages exchange activations and gradients,
    /// pairing a send with the matching receive where both sides send at once. Returns the
    /// sum of the microbatches' mean losses on the last stage (zero on the others).
    fn pipeline(
        &mut self,
        mine: std::ops::Range<usize>,
        dloss: f32,
        overlap: bool,
        times: &mut StepTimes,
    ) -> Result<f64> {
        let [_, (stage, stages), _] = self.groups.coords();
        let (first, last) = (stage == 0, stage + 1 == stages);
        let count = mine.len();
        let warmup = (stages - stage - 1).min(count);
        let mut loss_sum = 0.0f64;
        let (mut next_fwd, mut next_bwd) = (0, 0);
        // Each call runs the next forward (or backward) of this stage and does its sends.
        for i in 0..count + count {
            // The op order of 1F1B: `warmup` forwards, then alternate, then backwards.
            let forward = if i < warmup {
                true
            } else if next_fwd < count {
                (i - warmup) % 2 == 0
            } else {
                false
            };
            if forward {
                let m = next_fwd;
                next_fwd += 1;
                self.load_microbatch(mine.start + m);
                if !first && m <= warmup {
                    // Warm-up forwards, and the first steady one, receive on their own; the
                    // later ones arrived with the previous backward's send.
                    let act_in = &mut self.act_in;
                    pipe(&mut self.groups.pp, times, |pp| pp.recv(act_in, stage - 1))?;
                }
                let slot = m % self.model.slots();
                let mut tp = TensorGroup {
                    group: self.groups.tp.as_mut(),
                    busy: Duration::ZERO,
                };
                let input = (!first).then_some(&self.act_in[..]);
                let loss =
                    self.model
                        .forward_stage(slot, &self.inputs, &self.targets, input, &mut tp)?;
                times.tp_comm += tp.busy;
                loss_sum += loss.map_or(0.0, |l| l as f64);
                if !last {
                    let out = self.model.stage_output(slot);
                    let grad_in = &mut self.grad_in;
                    if m < warmup {
                        pipe(&mut self.groups.pp, times, |pp| pp.send(out, stage + 1))?;
                    } else {
                        // Steady state: the next stage sends this stage a gradient while
                        // this stage sends it an activation.
                        pipe(&mut self.groups.pp, times, |pp| {
                            pp.send_recv(out, stage + 1, grad_in, stage + 1)
                        })?;
                    }
                }
            } else {
                let m = next_bwd;
                next_bwd += 1;
                if !last && m + warmup >= count {
                    // Cool-down backwards receive on their own.
                    let grad_in = &mut self.grad_in;
                    pipe(&mut self.groups.pp, times, |pp| pp.recv(grad_in, stage + 1))?;
                }
                let slot = m % self.model.slots();
                let final_backward = m + 1 == count;
                self.backward(slot, dloss, overlap && final_backward, times)?;
                if !first {
                    let (grad, act_in) = (self.model.input_grad(), &mut self.act_in);
                    if next_fwd < count {
                        // Steady state: the previous stage sends the next activation meanwhile.
                        pipe(&mut self.groups.pp, times, |pp| {
                            pp.send_recv(grad, stage - 1, act_in, stage - 1)
                        })?;
                    } else {
                        pipe(&mut self.groups.pp, times, |pp| pp.send(grad, stage - 1))?;
                    }
                }
            }
        }
        Ok(loss_sum)
    }

    /// Backward of the microbatch in `slot`. With `overlap`, each finished gradient bucket is
    /// all-reduced across replicas on a communication thread while backward goes on with the
    /// layers below; the step then waits only for the last buckets.
    fn backward(
        &mut self,
        slot: usize,
        dloss: f32,
        overlap: bool,
        times: &mut StepTimes,
    ) -> Result<()> {
        let Trainer {
            model,
            groups,
            grad_in,
            ..
        } = self;
        let output_grad = groups
            .pp
            .as_ref()
            .and_then(|pp| (pp.rank() + 1 < pp.size()).then_some(&grad_in[..]));
        let mut tp = TensorGroup {
            group: groups.tp.as_mut(),
            busy: Duration::ZERO,
        };
        let mut grads = std::mem::take(&mut model.grads);
        let result = match (overlap, groups.dp.as_mut()) {
            (true, Some(dp)) => std::thread::scope(|s| {
                let (buckets, ready) = std::sync::mpsc::channel::<&mut [f32]>();
                let comm = s.spawn(move || -> Result<Duration> {
                    let mut busy = Duration::ZERO;
                    for bucket in ready {
                        let t0 = Instant::now();
                        dp.all_reduce(bucket)?;
                        busy += t0.elapsed();
                    }
                    Ok(busy)
                });
                let done =
                    model.backward_stage(slot, &mut grads, dloss, output_grad, &mut tp, |b| {
                        // After a failed all-reduce the receiver is gone; the error comes from join.
                        let _ = buckets.send(b);
                    });
                drop(buckets);
                let waiting = Instant::now();
                let busy = comm
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                done?;
                times.comm_overlapped += busy?;
                times.comm_wait += waiting.elapsed();
                Ok(())
            }),
            _ => model.backward_stage(slot, &mut grads, dloss, output_grad, &mut tp, |_| {}),
        };
        model.grads = grads;
        times.tp_comm += tp.busy;
        result
    }

    /// Sums the gradients over replicas and the tied embedding's two copies, and the loss and
    /// squared gradient norm over every rank. Returns the summed loss, the range of the gradient
    /// buffer this rank updates (all of it, or its shard with the distributed optimizer), and
    /// the global gradient norm.
    /// `reduced` says the gradients were already all-reduced, overlapped with backward.
    fn sync_gradients(
        &mut self,
        loss_sum: f64,
        reduced: bool,
    ) -> Result<(f64, std::ops::Range<usize>, f64)> {
        let zero = self.cfg.parallel.distributed_optimizer && self.groups.dp.is_some();
        let Trainer {
            model,
            groups,
            stop_signal,
            stop_agreed,
            ..
        } = self;
        let grads = &mut model.grads;
        // The first and last stages each hold part of the tied embedding's gradient (input and
        // head); both need the sum. Summing before or after the replicas gives the same total.
        let mut tie = |grads: &mut [f32]| -> Result<()> {
            if let (Some(emb), Some(wte)) = (groups.emb.as_mut(), model.layout.get("wte")) {
                emb.all_reduce(&mut grads[wte.range()])?;
            }
            Ok(())
        };
        let shard = match groups.dp.as_mut() {
            Some(dp) if zero => {
                tie(grads)?;
                dp.reduce_scatter(grads)?
            }
            dp => {
                if let (Some(dp), false) = (dp, reduced) {
                    dp.all_reduce(grads)?;
                }
                tie(grads)?;
                0..grads.len()
            }
        };
        // Each element of the model is counted by one rank of its model-parallel group, and
        // with the distributed optimizer by the one replica whose shard holds it.
        let own_sq: f64 = model
            .layout
            .unique_ranges()
            .iter()
            .map(|r| r.start.max(shard.start)..r.end.min(shard.end))
            .filter(|r| !r.is_empty())
            .map(|r| sum_squares(&grads[r]))
            .sum();
        // The loss is known to the last stage's ranks; one of them counts it.
        let [(tp_rank, _), (stage, stages), _] = groups.coords();
        let loss_part = if tp_rank == 0 && stage + 1 == stages {
            loss_sum
        } else {
            0.0
        };
        // Each f64 travels as a high and a low f32, which keeps about 48 bits of the sum.
        let split = |x: f64| [x as f32, (x - (x as f32) as f64) as f32];
        let join = |hi: f32, lo: f32| hi as f64 + lo as f64;
        let ([l_hi, l_lo], [n_hi, n_lo]) = (split(loss_part), split(own_sq));
        let stop = stop_signal
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst));
        let mut totals = [l_hi, l_lo, n_hi, n_lo, f32::from(stop)];
        for g in [groups.tp.as_mut(), groups.pp.as_mut()]
            .into_iter()
            .flatten()
        {
            g.all_reduce(&mut totals)?;
        }
        if let Some(dp) = groups.dp.as_mut() {
            // Replicas hold the same norm unless each holds a shard of the gradient.
            let norm = [totals[2], totals[3]];
            if !zero {
                totals[2..4].fill(0.0);
            }
            dp.all_reduce(&mut totals)?;
            if !zero {
                totals[2..4].copy_from_slice(&norm);
            }
        }
        *stop_agreed = totals[4] > 0.0;
        let norm_sq = join(totals[2], totals[3]);
        Ok((join(totals[0], totals[1]), shard, norm_sq.sqrt()))
    }

    /// Mean loss over the first `train.eval_batches` microbatches of the validation file, in
    /// file order, run through the pipeline's stages. Every rank returns the same value. Leaves
    /// the gradients untouched.
    pub fn evaluate(&mut self) -> Result<Option<f32>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let batches = self
            .cfg
            .train
            .eval_batches
            .min(val.samples(seq) / mb)
            .max(1);
        let [_, (stage, stages), _] = self.groups.coords();
        let mut sum = 0.0f64;
        for b in 0..batches {
            for j in 0..mb {
                let r = j * seq..(j + 1) * seq;
                val.sample(
                    b * mb + j,
                    &mut self.inputs[r.clone()],
                    &mut self.targets[r],
                );
            }
            if let Some(gpu) = self.gpu.as_mut() {
                gpu.reset_losses()?;
                gpu.forward(&self.inputs, &self.targets, 0.0)?;
                sum += gpu.loss_sum()? / (mb * seq) as f64;
                continue;
            }
            if stage > 0 {
                let pp = self
                    .groups
                    .pp
                    .as_mut()
                    .expect("stages have a pipeline group");
                pp.recv(&mut self.act_in, stage - 1)?;
            }
            let mut tp = TensorGroup {
                group: self.groups.tp.as_mut(),
                busy: Duration::ZERO,
            };
            let input = (stage > 0).then_some(&self.act_in[..]);
            let loss = self
                .model
                .forward_stage(0, &self.inputs, &self.targets, input, &mut tp)?;
            sum += loss.map_or(0.0, |l| l as f64);
            if stage + 1 < stages {
                let pp = self
                    .groups
                    .pp
                    .as_mut()
                    .expect("stages have a pipeline group");
                pp.send(self.model.stage_output(0), stage + 1)?;
            }
        }
        if let Some(pp) = self.groups.pp.as_mut() {
            // The last stage has the loss; the others learn it (as a high and a low part).
            let part = if stage + 1 == stages { sum } else { 0.0 };
            let mut v = [part as f32, (part - (part as f32) as f64) as f32];
            pp.all_reduce(&mut v)?;
            sum = v[0] as f64 + v[1] as f64;
        }
        let loss = (sum / batches as f64) as f32;
        self.write_metric(
            &serde_json::json!({ "kind": "eval", "data": { "step": self.step, "val_loss": loss } }),
        )?;
        Ok(Some(loss))
    }

    /// Runs the configured number of steps with periodic validation.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Summary> {
        let started = Instant::now();
        let mut goodput = Goodput::default();
        let mut last = f32::NAN;
        while self.step < self.cfg.train.steps {
            last = self.advance(observer, &mut goodput)?.loss;
        }
        let summary = self.conclude(started, goodput, last)?;
        self.write_record("goodput", &summary.goodput)?;
        Ok(summary)
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
        let rec = self.train_step()?;
        goodput.training_s += rec.step_ms / 1e3;
        observer.on_step(&rec);
        let every = self.cfg.train.eval_every_steps;
        if every > 0 && (self.step % every == 0 || self.step == self.cfg.train.steps) {
            let t0 = Instant::now();
            let val = self.evaluate()?;
            goodput.eval_s += t0.elapsed().as_secs_f64();
            if let Some(v) = val {
                observer.on_eval(self.step, v);
                self.last_val_loss = Some(v);
            }
        }
        let ckpt_every = self.ckpt.as_ref().map_or(0, |c| c.every_steps);
        let last_step = self.step == self.cfg.train.steps;
        if (ckpt_every > 0 && self.step % ckpt_every == 0) || last_step {
            if let Some(ck) = self.checkpoint()? {
                goodput.checkpoint_stall_s += ck.stall_ms / 1e3;
                observer.on_checkpoint(&ck);
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
    fn write_metric(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            let path = self.cfg.train.metrics.as_deref().unwrap_or(Path::new(""));
            writeln!(m, "{v}")
                .and_then(|_| m.flush())
                .map_err(|e| RuntimeError::io("write metrics", path, e))?;
        }
        Ok(())
    }
}

/// Runs one transfer between neighbouring pipeline stages, adding its time to the step's
/// pipeline wait.
fn pipe(
    pp: &mut Option<ProcessGroup>,
    times: &mut StepTimes,
    op: impl FnOnce(&mut ProcessGroup) -> Result<()>,
) -> Result<()> {
    let pp = pp.as_mut().expect("stages have a pipeline group");
    let t0 = Instant::now();
    let done = op(pp);
    times.pipeline_wait += t0.elapsed();
    done
}

/// Everything a worker checks before it trains that needs no peers: the layout is one this
/// build runs, the data files open and fit the model and batch, and the buffers fit in memory.
/// A launcher runs it before starting any worker. Returns the opened train and val files.
pub fn preflight(cfg: &TrainConfig) -> Result<(TokenFile, Option<TokenFile>)> {
    check_memory(cfg)?;
    let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
    let train = TokenFile::open(&cfg.data.train, cfg.model.vocab_size)?;
    check_samples(&train, seq, mb, "data.train")?;
    if train.samples(seq) > u32::MAX as usize {
        return Err(RuntimeError::data(
            train.path(),
            format!(
                "holds {} samples of {seq} tokens; the sampler indexes at most 2^32 per epoch, so \
                 raise batch.seq_len or split the corpus",
                train.samples(seq)
            ),
        ));
    }
    let val = match &cfg.data.val {
        Some(p) => {
            let v = TokenFile::open(p, cfg.model.vocab_size)?;
            check_samples(&v, seq, mb, "data.val")?;
            Some(v)
        }
        None => None,
    };
    Ok((train, val))
}

fn check_samples(f: &TokenFile, seq: usize, mb: usize, field: &str) -> Result<()> {
    if f.samples(seq) < mb {
        return Err(RuntimeError::data(
            f.path(),
            format!(
                "({field}) holds {} tokens, fewer than one microbatch of {mb} sequences of {seq} \
                 tokens needs ({}); use more text or a smaller batch.micro_batch or batch.seq_len",
                f.len(),
                mb * seq + 1
            ),
        ));
    }
    Ok(())
}

/// Refuses a model and microbatch whose buffers would not fit in this machine's memory, before
/// allocating anything, naming the fields to change. Every rank of the layout runs on this
/// machine, so the need is the sum over all of them.
fn check_memory(cfg: &TrainConfig) -> Result<()> {
    let p = cfg.parallel;
    // On a GPU the host holds the state only; the device's memory is checked when it opens.
    let (mb, seq) = match cfg.train.device {
        Device::Cpu => (cfg.batch.micro_batch, cfg.batch.seq_len),
        Device::Cuda => (1, 1),
    };
    let per_replica: f64 = (0..p.pp)
        .map(|stage| {
            let shard = Shard {
                tp: p.tp,
                tp_rank: 0,
                pp: p.pp,
                stage,
            };
            p.tp as f64 * Gpt::<f32>::shard_memory_bytes(&cfg.model, shard, mb, seq, p.pp - stage)
        })
        .sum();
    let need = p.dp as f64 * per_replica;
    let Some(have) = physical_memory_bytes() else {
        return Ok(());
    };
    if need > have as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(RuntimeError::Config {
            path: cfg.source.clone(),
            field: "batch.micro_batch".into(),
            reason: format!(
                "the {} ranks of this layout need {:.1} GiB for the model's buffers with \
                 microbatches of {} x {} tokens, more than this machine's {:.1} GiB; lower \
                 batch.micro_batch or batch.seq_len, choose a smaller [model], or run the layout \
                 across machines",
                p.world_size(),
                gib(need),
                cfg.batch.micro_batch,
                cfg.batch.seq_len,
                gib(have as f64)
            ),
        });
    }
    Ok(())
}

/// Total physical memory, from /proc/meminfo where there is one.
fn physical_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn open_metrics(path: &Path, resumed: bool) -> Result<BufWriter<File>> {
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

/// A rank's checkpointing in its layout: its writer (Megatron's rank order; rank 0 commits)
/// and the pieces it stores. `None` without `[checkpoint]`.
fn checkpointing(
    cfg: &TrainConfig,
    model: &Gpt<f32>,
    opt: &AdamW<f32>,
    groups: &Groups,
) -> Result<Option<Checkpointing>> {
    let Some(c) = &cfg.checkpoint else {
        return Ok(None);
    };
    let [(tp_rank, tp), (stage, pp), (replica, replicas)] = groups.coords();
    let store = checkpoint::open_store(c)?;
    let rank = (stage * replicas + replica) * tp + tp_rank;
    let writer = CheckpointWriter::new(
        store.clone(),
        rank,
        tp * pp * replicas,
        checkpoint::writer_options(c),
    )?;
    let pieces = checkpoint::plan_pieces(
        &model.layout,
        &opt.shard,
        replica,
        replicas,
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
