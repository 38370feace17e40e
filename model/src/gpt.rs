//! The GPT-2 model on the CPU: flat buffers plus one forward and one backward pass, for the
//! whole model or for one rank's shard of it.
//!
//! A shard is a pipeline stage (a run of layers, with the embeddings on the first stage and the
//! final LayerNorm, head and loss on the last) cut by Megatron's tensor parallelism: attention
//! heads and MLP columns split across ranks, the vocabulary split for the embedding and the
//! loss. The stage keeps the activations of several microbatches at once (one "slot" each), as
//! a 1F1B pipeline schedule needs; backward scratch is shared by all slots.

use std::convert::Infallible;

use crate::collective::{Collective, Solo};
use crate::config::GptConfig;
pub use crate::dims::Recompute;
use crate::dims::{Act, Dims, ACTS};
use crate::kernels as k;
use crate::layout::{ParamLayout, Shard};
use crate::{Float, ModelError};

impl Dims {
    /// Elements of the one-layer working set recomputation writes into, as [`Work::new`]
    /// allocates it.
    fn work_elements(&self) -> usize {
        self.layer_elements(&ACTS, true)
    }

    /// Elements of one slot's saved activations, as [`Saved::new`] allocates them.
    fn saved_elements(&self) -> usize {
        let Dims {
            b, t, c, vl, last, ..
        } = *self;
        let bt = b * t;
        // Per layer: whatever forward keeps of ln1, residual2, ln2, residual3, qkv, atty, fch,
        // fch_gelu, the four per-position statistics and the attention probabilities.
        let kept = self.layer_elements(&ACTS, false);
        // encoded; on the last stage lnf, its two statistics, the logits slice, the inverse
        // sums of exponentials and the losses.
        let head = if last { bt * c + 4 * bt + bt * vl } else { 0 };
        kept + bt * c + head
    }

    /// Elements of the backward scratch, as [`Scratch::new`] allocates them.
    fn scratch_elements(&self) -> usize {
        let Dims {
            b,
            t,
            c,
            nh,
            cq,
            f4,
            tp,
            last,
            ..
        } = *self;
        let bt = b * t;
        let ce = if last { tp * bt + 3 * bt } else { 0 };
        2 * bt * c + bt * f4.max(3 * cq) + b * nh * t * t + ce + self.work_elements()
    }
}

/// What forward keeps of one microbatch for its backward.
#[derive(Debug)]
struct Saved<F> {
    tokens: Vec<u32>,  // (B, T)
    targets: Vec<u32>, // (B, T)
    encoded: Vec<F>,   // (B, T, C): the residual stream entering this stage's first layer
    // Per layer, stacked (L, ...):
    ln1: Vec<F>,       // (L, B, T, C)
    ln1_mean: Vec<F>,  // (L, B, T)
    ln1_rstd: Vec<F>,  // (L, B, T)
    qkv: Vec<F>,       // (L, B, T, 3C/tp)
    atty: Vec<F>,      // (L, B, T, C/tp)
    att: Vec<F>,       // (L, B, NH/tp, T, T)
    residual2: Vec<F>, // (L, B, T, C)
    ln2: Vec<F>,       // (L, B, T, C)
    ln2_mean: Vec<F>,  // (L, B, T)
    ln2_rstd: Vec<F>,  // (L, B, T)
    fch: Vec<F>,       // (L, B, T, 4C/tp)
    fch_gelu: Vec<F>,  // (L, B, T, 4C/tp)
    residual3: Vec<F>, // (L, B, T, C): the residual stream leaving each layer
    // Last stage only (empty elsewhere):
    lnf: Vec<F>,      // (B, T, C)
    lnf_mean: Vec<F>, // (B, T)
    lnf_rstd: Vec<F>, // (B, T)
    logits: Vec<F>,   // (B, T, Vp/tp): exp(logit - max) after forward, dlogits in backward
    inv_sums: Vec<F>, // (B, T): 1 / each row's sum of exponentials over the whole vocabulary
    losses: Vec<F>,   // (B, T)
    forwarded: bool,
}

impl<F: Float> Saved<F> {
    fn new(d: &Dims) -> Self {
        let (l, bt, c) = (d.l, d.b * d.t, d.c);
        let z = |n: usize| vec![F::ZERO; n];
        let h = |n: usize| if d.last { z(n) } else { Vec::new() };
        // A layer activation forward keeps, for every layer; none when backward recomputes it.
        let k = |a: Act| {
            if d.keeps(a) {
                z(l * d.size(a))
            } else {
                Vec::new()
            }
        };
        Saved {
            tokens: vec![0; bt],
            targets: vec![0; bt],
            encoded: z(bt * c),
            ln1: k(Act::Ln1),
            ln1_mean: k(Act::Stats),
            ln1_rstd: k(Act::Stats),
            qkv: k(Act::Qkv),
            atty: k(Act::Atty),
            att: k(Act::Att),
            residual2: k(Act::Residual2),
            ln2: k(Act::Ln2),
            ln2_mean: k(Act::Stats),
            ln2_rstd: k(Act::Stats),
            fch: k(Act::Fch),
            fch_gelu: k(Act::FchGelu),
            residual3: k(Act::Residual3),
            lnf: h(bt * c),
            lnf_mean: h(bt),
            lnf_rstd: h(bt),
            logits: h(bt * d.vl),
            inv_sums: h(bt),
            losses: h(bt),
            forwarded: false,
        }
    }
}

