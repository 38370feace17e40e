//! GPT-2 on one GPU, whole or one rank's shard of it: the CPU model's forward and backward
//! ([`crate::Gpt`]) layer for layer, with bf16 parameters and activations, an fp32 residual
//! stream and fp32 master weights, gradients and Adam moments, all laid out by the same
//! [`ParamLayout`] so that a checkpoint's boxes mean the same on either device.
//!
//! A shard is cut as on the CPU: a pipeline stage's layers, with Megatron's tensor parallelism
//! (heads and MLP columns split, the vocabulary split for the embedding and the loss). The
//! collectives it needs go through [`DeviceCollective`] on device memory, at the points the CPU
//! model calls [`crate::Collective`].

use std::ops::Range;
use std::sync::Arc;

use half::bf16 as Bf16;

use super::blas::Out;
use super::ops::AdamWStep;
use super::{bytes, CudaError, DeviceBuffer, Event, Gpu, Result, Slice, Stream};
use crate::dims::{Act, Dims};
use crate::layout::{BlockOffsets, ParamLayout, Shard};
use crate::{AdamWConfig, GptConfig, ModelError, Recompute};

/// Blocks of the gradient-norm reduction: partial sums in a fixed order.
const NORM_PARTS: usize = 1024;

type Db<T> = DeviceBuffer<T>;

/// A tensor-parallel group seen from one member, on device memory: the GPU twin of
/// [`crate::Collective`]. Every member calls the same operations in the same order with
/// buffers of the same length; each works in order on the GPU's training stream.
pub trait DeviceCollective {
    type Error;

    /// Members of the group.
    fn size(&self) -> usize;

    /// This member's place in the group, `0..size`.
    fn rank(&self) -> usize;

    /// Replaces `buf` on every member with the element-wise sum over members.
    fn all_reduce(&mut self, gpu: &Gpu, buf: Slice<f32>) -> std::result::Result<(), Self::Error>;

    /// As [`DeviceCollective::all_reduce`] on bf16 values, summed in fp32.
    fn all_reduce_bf16(
        &mut self,
        gpu: &Gpu,
        buf: Slice<Bf16>,
    ) -> std::result::Result<(), Self::Error>;

    /// `buf` holds `size` equal parts; member `i` fills part `i`, and afterwards every member
    /// holds every part.
    fn all_gather(&mut self, gpu: &Gpu, buf: Slice<f32>) -> std::result::Result<(), Self::Error>;
}

/// A shard's step failed on the device or in one of its collectives.
#[derive(Debug, thiserror::Error)]
pub enum StageError<E> {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The tensor-parallel group failed; its error says how.
    #[error("tensor-parallel collective")]
    Comm(E),
}

/// Whether `shard`'s heads are 64 wide, the width the fused attention kernels take.
fn fused_attention(config: &GptConfig, shard: Shard) -> bool {
    let heads = config.n_head / shard.tp;
    heads > 0 && config.n_embd / shard.tp / heads == super::ops::FLASH_HEAD
}

/// Device-side sizes of a shard's buffers, split by element type.
impl Dims {
    /// (fp32, bf16) elements of the layer activations forward keeps (`working` false) or of
    /// the one-layer working set (`working` true).
    fn device_layer_elements(&self, working: bool) -> (usize, usize) {
        let f32s = [Act::Stats, Act::Lse, Act::Residual2, Act::Residual3];
        let bf16s = [
            Act::Ln1,
            Act::Qkv,
            Act::Atty,
            Act::Att,
            Act::Ln2,
            Act::Fch,
            Act::FchGelu,
        ];
        (
            self.layer_elements(&f32s, working),
            self.layer_elements(&bf16s, working),
        )
    }

    /// (fp32, bf16) elements of one slot's activations, as [`Acts::new`] allocates them.
    fn device_slot_elements(&self) -> (usize, usize) {
        let (bt, c, vl) = (self.b * self.t, self.c, self.vl);
        let head = usize::from(self.last);
        let (f32s, bf16s) = self.device_layer_elements(false);
        (
            bt * c + f32s + head * 2 * bt,
            bf16s + head * (bt * c + bt * vl),
        )
    }

    /// (fp32, bf16) elements of the backward scratch, as [`CudaGpt::new_shard`] allocates it.
    fn device_scratch_elements(&self) -> (usize, usize) {
        let Dims {
            b,
            t,
            c,
            nh,
            cq,
            f4,
            tp,
            ..
        } = *self;
        let bt = b * t;
        let (tt, rows) = if self.fused {
            (0, b * nh * t)
        } else {
            (b * nh * t * t, 0)
        };
        let (w32, wbf) = self.device_layer_elements(true);
        let f32s = bt * c + rows + 3 * bt + tp * 3 * bt + bt + w32;
        let bf16s = 2 * bt * c + bt * f4.max(3 * cq) + tt + 8 * bt * cq + wbf;
        (f32s, bf16s)
    }
}

