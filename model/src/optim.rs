//! AdamW with decoupled weight decay and global gradient-norm clipping, on flat buffers.

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layout::ParamLayout;
use crate::Float;

/// Elements per rayon task in the optimizer and norm loops.
const CHUNK: usize = 1 << 15;

/// AdamW's hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The MT-NLG recipe.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW state for a range of the flat parameter buffer (all of it, or a ZeRO shard): both
/// moments for that range, and the step count.
#[derive(Debug, Clone)]
pub struct AdamW<F> {
    pub config: AdamWConfig,
    /// The elements of the flat buffers this state covers.
    pub shard: Range<usize>,
    pub m: Vec<F>,
    pub v: Vec<F>,
    /// Steps taken; bias correction uses it.
    pub step: u64,
    /// Shard-relative ranges and whether weight decay applies (biases and norms do not decay).
    decay: Vec<(Range<usize>, bool)>,
}

impl<F: Float> AdamW<F> {
    /// State for every parameter.
    pub fn new(config: AdamWConfig, layout: &ParamLayout) -> Self {
        Self::for_shard(config, layout, 0..layout.numel())
    }

    /// State for the elements `shard` of the flat buffers only: the distributed optimizer's
    /// share of one data-parallel replica.
    pub fn for_shard(config: AdamWConfig, layout: &ParamLayout, shard: Range<usize>) -> Self {
        assert!(shard.end <= layout.numel());
        let decay = layout
            .decay_ranges()
            .filter_map(|(r, d)| {
                let (lo, hi) = (r.start.max(shard.start), r.end.min(shard.end));
                (lo < hi).then(|| (lo - shard.start..hi - shard.start, d))
            })
            .collect();
        let n = shard.len();
        AdamW {
            config,
            shard,
            m: vec![F::ZERO; n],
            v: vec![F::ZERO; n],
            step: 0,
            decay,
        }
    }

    /// One AdamW update at learning rate `lr` of `params` from `grads`, both this state's shard
    /// of the flat buffers.
    pub fn update(&mut self, params: &mut [F], grads: &[F], lr: f64) {
        assert_eq!(params.len(), self.m.len());
        assert_eq!(grads.len(), self.m.len());
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let (b1, b2) = (F::from_f64(c.beta1), F::from_f64(c.beta2));
        let (one_b1, one_b2) = (F::from_f64(1.0 - c.beta1), F::from_f64(1.0 - c.beta2));
        let (lr_f, eps) = (F::from_f64(lr), F::from_f64(c.eps));
        let (inv_bc1, inv_bc2) = (F::from_f64(1.0 / bc1), F::from_f64(1.0 / bc2));
        for (range, decays) in &self.decay {
            let wd = if *decays {
                F::from_f64(c.weight_decay)
            } else {
                F::ZERO
            };
            let p = &mut params[range.clone()];
            let g = &grads[range.clone()];
            let m = &mut self.m[range.clone()];
            let v = &mut self.v[range.clone()];
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((p, g), (m, v))| {
                    for i in 0..p.len() {
                        m[i] = b1 * m[i] + one_b1 * g[i];
                        v[i] = b2 * v[i] + one_b2 * g[i] * g[i];
                        let m_hat = m[i] * inv_bc1;
                        let v_hat = v[i] * inv_bc2;
                        p[i] -= lr_f * (m_hat / (v_hat.sqrt() + eps) + wd * p[i]);
                    }
                });
        }
    }
}

/// Fixed number of parts a norm is split into: fixed, not per thread, so the summation order
/// and therefore the result never depend on the thread count.
const NORM_PARTS: usize = 64;

/// The squared L2 norm of `x`, summed in f64 in a fixed order. Callers add the squares of
/// several shards before taking the square root. Allocates nothing.
pub fn sum_squares<F: Float>(x: &[F]) -> f64 {
    let part_len = x.len().div_ceil(NORM_PARTS).max(1);
    let mut parts = [0f64; NORM_PARTS];
    parts.par_iter_mut().enumerate().for_each(|(i, p)| {
        let lo = (i * part_len).min(x.len());
        let hi = ((i + 1) * part_len).min(x.len());
        *p = x[lo..hi].iter().map(|&v| v.to_f64() * v.to_f64()).sum();
    });
    parts.iter().sum()
}

/// Scales `grads` so their global norm is at most `max_norm` (as PyTorch's `clip_grad_norm_`,
/// with its 1e-6 guard), given the norm already computed. Returns the factor applied.
pub fn clip_grads<F: Float>(grads: &mut [F], norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let s = F::from_f64(coef);
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= s));
        coef
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GptConfig;

    #[test]
    fn shards_update_exactly_as_the_whole() {
        let config = GptConfig {
            vocab_size: 100,
            seq_len: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
        };
        let layout = ParamLayout::new(&config);
        let n = layout.numel();
        let params: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let grads: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut whole = params.clone();
        let mut opt = AdamW::new(AdamWConfig::default(), &layout);
        let mut sharded = params.clone();
        // Shard boundaries that cut through tensors, decayed and not.
        let cuts = [0, 7, 1000, 2049, 2051, n];
        let mut shards: Vec<AdamW<f32>> = cuts
            .windows(2)
            .map(|w| AdamW::for_shard(AdamWConfig::default(), &layout, w[0]..w[1]))
            .collect();
        for _ in 0..3 {
            opt.update(&mut whole, &grads, 1e-2);
            for s in &mut shards {
                let r = s.shard.clone();
                s.update(&mut sharded[r.clone()], &grads[r], 1e-2);
            }
        }
        assert_eq!(whole, sharded);
    }
}