/// One layer's activations that forward does not keep: where forward writes them on its way
/// through a layer, and where backward recomputes them. Shared by every slot; empty without
/// recomputation.
#[derive(Debug)]
struct Work<F> {
    ln1: Vec<F>,
    ln1_mean: Vec<F>,
    ln1_rstd: Vec<F>,
    qkv: Vec<F>,
    atty: Vec<F>,
    att: Vec<F>,
    residual2: Vec<F>,
    ln2: Vec<F>,
    ln2_mean: Vec<F>,
    ln2_rstd: Vec<F>,
    fch: Vec<F>,
    fch_gelu: Vec<F>,
}

impl<F: Float> Work<F> {
    fn new(d: &Dims) -> Self {
        let w = |a: Act| {
            if d.works(a) {
                vec![F::ZERO; d.size(a)]
            } else {
                Vec::new()
            }
        };
        Work {
            ln1: w(Act::Ln1),
            ln1_mean: w(Act::Stats),
            ln1_rstd: w(Act::Stats),
            qkv: w(Act::Qkv),
            atty: w(Act::Atty),
            att: w(Act::Att),
            residual2: w(Act::Residual2),
            ln2: w(Act::Ln2),
            ln2_mean: w(Act::Stats),
            ln2_rstd: w(Act::Stats),
            fch: w(Act::Fch),
            fch_gelu: w(Act::FchGelu),
        }
    }
}

/// Layer `l` of a kept activation, or the working set's copy when forward does not keep it.
fn kept<'a, F>(saved: &'a [F], work: &'a [F], l: usize, n_layer: usize) -> &'a [F] {
    if saved.is_empty() {
        work
    } else {
        layer(saved, l, n_layer)
    }
}

fn kept_mut<'a, F>(saved: &'a mut [F], work: &'a mut [F], l: usize, n_layer: usize) -> &'a mut [F] {
    if saved.is_empty() {
        work
    } else {
        layer_mut(saved, l, n_layer)
    }
}

/// Where one layer's forward writes its activations.
struct LayerOut<'a, F> {
    ln1: &'a mut [F],
    ln1_mean: &'a mut [F],
    ln1_rstd: &'a mut [F],
    qkv: &'a mut [F],
    atty: &'a mut [F],
    att: &'a mut [F],
    residual2: &'a mut [F],
    ln2: &'a mut [F],
    ln2_mean: &'a mut [F],
    ln2_rstd: &'a mut [F],
    fch: &'a mut [F],
    fch_gelu: &'a mut [F],
    residual3: &'a mut [F],
}

/// Layer `$l`'s places: the slot `$a`'s where forward keeps an activation, the working set
/// `$w`'s where it does not; the layer's output goes to `$out`. A macro, so that the borrows
/// stay field by field and the caller may read the slot's other fields meanwhile.
macro_rules! layer_out {
    ($a:expr, $w:expr, $l:expr, $n:expr, $out:expr) => {
        LayerOut {
            ln1: kept_mut(&mut $a.ln1, &mut $w.ln1, $l, $n),
            ln1_mean: kept_mut(&mut $a.ln1_mean, &mut $w.ln1_mean, $l, $n),
            ln1_rstd: kept_mut(&mut $a.ln1_rstd, &mut $w.ln1_rstd, $l, $n),
            qkv: kept_mut(&mut $a.qkv, &mut $w.qkv, $l, $n),
            atty: kept_mut(&mut $a.atty, &mut $w.atty, $l, $n),
            att: kept_mut(&mut $a.att, &mut $w.att, $l, $n),
            residual2: kept_mut(&mut $a.residual2, &mut $w.residual2, $l, $n),
            ln2: kept_mut(&mut $a.ln2, &mut $w.ln2, $l, $n),
            ln2_mean: kept_mut(&mut $a.ln2_mean, &mut $w.ln2_mean, $l, $n),
            ln2_rstd: kept_mut(&mut $a.ln2_rstd, &mut $w.ln2_rstd, $l, $n),
            fch: kept_mut(&mut $a.fch, &mut $w.fch, $l, $n),
            fch_gelu: kept_mut(&mut $a.fch_gelu, &mut $w.fch_gelu, $l, $n),
            residual3: $out,
        }
    };
}

