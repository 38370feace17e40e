//! The whole GPT-2 model on one GPU: the CPU model's forward and backward ([`crate::Gpt`])
//! layer for layer, with bf16 parameters and activations, an fp32 residual stream and fp32
//! master weights, gradients and Adam moments, all laid out by the same [`ParamLayout`] so that
//! a checkpoint's boxes mean the same on either device.

use std::ops::Range;
use std::sync::Arc;

use half::bf16 as Bf16;

use super::blas::Out;
use super::ops::AdamWStep;
use super::{bytes, DeviceBuffer, Event, Gpu, Result, Slice, Stream};
use crate::layout::{ParamLayout, Shard};
use crate::{AdamWConfig, GptConfig, ModelError};

/// Blocks of the gradient-norm reduction: partial sums in a fixed order.
const NORM_PARTS: usize = 1024;

type Db<T> = DeviceBuffer<T>;

/// What forward keeps for backward, stacked over layers as in the CPU model.
#[derive(Debug)]
struct Acts {
    tokens: Db<u32>,
    targets: Db<u32>,
    encoded: Db<f32>,
    ln1: Db<Bf16>,
    ln1_mean: Db<f32>,
    ln1_rstd: Db<f32>,
    qkv: Db<Bf16>,
    atty: Db<Bf16>,
    /// The probabilities (L, B, NH, T, T), kept only when attention is not fused.
    att: Db<Bf16>,
    /// Each row's log2-sum-exp2 (L, B, NH, T), kept when attention is fused.
    lse: Db<f32>,
    residual2: Db<f32>,
    ln2: Db<Bf16>,
    ln2_mean: Db<f32>,
    ln2_rstd: Db<f32>,
    fch: Db<Bf16>,
    fch_gelu: Db<Bf16>,
    residual3: Db<f32>,
    lnf: Db<Bf16>,
    lnf_mean: Db<f32>,
    lnf_rstd: Db<f32>,
    /// Logits after forward's loss, dL/dlogits once forward has been told `dloss`.
    logits: Db<Bf16>,
    /// Each position's loss, summed over the microbatches since [`CudaGpt::zero_grad`].
    losses: Db<f32>,
}

/// Backward's working buffers.
#[derive(Debug)]
struct Scratch {
    dres: Db<f32>,
    dres_bf: Db<Bf16>,
    dsmall: Db<Bf16>,
    dwide: Db<Bf16>,
    datt: Db<Bf16>,
    /// The fused attention backward's row sums of dout * out, (B, NH, T).
    dd: Db<f32>,
    /// Eight (B, NH, T, hs) buffers for attention.
    heads: Vec<Db<Bf16>>,
    partials: Db<f64>,
    norm_sq: Db<f64>,
}

/// The whole model on one GPU, with its optimizer state.
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
    pub m: Db<f32>,
    pub v: Db<f32>,
    decay: Db<u8>,
    /// AdamW updates done.
    pub step: u64,
    /// The last snapshot's copy, which the next update waits for on the device.
    copy_fence: Option<Arc<Event>>,
    b: usize,
    t: usize,
    /// Heads of 64 run the fused attention kernels; others materialize the probabilities.
    flash: bool,
    acts: Acts,
    s: Scratch,
}

