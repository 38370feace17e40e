//! The sizes one rank's shard computes with, shared by the CPU model ([`crate::gpt`]) and the
//! CUDA model: the microbatch, the tensor-parallel widths, the vocabulary slice, the stage's
//! layers, and which of each layer's activations forward keeps under [`Recompute`].

use crate::config::GptConfig;
use crate::layout::Shard;

/// How much of each layer's activations backward recomputes instead of keeping them from
/// forward (`train.recompute`). Recomputing runs the same kernels on the same inputs, so on the
/// CPU the gradients are bitwise those of keeping everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep everything forward computes.
    #[default]
    None,
    /// Keep the matrix products' outputs and the LayerNorms'; recompute attention (its output
    /// and probabilities or row statistics) and GELU from them (Korthikanti et al.'s selective
    /// recomputation: the T x T probabilities are what grows with the sequence).
    Selective,
    /// Keep each layer's input only; recompute the layer's whole forward, its tensor-parallel
    /// all-reduces included, just before its backward.
    Full,
}

/// The sizes a shard computes with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    /// Model width: the residual stream is whole on every rank.
    pub c: usize,
    /// Attention heads on this rank, and their width (C / tp).
    pub nh: usize,
    pub cq: usize,
    /// MLP width on this rank (4C / tp).
    pub f4: usize,
    /// This rank's vocabulary slice: `vl` ids from `v0`; `v` is the real vocabulary.
    pub v0: usize,
    pub vl: usize,
    pub v: usize,
    /// Layers of this stage.
    pub l: usize,
    pub tp: usize,
    pub first: bool,
    pub last: bool,
    pub recompute: Recompute,
    /// Whether attention is fused (it then keeps each row's log-sum-exp, not the T x T
    /// probabilities).
    pub fused: bool,
}

/// One layer's activations, as [`Dims::size`] sizes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    Ln1,
    /// Each of the four per-position LayerNorm statistics.
    Stats,
    Qkv,
    Atty,
    /// The attention probabilities, when attention is not fused.
    Att,
    /// Each row's log-sum-exp, when attention is fused.
    Lse,
    Residual2,
    Ln2,
    Fch,
    FchGelu,
    Residual3,
}

impl Dims {
    pub fn new(
        cfg: &GptConfig,
        shard: Shard,
        b: usize,
        t: usize,
        recompute: Recompute,
        fused: bool,
    ) -> Self {
        let vl = cfg.padded_vocab_size() / shard.tp;
        Dims {
            b,
            t,
            c: cfg.n_embd,
            nh: cfg.n_head / shard.tp,
            cq: cfg.n_embd / shard.tp,
            f4: 4 * cfg.n_embd / shard.tp,
            v0: shard.tp_rank * vl,
            vl,
            v: cfg.vocab_size,
            l: shard.layers(cfg.n_layer).len(),
            tp: shard.tp,
            first: shard.first_stage(),
            last: shard.last_stage(),
            recompute,
            fused,
        }
    }

    /// Elements of one layer's `act`.
    pub fn size(&self, act: Act) -> usize {
        let bt = self.b * self.t;
        let (tt, rows) = if self.fused {
            (0, self.b * self.nh * self.t)
        } else {
            (self.b * self.nh * self.t * self.t, 0)
        };
        match act {
            Act::Ln1 | Act::Residual2 | Act::Ln2 | Act::Residual3 => bt * self.c,
            Act::Stats => bt,
            Act::Qkv => bt * 3 * self.cq,
            Act::Atty => bt * self.cq,
            Act::Att => tt,
            Act::Lse => rows,
            Act::Fch | Act::FchGelu => bt * self.f4,
        }
    }

    /// Whether forward keeps `act` of every layer for backward; otherwise it lives in the
    /// one-layer working set and backward recomputes it.
    pub fn keeps(&self, act: Act) -> bool {
        match self.recompute {
            Recompute::None => true,
            Recompute::Selective => !matches!(act, Act::Atty | Act::Att | Act::Lse | Act::FchGelu),
            Recompute::Full => act == Act::Residual3,
        }
    }

    /// Whether `act` has a place in the one-layer working set: whatever forward does not keep.
    pub fn works(&self, act: Act) -> bool {
        self.recompute != Recompute::None && !self.keeps(act)
    }

    /// Elements of `acts` over the layers forward keeps them for (`working` false) or in the
    /// one-layer working set (`working` true); the statistics count four times.
    pub fn layer_elements(&self, acts: &[Act], working: bool) -> usize {
        acts.iter()
            .map(|&a| {
                let n = if a == Act::Stats { 4 } else { 1 };
                let layers = if working {
                    usize::from(self.works(a))
                } else if self.keeps(a) {
                    self.l
                } else {
                    0
                };
                n * layers * self.size(a)
            })
            .sum()
    }
}

/// Every layer activation.
pub(crate) const ACTS: [Act; 11] = [
    Act::Ln1,
    Act::Stats,
    Act::Qkv,
    Act::Atty,
    Act::Att,
    Act::Lse,
    Act::Residual2,
    Act::Ln2,
    Act::Fch,
    Act::FchGelu,
    Act::Residual3,
];