/// One transformer layer's forward from `res_in`, (B, T, C), into `x`: the residual stream
/// leaves in `x.residual3`. Tensor parallelism as in [`Gpt::forward_stage`]. Without `output`
/// it stops at the MLP's GELU: recomputation for backward needs nothing after it, and so
/// neither the last product nor its all-reduce.
fn layer_forward<F: Float, C: Collective<F>>(
    p: &[F],
    o: &crate::layout::BlockOffsets,
    d: &Dims,
    res_in: &[F],
    x: LayerOut<'_, F>,
    tp: &mut C,
    output: bool,
) -> Result<(), C::Error> {
    let Dims {
        b,
        t,
        c,
        nh,
        cq,
        f4,
        ..
    } = *d;
    k::layernorm_forward(
        x.ln1,
        x.ln1_mean,
        x.ln1_rstd,
        res_in,
        &p[o.ln1_w..o.ln1_w + c],
        &p[o.ln1_b..o.ln1_b + c],
        c,
    );
    // Column-parallel: this rank's heads of q, k and v.
    k::matmul_forward(
        x.qkv,
        x.ln1,
        &p[o.qkv_w..o.qkv_w + 3 * cq * c],
        Some(&p[o.qkv_b..o.qkv_b + 3 * cq]),
        c,
        3 * cq,
        false,
    );
    k::attention_forward(x.atty, x.att, x.qkv, b, t, cq, nh);
    // Row-parallel: partial products summed over ranks, then the bias once.
    k::matmul_forward(
        x.residual2,
        x.atty,
        &p[o.proj_w..o.proj_w + c * cq],
        None,
        cq,
        c,
        false,
    );
    tp.all_reduce(x.residual2)?;
    k::residual_bias_add(x.residual2, res_in, &p[o.proj_b..o.proj_b + c]);
    k::layernorm_forward(
        x.ln2,
        x.ln2_mean,
        x.ln2_rstd,
        x.residual2,
        &p[o.ln2_w..o.ln2_w + c],
        &p[o.ln2_b..o.ln2_b + c],
        c,
    );
    k::matmul_forward(
        x.fch,
        x.ln2,
        &p[o.fc_w..o.fc_w + f4 * c],
        Some(&p[o.fc_b..o.fc_b + f4]),
        c,
        f4,
        false,
    );
    k::gelu_forward(x.fch_gelu, x.fch);
    if !output {
        return Ok(());
    }
    k::matmul_forward(
        x.residual3,
        x.fch_gelu,
        &p[o.fcproj_w..o.fcproj_w + c * f4],
        None,
        f4,
        c,
        false,
    );
    tp.all_reduce(x.residual3)?;
    k::residual_bias_add(x.residual3, x.residual2, &p[o.fcproj_b..o.fcproj_b + c]);
    Ok(())
}

/// Backward's working buffers, shared by every slot.
#[derive(Debug)]
struct Scratch<F> {
    dres: Vec<F>,  // (B, T, C): dL/d(residual stream) at the current layer boundary
    dc: Vec<F>,    // (B, T, C)
    dwide: Vec<F>, // (B, T, max(4C, 3C)/tp)
    datt: Vec<F>,  // (B, NH/tp, T, T)
    // The cross-entropy's statistics, last stage only: every rank's row maxima (tp, B, T), the
    // whole vocabulary's maxima (B, T), and the sums of exponentials and target logits (2, B, T).
    ce_maxes: Vec<F>,
    ce_max: Vec<F>,
    ce_sums: Vec<F>,
}

impl<F: Float> Scratch<F> {
    fn new(d: &Dims) -> Self {
        let bt = d.b * d.t;
        let z = |n: usize| vec![F::ZERO; n];
        let h = |n: usize| if d.last { z(n) } else { Vec::new() };
        Scratch {
            dres: z(bt * d.c),
            dc: z(bt * d.c),
            dwide: z(bt * d.f4.max(3 * d.cq)),
            datt: z(d.b * d.nh * d.t * d.t),
            ce_maxes: h(d.tp * bt),
            ce_max: h(bt),
            ce_sums: h(2 * bt),
        }
    }
}

/// Layer `l`'s slice of a buffer stacked over layers.
fn layer<F>(buf: &[F], l: usize, n_layer: usize) -> &[F] {
    let n = buf.len() / n_layer;
    &buf[l * n..(l + 1) * n]
}

fn layer_mut<F>(buf: &mut [F], l: usize, n_layer: usize) -> &mut [F] {
    let n = buf.len() / n_layer;
    &mut buf[l * n..(l + 1) * n]
}

/// Two disjoint ranges of one buffer, mutably; `a` must end at or before `b` starts.
fn two_mut<F>(
    buf: &mut [F],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [F], &mut [F]) {
    assert!(a.end <= b.start, "ranges overlap or are out of order");
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(x) => x,
        Err(never) => match never {},
    }
}