impl CudaGpt {
    /// Builds the model on `gpu` for microbatches of `batch` sequences of `seq` tokens, from
    /// fp32 `master` weights laid out by [`ParamLayout::new`]; the Adam moments start at zero.
    pub fn new(
        gpu: Gpu,
        config: GptConfig,
        batch: usize,
        seq: usize,
        master: &[f32],
    ) -> std::result::Result<Self, CudaModelError> {
        config.validate()?;
        if batch == 0 || seq == 0 || seq > config.seq_len {
            return Err(ModelError::invalid(
                "batch",
                format!(
                    "microbatch ({batch} x {seq}) must be non-empty with seq_len at most {}",
                    config.seq_len
                ),
            )
            .into());
        }
        let layout = ParamLayout::sharded(&config, Shard::WHOLE);
        let n = layout.numel();
        assert_eq!(
            master.len(),
            n,
            "master weights are not laid out by this model"
        );
        let (b, t, c, l) = (batch, seq, config.n_embd, config.n_layer);
        let (bt, nh, vp) = (b * t, config.n_head, config.padded_vocab_size());
        let flash = c / nh == super::ops::FLASH_HEAD;
        let (tt, rows) = if flash {
            (0, b * nh * t)
        } else {
            (b * nh * t * t, 0)
        };
        let z32 = |n: usize| Db::<f32>::zeros(&gpu, n);
        let zbf = |n: usize| Db::<Bf16>::zeros(&gpu, n);
        let acts = Acts {
            tokens: Db::zeros(&gpu, bt)?,
            targets: Db::zeros(&gpu, bt)?,
            encoded: z32(bt * c)?,
            ln1: zbf(l * bt * c)?,
            ln1_mean: z32(l * bt)?,
            ln1_rstd: z32(l * bt)?,
            qkv: zbf(l * bt * 3 * c)?,
            atty: zbf(l * bt * c)?,
            att: zbf(l * tt)?,
            lse: z32(l * rows)?,
            residual2: z32(l * bt * c)?,
            ln2: zbf(l * bt * c)?,
            ln2_mean: z32(l * bt)?,
            ln2_rstd: z32(l * bt)?,
            fch: zbf(l * bt * 4 * c)?,
            fch_gelu: zbf(l * bt * 4 * c)?,
            residual3: z32(l * bt * c)?,
            lnf: zbf(bt * c)?,
            lnf_mean: z32(bt)?,
            lnf_rstd: z32(bt)?,
            logits: zbf(bt * vp)?,
            losses: z32(bt)?,
        };
        let s = Scratch {
            dres: z32(bt * c)?,
            dres_bf: zbf(bt * c)?,
            dsmall: zbf(bt * c)?,
            dwide: zbf(bt * 4 * c)?,
            datt: zbf(tt)?,
            dd: z32(rows)?,
            heads: (0..8).map(|_| zbf(bt * c)).collect::<Result<_>>()?,
            partials: Db::zeros(&gpu, NORM_PARTS)?,
            norm_sq: Db::zeros(&gpu, 1)?,
        };
        let mut decay = vec![0u8; n];
        for (r, d) in layout.decay_ranges() {
            decay[r].fill(d as u8);
        }
        let model = CudaGpt {
            master: Db::from_host(&gpu, master)?,
            params: Db::zeros(&gpu, n)?,
            grads: z32(n)?,
            m: z32(n)?,
            v: z32(n)?,
            decay: Db::from_host(&gpu, &decay)?,
            step: 0,
            copy_fence: None,
            flash,
            b,
            t,
            acts,
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

    /// Bytes the device holds for `config` and microbatches of (b, t): state, activations and
    /// scratch, as [`CudaGpt::new`] allocates them.
    pub fn memory_bytes(config: &GptConfig, b: usize, t: usize) -> f64 {
        let f = |x: usize| x as f64;
        let n = f(ParamLayout::new(config).numel());
        let (bt, c, l, nh) = (
            f(b * t),
            f(config.n_embd),
            f(config.n_layer),
            f(config.n_head),
        );
        let fused = config.n_embd / config.n_head == super::ops::FLASH_HEAD;
        let tt = if fused { 0.0 } else { f(b) * nh * f(t) * f(t) };
        let vp = f(config.padded_vocab_size());
        // master, grads, m, v (fp32); params (bf16); decay mask.
        let state = n * (4.0 * 4.0 + 2.0 + 1.0);
        // Per layer: fp32 residual2, residual3 and four statistics; bf16 ln1, qkv, atty, ln2,
        // fch, fch_gelu and the probabilities.
        let per_layer =
            4.0 * (2.0 * bt * c + 4.0 * bt) + 2.0 * (bt * (c + 3.0 * c + c + c + 8.0 * c) + tt);
        let head = 4.0 * (bt * c + 3.0 * bt) + 2.0 * (bt * c + bt * vp);
        let scratch = 4.0 * bt * c + 2.0 * (bt * c * (2.0 + 4.0 + 8.0) + tt);
        state + l * per_layer + head + scratch
    }

    /// The microbatch shape (B, T).
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// Zeroes the gradients and the summed losses, before a step's first microbatch.
    pub fn zero_grad(&self) -> Result<()> {
        self.grads.zero(&self.gpu)?;
        self.reset_losses()
    }

    /// Forward of one microbatch, adding each position's loss into the step's sum. With
    /// `dloss` > 0 the loss's gradient (each position weighted by `dloss`) is formed at once,
    /// ready for [`CudaGpt::backward`]; evaluation passes 0.
    ///
    /// # Panics
    /// If the shapes differ from [`CudaGpt::batch_shape`] or a token is outside the
    /// vocabulary; callers validate data before it reaches the model.
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32], dloss: f32) -> Result<()> {
        let (b, t) = (self.b, self.t);
        let c = self.config.n_embd;
        let (l_n, nh, v) = (
            self.config.n_layer,
            self.config.n_head,
            self.config.vocab_size,
        );
        assert_eq!(tokens.len(), b * t, "tokens must be (B, T) = ({b}, {t})");
        assert_eq!(targets.len(), b * t, "targets must be (B, T) = ({b}, {t})");
        assert!(
            tokens.iter().chain(targets).all(|&x| (x as usize) < v),
            "token id outside the vocabulary"
        );
        let a = &self.acts;
        let g = &mut self.gpu;
        a.tokens.upload(g, tokens)?;
        a.targets.upload(g, targets)?;
        let p = &self.params;
        let lay = &self.layout;
        let vp = self.config.padded_vocab_size();
        let (wte, wpe) = (lay.wte.expect("whole model"), lay.wpe.expect("whole model"));
        g.embedding_forward(
            a.encoded.all(),
            a.tokens.all(),
            p.slice(wte..wte + vp * c),
            p.slice(wpe..wpe + t * c),
            t,
            0,
        )?;
        let heads: [Slice<Bf16>; 8] = std::array::from_fn(|i| self.s.heads[i].all());
        for l in 0..l_n {
            let o = lay.blocks[l];
            let res_in = if l == 0 {
                a.encoded.all()
            } else {
                a.residual3.part(l - 1, l_n)
            };
            let ln1 = a.ln1.part(l, l_n);
            g.layernorm_forward(
                ln1,
                a.ln1_mean.part(l, l_n),
                a.ln1_rstd.part(l, l_n),
                res_in,
                p.slice(o.ln1_w..o.ln1_w + c),
                p.slice(o.ln1_b..o.ln1_b + c),
            )?;
            let qkv = a.qkv.part(l, l_n);
            g.matmul_forward(
                bytes(qkv),
                Out::Bf16,
                ln1,
                p.slice(o.qkv_w..o.qkv_w + 3 * c * c),
                Some(p.slice(o.qkv_b..o.qkv_b + 3 * c)),
                c,
                3 * c,
            )?;
            let atty = a.atty.part(l, l_n);
            if self.flash {
                g.flash_attention_forward(atty, a.lse.part(l, l_n), qkv, b, t, nh)?;
            } else {
                g.attention_forward(
                    atty,
                    a.att.part(l, l_n),
                    qkv,
                    [heads[0], heads[1], heads[2], heads[3]],
                    b,
                    t,
                    nh,
                )?;
            }
            let residual2 = a.residual2.part(l, l_n);
            g.matmul_forward(
                bytes(residual2),
                Out::F32,
                atty,
                p.slice(o.proj_w..o.proj_w + c * c),
                None,
                c,
                c,
            )?;
            g.residual_bias_add(residual2, res_in, p.slice(o.proj_b..o.proj_b + c))?;
            let ln2 = a.ln2.part(l, l_n);
            g.layernorm_forward(
                ln2,
                a.ln2_mean.part(l, l_n),
                a.ln2_rstd.part(l, l_n),
                residual2,
                p.slice(o.ln2_w..o.ln2_w + c),
                p.slice(o.ln2_b..o.ln2_b + c),
            )?;
            let fch_gelu = a.fch_gelu.part(l, l_n);
            g.matmul_forward_gelu(
                fch_gelu,
                a.fch.part(l, l_n),
                ln2,
                p.slice(o.fc_w..o.fc_w + 4 * c * c),
                p.slice(o.fc_b..o.fc_b + 4 * c),
                c,
                4 * c,
            )?;
            let residual3 = a.residual3.part(l, l_n);
            g.matmul_forward(
                bytes(residual3),
                Out::F32,
                fch_gelu,
                p.slice(o.fcproj_w..o.fcproj_w + 4 * c * c),
                None,
                4 * c,
                c,
            )?;
            g.residual_bias_add(residual3, residual2, p.slice(o.fcproj_b..o.fcproj_b + c))?;
        }
        let (lnf_w, lnf_b) = (
            lay.lnf_w.expect("whole model"),
            lay.lnf_b.expect("whole model"),
        );
        g.layernorm_forward(
            a.lnf.all(),
            a.lnf_mean.all(),
            a.lnf_rstd.all(),
            a.residual3.part(l_n - 1, l_n),
            p.slice(lnf_w..lnf_w + c),
            p.slice(lnf_b..lnf_b + c),
        )?;
        g.matmul_forward(
            bytes(a.logits.all()),
            Out::Bf16,
            a.lnf.all(),
            p.slice(wte..wte + vp * c),
            None,
            c,
            vp,
        )?;
        g.crossentropy(a.losses.all(), a.logits.all(), a.targets.all(), v, dloss)
    }

