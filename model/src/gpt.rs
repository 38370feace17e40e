//! The GPT-2 model on the CPU: flat buffers plus one forward and one backward pass.

use crate::config::GptConfig;
use crate::kernels as k;
use crate::layout::ParamLayout;
use crate::{Float, ModelError};

/// Activations of one microbatch, allocated once for its (B, T) and reused every step.
#[derive(Debug)]
struct Activations<F> {
    b: usize,
    t: usize,
    tokens: Vec<u32>,  // (B, T)
    targets: Vec<u32>, // (B, T)
    encoded: Vec<F>,   // (B, T, C): the residual stream entering layer 0
    // Per layer, stacked (L, ...):
    ln1: Vec<F>,       // (L, B, T, C)
    ln1_mean: Vec<F>,  // (L, B, T)
    ln1_rstd: Vec<F>,  // (L, B, T)
    qkv: Vec<F>,       // (L, B, T, 3C)
    atty: Vec<F>,      // (L, B, T, C)
    att: Vec<F>,       // (L, B, NH, T, T)
    residual2: Vec<F>, // (L, B, T, C)
    ln2: Vec<F>,       // (L, B, T, C)
    ln2_mean: Vec<F>,  // (L, B, T)
    ln2_rstd: Vec<F>,  // (L, B, T)
    fch: Vec<F>,       // (L, B, T, 4C)
    fch_gelu: Vec<F>,  // (L, B, T, 4C)
    residual3: Vec<F>, // (L, B, T, C): the residual stream leaving each layer
    lnf: Vec<F>,       // (B, T, C)
    lnf_mean: Vec<F>,  // (B, T)
    lnf_rstd: Vec<F>,  // (B, T)
    logits: Vec<F>,    // (B, T, Vp): probabilities after forward, dlogits during backward
    losses: Vec<F>,    // (B, T)
    // Backward scratch:
    dres: Vec<F>,  // (B, T, C): dL/d(residual stream) at the current layer boundary
    dc: Vec<F>,    // (B, T, C)
    dwide: Vec<F>, // (B, T, 4C), also used as (B, T, 3C)
    datt: Vec<F>,  // (B, NH, T, T)
    forwarded: bool,
}

impl<F: Float> Activations<F> {
    fn new(cfg: &GptConfig, b: usize, t: usize) -> Self {
        let (l, c, nh, vp) = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size());
        let bt = b * t;
        let z = |n: usize| vec![F::ZERO; n];
        Activations {
            b,
            t,
            tokens: vec![0; bt],
            targets: vec![0; bt],
            encoded: z(bt * c),
            ln1: z(l * bt * c),
            ln1_mean: z(l * bt),
            ln1_rstd: z(l * bt),
            qkv: z(l * bt * 3 * c),
            atty: z(l * bt * c),
            att: z(l * b * nh * t * t),
            residual2: z(l * bt * c),
            ln2: z(l * bt * c),
            ln2_mean: z(l * bt),
            ln2_rstd: z(l * bt),
            fch: z(l * bt * 4 * c),
            fch_gelu: z(l * bt * 4 * c),
            residual3: z(l * bt * c),
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * vp),
            losses: z(bt),
            dres: z(bt * c),
            dc: z(bt * c),
            dwide: z(bt * 4 * c),
            datt: z(b * nh * t * t),
            forwarded: false,
        }
    }
}