/// A GPT-2 model, or one rank's shard of it, with its parameter and gradient buffers and the
/// activations of one microbatch shape. Optimizer state lives in [`crate::AdamW`], laid out by
/// the same [`ParamLayout`].
#[derive(Debug)]
pub struct Gpt<F> {
    pub config: GptConfig,
    pub layout: ParamLayout,
    /// This shard's parameters, laid out by `layout`.
    pub params: Vec<F>,
    /// Gradients, laid out by `layout`; [`Gpt::backward`] adds into them.
    pub grads: Vec<F>,
    dims: Dims,
    saved: Vec<Saved<F>>,
    scratch: Scratch<F>,
    /// The one-layer working set of recomputation (see [`Recompute`]).
    work: Work<F>,
}

impl<F: Float> Gpt<F> {
    /// Builds the whole model with zeroed parameters and activation buffers for microbatches of
    /// `batch` sequences of `seq` tokens. All memory the step needs is allocated here.
    pub fn new(config: GptConfig, batch: usize, seq: usize) -> Result<Self, ModelError> {
        Self::new_shard(config, Shard::WHOLE, batch, seq, 1, Recompute::None)
    }

    /// As [`Gpt::new`] for one rank's `shard`, keeping the activations of up to `slots`
    /// microbatches at once (a pipeline stage needs one per microbatch in flight), of each of
    /// which it keeps what `recompute` says; backward recomputes the rest.
    pub fn new_shard(
        config: GptConfig,
        shard: Shard,
        batch: usize,
        seq: usize,
        slots: usize,
        recompute: Recompute,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        shard.validate(&config)?;
        if batch == 0 {
            return Err(ModelError::invalid(
                "batch.micro_batch",
                "must be at least 1",
            ));
        }
        if seq == 0 || seq > config.seq_len {
            return Err(ModelError::invalid(
                "batch.seq_len",
                format!(
                    "{seq} is out of range; use 1 to model.seq_len ({})",
                    config.seq_len
                ),
            ));
        }
        assert!(slots > 0, "a model keeps at least one microbatch");
        let layout = ParamLayout::sharded(&config, shard);
        let n = layout.numel();
        let dims = Dims::new(&config, shard, batch, seq, recompute, false);
        Ok(Gpt {
            config,
            layout,
            params: vec![F::ZERO; n],
            grads: vec![F::ZERO; n],
            dims,
            saved: (0..slots).map(|_| Saved::new(&dims)).collect(),
            scratch: Scratch::new(&dims),
            work: Work::new(&dims),
        })
    }

    /// Bytes that [`Gpt::new`] allocates for `config` and microbatches of (b, t), plus the two
    /// AdamW moments: parameters, gradients, moments, activations and backward scratch.
    /// Computed in f64, so an absurd shape gives a huge number instead of an overflow.
    pub fn memory_bytes(config: &GptConfig, b: usize, t: usize) -> f64 {
        Self::shard_memory_bytes(config, Shard::WHOLE, b, t, 1, Recompute::None)
    }

    /// As [`Gpt::memory_bytes`] for one rank's shard keeping `slots` microbatches under
    /// `recompute`, as [`Gpt::new_shard`] allocates.
    pub fn shard_memory_bytes(
        config: &GptConfig,
        shard: Shard,
        b: usize,
        t: usize,
        slots: usize,
        recompute: Recompute,
    ) -> f64 {
        let f = |x: usize| x as f64;
        let (l, c, vp) = (
            f(config.n_layer),
            f(config.n_embd),
            f(config.padded_vocab_size()),
        );
        let whole = vp * c + f(config.seq_len) * c + l * (12.0 * c * c + 13.0 * c) + 2.0 * c;
        // Close enough for a memory check without building the layout: the sharded share.
        let params = whole / f(shard.tp * shard.pp);
        // Activation sizes are products of small numbers; in f64 they cannot overflow.
        let d = Dims::new(config, shard, b, t, recompute, false);
        let acts = f(slots) * d.saved_elements() as f64 + d.scratch_elements() as f64;
        std::mem::size_of::<F>() as f64 * (4.0 * params + acts)
    }

    /// Draws fresh parameters from `seed` (see [`ParamLayout::init`]).
    pub fn init_params(&mut self, seed: u64, init_std: f64) {
        self.layout
            .init(&mut self.params, &self.config, seed, init_std);
    }