    /// Backpropagates the last [`CudaGpt::forward`] (which was given the `dloss`), adding the
    /// parameter gradients into [`CudaGpt::grads`].
    pub fn backward(&mut self) -> Result<()> {
        let (b, t) = (self.b, self.t);
        let c = self.config.n_embd;
        let (l_n, nh) = (self.config.n_layer, self.config.n_head);
        let vp = self.config.padded_vocab_size();
        let (a, s) = (&self.acts, &self.s);
        let g = &mut self.gpu;
        let (p, gr) = (&self.params, &self.grads);
        let lay = &self.layout;
        let heads: [Slice<Bf16>; 8] = std::array::from_fn(|i| s.heads[i].all());
        let (wte, wpe) = (lay.wte.expect("whole model"), lay.wpe.expect("whole model"));
        let (lnf_w, lnf_b) = (
            lay.lnf_w.expect("whole model"),
            lay.lnf_b.expect("whole model"),
        );
        s.dres.zero(g)?;
        let dsmall = s.dsmall.all();
        // The tied head: dlnf = dlogits @ wte, dwte += dlogits^T @ lnf.
        g.matmul_backward(
            dsmall,
            gr.slice(wte..wte + vp * c),
            a.logits.all(),
            a.lnf.all(),
            p.slice(wte..wte + vp * c),
            c,
            vp,
        )?;
        let last = a.residual3.part(l_n - 1, l_n);
        g.layernorm_backward(
            s.dres.all(),
            gr.slice(lnf_w..lnf_w + c),
            gr.slice(lnf_b..lnf_b + c),
            dsmall,
            last,
            a.lnf_mean.all(),
            a.lnf_rstd.all(),
            p.slice(lnf_w..lnf_w + c),
        )?;
        let dres_bf = s.dres_bf.all();
        for l in (0..l_n).rev() {
            let o = lay.blocks[l];
            let res_in = if l == 0 {
                a.encoded.all()
            } else {
                a.residual3.part(l - 1, l_n)
            };
            let residual2 = a.residual2.part(l, l_n);
            // MLP: residual3 = residual2 + gelu(ln2 @ fc^T + b) @ fcproj^T + b.
            g.cast_to_bf16(dres_bf, s.dres.all())?;
            g.bias_backward(gr.slice(o.fcproj_b..o.fcproj_b + c), dres_bf)?;
            let dwide = s.dwide.all();
            g.matmul_backward_gelu(
                dwide,
                gr.slice(o.fcproj_w..o.fcproj_w + 4 * c * c),
                dres_bf,
                a.fch_gelu.part(l, l_n),
                p.slice(o.fcproj_w..o.fcproj_w + 4 * c * c),
                a.fch.part(l, l_n),
                4 * c,
                c,
            )?;
            g.bias_backward(gr.slice(o.fc_b..o.fc_b + 4 * c), dwide)?;
            g.matmul_backward(
                dsmall,
                gr.slice(o.fc_w..o.fc_w + 4 * c * c),
                dwide,
                a.ln2.part(l, l_n),
                p.slice(o.fc_w..o.fc_w + 4 * c * c),
                c,
                4 * c,
            )?;
            g.layernorm_backward(
                s.dres.all(),
                gr.slice(o.ln2_w..o.ln2_w + c),
                gr.slice(o.ln2_b..o.ln2_b + c),
                dsmall,
                residual2,
                a.ln2_mean.part(l, l_n),
                a.ln2_rstd.part(l, l_n),
                p.slice(o.ln2_w..o.ln2_w + c),
            )?;
            // Attention: residual2 = res_in + attention(ln1 @ qkv^T + b) @ proj^T + b.
            g.cast_to_bf16(dres_bf, s.dres.all())?;
            g.bias_backward(gr.slice(o.proj_b..o.proj_b + c), dres_bf)?;
            g.matmul_backward(
                dsmall,
                gr.slice(o.proj_w..o.proj_w + c * c),
                dres_bf,
                a.atty.part(l, l_n),
                p.slice(o.proj_w..o.proj_w + c * c),
                c,
                c,
            )?;
            let dqkv = dwide.sub(0..b * t * 3 * c);
            if self.flash {
                g.flash_attention_backward(
                    dqkv,
                    s.dd.all(),
                    dsmall,
                    a.atty.part(l, l_n),
                    a.qkv.part(l, l_n),
                    a.lse.part(l, l_n),
                    b,
                    t,
                    nh,
                )?;
            } else {
                g.attention_backward(
                    dqkv,
                    s.datt.all(),
                    dsmall,
                    a.qkv.part(l, l_n),
                    a.att.part(l, l_n),
                    heads,
                    b,
                    t,
                    nh,
                )?;
            }
            g.bias_backward(gr.slice(o.qkv_b..o.qkv_b + 3 * c), dqkv)?;
            g.matmul_backward(
                dsmall,
                gr.slice(o.qkv_w..o.qkv_w + 3 * c * c),
                dqkv,
                a.ln1.part(l, l_n),
                p.slice(o.qkv_w..o.qkv_w + 3 * c * c),
                c,
                3 * c,
            )?;
            g.layernorm_backward(
                s.dres.all(),
                gr.slice(o.ln1_w..o.ln1_w + c),
                gr.slice(o.ln1_b..o.ln1_b + c),
                dsmall,
                res_in,
                a.ln1_mean.part(l, l_n),
                a.ln1_rstd.part(l, l_n),
                p.slice(o.ln1_w..o.ln1_w + c),
            )?;
        }
        g.embedding_backward(
            gr.slice(wte..wte + vp * c),
            gr.slice(wpe..wpe + t * c),
            s.dres.all(),
            a.tokens.all(),
            t,
            0,
        )
    }