#[cfg(test)]
impl<F> Activations<F> {
    /// Elements held, across every buffer.
    fn elements(&self) -> usize {
        let v = [
            &self.encoded,
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.qkv,
            &self.atty,
            &self.att,
            &self.residual2,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fch,
            &self.fch_gelu,
            &self.residual3,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.losses,
            &self.dres,
            &self.dc,
            &self.dwide,
            &self.datt,
        ];
        v.iter().map(|b| b.len()).sum()
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

/// A GPT-2 model with its parameter and gradient buffers and the activations of one microbatch
/// shape. Optimizer state lives in [`crate::AdamW`], laid out by the same [`ParamLayout`].
#[derive(Debug)]
pub struct Gpt<F> {
    pub config: GptConfig,
    pub layout: ParamLayout,
    /// All parameters, laid out by `layout`.
    pub params: Vec<F>,
    /// Gradients, laid out by `layout`; [`Gpt::backward`] adds into them.
    pub grads: Vec<F>,
    acts: Activations<F>,
}

impl<F: Float> Gpt<F> {
    /// Builds a model with zeroed parameters and activation buffers for microbatches of
    /// `batch` sequences of `seq` tokens. All memory the step needs is allocated here.
    pub fn new(config: GptConfig, batch: usize, seq: usize) -> Result<Self, ModelError> {
        config.validate()?;
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
        let layout = ParamLayout::new(&config);
        let n = layout.numel();
        let acts = Activations::new(&config, batch, seq);
        Ok(Gpt {
            config,
            layout,
            params: vec![F::ZERO; n],
            grads: vec![F::ZERO; n],
            acts,
        })
    }

    /// Bytes that [`Gpt::new`] allocates for `config` and microbatches of (b, t), plus the two
    /// AdamW moments: parameters, gradients, moments, activations and backward scratch.
    /// Computed in f64, so an absurd shape gives a huge number instead of an overflow.
    pub fn memory_bytes(config: &GptConfig, b: usize, t: usize) -> f64 {
        let f = |x: usize| x as f64;
        let (l, c, nh, vp) = (
            f(config.n_layer),
            f(config.n_embd),
            f(config.n_head),
            f(config.padded_vocab_size()),
        );
        let params = vp * c + f(config.seq_len) * c + l * (12.0 * c * c + 13.0 * c) + 2.0 * c;
        let (bt, att) = (f(b) * f(t), f(b) * nh * f(t) * f(t));
        // Per layer: ln1, qkv (3), atty, residual2, ln2, fch (4), fch_gelu (4), residual3 = 16 C
        // per position, four per-position statistics, and the attention probabilities.
        let per_layer = 16.0 * bt * c + 4.0 * bt + att;
        // encoded, lnf, dres, dc, dwide (4); three per-position vectors; logits; datt.
        let rest = 8.0 * bt * c + 3.0 * bt + bt * vp + att;
        std::mem::size_of::<F>() as f64 * (4.0 * params + l * per_layer + rest)
    }

    /// Draws fresh parameters from `seed` (see [`ParamLayout::init`]).
    pub fn init_params(&mut self, seed: u64, init_std: f64) {
        self.layout
            .init(&mut self.params, &self.config, seed, init_std);
    }

    /// The microbatch shape (B, T) this model was built for.
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.acts.b, self.acts.t)
    }

    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = F::ZERO);
    }

    /// Runs the forward pass on `tokens` (B, T) predicting `targets` (B, T) and returns the mean
    /// loss over the B * T positions. Keeps the activations for [`Gpt::backward`].
    ///
    /// # Panics
    /// If the shapes differ from [`Gpt::batch_shape`] or a token is outside the vocabulary;
    /// callers validate data before it reaches the model.
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32]) -> F {
        let cfg = &self.config;
        let (l_n, c, nh, v, vp) = (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.padded_vocab_size(),
        );
        let a = &mut self.acts;
        let (b, t) = (a.b, a.t);
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

        k::encoder_forward(&mut a.encoded, tokens, &p[lay.wte..], &p[lay.wpe..], t, c);
        for l in 0..l_n {
            let o = lay.blocks[l];
            let res_in: &[F] = if l == 0 {
                &a.encoded
            } else {
                layer(&a.residual3, l - 1, l_n)
            };
            let ln1 = layer_mut(&mut a.ln1, l, l_n);
            let (ln1_mean, ln1_rstd) = (
                layer_mut(&mut a.ln1_mean, l, l_n),
                layer_mut(&mut a.ln1_rstd, l, l_n),
            );
            k::layernorm_forward(
                ln1,
                ln1_mean,
                ln1_rstd,
                res_in,
                &p[o.ln1_w..o.ln1_w + c],
                &p[o.ln1_b..o.ln1_b + c],
                c,
            );
            let qkv = layer_mut(&mut a.qkv, l, l_n);
            k::matmul_forward(
                qkv,
                ln1,
                &p[o.qkv_w..o.qkv_w + 3 * c * c],
                Some(&p[o.qkv_b..o.qkv_b + 3 * c]),
                c,
                3 * c,
                false,
            );
            let atty = layer_mut(&mut a.atty, l, l_n);
            k::attention_forward(atty, layer_mut(&mut a.att, l, l_n), qkv, b, t, c, nh);
            let residual2 = layer_mut(&mut a.residual2, l, l_n);
            residual2.copy_from_slice(res_in);
            k::matmul_forward(
                residual2,
                atty,
                &p[o.proj_w..o.proj_w + c * c],
                Some(&p[o.proj_b..o.proj_b + c]),
                c,
                c,
                true,
            );
            let ln2 = layer_mut(&mut a.ln2, l, l_n);
            let (ln2_mean, ln2_rstd) = (
                layer_mut(&mut a.ln2_mean, l, l_n),
                layer_mut(&mut a.ln2_rstd, l, l_n),
            );
            k::layernorm_forward(
                ln2,
                ln2_mean,
                ln2_rstd,
                residual2,
                &p[o.ln2_w..o.ln2_w + c],
                &p[o.ln2_b..o.ln2_b + c],
                c,
            );
            let fch = layer_mut(&mut a.fch, l, l_n);
            k::matmul_forward(
                fch,
                ln2,
                &p[o.fc_w..o.fc_w + 4 * c * c],
                Some(&p[o.fc_b..o.fc_b + 4 * c]),
                c,
                4 * c,
                false,
            );
            let fch_gelu = layer_mut(&mut a.fch_gelu, l, l_n);
            k::gelu_forward(fch_gelu, fch);
            let residual3 = layer_mut(&mut a.residual3, l, l_n);
            residual3.copy_from_slice(residual2);
            k::matmul_forward(
                residual3,
                fch_gelu,
                &p[o.fcproj_w..o.fcproj_w + 4 * c * c],
                Some(&p[o.fcproj_b..o.fcproj_b + c]),
                4 * c,
                c,
                true,
            );
        }
        let last = layer(&a.residual3, l_n - 1, l_n);
        k::layernorm_forward(
            &mut a.lnf,
            &mut a.lnf_mean,
            &mut a.lnf_rstd,
            last,
            &p[lay.lnf_w..lay.lnf_w + c],
            &p[lay.lnf_b..lay.lnf_b + c],
            c,
        );
        k::matmul_forward(
            &mut a.logits,
            &a.lnf,
            &p[lay.wte..lay.wte + vp * c],
            None,
            c,
            vp,
            false,
        );
        k::crossentropy_forward(&mut a.losses, &mut a.logits, targets, v, vp);
        a.forwarded = true;
        let total: F = a.losses.iter().copied().sum();
        total / F::from_f64((b * t) as f64)
    }

    /// Backpropagates the last forward pass and adds the parameter gradients into `grads`, with
    /// each position's loss weighted by `dloss`. For the mean loss of this microbatch alone,
    /// `dloss` is 1 / (B * T); over a global batch it is 1 / (tokens in the whole batch), which
    /// makes microbatches and replicas add up to the same update however the batch is split.
    ///
    /// # Panics
    /// If called twice for one forward pass: the forward's probabilities are consumed.
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
        mut ready: impl FnMut(&'g mut [F]),
    ) {
        assert_eq!(
            grads.len(),
            self.layout.numel(),
            "gradients are not laid out by this model"
        );
        let cfg = &self.config;
        let (l_n, c, nh, vp) = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size());
        let a = &mut self.acts;
        assert!(a.forwarded, "backward needs a forward pass first");
        a.forwarded = false;
        let (b, t) = (a.b, a.t);
        let bt = b * t;
        let p = &self.params;
        let lay = &self.layout;
        // The part of `grads` backward may still write: a prefix, so offsets stay absolute.
        let mut rest: &'g mut [F] = grads;
        let mut release = |rest: &mut &'g mut [F], from: usize| {
            let (head, tail) = std::mem::take(rest).split_at_mut(from);
            ready(tail);
            *rest = head;
        };
        let g = &mut *rest;

        k::crossentropy_backward_inplace(&mut a.logits, &a.targets, dloss, vp);
        k::matmul_backward(
            &mut a.dc,
            &mut g[lay.wte..lay.wte + vp * c],
            None,
            &a.logits,
            &a.lnf,
            &p[lay.wte..lay.wte + vp * c],
            c,
            vp,
            false,
        );
        a.dres.iter_mut().for_each(|x| *x = F::ZERO);
        {
            let (dw, db) = two_mut(g, lay.lnf_w..lay.lnf_w + c, lay.lnf_b..lay.lnf_b + c);
            let last = layer(&a.residual3, l_n - 1, l_n);
            k::layernorm_backward(
                &mut a.dres,
                dw,
                db,
                &a.dc,
                last,
                &a.lnf_mean,
                &a.lnf_rstd,
                &p[lay.lnf_w..lay.lnf_w + c],
                c,
            );
        }
        release(&mut rest, lay.lnf_w);
        for l in (0..l_n).rev() {
            let g = &mut *rest;
            let o = lay.blocks[l];
            let res_in: &[F] = if l == 0 {
                &a.encoded
            } else {
                layer(&a.residual3, l - 1, l_n)
            };
            let d4c = &mut a.dwide[..bt * 4 * c];
            // MLP: residual3 = residual2 + c_proj(gelu(c_fc(ln_2(residual2)))).
            {
                let (dw, db) = two_mut(
                    g,
                    o.fcproj_w..o.fcproj_w + 4 * c * c,
                    o.fcproj_b..o.fcproj_b + c,
                );
                let w = &p[o.fcproj_w..o.fcproj_w + 4 * c * c];
                k::matmul_backward(
                    d4c,
                    dw,
                    Some(db),
                    &a.dres,
                    layer(&a.fch_gelu, l, l_n),
                    w,
                    4 * c,
                    c,
                    false,
                );
            }
            k::gelu_backward_inplace(d4c, layer(&a.fch, l, l_n));
            {
                let (dw, db) = two_mut(g, o.fc_w..o.fc_w + 4 * c * c, o.fc_b..o.fc_b + 4 * c);
                let w = &p[o.fc_w..o.fc_w + 4 * c * c];
                k::matmul_backward(
                    &mut a.dc,
                    dw,
                    Some(db),
                    d4c,
                    layer(&a.ln2, l, l_n),
                    w,
                    c,
                    4 * c,
                    false,
                );
            }
            {
                let (dw, db) = two_mut(g, o.ln2_w..o.ln2_w + c, o.ln2_b..o.ln2_b + c);
                let (mean, rstd) = (layer(&a.ln2_mean, l, l_n), layer(&a.ln2_rstd, l, l_n));
                let w = &p[o.ln2_w..o.ln2_w + c];
                k::layernorm_backward(
                    &mut a.dres,
                    dw,
                    db,
                    &a.dc,
                    layer(&a.residual2, l, l_n),
                    mean,
                    rstd,
                    w,
                    c,
                );
            }
            // Attention: residual2 = res_in + c_proj(attention(c_attn(ln_1(res_in)))).
            {
                let (dw, db) = two_mut(g, o.proj_w..o.proj_w + c * c, o.proj_b..o.proj_b + c);
                let w = &p[o.proj_w..o.proj_w + c * c];
                k::matmul_backward(
                    &mut a.dc,
                    dw,
                    Some(db),
                    &a.dres,
                    layer(&a.atty, l, l_n),
                    w,
                    c,
                    c,
                    false,
                );
            }
            let d3c = &mut a.dwide[..bt * 3 * c];
            k::attention_backward(
                d3c,
                &mut a.datt,
                &a.dc,
                layer(&a.qkv, l, l_n),
                layer(&a.att, l, l_n),
                b,
                t,
                c,
                nh,
            );
            {
                let (dw, db) = two_mut(g, o.qkv_w..o.qkv_w + 3 * c * c, o.qkv_b..o.qkv_b + 3 * c);
                let w = &p[o.qkv_w..o.qkv_w + 3 * c * c];
                k::matmul_backward(
                    &mut a.dc,
                    dw,
                    Some(db),
                    d3c,
                    layer(&a.ln1, l, l_n),
                    w,
                    c,
                    3 * c,
                    false,
                );
            }
            {
                let (dw, db) = two_mut(g, o.ln1_w..o.ln1_w + c, o.ln1_b..o.ln1_b + c);
                let (mean, rstd) = (layer(&a.ln1_mean, l, l_n), layer(&a.ln1_rstd, l, l_n));
                let w = &p[o.ln1_w..o.ln1_w + c];
                k::layernorm_backward(&mut a.dres, dw, db, &a.dc, res_in, mean, rstd, w, c);
            }
            release(&mut rest, o.ln1_w);
        }
        let (dwte, dwpe) = two_mut(
            rest,
            lay.wte..lay.wte + vp * c,
            lay.wpe..lay.wpe + cfg.seq_len * c,
        );
        k::encoder_backward(dwte, dwpe, &a.dres, &a.tokens, t, c);
        ready(rest);
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
        let actual = 4 * (4 * m.params.len() + m.acts.elements());
        assert_eq!(Gpt::<f32>::memory_bytes(&config, 2, 12), actual as f64);
    }
}
