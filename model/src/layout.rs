//! The size table: where each named tensor lives in the flat buffers.
//!
//! Parameters, gradients and both AdamW moments are each one flat buffer laid out by the same
//! [`ParamLayout`]. Tensors are ordered embedding first, then layer by layer, then the final
//! LayerNorm, so the tensors of any run of layers form one contiguous range: a pipeline stage's
//! state, a ZeRO shard or a checkpoint chunk is a range of the buffer, copied in one piece.

use std::collections::HashMap;

use crate::config::GptConfig;
use crate::rng::Rng;
use crate::Float;

/// What a tensor is, which decides its initialisation and whether weight decay applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Token embedding, tied to the output head.
    TokenEmbedding,
    PositionEmbedding,
    /// A linear layer's weight, (out_features, in_features).
    Weight,
    /// A linear weight that writes into the residual stream (attention and MLP output
    /// projections): initialised with std / sqrt(2 * n_layer) as GPT-2 and Megatron do.
    ResidualWeight,
    Bias,
    NormWeight,
    NormBias,
}

impl TensorKind {
    /// Decoupled weight decay applies to matrices and embeddings, never to biases or norms.
    pub fn decays(self) -> bool {
        matches!(
            self,
            TensorKind::TokenEmbedding
                | TensorKind::PositionEmbedding
                | TensorKind::Weight
                | TensorKind::ResidualWeight
        )
    }
}

/// One named tensor: its global shape and its place in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face GPT-2 style name: `wte`, `h.3.attn.c_attn.weight`, `ln_f.bias`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub kind: TensorKind,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Offsets of one transformer block's tensors in the flat buffers.
#[derive(Debug, Clone, Copy)]
pub struct BlockOffsets {
    pub ln1_w: usize,
    pub ln1_b: usize,
    pub qkv_w: usize,
    pub qkv_b: usize,
    pub proj_w: usize,
    pub proj_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub fc_w: usize,
    pub fc_b: usize,
    pub fcproj_w: usize,
    pub fcproj_b: usize,
}

/// The size table of a model: every tensor, in buffer order.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    tensors: Vec<TensorSpec>,
    by_name: HashMap<String, usize>,
    numel: usize,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockOffsets>,
    pub lnf_w: usize,
    pub lnf_b: usize,
}