    /// The microbatch shape (B, T) this model was built for.
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.dims.b, self.dims.t)
    }

    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = F::ZERO);
    }

    /// Runs the forward pass of the whole model on `tokens` (B, T) predicting `targets` (B, T)
    /// and returns the mean loss over the B * T positions. Keeps the activations for
    /// [`Gpt::backward`].
    ///
    /// # Panics
    /// If this model is a shard, the shapes differ from [`Gpt::batch_shape`] or a token is
    /// outside the vocabulary; callers validate data before it reaches the model.
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32]) -> F {
        let loss = infallible(self.forward_stage(0, tokens, targets, None, &mut Solo));
        loss.expect("the whole model has a loss")
    }

    /// Runs this stage's forward pass for one microbatch, keeping its activations in `slot` for
    /// [`Gpt::backward_stage`]. The first stage reads `tokens`; later stages take `input`, the
    /// previous stage's [`Gpt::stage_output`]. The last stage scores `targets` and returns the
    /// mean loss over the B * T positions; other stages return `None`. `tp` is this rank's
    /// tensor-parallel group, of `shard.tp` members.
    ///
    /// # Panics
    /// As [`Gpt::forward`], and if `input` is missing on a later stage or given to the first.
    pub fn forward_stage<C: Collective<F>>(
        &mut self,
        slot: usize,
        tokens: &[u32],
        targets: &[u32],
        input: Option<&[F]>,
        tp: &mut C,
    ) -> Result<Option<F>, C::Error> {
        let d = self.dims;
        let Dims {
            b, t, c, v0, vl, v, ..
        } = d;
        let l_n = d.l;
        assert!(
            tp.size() == d.tp && tp.rank() == self.layout.shard.tp_rank,
            "the tensor-parallel group does not match the shard"
        );
        let a = &mut self.saved[slot];
        let s = &mut self.scratch;
        assert_eq!(tokens.len(), b * t, "tokens must be (B, T) = ({b}, {t})");
        assert_eq!(targets.len(), b * t, "targets must be (B, T) = ({b}, {t})");
        assert!(
            tokens.iter().chain(targets).all(|&x| (x as usize) < v),
            "token id outside the vocabulary"
        );
        a.tokens.copy_from_slice(tokens);
        a.targets.copy_from_slice(targets);
        let p = &self.params;
        let lay = &self.layout;

        match (d.first, input) {
            (true, None) => {
                let wte = lay.wte.expect("the first stage holds the embedding");
                let wpe = lay.wpe.expect("the first stage holds the embedding");
                // Vocabulary-parallel: each rank looks up its own slice, the sum is the lookup.
                k::embedding_forward(&mut a.encoded, tokens, &p[wte..wte + vl * c], v0, c);
                tp.all_reduce(&mut a.encoded)?;
                k::position_forward(&mut a.encoded, &p[wpe..wpe + t * c], t, c);
            }
            (false, Some(x)) => a.encoded.copy_from_slice(x),
            _ => panic!("only stages after the first take an input"),
        }
        let w = &mut self.work;
        let per = b * t * c;
        for l in 0..l_n {
            let (done, rest) = a.residual3.split_at_mut(l * per);
            let res_in: &[F] = if l == 0 {
                &a.encoded
            } else {
                &done[(l - 1) * per..]
            };
            let x = layer_out!(a, w, l, l_n, &mut rest[..per]);
            layer_forward(p, &lay.blocks[l], &d, res_in, x, tp, true)?;
        }
        a.forwarded = true;
        if !d.last {
            return Ok(None);
        }
        let (wte, lnf_w, lnf_b) = (
            lay.wte.expect("the last stage holds the head"),
            lay.lnf_w.expect("the last stage holds ln_f"),
            lay.lnf_b.expect("the last stage holds ln_f"),
        );
        let last = layer(&a.residual3, l_n - 1, l_n);
        k::layernorm_forward(
            &mut a.lnf,
            &mut a.lnf_mean,
            &mut a.lnf_rstd,
            last,
            &p[lnf_w..lnf_w + c],
            &p[lnf_b..lnf_b + c],
            c,
        );
        // The tied head, vocabulary-parallel: this rank's slice of the logits.
        k::matmul_forward(
            &mut a.logits,
            &a.lnf,
            &p[wte..wte + vl * c],
            None,
            c,
            vl,
            false,
        );
        let bt = b * t;
        let r = tp.rank();
        k::crossentropy_max(&mut s.ce_maxes[r * bt..(r + 1) * bt], &a.logits, v0, v);
        tp.all_gather(&mut s.ce_maxes)?;
        s.ce_max.copy_from_slice(&s.ce_maxes[..bt]);
        for part in s.ce_maxes.chunks_exact(bt).skip(1) {
            s.ce_max
                .iter_mut()
                .zip(part)
                .for_each(|(m, &x)| *m = m.max(x));
        }
        let (sums, target_logits) = s.ce_sums.split_at_mut(bt);
        k::crossentropy_exp(
            sums,
            target_logits,
            &mut a.logits,
            &s.ce_max,
            targets,
            v0,
            v,
        );
        tp.all_reduce(&mut s.ce_sums)?;
        let (sums, target_logits) = s.ce_sums.split_at(bt);
        k::crossentropy_finish(&mut a.losses, &mut a.inv_sums, sums, target_logits);
        let total: F = a.losses.iter().copied().sum();
        Ok(Some(total / F::from_f64(bt as f64)))
    }

    /// The next-token probabilities over the real vocabulary at position `row` (of B * T) of
    /// the last [`Gpt::forward`], before [`Gpt::backward`] turns them into gradients. Whole
    /// model only.
    ///
    /// # Panics
    /// If this model is a shard or `row` is out of range.
    pub fn probabilities(&self, row: usize) -> Vec<F> {
        let d = self.dims;
        assert!(
            d.tp == 1 && d.first && d.last,
            "probabilities come from the whole model"
        );
        assert!(row < d.b * d.t, "row {row} outside the microbatch");
        let a = &self.saved[0];
        let inv = a.inv_sums[row];
        a.logits[row * d.vl..row * d.vl + d.v]
            .iter()
            .map(|&e| e * inv)
            .collect()
    }

    /// The residual stream leaving this stage for the microbatch in `slot`, (B, T, C): what the
    /// next stage takes as its input.
    pub fn stage_output(&self, slot: usize) -> &[F] {
        layer(&self.saved[slot].residual3, self.dims.l - 1, self.dims.l)
    }

    /// dL/d(this stage's input), (B, T, C), left by the last [`Gpt::backward_stage`]: what the
    /// previous stage takes as its output gradient.
    pub fn input_grad(&self) -> &[F] {
        &self.scratch.dres
    }

    /// Backpropagates the last forward pass and adds the parameter gradients into `grads`, with
    /// each position's loss weighted by `dloss`. For the mean loss of this microbatch alone,
    /// `dloss` is 1 / (B * T); over a global batch it is 1 / (tokens in the whole batch), which
    /// makes microbatches and replicas add up to the same update however the batch is split.
    ///
    /// # Panics
    /// If called twice for one forward pass: backward turns the forward's exponentials into
    /// gradients in place.
    pub fn backward(&mut self, dloss: F) {
        // Moved out and back: no allocation, and the gradient buffer can be borrowed apart
        // from the rest of the model.
        let mut grads = std::mem::take(&mut self.grads);
        self.backward_into(&mut grads, dloss, |_| {});
        self.grads = grads;
    }

    /// As [`Gpt::backward`], adding into `grads` (laid out by `self.layout`), and handing each
    /// part of `grads` to `ready` as soon as backward is done writing it, in the order of
    /// [`ParamLayout::backward_buckets`]. Data parallelism all-reduces those parts while
    /// backward goes on with the layers below.
    pub fn backward_into<'g>(
        &mut self,
        grads: &'g mut [F],
        dloss: F,
        ready: impl FnMut(&'g mut [F]),
    ) {
        infallible(self.backward_stage(0, grads, dloss, None, &mut Solo, ready));
    }

    /// This stage's backward for the microbatch in `slot`, as [`Gpt::backward_into`]. The last
    /// stage starts from its loss; earlier stages take `output_grad`, the next stage's
    /// [`Gpt::input_grad`]. Afterwards [`Gpt::input_grad`] holds the gradient to send back.
    ///
    /// # Panics
    /// If `slot` holds no forward pass, or `output_grad` is missing on an earlier stage or
    /// given to the last.
    pub fn backward_stage<'g, C: Collective<F>>(
        &mut self,
        slot: usize,
        grads: &'g mut [F],
        dloss: F,
        output_grad: Option<&[F]>,
        tp: &mut C,
        mut ready: impl FnMut(&'g mut [F]),
    ) -> Result<(), C::Error> {
        assert_eq!(
            grads.len(),
            self.layout.numel(),
            "gradients are not laid out by this model"
        );
        let d = self.dims;
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
        let bt = b * t;
        let a = &mut self.saved[slot];
        let s = &mut self.scratch;
        let wk = &mut self.work;
        assert!(a.forwarded, "backward needs a forward pass first");
        a.forwarded = false;
        let p = &self.params;
        let lay = &self.layout;
        // The part of `grads` backward may still write: a prefix, so offsets stay absolute.
        let mut rest: &'g mut [F] = grads;
        let mut release = |rest: &mut &'g mut [F], from: usize| {
            let (head, tail) = std::mem::take(rest).split_at_mut(from);
            ready(tail);
            *rest = head;
        };

        match (d.last, output_grad) {
            (true, None) => {
                let g = &mut *rest;
                let wte = lay.wte.expect("the last stage holds the head");
                let (lnf_w, lnf_b) = (
                    lay.lnf_w.expect("the last stage holds ln_f"),
                    lay.lnf_b.expect("the last stage holds ln_f"),
                );
                k::crossentropy_backward_inplace(&mut a.logits, &a.inv_sums, &a.targets, dloss, v0);
                k::matmul_backward(
                    &mut s.dc,
                    &mut g[wte..wte + vl * c],
                    None,
                    &a.logits,
                    &a.lnf,
                    &p[wte..wte + vl * c],
                    c,
                    vl,
                    false,
                );
                // The head's input is used by every rank: its gradient is the sum.
                tp.all_reduce(&mut s.dc)?;
                s.dres.iter_mut().for_each(|x| *x = F::ZERO);
                let (dw, db) = two_mut(g, lnf_w..lnf_w + c, lnf_b..lnf_b + c);
                k::layernorm_backward(
                    &mut s.dres,
                    dw,
                    db,
                    &s.dc,
                    layer(&a.residual3, l_n - 1, l_n),
                    &a.lnf_mean,
                    &a.lnf_rstd,
                    &p[lnf_w..lnf_w + c],
                    c,
                );
                release(&mut rest, lnf_w);
            }
            (false, Some(dy)) => s.dres.copy_from_slice(dy),
            _ => panic!("only stages before the last take an output gradient"),
        }
        for l in (0..l_n).rev() {
            let g = &mut *rest;
            let o = lay.blocks[l];
            let res_in: &[F] = if l == 0 {
                &a.encoded
            } else {
                layer(&a.residual3, l - 1, l_n)
            };
            // What forward did not keep of this layer, computed again from what it kept.
            match d.recompute {
                Recompute::None => {}
                Recompute::Selective => {
                    let (qkv, fch) = (layer(&a.qkv, l, l_n), layer(&a.fch, l, l_n));
                    k::attention_forward(&mut wk.atty, &mut wk.att, qkv, b, t, cq, nh);
                    k::gelu_forward(&mut wk.fch_gelu, fch);
                }
                Recompute::Full => {
                    let x = layer_out!(a, wk, l, l_n, &mut []);
                    layer_forward(p, &o, &d, res_in, x, tp, false)?;
                }
            }
            let d4c = &mut s.dwide[..bt * f4];
            // MLP: residual3 = residual2 + c_proj(gelu(c_fc(ln_2(residual2)))).
            {
                let (dw, db) = two_mut(
                    g,
                    o.fcproj_w..o.fcproj_w + c * f4,
                    o.fcproj_b..o.fcproj_b + c,
                );
                let w = &p[o.fcproj_w..o.fcproj_w + c * f4];
                k::matmul_backward(
                    d4c,
                    dw,
                    Some(db),
                    &s.dres,
                    kept(&a.fch_gelu, &wk.fch_gelu, l, l_n),
                    w,
                    f4,
                    c,
                    false,
                );
            }
            k::gelu_backward_inplace(d4c, kept(&a.fch, &wk.fch, l, l_n));
            {
                let (dw, db) = two_mut(g, o.fc_w..o.fc_w + f4 * c, o.fc_b..o.fc_b + f4);
                let w = &p[o.fc_w..o.fc_w + f4 * c];
                k::matmul_backward(
                    &mut s.dc,
                    dw,
                    Some(db),
                    d4c,
                    kept(&a.ln2, &wk.ln2, l, l_n),
                    w,
                    c,
                    f4,
                    false,
                );
            }
            // Column-parallel input: every rank's partial input gradient, summed.
            tp.all_reduce(&mut s.dc)?;
            {
                let (dw, db) = two_mut(g, o.ln2_w..o.ln2_w + c, o.ln2_b..o.ln2_b + c);
                let (mean, rstd) = (
                    kept(&a.ln2_mean, &wk.ln2_mean, l, l_n),
                    kept(&a.ln2_rstd, &wk.ln2_rstd, l, l_n),
                );
                let w = &p[o.ln2_w..o.ln2_w + c];
                k::layernorm_backward(
                    &mut s.dres,
                    dw,
                    db,
                    &s.dc,
                    kept(&a.residual2, &wk.residual2, l, l_n),
                    mean,
                    rstd,
                    w,
                    c,
                );
            }
            // Attention: residual2 = res_in + c_proj(attention(c_attn(ln_1(res_in)))).
            let datty = &mut s.dc[..bt * cq];
            {
                let (dw, db) = two_mut(g, o.proj_w..o.proj_w + c * cq, o.proj_b..o.proj_b + c);
                let w = &p[o.proj_w..o.proj_w + c * cq];
                k::matmul_backward(
                    datty,
                    dw,
                    Some(db),
                    &s.dres,
                    kept(&a.atty, &wk.atty, l, l_n),
                    w,
                    cq,
                    c,
                    false,
                );
            }
            let d3c = &mut s.dwide[..bt * 3 * cq];
            k::attention_backward(
                d3c,
                &mut s.datt,
                datty,
                kept(&a.qkv, &wk.qkv, l, l_n),
                kept(&a.att, &wk.att, l, l_n),
                b,
                t,
                cq,
                nh,
            );
            {
                let (dw, db) = two_mut(g, o.qkv_w..o.qkv_w + 3 * cq * c, o.qkv_b..o.qkv_b + 3 * cq);
                let w = &p[o.qkv_w..o.qkv_w + 3 * cq * c];
                k::matmul_backward(
                    &mut s.dc,
                    dw,
                    Some(db),
                    d3c,
                    kept(&a.ln1, &wk.ln1, l, l_n),
                    w,
                    c,
                    3 * cq,
                    false,
                );
            }
            tp.all_reduce(&mut s.dc)?;
            {
                let (dw, db) = two_mut(g, o.ln1_w..o.ln1_w + c, o.ln1_b..o.ln1_b + c);
                let (mean, rstd) = (
                    kept(&a.ln1_mean, &wk.ln1_mean, l, l_n),
                    kept(&a.ln1_rstd, &wk.ln1_rstd, l, l_n),
                );
                let w = &p[o.ln1_w..o.ln1_w + c];
                k::layernorm_backward(&mut s.dres, dw, db, &s.dc, res_in, mean, rstd, w, c);
            }
            release(&mut rest, o.ln1_w);
        }
        if d.first {
            let (wte, wpe) = (
                lay.wte.expect("the first stage holds the embedding"),
                lay.wpe.expect("the first stage holds the embedding"),
            );
            let (dwte, dwpe) = two_mut(rest, wte..wte + vl * c, wpe..wpe + self.config.seq_len * c);
            k::embedding_backward(dwte, &s.dres, &a.tokens, v0, c);
            k::position_backward(dwpe, &s.dres, t, c);
        }
        if !rest.is_empty() {
            ready(rest);
        }
        Ok(())
    }
}

