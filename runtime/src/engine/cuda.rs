//! The CUDA engine (feature `cuda`): the rank's shard on a GPU ([`CudaGpt`]), bf16 weights and
//! activations with fp32 master weights, gradients and moments.
//!
//! Its collectives are host-staged: the operand is copied from the device into page-locked
//! host memory, the TCP group runs the operation, and the result goes back to the device.
//! That is the transport for ranks that share a GPU (NCCL refuses two ranks of one
//! communicator on one device) and where NCCL is absent. Pipeline activations and their
//! gradients travel the same way, through the host views [`Engine::stage_output`] and
//! [`Engine::input_grad`] return.
//!
//! A checkpoint's snapshot copies the device's fp32 master weights and moments straight into
//! the writer's page-locked staging buffer on a side stream; the next step's forward and
//! backward run meanwhile, and only its optimizer update waits for the copy.

use std::ops::Range;
use std::time::Instant;

use half::bf16 as Bf16;
use marathon_model::cuda::{
    CudaGpt, DeviceCollective, Gpu, Pinned, PinnedBuffer, Slice, StageError, State,
};
use marathon_model::{AdamW, AdamWConfig, Gpt, Shard};
use marathon_storage::writer::SnapshotReport;
use marathon_storage::CheckpointWriter;
use rayon::prelude::*;

use super::{Engine, Piece};
use crate::checkpoint::Source;
use crate::comm::ProcessGroup;
use crate::config::TrainConfig;
use crate::error::{Result, RuntimeError};
use crate::groups::TensorGroup;
use crate::records::StepTimes;

/// Elements per block of the host's bf16 conversions, which run on every core.
const CONVERT_BLOCK: usize = 1 << 16;

fn device_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Device(e.to_string())
}

fn stage_error(e: StageError<RuntimeError>) -> RuntimeError {
    match e {
        StageError::Cuda(e) => device_error(e),
        StageError::Comm(e) => e,
    }
}

/// Page-locked host buffers the host-staged collectives and the pipeline's transfers pass
/// through, allocated once at their largest.
#[derive(Debug)]
struct Staging {
    f32s: PinnedBuffer<f32>,
    bf16s: PinnedBuffer<Bf16>,
}

impl Staging {
    /// Copies `buf` to the host, runs `op` on the host copy, and copies the result back.
    fn round_trip(
        &mut self,
        gpu: &Gpu,
        buf: Slice<f32>,
        op: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let host = &mut self.f32s.as_mut_slice()[..buf.len()];
        gpu.download_slice(buf, host).map_err(device_error)?;
        op(host)?;
        gpu.upload_slice(buf, host).map_err(device_error)
    }

    /// As [`Staging::round_trip`] for bf16 values, which the host widens to fp32 for `op`.
    fn round_trip_bf16(
        &mut self,
        gpu: &Gpu,
        buf: Slice<Bf16>,
        op: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let n = buf.len();
        let half = &mut self.bf16s.as_mut_slice()[..n];
        gpu.download_slice(buf, half).map_err(device_error)?;
        let wide = &mut self.f32s.as_mut_slice()[..n];
        wide.par_chunks_mut(CONVERT_BLOCK)
            .zip(half.par_chunks(CONVERT_BLOCK))
            .for_each(|(w, h)| w.iter_mut().zip(h).for_each(|(w, h)| *w = h.to_f32()));
        op(wide)?;
        half.par_chunks_mut(CONVERT_BLOCK)
            .zip(wide.par_chunks(CONVERT_BLOCK))
            .for_each(|(h, w)| {
                h.iter_mut()
                    .zip(w)
                    .for_each(|(h, w)| *h = Bf16::from_f32(*w))
            });
        gpu.upload_slice(buf, half).map_err(device_error)
    }
}

/// The tensor-parallel group on device memory, host-staged.
struct StagedTp<'a, 'g> {
    tp: &'a mut TensorGroup<'g>,
    staging: &'a mut Staging,
}

impl DeviceCollective for StagedTp<'_, '_> {
    type Error = RuntimeError;

    fn size(&self) -> usize {
        marathon_model::Collective::<f32>::size(self.tp)
    }

    fn rank(&self) -> usize {
        marathon_model::Collective::<f32>::rank(self.tp)
    }