/// What forward keeps of one microbatch for its backward, stacked over layers as in the CPU
/// model.
#[derive(Debug)]
struct Acts {
    tokens: Db<u32>,
    targets: Db<u32>,
    /// The residual stream entering this stage's first layer, (B, T, C).
    encoded: Db<f32>,
    ln1: Db<Bf16>,     // (L, B, T, C)
    ln1_mean: Db<f32>, // (L, B, T)
    ln1_rstd: Db<f32>, // (L, B, T)
    qkv: Db<Bf16>,     // (L, B, T, 3C/tp)
    atty: Db<Bf16>,    // (L, B, T, C/tp)
    /// The probabilities (L, B, NH/tp, T, T), kept only when attention is not fused.
    att: Db<Bf16>,
    /// Each row's log2-sum-exp2 (L, B, NH/tp, T), kept when attention is fused.
    lse: Db<f32>,
    residual2: Db<f32>, // (L, B, T, C)
    ln2: Db<Bf16>,      // (L, B, T, C)
    ln2_mean: Db<f32>,  // (L, B, T)
    ln2_rstd: Db<f32>,  // (L, B, T)
    fch: Db<Bf16>,      // (L, B, T, 4C/tp)
    fch_gelu: Db<Bf16>, // (L, B, T, 4C/tp)
    residual3: Db<f32>, // (L, B, T, C)
    // Last stage only (empty elsewhere):
    lnf: Db<Bf16>,     // (B, T, C)
    lnf_mean: Db<f32>, // (B, T)
    lnf_rstd: Db<f32>, // (B, T)
    /// This rank's slice of the logits (B, T, Vp/tp); dL/dlogits once forward has been given
    /// `dloss`.
    logits: Db<Bf16>,
    forwarded: bool,
}

impl Acts {
    /// One slot's buffers: every layer of what forward keeps, no layer of what it does not.
    fn new(gpu: &Gpu, d: &Dims) -> Result<Self> {
        Self::layers(gpu, d, |a| if d.keeps(a) { d.l } else { 0 }, true)
    }

    /// The one-layer working set of recomputation, laid out as a slot; empty without it.
    fn work(gpu: &Gpu, d: &Dims) -> Result<Self> {
        Self::layers(gpu, d, |a| usize::from(d.works(a)), false)
    }

    /// `layers(act)` layers of each activation; the encoded input, tokens and the last stage's
    /// head only with `slot`.
    fn layers(gpu: &Gpu, d: &Dims, layers: impl Fn(Act) -> usize, slot: bool) -> Result<Self> {
        let (bt, c, vl) = (d.b * d.t, d.c, d.vl);
        let head = usize::from(d.last && slot);
        let own = usize::from(slot);
        let z32 = |a: Act| Db::<f32>::zeros(gpu, layers(a) * d.size(a));
        let zbf = |a: Act| Db::<Bf16>::zeros(gpu, layers(a) * d.size(a));
        Ok(Acts {
            tokens: Db::zeros(gpu, own * bt)?,
            targets: Db::zeros(gpu, own * bt)?,
            encoded: Db::zeros(gpu, own * bt * c)?,
            ln1: zbf(Act::Ln1)?,
            ln1_mean: z32(Act::Stats)?,
            ln1_rstd: z32(Act::Stats)?,
            qkv: zbf(Act::Qkv)?,
            atty: zbf(Act::Atty)?,
            att: zbf(Act::Att)?,
            lse: z32(Act::Lse)?,
            residual2: z32(Act::Residual2)?,
            ln2: zbf(Act::Ln2)?,
            ln2_mean: z32(Act::Stats)?,
            ln2_rstd: z32(Act::Stats)?,
            fch: zbf(Act::Fch)?,
            fch_gelu: zbf(Act::FchGelu)?,
            residual3: z32(Act::Residual3)?,
            lnf: Db::zeros(gpu, head * bt * c)?,
            lnf_mean: Db::zeros(gpu, head * bt)?,
            lnf_rstd: Db::zeros(gpu, head * bt)?,
            logits: Db::zeros(gpu, head * bt * vl)?,
            forwarded: false,
        })
    }
}

/// Layer `l` of activation `act`, in the slot `kept` where forward keeps it, else in the
/// working set `work`.
fn at<'a, T: Copy>(d: &Dims, act: Act, kept: &'a Db<T>, work: &'a Db<T>, l: usize) -> Slice<'a, T> {
    if d.keeps(act) {
        kept.part(l, d.l)
    } else {
        work.all()
    }
}

/// Where one layer's activations are: the slot's where forward keeps them, the working set's
/// where it does not.
#[derive(Clone, Copy)]
struct Layer<'a> {
    ln1: Slice<'a, Bf16>,
    ln1_mean: Slice<'a, f32>,
    ln1_rstd: Slice<'a, f32>,
    qkv: Slice<'a, Bf16>,
    atty: Slice<'a, Bf16>,
    att: Slice<'a, Bf16>,
    lse: Slice<'a, f32>,
    residual2: Slice<'a, f32>,
    ln2: Slice<'a, Bf16>,
    ln2_mean: Slice<'a, f32>,
    ln2_rstd: Slice<'a, f32>,
    fch: Slice<'a, Bf16>,
    fch_gelu: Slice<'a, Bf16>,
    residual3: Slice<'a, f32>,
}