    /// The squared global gradient norm, left on the device for [`CudaGpt::update`] and
    /// returned (one small copy to the host).
    pub fn grad_norm_sq(&self) -> Result<f64> {
        self.gpu.sum_squares(
            self.s.norm_sq.all(),
            self.s.partials.all(),
            self.grads.all(),
        )?;
        let mut out = [0f64];
        self.s.norm_sq.download(&self.gpu, &mut out)?;
        Ok(out[0])
    }

    /// One AdamW update at learning rate `lr` with the gradients clipped to `max_norm`, after
    /// [`CudaGpt::grad_norm_sq`]. Writes the master weights and their bf16 copy.
    pub fn update(&mut self, opt: &AdamWConfig, lr: f64, max_norm: f64) -> Result<()> {
        if let Some(copy) = self.copy_fence.take() {
            self.gpu.wait(Stream::Training, &copy)?;
        }
        self.step += 1;
        let h = AdamWStep::new(opt, self.step, lr, max_norm);
        self.gpu.adamw(
            self.master.all(),
            self.params.all(),
            self.grads.all(),
            self.m.all(),
            self.v.all(),
            self.decay.all(),
            &h,
            self.s.norm_sq.all(),
        )
    }

    /// The sum of the per-position losses since [`CudaGpt::zero_grad`], summed on the host in
    /// f64.
    pub fn loss_sum(&self) -> Result<f64> {
        let v = self.acts.losses.to_vec(&self.gpu)?;
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
        self.master.upload(&self.gpu, master)?;
        self.m.upload(&self.gpu, m)?;
        self.v.upload(&self.gpu, v)?;
        self.step = step;
        self.gpu.cast_to_bf16(self.params.all(), self.master.all())
    }

    /// Starts copying `pieces` of the state into `host`, back to back in order, on the copy
    /// stream after the training stream's work so far, and returns at once with the event that
    /// marks the copy done. Training goes on: forward and backward run alongside the copy, and
    /// only the next [`CudaGpt::update`], the one kernel that writes what is being copied,
    /// waits for it on the device.
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
        self.acts.losses.zero(&self.gpu)
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