    fn all_reduce(&mut self, gpu: &Gpu, buf: Slice<f32>) -> Result<()> {
        if self.tp.group.is_none() {
            return Ok(());
        }
        let tp = &mut *self.tp;
        self.staging
            .round_trip(gpu, buf, |h| marathon_model::Collective::all_reduce(tp, h))
    }

    fn all_reduce_bf16(&mut self, gpu: &Gpu, buf: Slice<Bf16>) -> Result<()> {
        if self.tp.group.is_none() {
            return Ok(());
        }
        let tp = &mut *self.tp;
        self.staging
            .round_trip_bf16(gpu, buf, |h| marathon_model::Collective::all_reduce(tp, h))
    }

    fn all_gather(&mut self, gpu: &Gpu, buf: Slice<f32>) -> Result<()> {
        if self.tp.group.is_none() {
            return Ok(());
        }
        let tp = &mut *self.tp;
        self.staging
            .round_trip(gpu, buf, |h| marathon_model::Collective::all_gather(tp, h))
    }
}

/// The rank's shard and its optimizer state on a GPU.
#[derive(Debug)]
pub struct CudaEngine {
    pub model: CudaGpt,
    adamw: AdamWConfig,
    staging: Staging,
    /// The host copies of the last stage output and input gradient the pipeline sends.
    out_host: Vec<f32>,
    /// The writer's staging buffer, page-locked on the first snapshot.
    pinned: Option<Pinned>,
    /// The device's UUID, which the groups' members compare.
    uuid: String,
}

impl CudaEngine {
    /// Opens GPU `ordinal`, which `sharing` ranks of this machine share, and builds `shard`
    /// on it from the host's fp32 `master` weights, with `slots` microbatches in flight and
    /// the optimizer over `opt_shard`.
    pub fn open(
        cfg: &TrainConfig,
        ordinal: usize,
        sharing: usize,
        shard: Shard,
        slots: usize,
        master: &[f32],
        opt_shard: Range<usize>,
    ) -> Result<Self> {
        let gpu = Gpu::new(ordinal).map_err(device_error)?;
        let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
        let opt_parts = master.len().div_ceil(opt_shard.len().max(1));
        let recompute = cfg.train.recompute;
        let need =
            CudaGpt::shard_memory_bytes(&cfg.model, shard, mb, seq, slots, opt_parts, recompute);
        let free = gpu.free_memory().map_err(device_error)? as f64;
        // Ranks sharing the device check before any of them allocates: each needs its share.
        if need * sharing as f64 > free {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return Err(RuntimeError::Config {
                path: cfg.source.clone(),
                field: "batch.micro_batch".into(),
                reason: format!(
                    "this rank's shard with microbatches of {mb} x {seq} tokens needs {:.1} GiB \
                     on GPU {ordinal}, which {sharing} ranks share and which has {:.1} GiB \
                     free; lower batch.micro_batch (and \
                     raise the microbatch count through batch.global_batch) or batch.seq_len, \
                     set train.recompute = \"selective\" or \"full\", or raise parallel.tp or \
                     parallel.pp",
                    gib(need),
                    gib(free)
                ),
            });
        }
        let hidden = mb * seq * cfg.model.n_embd;
        let tp_stats = shard.tp * 3 * mb * seq;
        let staging = Staging {
            f32s: PinnedBuffer::new(&gpu, master.len().max(hidden).max(tp_stats))
                .map_err(device_error)?,
            bf16s: PinnedBuffer::new(&gpu, hidden).map_err(device_error)?,
        };
        let model = CudaGpt::new_shard(
            gpu,
            cfg.model.clone(),
            shard,
            mb,
            seq,
            slots,
            master,
            opt_shard,
            recompute,
        )
        .map_err(device_error)?;
        let uuid = model.gpu.uuid().map_err(device_error)?;
        Ok(CudaEngine {
            uuid,
            model,
            adamw: cfg.optim.adamw(),
            staging,
            out_host: vec![0.0; hidden],
            pinned: None,
        })
    }

    /// Turns per-operation timing on or off ([`marathon_model::cuda::Gpu::set_profiling`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.model.gpu.set_profiling(on);
    }

    /// Milliseconds per operation since profiling was turned on, largest first.
    pub fn profile_report(&self) -> Result<Vec<(String, f64, usize)>> {
        self.model.gpu.profile_report().map_err(device_error)
    }
}