impl<'a> Layer<'a> {
    fn of(d: &Dims, a: &'a Acts, w: &'a Acts, l: usize) -> Self {
        Layer {
            ln1: at(d, Act::Ln1, &a.ln1, &w.ln1, l),
            ln1_mean: at(d, Act::Stats, &a.ln1_mean, &w.ln1_mean, l),
            ln1_rstd: at(d, Act::Stats, &a.ln1_rstd, &w.ln1_rstd, l),
            qkv: at(d, Act::Qkv, &a.qkv, &w.qkv, l),
            atty: at(d, Act::Atty, &a.atty, &w.atty, l),
            att: at(d, Act::Att, &a.att, &w.att, l),
            lse: at(d, Act::Lse, &a.lse, &w.lse, l),
            residual2: at(d, Act::Residual2, &a.residual2, &w.residual2, l),
            ln2: at(d, Act::Ln2, &a.ln2, &w.ln2, l),
            ln2_mean: at(d, Act::Stats, &a.ln2_mean, &w.ln2_mean, l),
            ln2_rstd: at(d, Act::Stats, &a.ln2_rstd, &w.ln2_rstd, l),
            fch: at(d, Act::Fch, &a.fch, &w.fch, l),
            fch_gelu: at(d, Act::FchGelu, &a.fch_gelu, &w.fch_gelu, l),
            residual3: a.residual3.part(l, d.l),
        }
    }
}

/// Attention's forward of one layer from its `qkv`, fused for heads of 64.
fn attention_forward(g: &mut Gpu, d: &Dims, x: &Layer, heads: &[Slice<Bf16>; 8]) -> Result<()> {
    if d.fused {
        g.flash_attention_forward(x.atty, x.lse, x.qkv, d.b, d.t, d.nh)
    } else {
        g.attention_forward(
            x.atty,
            x.att,
            x.qkv,
            [heads[0], heads[1], heads[2], heads[3]],
            d.b,
            d.t,
            d.nh,
        )
    }
}

/// One layer's forward from `res_in`, (B, T, C), into `x`; the residual stream leaves in
/// `x.residual3`. Tensor parallelism as in [`CudaGpt::forward_stage`]. Without `output` it
/// stops at the MLP's GELU, all that recomputation for backward needs.
fn layer_forward<C: DeviceCollective>(
    g: &mut Gpu,
    p: &Db<Bf16>,
    o: &BlockOffsets,
    d: &Dims,
    res_in: Slice<f32>,
    x: &Layer,
    heads: &[Slice<Bf16>; 8],
    tp: &mut C,
    output: bool,
) -> std::result::Result<(), StageError<C::Error>> {
    let (c, cq, f4) = (d.c, d.cq, d.f4);
    g.layernorm_forward(
        x.ln1,
        x.ln1_mean,
        x.ln1_rstd,
        res_in,
        p.slice(o.ln1_w..o.ln1_w + c),
        p.slice(o.ln1_b..o.ln1_b + c),
    )?;
    // Column-parallel: this rank's heads of q, k and v.
    g.matmul_forward(
        bytes(x.qkv),
        Out::Bf16,
        x.ln1,
        p.slice(o.qkv_w..o.qkv_w + 3 * cq * c),
        Some(p.slice(o.qkv_b..o.qkv_b + 3 * cq)),
        c,
        3 * cq,
    )?;
    attention_forward(g, d, x, heads)?;
    // Row-parallel: partial products summed over ranks, then the bias once.
    g.matmul_forward(
        bytes(x.residual2),
        Out::F32,
        x.atty,
        p.slice(o.proj_w..o.proj_w + c * cq),
        None,
        cq,
        c,
    )?;
    tp.all_reduce(g, x.residual2).map_err(StageError::Comm)?;
    g.residual_bias_add(x.residual2, res_in, p.slice(o.proj_b..o.proj_b + c))?;
    g.layernorm_forward(
        x.ln2,
        x.ln2_mean,
        x.ln2_rstd,
        x.residual2,
        p.slice(o.ln2_w..o.ln2_w + c),
        p.slice(o.ln2_b..o.ln2_b + c),
    )?;
    g.matmul_forward_gelu(
        x.fch_gelu,
        x.fch,
        x.ln2,
        p.slice(o.fc_w..o.fc_w + f4 * c),
        p.slice(o.fc_b..o.fc_b + f4),
        c,
        f4,
    )?;
    if !output {
        return Ok(());
    }
    g.matmul_forward(
        bytes(x.residual3),
        Out::F32,
        x.fch_gelu,
        p.slice(o.fcproj_w..o.fcproj_w + c * f4),
        None,
        f4,
        c,
    )?;
    tp.all_reduce(g, x.residual3).map_err(StageError::Comm)?;
    g.residual_bias_add(
        x.residual3,
        x.residual2,
        p.slice(o.fcproj_b..o.fcproj_b + c),
    )?;
    Ok(())
}