impl ParamLayout {
    pub fn new(config: &GptConfig) -> Self {
        let c = config.n_embd;
        let mut tensors = Vec::new();
        let mut numel = 0;
        let mut add = |name: String, shape: Vec<usize>, kind: TensorKind| {
            let offset = numel;
            numel += shape.iter().product::<usize>();
            tensors.push(TensorSpec {
                name,
                shape,
                offset,
                kind,
            });
            offset
        };
        let wte = add(
            "wte".into(),
            vec![config.padded_vocab_size(), c],
            TensorKind::TokenEmbedding,
        );
        let wpe = add(
            "wpe".into(),
            vec![config.seq_len, c],
            TensorKind::PositionEmbedding,
        );
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = |s: &str| format!("h.{l}.{s}");
            use TensorKind::*;
            blocks.push(BlockOffsets {
                ln1_w: add(p("ln_1.weight"), vec![c], NormWeight),
                ln1_b: add(p("ln_1.bias"), vec![c], NormBias),
                qkv_w: add(p("attn.c_attn.weight"), vec![3 * c, c], Weight),
                qkv_b: add(p("attn.c_attn.bias"), vec![3 * c], Bias),
                proj_w: add(p("attn.c_proj.weight"), vec![c, c], ResidualWeight),
                proj_b: add(p("attn.c_proj.bias"), vec![c], Bias),
                ln2_w: add(p("ln_2.weight"), vec![c], NormWeight),
                ln2_b: add(p("ln_2.bias"), vec![c], NormBias),
                fc_w: add(p("mlp.c_fc.weight"), vec![4 * c, c], Weight),
                fc_b: add(p("mlp.c_fc.bias"), vec![4 * c], Bias),
                fcproj_w: add(p("mlp.c_proj.weight"), vec![c, 4 * c], ResidualWeight),
                fcproj_b: add(p("mlp.c_proj.bias"), vec![c], Bias),
            });
        }
        let lnf_w = add("ln_f.weight".into(), vec![c], TensorKind::NormWeight);
        let lnf_b = add("ln_f.bias".into(), vec![c], TensorKind::NormBias);
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        ParamLayout {
            tensors,
            by_name,
            numel,
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
        }
    }

    /// Total elements in each flat buffer.
    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The named view of `name` in any buffer laid out by this table.
    ///
    /// # Panics
    /// If `name` is not a tensor of this model or `buf` is not one of its flat buffers.
    pub fn view<'a, F>(&self, buf: &'a [F], name: &str) -> &'a [F] {
        &buf[self.range_in(buf.len(), name)]
    }

    pub fn view_mut<'a, F>(&self, buf: &'a mut [F], name: &str) -> &'a mut [F] {
        let range = self.range_in(buf.len(), name);
        &mut buf[range]
    }

    fn range_in(&self, buf_len: usize, name: &str) -> std::ops::Range<usize> {
        assert_eq!(buf_len, self.numel, "buffer is not laid out by this table");
        self.get(name)
            .unwrap_or_else(|| panic!("no tensor named {name}"))
            .range()
    }

    /// Initialises `params` from `seed`. Each tensor draws from its own stream keyed by its
    /// index, so a tensor's values never depend on the tensors before it, and any shard of the
    /// model can initialise just its own part and still match the whole model.
    pub fn init<F: Float>(&self, params: &mut [F], config: &GptConfig, seed: u64, std: f64) {
        assert_eq!(params.len(), self.numel);
        let residual_std = std / (2.0 * config.n_layer as f64).sqrt();
        for (i, t) in self.tensors.iter().enumerate() {
            let out = &mut params[t.range()];
            let mut rng = Rng::stream(seed, i as u64);
            match t.kind {
                TensorKind::NormWeight => out.fill(F::ONE),
                TensorKind::Bias | TensorKind::NormBias => out.fill(F::ZERO),
                TensorKind::ResidualWeight => out
                    .iter_mut()
                    .for_each(|x| *x = F::from_f64(residual_std * rng.normal())),
                TensorKind::Weight | TensorKind::PositionEmbedding => out
                    .iter_mut()
                    .for_each(|x| *x = F::from_f64(std * rng.normal())),
                TensorKind::TokenEmbedding => {
                    let real = config.vocab_size * config.n_embd;
                    out[..real]
                        .iter_mut()
                        .for_each(|x| *x = F::from_f64(std * rng.normal()));
                    out[real..].fill(F::ZERO);
                }
            }
        }
    }

    /// The parts of the gradient buffer in the order backward finishes them: the final
    /// LayerNorm, each layer from the last to the first, then both embeddings (the tied token
    /// embedding gets gradient from the head first and from the input last). They tile the
    /// buffer from its end to its start.
    pub fn backward_buckets(&self) -> Vec<std::ops::Range<usize>> {
        let mut bounds = vec![self.numel, self.lnf_w];
        bounds.extend(self.blocks.iter().rev().map(|b| b.ln1_w));
        bounds.push(0);
        bounds.windows(2).map(|w| w[1]..w[0]).collect()
    }

    /// Whether weight decay applies, element by element ranges: `(range, decays)` for each tensor.
    pub fn decay_ranges(&self) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + '_ {
        self.tensors.iter().map(|t| (t.range(), t.kind.decays()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_the_known_parameter_count() {
        let layout = ParamLayout::new(&GptConfig::gpt2_124m());
        // 124,475,904 with the vocabulary padded to 50304 (llm.c reports the same).
        assert_eq!(layout.numel(), 124_475_904);
        let names: Vec<_> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[0], "wte");
        assert_eq!(names[2], "h.0.ln_1.weight");
        assert_eq!(*names.last().unwrap(), "ln_f.bias");
        // Contiguous and in order.
        let mut next = 0;
        for t in layout.tensors() {
            assert_eq!(t.offset, next);
            next += t.numel();
        }
    }

    #[test]
    fn init_is_per_tensor_and_zeroes_padding() {
        let c = GptConfig {
            vocab_size: 100,
            seq_len: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
        };
        let layout = ParamLayout::new(&c);
        let mut a = vec![0f32; layout.numel()];
        layout.init(&mut a, &c, 42, 0.02);
        let wte = layout.view(&a, "wte");
        assert!(wte[100 * 16..].iter().all(|&x| x == 0.0));
        assert!(wte[..100 * 16].iter().any(|&x| x != 0.0));
        assert!(layout.view(&a, "h.1.ln_2.weight").iter().all(|&x| x == 1.0));
        // A deeper model draws the same values for the tensors the two share.
        let c2 = GptConfig {
            n_layer: 3,
            ..c.clone()
        };
        let layout2 = ParamLayout::new(&c2);
        let mut b = vec![0f32; layout2.numel()];
        layout2.init(&mut b, &c2, 42, 0.02);
        assert_eq!(
            layout.view(&a, "h.0.mlp.c_fc.weight"),
            layout2.view(&b, "h.0.mlp.c_fc.weight")
        );
    }
}