impl Engine for CudaEngine {
    fn device_name(&self) -> Option<&str> {
        Some(self.model.gpu.name())
    }

    fn device_id(&self) -> crate::transport::DeviceId {
        crate::transport::DeviceId::gpu(self.uuid.clone())
    }

    fn zero_grad(&mut self, _model: &mut Gpt<f32>) -> Result<()> {
        self.model.zero_grad().map_err(device_error)
    }

    fn forward(
        &mut self,
        _model: &mut Gpt<f32>,
        slot: usize,
        tokens: &[u32],
        targets: &[u32],
        input: Option<&[f32]>,
        dloss: f32,
        tp: &mut TensorGroup,
    ) -> Result<()> {
        let mut tp = StagedTp {
            tp,
            staging: &mut self.staging,
        };
        self.model
            .forward_stage(slot, tokens, targets, input, dloss, &mut tp)
            .map_err(stage_error)
    }

    fn loss_sum(&mut self) -> Result<f64> {
        let (b, t) = self.model.batch_shape();
        Ok(self.model.loss_sum().map_err(device_error)? / (b * t) as f64)
    }

    fn reset_loss(&mut self) -> Result<()> {
        self.model.reset_losses().map_err(device_error)
    }

    fn stage_output<'a>(&'a mut self, _model: &'a Gpt<f32>, slot: usize) -> Result<&'a [f32]> {
        let out = self.model.stage_output(slot);
        self.model
            .gpu
            .download_slice(out, &mut self.out_host)
            .map_err(device_error)?;
        Ok(&self.out_host)
    }

    /// Backward runs whole; with `overlap` the gradient buckets are all-reduced after it,
    /// host-staged.
    fn backward(
        &mut self,
        model: &mut Gpt<f32>,
        slot: usize,
        _dloss: f32,
        output_grad: Option<&[f32]>,
        tp: &mut TensorGroup,
        overlap: Option<&mut ProcessGroup>,
        times: &mut StepTimes,
    ) -> Result<()> {
        let mut staged = StagedTp {
            tp,
            staging: &mut self.staging,
        };
        self.model
            .backward_stage(slot, output_grad, &mut staged)
            .map_err(stage_error)?;
        if let Some(dp) = overlap {
            // The same buckets in the same order as a replica with no microbatch reduces
            // them, since collectives pair up by order.
            let t0 = Instant::now();
            for bucket in model.layout.backward_buckets() {
                self.all_reduce_grads(model, dp, bucket)?;
            }
            times.comm_wait += t0.elapsed();
        }
        Ok(())
    }

    fn input_grad<'a>(&'a mut self, _model: &'a Gpt<f32>) -> Result<&'a [f32]> {
        let grad = self.model.input_grad();
        self.model
            .gpu
            .download_slice(grad, &mut self.out_host)
            .map_err(device_error)?;
        Ok(&self.out_host)
    }

    fn all_reduce_grads(
        &mut self,
        _model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        range: Range<usize>,
    ) -> Result<()> {
        let m = &self.model;
        self.staging
            .round_trip(&m.gpu, m.grads.slice(range), |h| group.all_reduce(h))
    }

    fn deterministic(&self) -> bool {
        false
    }

    /// The ranges travel packed, in one broadcast.
    fn broadcast_grads(
        &mut self,
        _model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        ranges: &[Range<usize>],
        root: usize,
    ) -> Result<()> {
        let m = &self.model;
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        let host = &mut self.staging.f32s.as_mut_slice()[..total];
        let mut at = 0;
        for r in ranges {
            m.gpu
                .download_slice(m.grads.slice(r.clone()), &mut host[at..at + r.len()])
                .map_err(device_error)?;
            at += r.len();
        }
        group.broadcast(host, root)?;
        at = 0;
        for r in ranges {
            m.gpu
                .upload_slice(m.grads.slice(r.clone()), &host[at..at + r.len()])
                .map_err(device_error)?;
            at += r.len();
        }
        Ok(())
    }