/// Backward's working buffers, shared by every slot, and the step's sums.
#[derive(Debug)]
struct Scratch {
    dres: Db<f32>,
    dres_bf: Db<Bf16>,
    dsmall: Db<Bf16>,
    dwide: Db<Bf16>,
    datt: Db<Bf16>,
    /// The fused attention backward's row sums of dout * out, (B, NH/tp, T).
    dd: Db<f32>,
    /// Eight (B, NH/tp, T, hs) buffers for attention.
    heads: Vec<Db<Bf16>>,
    /// This rank's cross-entropy statistics (3, B, T) and every rank's (tp, 3, B, T).
    ce_stats: Db<f32>,
    ce_all: Db<f32>,
    /// Each position's loss, summed over the microbatches since [`CudaGpt::zero_grad`].
    losses: Db<f32>,
    partials: Db<f64>,
    norm_sq: Db<f64>,
    /// The ranges the last [`CudaGpt::grad_norm_sq_of`] summed, on the host and the device.
    norm_ranges: Vec<Range<usize>>,
    norm_ranges_dev: Db<i64>,
}

/// The model, or one rank's shard of it, on one GPU, with its optimizer state.
#[derive(Debug)]
pub struct CudaGpt {
    pub config: GptConfig,
    pub layout: ParamLayout,
    pub gpu: Gpu,
    /// fp32 master weights, the optimizer's copy.
    pub master: Db<f32>,
    /// bf16 weights, what forward and backward compute with.
    pub params: Db<Bf16>,
    pub grads: Db<f32>,
    /// Adam's moments over [`CudaGpt::opt_shard`] of the flat buffers.
    pub m: Db<f32>,
    pub v: Db<f32>,
    /// The elements this rank's optimizer updates: all of them, or its distributed-optimizer
    /// shard.
    pub opt_shard: Range<usize>,
    decay: Db<u8>,
    /// AdamW updates done.
    pub step: u64,
    /// The last snapshot's copy, which the next update waits for on the device.
    copy_fence: Option<Arc<Event>>,
    d: Dims,
    acts: Vec<Acts>,
    /// The one-layer working set of recomputation ([`Recompute`]).
    work: Acts,
    s: Scratch,
}

impl CudaGpt {
    /// Builds `shard` of the model on `gpu`, keeping the activations of `slots` microbatches
    /// (a 1F1B stage keeps one per later stage, plus its own) of which it keeps what
    /// `recompute` says, from fp32 `master` weights laid out by [`ParamLayout::sharded`]. The
    /// Adam moments cover `opt_shard` of the flat buffers and start at zero.
    pub fn new_shard(
        gpu: Gpu,
        config: GptConfig,
        shard: Shard,
        batch: usize,
        seq: usize,
        slots: usize,
        master: &[f32],
        opt_shard: Range<usize>,
        recompute: Recompute,
    ) -> std::result::Result<Self, CudaModelError> {
        config.validate()?;
        shard.validate(&config)?;
        if batch == 0 || seq == 0 || seq > config.seq_len || slots == 0 {
            return Err(ModelError::invalid(
                "batch",
                format!(
                    "microbatch ({batch} x {seq}, {slots} slots) must be non-empty with seq_len                      at most {}",
                    config.seq_len
                ),
            )
            .into());
        }
        let layout = ParamLayout::sharded(&config, shard);
        let n = layout.numel();
        assert_eq!(
            master.len(),
            n,
            "master weights are not laid out by this shard"
        );
        assert!(
            opt_shard.end <= n,
            "the optimizer's shard is outside the model"
        );
        let d = Dims::new(
            &config,
            shard,
            batch,
            seq,
            recompute,
            fused_attention(&config, shard),
        );
        let (bt, c, cq, f4) = (d.b * d.t, d.c, d.cq, d.f4);
        let (tt, rows) = if d.fused {
            (0, d.b * d.nh * d.t)
        } else {
            (d.b * d.nh * d.t * d.t, 0)
        };
        let z32 = |n: usize| Db::<f32>::zeros(&gpu, n);
        let zbf = |n: usize| Db::<Bf16>::zeros(&gpu, n);
        let acts = (0..slots)
            .map(|_| Acts::new(&gpu, &d))
            .collect::<Result<_>>()?;
        let work = Acts::work(&gpu, &d)?;
        let s = Scratch {
            dres: z32(bt * c)?,
            dres_bf: zbf(bt * c)?,
            dsmall: zbf(bt * c)?,
            dwide: zbf(bt * f4.max(3 * cq))?,
            datt: zbf(tt)?,
            dd: z32(rows)?,
            heads: (0..8).map(|_| zbf(bt * cq)).collect::<Result<_>>()?,
            ce_stats: z32(3 * bt)?,
            ce_all: z32(d.tp * 3 * bt)?,
            losses: z32(bt)?,
            partials: Db::zeros(&gpu, NORM_PARTS)?,
            norm_sq: Db::zeros(&gpu, 1)?,
            norm_ranges: Vec::new(),
            norm_ranges_dev: Db::zeros(&gpu, 0)?,
        };
        let mut decay = vec![0u8; n];
        for (r, dec) in layout.decay_ranges() {
            decay[r].fill(dec as u8);
        }
        let k = opt_shard.len();
        let model = CudaGpt {
            master: Db::from_host(&gpu, master)?,
            params: Db::zeros(&gpu, n)?,
            grads: z32(n)?,
            m: z32(k)?,
            v: z32(k)?,
            opt_shard,
            decay: Db::from_host(&gpu, &decay)?,
            step: 0,
            copy_fence: None,
            d,
            acts,
            work,
            s,
            config,
            layout,
            gpu,
        };
        model
            .gpu
            .cast_to_bf16(model.params.all(), model.master.all())?;
        Ok(model)
    }

