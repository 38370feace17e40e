//! The trainer: one rank of a job in any tensor x pipeline x data layout, on the CPU or a GPU.
//!
//! One step takes the global batch the schedule gives, runs this replica's share of it as
//! microbatches through this rank's stage in a 1F1B schedule with every position's loss weighted
//! by 1 / (tokens in the global batch), sums the gradients over replicas, clips the global
//! gradient norm, and applies AdamW at the learning rate of the tokens consumed. Everything here
//! is written once over [`crate::engine::Engine`], which the CPU model and the CUDA model both
//! implement. A reader finds each responsibility in one file:
//!
//! - `mod.rs`: the trainer's state and how it is built;
//! - [`preflight`]: the checks that need no peers, run before any worker starts;
//! - `step.rs`: one step, its pipeline schedule and the data it feeds; validation;
//! - `sync.rs`: gradient synchronisation and the step's closing sums;
//! - `recovery.rs`: a new generation's groups, reloads, transfers between replicas;
//! - `zero.rs`: the distributed optimizer's chunks, their mirrors, and their re-partitioning;
//! - `checkpoints.rs`: resuming, snapshots and their persists;
//! - `run.rs`: the run loop, metrics and goodput.

mod checkpoints;
mod preflight;
mod recovery;
mod run;
mod step;
mod sync;
mod zero;

pub use preflight::preflight;
pub use run::Observer;

use std::fs::File;
use std::io::BufWriter;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use marathon_model::{AdamW, BatchRamp, Gpt, Place, Recompute, Shard};

use crate::checkpoint::Checkpointing;
use crate::comm::{chunk_range, ProcessGroup};
use crate::config::TrainConfig;
use crate::data::{DataOrder, TokenFile};
use crate::device::Device;
use crate::engine::cpu::CpuEngine;
use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::groups::Groups;
use crate::metrics::{JobMetrics, RankMetrics};
use crate::records::StepRecord;
use crate::transport::{Transport, TransportChoice};

use checkpoints::checkpointing;
use run::open_metrics;
use step::SamplesLog;

