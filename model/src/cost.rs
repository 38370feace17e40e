//! The cost model of a parallel layout: parameters, FLOPs and memory per rank.
//!
//! Memory assumes the production recipe: bf16 weights, fp32 gradients, fp32 master weights and
//! both Adam moments (sharded across data parallelism with the distributed optimizer, ZeRO-1),
//! a 1F1B pipeline, and the activation recomputation the configuration asks for
//! ([`crate::Recompute`]), with Korthikanti et al.'s per-layer activation sizes.

use serde::Serialize;

use crate::config::GptConfig;
use crate::layout::{ParallelLayout, ParamLayout};

/// What one training step of a configuration costs under a layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    pub params: u64,
    /// Parameters on the most loaded rank (a first or last pipeline stage holds the embedding).
    pub params_per_rank_max: u64,
    /// Training FLOPs per token: 6 x parameters plus attention's 12 x layers x seq x hidden.
    pub flops_per_token: f64,
    pub flops_per_step: f64,
    pub flops_per_step_per_rank: f64,
    /// bf16 weights, fp32 gradients, and fp32 master weights and Adam moments sharded over dp.
    pub state_bytes_per_rank: f64,
    /// What the microbatches in flight keep of each layer under `recompute`, plus one layer's
    /// recomputed working set.
    pub activation_bytes_per_rank: f64,
    pub recompute: crate::Recompute,
}

impl Cost {
    pub fn memory_bytes_per_rank(&self) -> f64 {
        self.state_bytes_per_rank + self.activation_bytes_per_rank
    }
}

/// Training FLOPs per token of `config` at sequence length `seq`.
pub fn flops_per_token(config: &GptConfig, seq: usize) -> f64 {
    let params = ParamLayout::new(config).numel() as f64;
    6.0 * params + 12.0 * (config.n_layer * seq * config.n_embd) as f64
}

/// Parameters on the most loaded rank of `layout`: a first or last pipeline stage, which holds
/// the embedding beside its layers.
pub fn params_per_rank_max(config: &GptConfig, layout: &ParallelLayout) -> u64 {
    let (c, l, t) = (
        config.n_embd as u64,
        config.n_layer as u64,
        layout.tp as u64,
    );
    // Column-parallel weights and biases and row-parallel weights split over tp; LayerNorms and
    // the row-parallel biases are replicated.
    let layer_per_rank = (12 * c * c + 7 * c) / t + 6 * c;
    let embedding_per_rank = config.padded_vocab_size() as u64 * c / t;
    let stage_layers = l / layout.pp as u64;
    let first_stage =
        stage_layers * layer_per_rank + embedding_per_rank + config.seq_len as u64 * c;
    let last_stage = stage_layers * layer_per_rank + embedding_per_rank + 2 * c;
    if layout.pp == 1 {
        first_stage + 2 * c
    } else {
        first_stage.max(last_stage)
    }
}

/// The cost of one step of `global_batch` sequences of `seq` tokens, in microbatches of
/// `micro_batch`, under `layout`, with `recompute`.
pub fn cost(
    config: &GptConfig,
    layout: &ParallelLayout,
    seq: usize,
    global_batch: usize,
    micro_batch: usize,
    recompute: crate::Recompute,
) -> Cost {
    let params = ParamLayout::new(config).numel() as u64;
    let params_per_rank_max = params_per_rank_max(config, layout);
    let fpt = flops_per_token(config, seq);
    let tokens = (global_batch * seq) as f64;
    let optimizer_shards = if layout.distributed_optimizer {
        layout.dp as f64
    } else {
        1.0
    };
    let bytes_per_param = 2.0 + 4.0 + 12.0 / optimizer_shards;
    let (s, b, h, a) = (
        seq as f64,
        micro_batch as f64,
        config.n_embd as f64,
        config.n_head as f64,
    );
    // 1F1B keeps up to `pp` microbatches in flight on the first stage, each holding what it
    // keeps of every layer of the stage: L/pp layers x pp microbatches = L layers' worth.
    // Per layer, in bf16 (Korthikanti et al.): 34 sbh of matrix-product outputs, norms and
    // GELU, and 5 a s^2 b of attention scores, both split over tp; the layer input is 2 sbh.
    let tp = layout.tp as f64;
    let (products, scores) = (34.0 * s * b * h / tp, 5.0 * a * s * s * b / tp);
    let layers = config.n_layer as f64;
    let activations = match recompute {
        crate::Recompute::None => layers * (products + scores),
        // The scores of one layer at a time, recomputed.
        crate::Recompute::Selective => layers * products + scores,
        // Every layer's input, and one layer recomputed whole.
        crate::Recompute::Full => layers * 2.0 * s * b * h + products + scores,
    };
    Cost {
        params,
        params_per_rank_max,
        flops_per_token: fpt,
        flops_per_step: fpt * tokens,
        flops_per_step_per_rank: fpt * tokens / layout.world_size() as f64,
        state_bytes_per_rank: params_per_rank_max as f64 * bytes_per_param,
        activation_bytes_per_rank: activations,
        recompute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtnlg() -> GptConfig {
        GptConfig {
            vocab_size: 51200,
            seq_len: 2048,
            n_layer: 105,
            n_head: 128,
            n_embd: 20480,
        }
    }

    #[test]
    fn mtnlg_530b_has_530b_parameters_and_fits_its_layout() {
        let layout = ParallelLayout {
            tp: 8,
            pp: 35,
            dp: 16,
            distributed_optimizer: true,
        };
        layout.validate(&mtnlg()).unwrap();
        let k = cost(&mtnlg(), &layout, 2048, 1920, 1, crate::Recompute::Full);
        assert!((529e9..531e9).contains(&(k.params as f64)), "{}", k.params);
        assert_eq!(layout.world_size(), 4480);
        // A rank holds a 280th of the model plus its share of the embedding.
        assert!(k.params_per_rank_max > k.params / 280 && k.params_per_rank_max < k.params / 250);
        // It must fit an 80 GB A100, as it did.
        assert!(
            k.memory_bytes_per_rank() < 80e9,
            "{}",
            k.memory_bytes_per_rank()
        );
    }

    #[test]
    fn recomputation_trades_memory_in_order() {
        let layout = ParallelLayout {
            tp: 8,
            pp: 35,
            dp: 16,
            distributed_optimizer: true,
        };
        let mem = |r| cost(&mtnlg(), &layout, 2048, 1920, 1, r).activation_bytes_per_rank;
        let (none, selective, full) = (
            mem(crate::Recompute::None),
            mem(crate::Recompute::Selective),
            mem(crate::Recompute::Full),
        );
        assert!(
            full < selective && selective < none,
            "{full} {selective} {none}"
        );
        // Full recomputation keeps 2 sbh per layer where keeping everything takes
        // 34 sbh / tp + 5 a s^2 b / tp: here 9.3 GB against 54 GB.
        assert!(full < 10e9 && none > 50e9, "{full} {none}");
    }

    #[test]
    fn layouts_that_do_not_divide_are_named() {
        let e = ParallelLayout {
            tp: 3,
            pp: 1,
            dp: 1,
            distributed_optimizer: false,
        }
        .validate(&mtnlg())
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("parallel.tp: tensor parallel size 3 does not divide model.n_head 128"),
            "{e}"
        );
        let e = ParallelLayout {
            tp: 8,
            pp: 4,
            dp: 1,
            distributed_optimizer: false,
        }
        .validate(&mtnlg())
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "parallel.pp: pipeline parallel size 4 does not divide model.n_layer 105"
            ),
            "{e}"
        );
    }
}