    /// Bytes the device holds for `shard` with microbatches of (b, t), `slots` of them kept
    /// under `recompute`, and the optimizer's moments split over `opt_parts` replicas: state,
    /// activations and scratch, as [`CudaGpt::new_shard`] allocates them.
    pub fn shard_memory_bytes(
        config: &GptConfig,
        shard: Shard,
        b: usize,
        t: usize,
        slots: usize,
        opt_parts: usize,
        recompute: Recompute,
    ) -> f64 {
        let n = ParamLayout::sharded(config, shard).numel() as f64;
        let d = Dims::new(
            config,
            shard,
            b,
            t,
            recompute,
            fused_attention(config, shard),
        );
        // master and grads (fp32), the moments (fp32, this replica's part), params (bf16),
        // the decay mask.
        let state = n * (4.0 * 2.0 + 8.0 / opt_parts.max(1) as f64 + 2.0 + 1.0);
        let (a32, abf) = d.device_slot_elements();
        let (s32, sbf) = d.device_scratch_elements();
        let slot = 4.0 * a32 as f64 + 2.0 * abf as f64 + 8.0 * (b * t) as f64;
        state + slots as f64 * slot + 4.0 * s32 as f64 + 2.0 * sbf as f64
    }

    /// The microbatch shape (B, T).
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.d.b, self.d.t)
    }

    /// Zeroes the gradients and the summed losses, before a step's first microbatch.
    pub fn zero_grad(&self) -> Result<()> {
        self.grads.zero(&self.gpu)?;
        self.reset_losses()
    }

    /// This stage's forward of one microbatch, keeping its activations in `slot` for
    /// [`CudaGpt::backward_stage`]. The first stage reads `tokens`; later stages take `input`,
    /// the previous stage's output (B, T, C) from the host. The last stage adds each
    /// position's loss into the step's sum and, with `dloss` > 0, forms the loss's gradient at
    /// once. `tp` is this rank's tensor-parallel group.
    ///
    /// # Panics
    /// If the shapes differ from [`CudaGpt::batch_shape`], a token is outside the vocabulary,
    /// `input` is missing on a later stage or given to the first, or `tp` does not match the
    /// shard; callers validate data before it reaches the model.
    pub fn forward_stage<C: DeviceCollective>(
        &mut self,
        slot: usize,
        tokens: &[u32],
        targets: &[u32],
        input: Option<&[f32]>,
        dloss: f32,
        tp: &mut C,
    ) -> std::result::Result<(), StageError<C::Error>> {
        let d = self.d;
        let Dims {
            b, t, c, v0, vl, v, ..
        } = d;
        let l_n = d.l;
        assert!(
            tp.size() == d.tp && tp.rank() == self.layout.shard.tp_rank,
            "the tensor-parallel group does not match the shard"
        );
        assert_eq!(tokens.len(), b * t, "tokens must be (B, T) = ({b}, {t})");
        assert_eq!(targets.len(), b * t, "targets must be (B, T) = ({b}, {t})");
        assert!(
            tokens.iter().chain(targets).all(|&x| (x as usize) < v),
            "token id outside the vocabulary"
        );
        let a = &mut self.acts[slot];
        let g = &mut self.gpu;
        a.tokens.upload(g, tokens)?;
        a.targets.upload(g, targets)?;
        let p = &self.params;
        let lay = &self.layout;
        let comm = StageError::Comm;
        match (d.first, input) {
            (true, None) => {
                let wte = lay.wte.expect("the first stage holds the embedding");
                let wpe = lay.wpe.expect("the first stage holds the embedding");
                let (wte, wpe) = (p.slice(wte..wte + vl * c), p.slice(wpe..wpe + t * c));
                if d.tp == 1 {
                    g.embedding_forward(a.encoded.all(), a.tokens.all(), wte, Some(wpe), t, v0)?;
                } else {
                    // Vocabulary-parallel: each rank looks up its own slice, the sum is the
                    // lookup; the positions are added once, after it.
                    g.embedding_forward(a.encoded.all(), a.tokens.all(), wte, None, t, v0)?;
                    tp.all_reduce(g, a.encoded.all()).map_err(comm)?;
                    g.position_forward(a.encoded.all(), wpe, t)?;
                }
            }
            (false, Some(x)) => a.encoded.upload(g, x)?,
            _ => panic!("only stages after the first take an input"),
        }
        let heads: [Slice<Bf16>; 8] = std::array::from_fn(|i| self.s.heads[i].all());
        for l in 0..l_n {
            let res_in = if l == 0 {
                a.encoded.all()
            } else {
                a.residual3.part(l - 1, l_n)
            };
            let x = Layer::of(&d, a, &self.work, l);
            layer_forward(g, p, &lay.blocks[l], &d, res_in, &x, &heads, tp, true)?;
        }
        a.forwarded = true;
        if !d.last {
            return Ok(());
        }
        let (wte, lnf_w, lnf_b) = (
            lay.wte.expect("the last stage holds the head"),
            lay.lnf_w.expect("the last stage holds ln_f"),
            lay.lnf_b.expect("the last stage holds ln_f"),
        );
        g.layernorm_forward(
            a.lnf.all(),
            a.lnf_mean.all(),
            a.lnf_rstd.all(),
            a.residual3.part(l_n - 1, l_n),
            p.slice(lnf_w..lnf_w + c),
            p.slice(lnf_b..lnf_b + c),
        )?;
        // The tied head, vocabulary-parallel: this rank's slice of the logits.
        g.matmul_forward(
            bytes(a.logits.all()),
            Out::Bf16,
            a.lnf.all(),
            p.slice(wte..wte + vl * c),
            None,
            c,
            vl,
        )?;
        let losses = self.s.losses.all();
        if d.tp == 1 {
            g.crossentropy(losses, a.logits.all(), a.targets.all(), v, dloss)?;
            return Ok(());
        }
        let (stats, all) = (self.s.ce_stats.all(), self.s.ce_all.all());
        g.crossentropy_partial(stats, a.logits.all(), a.targets.all(), v0, v)?;
        let bt3 = 3 * b * t;
        let r = tp.rank();
        g.copy_within(all.sub(r * bt3..(r + 1) * bt3), stats)?;
        tp.all_gather(g, all).map_err(comm)?;
        g.crossentropy_finish(losses, a.logits.all(), all, a.targets.all(), v0, v, dloss)?;
        Ok(())
    }

    /// The residual stream leaving this stage for the microbatch in `slot`, (B, T, C): what the
    /// next stage takes as its input.
    pub fn stage_output(&self, slot: usize) -> Slice<'_, f32> {
        self.acts[slot].residual3.part(self.d.l - 1, self.d.l)
    }

    /// dL/d(this stage's input), (B, T, C), left by the last [`CudaGpt::backward_stage`]: what
    /// the previous stage takes as its output gradient.
    pub fn input_grad(&self) -> Slice<'_, f32> {
        self.s.dres.all()
    }

    /// This stage's backward for the microbatch in `slot`, whose forward was given the
    /// `dloss`, adding the parameter gradients into [`CudaGpt::grads`]. The last stage starts
    /// from its loss; earlier stages take `output_grad`, the next stage's input gradient, from
    /// the host. Afterwards [`CudaGpt::input_grad`] holds the gradient to send back.
    ///
    /// # Panics
    /// If `slot` holds no forward pass, or `output_grad` is missing on an earlier stage or
    /// given to the last.
    pub fn backward_stage<C: DeviceCollective>(
        &mut self,
        slot: usize,
        output_grad: Option<&[f32]>,
        tp: &mut C,
    ) -> std::result::Result<(), StageError<C::Error>> {
        let d = self.d;
        let Dims {
            b,
            t,
            c,
            nh,
            cq,
            f4,
            v0,
            vl,
            ..
        } = d;
        let l_n = d.l;
        let fused = d.fused;
        let (a, s) = (&mut self.acts[slot], &self.s);
        assert!(a.forwarded, "backward needs a forward pass first");
        a.forwarded = false;
        let g = &mut self.gpu;
        let (p, gr) = (&self.params, &self.grads);
        let lay = &self.layout;
        let comm = StageError::Comm;
        let heads: [Slice<Bf16>; 8] = std::array::from_fn(|i| s.heads[i].all());
        let w = &self.work;
        let dsmall = s.dsmall.all();
        match (d.last, output_grad) {
            (true, None) => {
                let wte = lay.wte.expect("the last stage holds the head");
                let (lnf_w, lnf_b) = (
                    lay.lnf_w.expect("the last stage holds ln_f"),
                    lay.lnf_b.expect("the last stage holds ln_f"),
                );
                s.dres.zero(g)?;
                // The tied head: dlnf = dlogits @ wte, dwte += dlogits^T @ lnf.
                g.matmul_backward(
                    dsmall,
                    gr.slice(wte..wte + vl * c),
                    a.logits.all(),
                    a.lnf.all(),
                    p.slice(wte..wte + vl * c),
                    c,
                    vl,
                )?;
                // The head's input is used by every rank: its gradient is the sum.
                tp.all_reduce_bf16(g, dsmall).map_err(comm)?;
                g.layernorm_backward(
                    s.dres.all(),
                    gr.slice(lnf_w..lnf_w + c),
                    gr.slice(lnf_b..lnf_b + c),
                    dsmall,
                    a.residual3.part(l_n - 1, l_n),
                    a.lnf_mean.all(),
                    a.lnf_rstd.all(),
                    p.slice(lnf_w..lnf_w + c),
                )?;
            }
            (false, Some(dy)) => s.dres.upload(g, dy)?,
            _ => panic!("only stages before the last take an output gradient"),
        }
        let dres_bf = s.dres_bf.all();
        for l in (0..l_n).rev() {
            let o = lay.blocks[l];
            let res_in = if l == 0 {
                a.encoded.all()
            } else {
                a.residual3.part(l - 1, l_n)
            };
            let x = Layer::of(&d, a, w, l);
            // What forward did not keep of this layer, computed again from what it kept.
            match d.recompute {
                Recompute::None => {}
                Recompute::Selective => {
                    attention_forward(g, &d, &x, &heads)?;
                    g.gelu_forward(x.fch_gelu, x.fch)?;
                }
                Recompute::Full => layer_forward(g, p, &o, &d, res_in, &x, &heads, tp, false)?,
            }
            // MLP: residual3 = residual2 + gelu(ln2 @ fc^T + b) @ fcproj^T + b.
            g.cast_to_bf16(dres_bf, s.dres.all())?;
            g.bias_backward(gr.slice(o.fcproj_b..o.fcproj_b + c), dres_bf)?;
            let dwide = s.dwide.all();
            let d4c = dwide.sub(0..b * t * f4);
            g.matmul_backward_gelu(
                d4c,
                gr.slice(o.fcproj_w..o.fcproj_w + c * f4),
                dres_bf,
                x.fch_gelu,
                p.slice(o.fcproj_w..o.fcproj_w + c * f4),
                x.fch,
                f4,
                c,
            )?;
            g.bias_backward(gr.slice(o.fc_b..o.fc_b + f4), d4c)?;
            g.matmul_backward(
                dsmall,
                gr.slice(o.fc_w..o.fc_w + f4 * c),
                d4c,
                x.ln2,
                p.slice(o.fc_w..o.fc_w + f4 * c),
                c,
                f4,
            )?;
            // Column-parallel input: every rank's partial input gradient, summed.
            tp.all_reduce_bf16(g, dsmall).map_err(comm)?;
            g.layernorm_backward(
                s.dres.all(),
                gr.slice(o.ln2_w..o.ln2_w + c),
                gr.slice(o.ln2_b..o.ln2_b + c),
                dsmall,
                x.residual2,
                x.ln2_mean,
                x.ln2_rstd,
                p.slice(o.ln2_w..o.ln2_w + c),
            )?;
            // Attention: residual2 = res_in + attention(ln1 @ qkv^T + b) @ proj^T + b.
            g.cast_to_bf16(dres_bf, s.dres.all())?;
            g.bias_backward(gr.slice(o.proj_b..o.proj_b + c), dres_bf)?;
            let datty = dsmall.sub(0..b * t * cq);
            g.matmul_backward(
                datty,
                gr.slice(o.proj_w..o.proj_w + c * cq),
                dres_bf,
                x.atty,
                p.slice(o.proj_w..o.proj_w + c * cq),
                cq,
                c,
            )?;
            let dqkv = dwide.sub(0..b * t * 3 * cq);
            if fused {
                g.flash_attention_backward(
                    dqkv,
                    s.dd.all(),
                    datty,
                    x.atty,
                    x.qkv,
                    x.lse,
                    b,
                    t,
                    nh,
                )?;
            } else {
                g.attention_backward(dqkv, s.datt.all(), datty, x.qkv, x.att, heads, b, t, nh)?;
            }
            g.bias_backward(gr.slice(o.qkv_b..o.qkv_b + 3 * cq), dqkv)?;
            g.matmul_backward(
                dsmall,
                gr.slice(o.qkv_w..o.qkv_w + 3 * cq * c),
                dqkv,
                x.ln1,
                p.slice(o.qkv_w..o.qkv_w + 3 * cq * c),
                c,
                3 * cq,
            )?;
            tp.all_reduce_bf16(g, dsmall).map_err(comm)?;
            g.layernorm_backward(
                s.dres.all(),
                gr.slice(o.ln1_w..o.ln1_w + c),
                gr.slice(o.ln1_b..o.ln1_b + c),
                dsmall,
                res_in,
                x.ln1_mean,
                x.ln1_rstd,
                p.slice(o.ln1_w..o.ln1_w + c),
            )?;
        }
        if d.first {
            let (wte, wpe) = (
                lay.wte.expect("the first stage holds the embedding"),
                lay.wpe.expect("the first stage holds the embedding"),
            );
            g.embedding_backward(
                gr.slice(wte..wte + vl * c),
                gr.slice(wpe..wpe + t * c),
                s.dres.all(),
                a.tokens.all(),
                t,
                v0,
            )?;
        }
        Ok(())
    }

    /// The sum of squares of the gradient elements in `ranges` (a rank's share of the global
    /// norm), left on the device and returned. A sharded run sums the shares over its groups
    /// and hands the total back through [`CudaGpt::set_grad_norm_sq`].
    pub fn grad_norm_sq_of(&mut self, ranges: &[Range<usize>]) -> Result<f64> {
        let n = self.grads.len();
        assert!(
            ranges.iter().all(|r| r.start <= r.end && r.end <= n),
            "a norm range lies outside the gradients"
        );
        let s = &mut self.s;
        if s.norm_ranges != ranges {
            let flat: Vec<i64> = ranges
                .iter()
                .flat_map(|r| [r.start as i64, r.end as i64])
                .collect();
            s.norm_ranges_dev = Db::from_host(&self.gpu, &flat)?;
            s.norm_ranges = ranges.to_vec();
        }
        self.gpu.sum_squares(
            s.norm_sq.all(),
            s.partials.all(),
            self.grads.all(),
            s.norm_ranges_dev.all(),
        )?;
        let mut out = [0f64];
        s.norm_sq.download(&self.gpu, &mut out)?;
        Ok(out[0])
    }

    /// Sets the squared global gradient norm [`CudaGpt::update`] clips with.
    pub fn set_grad_norm_sq(&mut self, norm_sq: f64) -> Result<()> {
        self.s.norm_sq.upload(&self.gpu, &[norm_sq])
    }

    /// One AdamW update of [`CudaGpt::opt_shard`] at learning rate `lr` with the gradients
    /// clipped to `max_norm`, after the norm is on the device ([`CudaGpt::grad_norm_sq`] or
    /// [`CudaGpt::set_grad_norm_sq`]). Writes the master weights and their bf16 copy.
    pub fn update(&mut self, opt: &AdamWConfig, lr: f64, max_norm: f64) -> Result<()> {
        if let Some(copy) = self.copy_fence.take() {
            self.gpu.wait(Stream::Training, &copy)?;
        }
        self.step += 1;
        let h = AdamWStep::new(opt, self.step, lr, max_norm);
        let r = self.opt_shard.clone();
        self.gpu.adamw(
            self.master.slice(r.clone()),
            self.params.slice(r.clone()),
            self.grads.slice(r.clone()),
            self.m.all(),
            self.v.all(),
            self.decay.slice(r),
            &h,
            self.s.norm_sq.all(),
        )
    }

    /// Refreshes the bf16 weights from the master weights, after the master weights changed
    /// outside [`CudaGpt::update`] (the distributed optimizer's all-gather).
    pub fn refresh_params(&self) -> Result<()> {
        self.gpu.cast_to_bf16(self.params.all(), self.master.all())
    }

    /// The sum of the per-position losses since [`CudaGpt::zero_grad`], summed on the host in
    /// f64.
    pub fn loss_sum(&self) -> Result<f64> {
        let v = self.s.losses.to_vec(&self.gpu)?;
        Ok(v.iter().map(|&x| x as f64).sum())
    }

    /// Copies master weights and both moments to the host, in that order, waiting for them.
    pub fn download_state(&self, master: &mut [f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        self.master.download(&self.gpu, master)?;
        self.m.download(&self.gpu, m)?;
        self.v.download(&self.gpu, v)
    }

    /// Replaces master weights, both moments and the update count (a resumed run), and
    /// refreshes the bf16 weights.
    pub fn upload_state(&mut self, master: &[f32], m: &[f32], v: &[f32], step: u64) -> Result<()> {
        assert!(m.len() == self.m.len() && v.len() == self.v.len());
        // A snapshot may still be copying the state out; the new state waits for it.
        if let Some(copy) = self.copy_fence.take() {
            self.gpu.wait(Stream::Training, &copy)?;
        }
        self.master.upload(&self.gpu, master)?;
        self.m.upload(&self.gpu, m)?;
        self.v.upload(&self.gpu, v)?;
        self.step = step;
        self.refresh_params()
    }

    /// Starts copying `pieces` of the state into `host`, back to back in order, on the copy
    /// stream after the training stream's work so far, and returns at once with the event that
    /// marks the copy done. Training goes on: forward and backward run alongside the copy, and
    /// only the next [`CudaGpt::update`], the one kernel that writes what is being copied,
    /// waits for it on the device. Moment ranges are relative to [`CudaGpt::opt_shard`].
    ///
    /// # Safety
    /// `host` must stay alive and untouched until the returned event has completed, and for
    /// full speed it should be page-locked ([`Gpu::pin`]).
    pub unsafe fn snapshot_async(
        &mut self,
        host: &mut [f32],
        pieces: &[(State, Range<usize>)],
    ) -> Result<Arc<Event>> {
        let total: usize = pieces.iter().map(|(_, r)| r.len()).sum();
        assert_eq!(
            host.len(),
            total,
            "the snapshot buffer does not fit the pieces"
        );
        let ready = self.gpu.event(false)?;
        self.gpu.record(&ready, Stream::Training)?;
        self.gpu.wait(Stream::Copies, &ready)?;
        let mut rest = host;
        for (state, r) in pieces {
            let src = match state {
                State::Master => &self.master,
                State::M => &self.m,
                State::V => &self.v,
            };
            assert!(r.end <= src.len(), "piece {r:?} is outside the state");
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            rest = tail;
            // SAFETY: the source range lies in a live allocation; the caller keeps `dst` alive
            // and untouched until the event completes.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(dst, src.at(r.start), self.gpu.copies)
            }
            .map_err(super::driver("copying the snapshot"))?;
        }
        let done = Arc::new(self.gpu.event(false)?);
        self.gpu.record(&done, Stream::Copies)?;
        self.copy_fence = Some(done.clone());
        Ok(done)
    }

    /// Zeroes the summed per-position losses (before validation, say).
    pub fn reset_losses(&self) -> Result<()> {
        self.s.losses.zero(&self.gpu)
    }
}

/// Which part of the optimizer state a snapshot piece copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The fp32 master weights: the parameters a checkpoint stores.
    Master,
    /// Adam's first moment.
    M,
    /// Adam's second moment.
    V,
}

/// Building the device model fails on a bad configuration or on the device.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Config(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] super::CudaError),
}