    fn reduce_scatter_grads(
        &mut self,
        _model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
    ) -> Result<Range<usize>> {
        let m = &self.model;
        let n = m.grads.len();
        let host = &mut self.staging.f32s.as_mut_slice()[..n];
        m.gpu
            .download_slice(m.grads.all(), host)
            .map_err(device_error)?;
        let mine = group.reduce_scatter(host)?;
        m.gpu
            .upload_slice(m.grads.slice(mine.clone()), &host[mine.clone()])
            .map_err(device_error)?;
        Ok(mine)
    }

    fn send_recv_grads(
        &mut self,
        _model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        (send, to): (Range<usize>, usize),
        (recv, from): (Range<usize>, usize),
    ) -> Result<()> {
        let m = &self.model;
        let host = self.staging.f32s.as_mut_slice();
        let (out, into) = host[..send.len() + recv.len()].split_at_mut(send.len());
        m.gpu
            .download_slice(m.grads.slice(send), out)
            .map_err(device_error)?;
        group.send_recv(out, to, into, from)?;
        m.gpu
            .upload_slice(m.grads.slice(recv), into)
            .map_err(device_error)
    }

    fn grad_sum_squares(&mut self, _model: &Gpt<f32>, ranges: &[Range<usize>]) -> Result<f64> {
        self.model.grad_norm_sq_of(ranges).map_err(device_error)
    }

    fn update(
        &mut self,
        _model: &mut Gpt<f32>,
        opt: &mut AdamW<f32>,
        shard: Range<usize>,
        lr: f64,
        grad_norm: f64,
        max_norm: f64,
    ) -> Result<()> {
        assert_eq!(
            shard, self.model.opt_shard,
            "the GPU's optimizer covers another shard"
        );
        let m = &mut self.model;
        m.set_grad_norm_sq(grad_norm * grad_norm)
            .and_then(|()| m.update(&self.adamw, lr, max_norm))
            .map_err(device_error)?;
        opt.step += 1;
        Ok(())
    }

    fn all_gather_params(&mut self, _model: &mut Gpt<f32>, group: &mut ProcessGroup) -> Result<()> {
        let m = &self.model;
        self.staging
            .round_trip(&m.gpu, m.master.all(), |h| group.all_gather(h))?;
        m.refresh_params().map_err(device_error)
    }

    fn fetch_state(&mut self, model: &mut Gpt<f32>, opt: &mut AdamW<f32>) -> Result<()> {
        self.model
            .download_state(&mut model.params, &mut opt.m, &mut opt.v)
            .map_err(device_error)
    }

    fn push_state(&mut self, model: &Gpt<f32>, opt: &AdamW<f32>) -> Result<()> {
        self.model
            .upload_state(&model.params, &opt.m, &opt.v, opt.step)
            .map_err(device_error)
    }

    fn snapshot(
        &mut self,
        _model: &Gpt<f32>,
        _opt: &AdamW<f32>,
        writer: &mut CheckpointWriter,
        step: u64,
        run: serde_json::Value,
        pieces: &[Piece],
    ) -> Result<SnapshotReport> {
        let list: Vec<(State, Range<usize>)> = pieces
            .iter()
            .map(|(_, s, r)| {
                let state = match s {
                    Source::Params => State::Master,
                    Source::AdamM => State::M,
                    Source::AdamV => State::V,
                };
                (state, r.clone())
            })
            .collect();
        let (model, pinned) = (&mut self.model, &mut self.pinned);
        let mut failed = None;
        // The device copies into the staging buffer on its copy stream; the persist waits for
        // the copy, training does not.
        let report = writer.snapshot_fenced(
            step,
            run,
            pieces.iter().map(|(p, _, _)| p.clone()).collect(),
            |buf| {
                let copy = (|| {
                    if !pinned.as_ref().is_some_and(|p| p.covers(buf)) {
                        *pinned = None;
                        *pinned = Some(model.gpu.pin(buf)?);
                    }
                    // SAFETY: the writer keeps `buf` alive and unread until the fence returns,
                    // which waits for the event.
                    unsafe { model.snapshot_async(buf, &list) }
                })();
                match copy {
                    Ok(done) => Some(Box::new(move || {
                        done.synchronize().map_err(|e| e.to_string())
                    })),
                    Err(e) => {
                        let reason = e.to_string();
                        failed = Some(device_error(e));
                        Some(Box::new(move || Err(reason)))
                    }
                }
            },
        );
        match failed {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn cuda(&mut self) -> Option<&mut CudaEngine> {
        Some(self)
    }
}