/// One rank of a training job: its shard of the model and optimizer state, its data, its
/// process groups and its checkpoint writer.
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
    /// Live metrics for Prometheus, when the process serves them (see [`Trainer::set_live_metrics`]).
    live: Option<Arc<RankMetrics>>,
    live_job: Option<Arc<JobMetrics>>,
    groups: Groups,
    ckpt: Option<Checkpointing>,
    resumed_from: Option<u64>,
    /// Whether this rank holds the job's state: false for a rank joining a running job until
    /// a replica hands it over (see [`Trainer::reconcile`]).
    holds_state: bool,
    /// Where the shard computes. On a GPU the host model and optimizer mirror the device's
    /// state, current after [`Trainer::fetch_state`].
    engine: Box<dyn Engine>,
    /// Raised by whoever wants the job to stop at the next step boundary (an elastic worker
    /// told of a new generation); see [`Trainer::set_stop_signal`].
    stop_signal: Option<Arc<AtomicBool>>,
    /// Whether any rank raised its stop signal before the last step's closing sum.
    stop_agreed: bool,
    /// Raised by whoever wants the job to end at the next step boundary (an elastic worker
    /// told that an operator stopped the job); see [`Trainer::set_finish_signal`].
    finish_signal: Option<Arc<AtomicBool>>,
    finish_agreed: bool,
    /// The last validation loss.
    last_val_loss: Option<f32>,
    /// The elastic generation this trainer runs in (0 outside an elastic job).
    generation: u64,
    /// Where this rank appends the samples its replica feeds (`train.samples_log`), on the
    /// first stage's first tensor rank of each replica.
    samples_log: Option<SamplesLog>,
    /// What this trainer's checkpoint persists share with no other persist of the same step
    /// (see [`Trainer::set_checkpoint_epoch`]).
    checkpoint_epoch: Option<u64>,
    /// The ranges of the gradients a rank counts in the norm, refilled each step without
    /// allocating.
    norm_ranges: Vec<std::ops::Range<usize>>,
    /// The tensor-parallel replicated ranges of the layout (see `sync_gradients`).
    replicated: Vec<std::ops::Range<usize>>,
    /// Whether this rank mirrors its ring successor's optimizer chunk (see `zero.rs`).
    mirrored: bool,
    /// The mirrored chunk's moments, and whether they are current.
    mirror: Option<AdamW<f32>>,
    mirror_valid: bool,
    /// Moments set aside at a change of groups, not yet placed in this rank's new chunks.
    held: Vec<AdamW<f32>>,
    /// With the distributed optimizer: the step (and samples consumed at it) whose update this
    /// rank applied to its chunks, while that step's parameter all-gather has not completed.
    pending: Option<(u64, u64)>,
    /// The record of the newest step whose update this rank applied, complete or pending:
    /// what a new generation's metrics writer logs for a step the old writer did not.
    last_record: Option<StepRecord>,
    /// On the rank that writes the metrics: the step of the last step record it wrote.
    logged_step: Option<u64>,
    /// The generation in which this rank's state was loaded (from storage, or initialised):
    /// replicas that missed a later reload hold an older history, which reconcile ignores.
    lineage: u64,
    /// The closing sums' buffer, reused every step.
    closing: Vec<f32>,
    /// With [`Trainer::gather_pace`]: every rank's compute time per microbatch in the last
    /// step, by global rank (not finite for a rank that ran no microbatch).
    pace: Option<Vec<f32>>,
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
        let place = groups.place();
        let Place {
            tp,
            pp,
            dp: replicas,
            tp_rank,
            stage,
            replica,
        } = place;
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
        let (train, val) = preflight(&cfg)?;
        let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
        let order = DataOrder::new(cfg.data.seed, train.samples(seq));
        let shard = place.shard();
        // A 1F1B stage keeps at most one microbatch per later stage in flight, plus its own.
        let slots = pp - stage;
        let on_gpu = cfg.train.device == Device::Cuda;
        // On a GPU the host model only holds the state: its activations are those of one token.
        let (hb, hs, host_slots) = if on_gpu { (1, 1, 1) } else { (mb, seq, slots) };
        let recompute = if on_gpu {
            Recompute::None
        } else {
            cfg.train.recompute
        };
        let mut model = Gpt::new_shard(cfg.model.clone(), shard, hb, hs, host_slots, recompute)
            .map_err(|e| cfg.error(e))?;
        model.init_params(cfg.train.seed, cfg.optim.init_std);
        let opt_shard = if layout.distributed_optimizer {
            chunk_range(model.layout.numel(), replicas, replica)
        } else {
            0..model.layout.numel()
        };
        let engine = open_engine(&cfg, &groups, shard, slots, &model.params, &opt_shard)?;
        let opt = AdamW::for_shard(cfg.optim.adamw(), &model.layout, opt_shard);
        let norm_ranges = Vec::with_capacity(model.layout.unique_ranges().len());
        let replicated = model.layout.tp_replicated_ranges();
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
            live: None,
            live_job: None,
            groups,
            ckpt,
            resumed_from: None,
            holds_state: resume,
            engine,
            stop_signal: None,
            stop_agreed: false,
            finish_signal: None,
            finish_agreed: false,
            last_val_loss: None,
            generation: 0,
            samples_log: None,
            checkpoint_epoch: None,
            norm_ranges,
            replicated,
            mirrored: false,
            mirror: None,
            mirror_valid: false,
            held: Vec::new(),
            pending: None,
            last_record: None,
            logged_step: None,
            lineage: 0,
            closing: Vec::with_capacity(5),
            pace: None,
        })
        .and_then(|mut t| {
            if resume {
                t.resumed_from = t.resume()?;
            }
            if t.resumed_from.is_some() {
                t.engine.push_state(&t.model, &t.opt)?;
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
            t.choose_transports()?;
            Ok(t)
        })
    }

    /// Gathers every rank's compute time per microbatch in each step's closing sums (one more
    /// float per rank), for [`Trainer::pace`]: what an elastic job finds stragglers with. On
    /// from now on, for this and later generations.
    pub fn gather_pace(&mut self) {
        self.resize_pace(true);
    }

    fn resize_pace(&mut self, on: bool) {
        if on || self.pace.is_some() {
            let world = self.groups.place().layout().world_size();
            self.pace = Some(vec![f32::NAN; world]);
        }
    }

    /// Every rank's compute time per microbatch in the last step, by global rank, when
    /// gathered ([`Trainer::gather_pace`]).
    pub fn pace(&self) -> Option<&[f32]> {
        self.pace.as_deref()
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

    /// Sets the flag any holder may raise to end the job at the next step boundary, as
    /// [`Trainer::set_stop_signal`]'s flag stops it, but without cancelling a checkpoint's
    /// commit: the job ends on a checkpoint of its last step.
    pub fn set_finish_signal(&mut self, signal: Arc<AtomicBool>) {
        self.finish_signal = Some(signal);
    }

    /// Whether some rank raised its finish signal before the closing sum of the last step.
    pub fn finish_agreed(&self) -> bool {
        self.finish_agreed
    }

    /// Sets the epoch of this trainer's checkpoint persists: the same on every rank, and
    /// different from any other persist of the same steps under the root (an elastic job's
    /// generation, which its commit record checks; a launch's token). Each rank's index is
    /// named by it, so a committer merges only its own persist's.
    pub fn set_checkpoint_epoch(&mut self, epoch: u64) {
        if let Some(ck) = self.ckpt.as_mut() {
            ck.writer.set_epoch(epoch);
        }
        self.checkpoint_epoch = Some(epoch);
    }

    /// The step this run resumed from, if it did.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
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
        self.engine.fetch_state(&mut self.model, &mut self.opt)
    }

    /// Chooses and logs how each group moves device memory, from what its members report
    /// ([`crate::transport`]). CPU ranks need no choice: their groups are the TCP ones.
    fn choose_transports(&mut self) -> Result<()> {
        if self.cfg.train.device == Device::Cpu {
            return Ok(());
        }
        let me = self.engine.device_id();
        let nccl = nccl_present();
        let chosen =
            crate::transport::negotiate(&mut self.groups, &me, nccl, self.cfg.train.transport)?;
        if !chosen.iter().any(|(_, t)| *t == Transport::Nccl) {
            return Ok(());
        }
        if self.cfg.train.transport == TransportChoice::Nccl {
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "train.transport".into(),
                reason: "is \"nccl\", but the trainer moves device memory host-staged in this \
                         release; use \"auto\" or \"host-staged\""
                    .into(),
            });
        }
        if self.groups.rank() == 0 {
            tracing::info!(
                "NCCL could serve groups of this job, but the trainer moves device memory \
                 host-staged in this release"
            );
        }
        Ok(())
    }

    /// The CUDA engine, when training on a GPU.
    #[cfg(feature = "cuda")]
    pub fn gpu(&mut self) -> Option<&mut crate::engine::cuda::CudaEngine> {
        self.engine.cuda()
    }

    /// The GPU's name, when training on one.
    pub fn device_name(&self) -> Option<&str> {
        self.engine.device_name()
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
    /// A trainer that holds state and runs its first generation loaded that state in it.
    pub fn set_generation(&mut self, generation: u64) {
        if self.generation == 0 && self.holds_state {
            self.lineage = generation;
        }
        self.generation = generation;
        self.set_checkpoint_epoch(generation);
    }
}

