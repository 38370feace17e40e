//! Where a rank's shard computes: the one interface the trainer's step loop, gradient
//! synchronisation, optimizer and checkpoint staging are written against, with two
//! implementations: [`cpu::CpuEngine`] (the host model, fp32, the reference) and, with feature
//! `cuda`, [`cuda::CudaEngine`] (the shard on a GPU, bf16 with fp32 master weights).
//!
//! The trainer owns the rank's state on the host: its shard of the model ([`Gpt`]) and its
//! optimizer state ([`AdamW`]). On the CPU the engine computes on that state in place. On a GPU
//! the host state is a mirror the engine fills ([`Engine::fetch_state`]) before anything reads
//! it and copies back ([`Engine::push_state`]) after anything writes it: a checkpoint load, a
//! peer's transfer. Recovery (regroup, reconcile, transfer) is written once, on the host state.
//!
//! Collectives on the engine's buffers take the trainer's TCP process groups. On a GPU they
//! travel host-staged: device to page-locked host memory, the group's operation, host to device
//! (see [`crate::transport`] for how each group's transport is chosen).

use std::ops::Range;

use marathon_model::{AdamW, Gpt};
use marathon_storage::writer::SnapshotReport;
use marathon_storage::CheckpointWriter;

use crate::checkpoint::Source;
use crate::comm::ProcessGroup;
use crate::error::Result;
use crate::groups::TensorGroup;
use crate::records::StepTimes;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// A checkpoint piece: what the writer names it, where its values come from, and which
/// elements of that buffer (moments relative to the optimizer's shard).
pub(crate) type Piece = (marathon_storage::writer::Piece, Source, Range<usize>);

/// A rank's compute: one microbatch's forward and backward through its shard, collectives on
/// its gradient and parameter buffers, the optimizer update and the checkpoint snapshot.
/// `model` and `opt` are the trainer's host state (see the module's documentation).
pub(crate) trait Engine: std::fmt::Debug {
    /// The GPU's name; `None` on the CPU.
    fn device_name(&self) -> Option<&str> {
        None
    }

    /// What this rank reports to its groups' members about where it computes.
    fn device_id(&self) -> crate::transport::DeviceId {
        crate::transport::DeviceId::cpu()
    }

    /// Whether every reduction is bitwise reproducible: then the tensor-parallel ranks'
    /// copies of a replicated tensor (a norm, a row-parallel bias) get bitwise the same
    /// gradient, computed from the same inputs. The GPU's column sums use atomics, so its
    /// copies are made equal by [`Engine::broadcast_grads`] from tensor-parallel rank 0.
    fn deterministic(&self) -> bool {
        true
    }

    /// Makes `ranges` of the gradients `root`'s on every member of `group`.
    fn broadcast_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        ranges: &[Range<usize>],
        root: usize,
    ) -> Result<()>;

    /// Zeroes the gradients and the step's loss sum, before a step's first microbatch.
    fn zero_grad(&mut self, model: &mut Gpt<f32>) -> Result<()>;

    /// Forward of one microbatch through this stage into `slot`: from `tokens` on the first
    /// stage, from `input` (the previous stage's output) on later ones. The last stage adds
    /// the microbatch's mean loss to the step's sum ([`Engine::loss_sum`]); `dloss` is the
    /// weight of each position's loss in backward (0 for validation).
    fn forward(
        &mut self,
        model: &mut Gpt<f32>,
        slot: usize,
        tokens: &[u32],
        targets: &[u32],
        input: Option<&[f32]>,
        dloss: f32,
        tp: &mut TensorGroup,
    ) -> Result<()>;

    /// The sum of the mean losses of the microbatches this stage has run forward since
    /// [`Engine::zero_grad`] or [`Engine::reset_loss`]: zero on stages other than the last.
    fn loss_sum(&mut self) -> Result<f64>;

    /// Zeroes the loss sum (validation runs between steps).
    fn reset_loss(&mut self) -> Result<()>;

    /// The residual stream this stage's forward in `slot` leaves, (B, T, C), on the host.
    fn stage_output<'a>(&'a mut self, model: &'a Gpt<f32>, slot: usize) -> Result<&'a [f32]>;

    /// Backward of the microbatch in `slot`, adding into the gradients: from the loss on the
    /// last stage, from `output_grad` (the next stage's input gradient) on earlier ones. With
    /// `overlap`, the data-parallel group, each finished gradient bucket is all-reduced while
    /// backward goes on, or after it where the engine cannot overlap.
    fn backward(
        &mut self,
        model: &mut Gpt<f32>,
        slot: usize,
        dloss: f32,
        output_grad: Option<&[f32]>,
        tp: &mut TensorGroup,
        overlap: Option<&mut ProcessGroup>,
        times: &mut StepTimes,
    ) -> Result<()>;

    /// dL/d(this stage's input) left by the last backward, (B, T, C), on the host.
    fn input_grad<'a>(&'a mut self, model: &'a Gpt<f32>) -> Result<&'a [f32]>;

    /// Sums `range` of the gradients over `group`'s members.
    fn all_reduce_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        range: Range<usize>,
    ) -> Result<()>;

    /// Reduce-scatters the gradients over `group`: afterwards this member's chunk (returned)
    /// holds the sum.
    fn reduce_scatter_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
    ) -> Result<Range<usize>>;

    /// Sends `send` of the gradients to member `to` of `group` while receiving `recv` from
    /// member `from`; the two ranges do not overlap.
    fn send_recv_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        send: (Range<usize>, usize),
        recv: (Range<usize>, usize),
    ) -> Result<()>;

    /// The sum of squares of the gradient elements in `ranges`, in fp64.
    fn grad_sum_squares(&mut self, model: &Gpt<f32>, ranges: &[Range<usize>]) -> Result<f64>;

    /// One AdamW update of `shard` of the parameters (the optimizer's shard) at `lr`, with the
    /// gradients clipped from the global `grad_norm` to `max_norm`.
    fn update(
        &mut self,
        model: &mut Gpt<f32>,
        opt: &mut AdamW<f32>,
        shard: Range<usize>,
        lr: f64,
        grad_norm: f64,
        max_norm: f64,
    ) -> Result<()>;

    /// All-gathers the parameters over `group` after each member updated its chunk (the
    /// distributed optimizer).
    fn all_gather_params(&mut self, model: &mut Gpt<f32>, group: &mut ProcessGroup) -> Result<()>;

    /// Makes the host state current: parameters, both moments (nothing to do on the CPU).
    fn fetch_state(&mut self, model: &mut Gpt<f32>, opt: &mut AdamW<f32>) -> Result<()>;

    /// Takes the host state as the engine's after the host wrote it (a checkpoint load, a
    /// transfer from a peer); nothing to do on the CPU.
    fn push_state(&mut self, model: &Gpt<f32>, opt: &AdamW<f32>) -> Result<()>;

    /// Snapshots `pieces` of the state for the checkpoint of `step` into `writer`'s staging
    /// buffer, whose persist then runs in the background.
    fn snapshot(
        &mut self,
        model: &Gpt<f32>,
        opt: &AdamW<f32>,
        writer: &mut CheckpointWriter,
        step: u64,
        run: serde_json::Value,
        pieces: &[Piece],
    ) -> Result<SnapshotReport>;

    /// The CUDA engine, for tools that profile it.
    #[cfg(feature = "cuda")]
    fn cuda(&mut self) -> Option<&mut cuda::CudaEngine> {
        None
    }
}