#[cfg(test)]
impl<F> Gpt<F> {
    /// Elements held in activations and scratch, across every buffer.
    fn activation_elements(&self) -> usize {
        let saved: usize = self
            .saved
            .iter()
            .map(|a| {
                [
                    &a.encoded,
                    &a.ln1,
                    &a.ln1_mean,
                    &a.ln1_rstd,
                    &a.qkv,
                    &a.atty,
                    &a.att,
                    &a.residual2,
                    &a.ln2,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    &a.fch,
                    &a.fch_gelu,
                    &a.residual3,
                    &a.lnf,
                    &a.lnf_mean,
                    &a.lnf_rstd,
                    &a.logits,
                    &a.inv_sums,
                    &a.losses,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        let s = &self.scratch;
        let scratch: usize = [
            &s.dres,
            &s.dc,
            &s.dwide,
            &s.datt,
            &s.ce_maxes,
            &s.ce_max,
            &s.ce_sums,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        let w = &self.work;
        let work: usize = [
            &w.ln1,
            &w.ln1_mean,
            &w.ln1_rstd,
            &w.qkv,
            &w.atty,
            &w.att,
            &w.residual2,
            &w.ln2,
            &w.ln2_mean,
            &w.ln2_rstd,
            &w.fch,
            &w.fch_gelu,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        saved + scratch + work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_hands_out_each_bucket_once_it_is_final() {
        let config = GptConfig {
            vocab_size: 300,
            seq_len: 16,
            n_layer: 3,
            n_head: 2,
            n_embd: 8,
        };
        let mut m = Gpt::<f64>::new(config, 2, 12).unwrap();
        m.init_params(5, 0.1);
        let tokens: Vec<u32> = (0..24).map(|i| i * 11 % 300).collect();
        let targets: Vec<u32> = (0..24).map(|i| i * 7 % 300).collect();
        m.forward(&tokens, &targets);
        m.backward(0.5);
        let whole = m.grads.clone();

        m.forward(&tokens, &targets);
        let mut grads = vec![0.0; m.layout.numel()];
        let base = grads.as_ptr() as usize;
        let mut seen = Vec::new();
        // Each part, when handed out, already holds its final gradient.
        m.backward_into(&mut grads, 0.5, |part| {
            let start = (part.as_ptr() as usize - base) / std::mem::size_of::<f64>();
            assert_eq!(part, &whole[start..start + part.len()]);
            seen.push(start..start + part.len());
        });
        assert_eq!(seen, m.layout.backward_buckets());
        assert_eq!(grads, whole);
    }

    #[test]
    fn memory_estimate_matches_what_is_allocated() {
        let config = GptConfig {
            vocab_size: 300,
            seq_len: 16,
            n_layer: 3,
            n_head: 2,
            n_embd: 8,
        };
        let m = Gpt::<f32>::new(config.clone(), 2, 12).unwrap();
        let actual = 4 * (4 * m.params.len() + m.activation_elements());
        assert_eq!(Gpt::<f32>::memory_bytes(&config, 2, 12), actual as f64);
        // A shard's activations: the estimate counts what it allocates.
        let config = GptConfig {
            n_layer: 4,
            n_head: 4,
            ..config
        };
        for shard in [
            Shard {
                tp: 2,
                tp_rank: 1,
                pp: 2,
                stage: 1,
            },
            Shard {
                tp: 4,
                tp_rank: 0,
                pp: 4,
                stage: 0,
            },
        ] {
            let mut seen = Vec::new();
            for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
                let m = Gpt::<f32>::new_shard(config.clone(), shard, 2, 12, 3, r).unwrap();
                let estimate = Gpt::<f32>::shard_memory_bytes(&config, shard, 2, 12, 3, r);
                let params =
                    ParamLayout::new(&config).numel() as f64 / (shard.tp * shard.pp) as f64;
                assert_eq!(
                    estimate,
                    4.0 * (4.0 * params + m.activation_elements() as f64),
                    "{r:?}"
                );
                seen.push(m.activation_elements());
            }
            // Each mode keeps less than the one before.
            assert!(seen[0] > seen[1] && seen[1] > seen[2], "{seen:?}");
        }
    }
}