/// Set by an elastic agent for a GPU worker: how many of the node's workers share its device.
#[cfg(feature = "cuda")]
const SHARING_ENV: &str = "MARATHON_DEVICE_SHARING";

/// The engine `train.device` asks for, for the shard this rank holds. A GPU rank opens the
/// device its place gives on this machine (ranks share them round-robin).
fn open_engine(
    cfg: &TrainConfig,
    groups: &Groups,
    shard: Shard,
    slots: usize,
    master: &[f32],
    opt_shard: &std::ops::Range<usize>,
) -> Result<Box<dyn Engine>> {
    match cfg.train.device {
        Device::Cpu => Ok(Box::new(CpuEngine::default())),
        Device::Cuda => open_cuda(cfg, groups, shard, slots, master, opt_shard),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(
    cfg: &TrainConfig,
    groups: &Groups,
    shard: Shard,
    slots: usize,
    master: &[f32],
    opt_shard: &std::ops::Range<usize>,
) -> Result<Box<dyn Engine>> {
    let count = marathon_model::cuda::probe().map_err(|e| RuntimeError::Device(e.to_string()))?;
    let ordinal = groups.rank() % count.max(1);
    // An elastic agent pins each worker to a device and says how many of its workers share it.
    let sharing = std::env::var(SHARING_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| cfg.parallel.world_size().div_ceil(count.max(1)));
    let engine = crate::engine::cuda::CudaEngine::open(
        cfg,
        ordinal,
        sharing,
        shard,
        slots,
        master,
        opt_shard.clone(),
    )?;
    Ok(Box::new(engine))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _cfg: &TrainConfig,
    _groups: &Groups,
    _shard: Shard,
    _slots: usize,
    _master: &[f32],
    _opt_shard: &std::ops::Range<usize>,
) -> Result<Box<dyn Engine>> {
    Err(RuntimeError::Device(
        "this marathon was built without CUDA; build it with `cargo build --release --features \
         cuda` (no CUDA installation is needed to build), or train with --device cpu"
            .into(),
    ))
}

/// Whether NCCL's library can be loaded here.
#[cfg(feature = "cuda")]
fn nccl_present() -> bool {
    marathon_model::cuda::require(&[marathon_model::cuda::Library::Nccl]).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn nccl_present() -> bool {
    false
}
