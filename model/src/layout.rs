//! The size table: where each named tensor lives in the flat buffers.
//!
//! Parameters, gradients and both AdamW moments are each one flat buffer laid out by the same
//! [`ParamLayout`]. Tensors are ordered embedding first, then layer by layer, then the final
//! LayerNorm, so the tensors of any run of layers form one contiguous range: a pipeline stage's
//! state, a ZeRO shard or a checkpoint chunk is a range of the buffer, copied in one piece.
//!
//! A [`ParallelLayout`] says how a job splits the model (tensor x pipeline x data), and a
//! [`Place`] where one rank sits in it. A size table describes either the whole model or one
//! rank's [`Shard`] of it: the tensors of its
//! pipeline stage, each cut to its tensor-parallel slice by Megatron's rules. Every local tensor
//! knows the box of the global tensor it holds, so state can move between layouts by boxes.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::rng::Rng;
use crate::{Float, ModelError};

/// How the ranks of a job split the model: tensor x pipeline x data parallel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelLayout {
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub pp: usize,
    #[serde(default = "one")]
    pub dp: usize,
    /// ZeRO-1: gradients are reduce-scattered, each data-parallel replica updates its shard of
    /// the master weights and Adam moments, and the parameters are all-gathered.
    #[serde(default)]
    pub distributed_optimizer: bool,
}

fn one() -> usize {
    1
}

impl Default for ParallelLayout {
    fn default() -> Self {
        ParallelLayout {
            tp: 1,
            pp: 1,
            dp: 1,
            distributed_optimizer: false,
        }
    }
}

impl ParallelLayout {
    pub fn world_size(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// Checks that the layout splits `config` into whole pieces, naming the dimension that does
    /// not divide.
    pub fn validate(&self, config: &GptConfig) -> Result<(), ModelError> {
        for (field, v) in [
            ("parallel.tp", self.tp),
            ("parallel.pp", self.pp),
            ("parallel.dp", self.dp),
        ] {
            if v == 0 {
                return Err(ModelError::invalid(field, "must be at least 1"));
            }
        }
        if config.n_head % self.tp != 0 {
            return Err(ModelError::invalid(
                "parallel.tp",
                format!("tensor parallel size {} does not divide model.n_head {}; each rank must hold whole heads", self.tp, config.n_head),
            ));
        }
        if config.padded_vocab_size() % self.tp != 0 {
            return Err(ModelError::invalid(
                "parallel.tp",
                format!(
                    "tensor parallel size {} does not divide the padded vocabulary {}",
                    self.tp,
                    config.padded_vocab_size()
                ),
            ));
        }
        if config.n_layer % self.pp != 0 {
            return Err(ModelError::invalid(
                "parallel.pp",
                format!(
                    "pipeline parallel size {} does not divide model.n_layer {}; each stage must hold the same number of layers",
                    self.pp, config.n_layer
                ),
            ));
        }
        Ok(())
    }
}

impl ParallelLayout {
    /// A layout of `tp * pp * dp` ranks, without the distributed optimizer.
    ///
    /// # Panics
    /// If any degree is zero.
    pub fn new(tp: usize, pp: usize, dp: usize) -> Self {
        assert!(
            tp > 0 && pp > 0 && dp > 0,
            "every parallel degree is at least 1"
        );
        ParallelLayout {
            tp,
            pp,
            dp,
            distributed_optimizer: false,
        }
    }

    /// Where `rank` sits.
    ///
    /// # Panics
    /// If `rank` is outside the layout.
    pub fn place(&self, rank: usize) -> Place {
        assert!(
            rank < self.world_size(),
            "rank {rank} outside a world of {}",
            self.world_size()
        );
        Place {
            tp: self.tp,
            pp: self.pp,
            dp: self.dp,
            tp_rank: rank % self.tp,
            replica: (rank / self.tp) % self.dp,
            stage: rank / (self.tp * self.dp),
        }
    }
}

/// The three kinds of group every rank belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Tensor,
    Pipeline,
    Data,
}

/// Where one rank sits in a job: the layout's degrees and the rank's coordinates in it. The one
/// notion of a rank's place, shared by the planner, the process groups, the trainer and the
/// checkpoint plan.
///
/// Ranks are numbered as Megatron numbers them, tensor fastest, then data, then pipeline:
/// `rank = (stage * dp + replica) * tp + tp_rank`. Tensor-parallel peers are neighbours (inside
/// a node, on NVLink in production), and a pipeline stage's ranks are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    /// This rank's place in its tensor-parallel group.
    pub tp_rank: usize,
    /// Its pipeline stage.
    pub stage: usize,
    /// Its data-parallel replica.
    pub replica: usize,
}

impl Place {
    /// The only rank of a one-rank job.
    pub const ALONE: Place = Place {
        tp: 1,
        pp: 1,
        dp: 1,
        tp_rank: 0,
        stage: 0,
        replica: 0,
    };

    /// The place of the rank at (`replica`, `stage`, `tp_rank`) in `layout`.
    ///
    /// # Panics
    /// If a coordinate is outside the layout.
    pub fn at(layout: ParallelLayout, replica: usize, stage: usize, tp_rank: usize) -> Place {
        let p = Place {
            tp: layout.tp,
            pp: layout.pp,
            dp: layout.dp,
            tp_rank,
            stage,
            replica,
        };
        assert!(
            tp_rank < p.tp && stage < p.pp && replica < p.dp,
            "{p:?} is outside its own layout"
        );
        p
    }

    /// The degrees of the layout this place is in.
    pub fn layout(&self) -> ParallelLayout {
        ParallelLayout::new(self.tp, self.pp, self.dp)
    }

    /// The rank's number.
    pub fn rank(&self) -> usize {
        (self.stage * self.dp + self.replica) * self.tp + self.tp_rank
    }

    /// The part of the model the rank holds: its tensor-parallel slice of its stage.
    pub fn shard(&self) -> Shard {
        Shard {
            tp: self.tp,
            tp_rank: self.tp_rank,
            pp: self.pp,
            stage: self.stage,
        }
    }

    /// The rank that sits where this one does, but at `i` along `axis`.
    pub fn along(&self, axis: Axis, i: usize) -> Place {
        let mut p = *self;
        match axis {
            Axis::Tensor => p.tp_rank = i,
            Axis::Pipeline => p.stage = i,
            Axis::Data => p.replica = i,
        }
        p
    }

    /// The size of the rank's group along `axis`, and its place in it.
    pub fn coordinate(&self, axis: Axis) -> (usize, usize) {
        match axis {
            Axis::Tensor => (self.tp_rank, self.tp),
            Axis::Pipeline => (self.stage, self.pp),
            Axis::Data => (self.replica, self.dp),
        }
    }

    /// The ranks of this rank's group along `axis`, in group-rank order, and its place in it.
    pub fn group(&self, axis: Axis) -> (Vec<usize>, usize) {
        let (me, size) = self.coordinate(axis);
        let members = (0..size).map(|i| self.along(axis, i).rank()).collect();
        (members, me)
    }

    /// A name for this rank's group along `axis`, the same for every member and different for
    /// every other group: the coordinates the members share.
    pub fn group_name(&self, axis: Axis) -> String {
        match axis {
            Axis::Tensor => format!("tp-pp{}-dp{}", self.stage, self.replica),
            Axis::Data => format!("dp-pp{}-tp{}", self.stage, self.tp_rank),
            Axis::Pipeline => format!("pp-dp{}-tp{}", self.replica, self.tp_rank),
        }
    }

    /// The group that shares the tied token embedding's gradient: the first and the last stage
    /// of this rank's pipeline, when it has more than one stage and the rank is one of them.
    /// Returns the members, this rank's place among them and the group's name.
    pub fn embedding_group(&self) -> Option<(Vec<usize>, usize, String)> {
        let last = self.pp - 1;
        if self.pp == 1 || (self.stage != 0 && self.stage != last) {
            return None;
        }
        let members = vec![
            self.along(Axis::Pipeline, 0).rank(),
            self.along(Axis::Pipeline, last).rank(),
        ];
        let me = usize::from(self.stage != 0);
        let name = format!("emb-dp{}-tp{}", self.replica, self.tp_rank);
        Some((members, me, name))
    }
}

/// The part of the model one rank holds: its tensor-parallel slice and its pipeline stage (a
/// [`Place`] without the data-parallel replica, which holds the same part as every other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Tensor-parallel size and this rank's place in its tensor-parallel group.
    pub tp: usize,
    pub tp_rank: usize,
    /// Pipeline size and this rank's stage.
    pub pp: usize,
    pub stage: usize,
}

impl Shard {
    /// The whole model in one piece.
    pub const WHOLE: Shard = Shard {
        tp: 1,
        tp_rank: 0,
        pp: 1,
        stage: 0,
    };

    /// Checks the shard splits `config` into whole pieces, naming the dimension that does not
    /// divide (see also [`ParallelLayout::validate`]).
    pub fn validate(&self, config: &GptConfig) -> Result<(), ModelError> {
        ParallelLayout {
            tp: self.tp,
            pp: self.pp,
            dp: 1,
            distributed_optimizer: false,
        }
        .validate(config)?;
        assert!(
            self.tp_rank < self.tp && self.stage < self.pp,
            "{self:?} is outside its own layout"
        );
        Ok(())
    }

    /// The global indices of this stage's layers: an equal, contiguous run.
    pub fn layers(&self, n_layer: usize) -> Range<usize> {
        let per = n_layer / self.pp;
        self.stage * per..(self.stage + 1) * per
    }

    /// The first stage holds the embeddings.
    pub fn first_stage(&self) -> bool {
        self.stage == 0
    }

    /// The last stage holds the final LayerNorm, the head (the tied token embedding) and the
    /// loss.
    pub fn last_stage(&self) -> bool {
        self.stage + 1 == self.pp
    }
}

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

/// One named tensor: the box of the global tensor this layout holds, and its place in the flat
/// buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face GPT-2 style name: `wte`, `h.3.attn.c_attn.weight`, `ln_f.bias`.
    pub name: String,
    /// The local shape: the box this layout holds.
    pub shape: Vec<usize>,
    /// The whole tensor's shape. `c_attn` is stored as (3, C, C) (q, k, v stacked), so that a
    /// tensor-parallel slice of whole heads is one box.
    pub global_shape: Vec<usize>,
    /// Where the local box starts in the global tensor, per dimension.
    pub box_offset: Vec<usize>,
    /// The dimension tensor parallelism splits, or `None` where every tensor-parallel rank holds
    /// the whole tensor (norms, position embedding, the biases of row-parallel layers).
    pub split_dim: Option<usize>,
    pub offset: usize,
    pub kind: TensorKind,
    /// The tensor's index in the whole model, which keys its initialisation stream.
    pub index: usize,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn range(&self) -> Range<usize> {
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

/// The size table of a model or of one rank's shard of it: every tensor, in buffer order.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub shard: Shard,
    tensors: Vec<TensorSpec>,
    by_name: HashMap<String, usize>,
    numel: usize,
    /// The token embedding, on the first and on the last stage (the tied head).
    pub wte: Option<usize>,
    /// The position embedding, on the first stage.
    pub wpe: Option<usize>,
    /// This stage's layers, in order.
    pub blocks: Vec<BlockOffsets>,
    /// The final LayerNorm, on the last stage.
    pub lnf_w: Option<usize>,
    pub lnf_b: Option<usize>,
    /// See [`ParamLayout::unique_ranges`].
    unique: Vec<Range<usize>>,
}

impl ParamLayout {
    /// The whole model.
    pub fn new(config: &GptConfig) -> Self {
        Self::sharded(config, Shard::WHOLE)
    }

    /// One rank's shard: its stage's tensors, each cut to its tensor-parallel slice. Megatron's
    /// rules: `c_attn` and `c_fc` split by output (column-parallel, whole heads for attention),
    /// both `c_proj`s by input (row-parallel), the token embedding by vocabulary; norms, the
    /// position embedding and the row-parallel biases are held whole by every rank.
    ///
    /// # Panics
    /// If the shard does not divide the model; check with [`Shard::validate`] first.
    pub fn sharded(config: &GptConfig, shard: Shard) -> Self {
        shard
            .validate(config)
            .unwrap_or_else(|e| panic!("{shard:?} does not split this model: {e}"));
        let c = config.n_embd;
        let (first, last) = (shard.first_stage(), shard.last_stage());
        let layers = shard.layers(config.n_layer);
        let mut tensors = Vec::new();
        let mut numel = 0;
        let mut index = 0;
        // Every tensor of the whole model passes through here in order, so `index` is the same
        // in every shard; `keep` says whether this shard holds it.
        let mut add = |name: String, global: Vec<usize>, split: Option<usize>, kind, keep: bool| {
            let i = index;
            index += 1;
            if !keep {
                return usize::MAX;
            }
            let mut shape = global.clone();
            let mut box_offset = vec![0; global.len()];
            if let Some(d) = split {
                shape[d] /= shard.tp;
                box_offset[d] = shard.tp_rank * shape[d];
            }
            let offset = numel;
            numel += shape.iter().product::<usize>();
            tensors.push(TensorSpec {
                name,
                shape,
                global_shape: global,
                box_offset,
                split_dim: split,
                offset,
                kind,
                index: i,
            });
            offset
        };
        let vp = config.padded_vocab_size();
        // The last stage of a pipeline keeps its own copy of the tied embedding for the head.
        let wte = add(
            "wte".into(),
            vec![vp, c],
            Some(0),
            TensorKind::TokenEmbedding,
            first || last,
        );
        let wpe = add(
            "wpe".into(),
            vec![config.seq_len, c],
            None,
            TensorKind::PositionEmbedding,
            first,
        );
        let mut blocks = Vec::with_capacity(layers.len());
        for l in 0..config.n_layer {
            let p = |s: &str| format!("h.{l}.{s}");
            let keep = layers.contains(&l);
            use TensorKind::*;
            let offsets = BlockOffsets {
                ln1_w: add(p("ln_1.weight"), vec![c], None, NormWeight, keep),
                ln1_b: add(p("ln_1.bias"), vec![c], None, NormBias, keep),
                qkv_w: add(
                    p("attn.c_attn.weight"),
                    vec![3, c, c],
                    Some(1),
                    Weight,
                    keep,
                ),
                qkv_b: add(p("attn.c_attn.bias"), vec![3, c], Some(1), Bias, keep),
                proj_w: add(
                    p("attn.c_proj.weight"),
                    vec![c, c],
                    Some(1),
                    ResidualWeight,
                    keep,
                ),
                proj_b: add(p("attn.c_proj.bias"), vec![c], None, Bias, keep),
                ln2_w: add(p("ln_2.weight"), vec![c], None, NormWeight, keep),
                ln2_b: add(p("ln_2.bias"), vec![c], None, NormBias, keep),
                fc_w: add(p("mlp.c_fc.weight"), vec![4 * c, c], Some(0), Weight, keep),
                fc_b: add(p("mlp.c_fc.bias"), vec![4 * c], Some(0), Bias, keep),
                fcproj_w: add(
                    p("mlp.c_proj.weight"),
                    vec![c, 4 * c],
                    Some(1),
                    ResidualWeight,
                    keep,
                ),
                fcproj_b: add(p("mlp.c_proj.bias"), vec![c], None, Bias, keep),
            };
            if keep {
                blocks.push(offsets);
            }
        }
        let lnf_w = add(
            "ln_f.weight".into(),
            vec![c],
            None,
            TensorKind::NormWeight,
            last,
        );
        let lnf_b = add(
            "ln_f.bias".into(),
            vec![c],
            None,
            TensorKind::NormBias,
            last,
        );
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let held = |o: usize| (o != usize::MAX).then_some(o);
        let mut layout = ParamLayout {
            shard,
            tensors,
            by_name,
            numel,
            wte: held(wte),
            wpe: held(wpe),
            blocks,
            lnf_w: held(lnf_w),
            lnf_b: held(lnf_b),
            unique: Vec::new(),
        };
        layout.unique = layout.compute_unique();
        layout
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

    fn range_in(&self, buf_len: usize, name: &str) -> Range<usize> {
        assert_eq!(buf_len, self.numel, "buffer is not laid out by this table");
        self.get(name)
            .unwrap_or_else(|| panic!("no tensor named {name}"))
            .range()
    }

    /// Initialises `params` from `seed`. Each tensor draws from its own stream keyed by its
    /// index in the whole model, so a tensor's values never depend on the tensors before it, and
    /// a shard draws its whole tensors and keeps its box: every layout starts from the same
    /// model.
    pub fn init<F: Float>(&self, params: &mut [F], config: &GptConfig, seed: u64, std: f64) {
        assert_eq!(params.len(), self.numel);
        let residual_std = std / (2.0 * config.n_layer as f64).sqrt();
        let mut whole = Vec::new();
        for t in &self.tensors {
            let out = &mut params[t.range()];
            let mut rng = Rng::stream(seed, t.index as u64);
            let mut draw = |n: usize, std: f64, real: usize| {
                whole.clear();
                whole.extend((0..n).map(|i| {
                    if i < real {
                        F::from_f64(std * rng.normal())
                    } else {
                        F::ZERO
                    }
                }));
            };
            let n: usize = t.global_shape.iter().product();
            match t.kind {
                TensorKind::NormWeight => {
                    out.fill(F::ONE);
                    continue;
                }
                TensorKind::Bias | TensorKind::NormBias => {
                    out.fill(F::ZERO);
                    continue;
                }
                TensorKind::ResidualWeight => draw(n, residual_std, n),
                TensorKind::Weight | TensorKind::PositionEmbedding => draw(n, std, n),
                // The padding rows beyond the real vocabulary stay zero.
                TensorKind::TokenEmbedding => draw(n, std, config.vocab_size * config.n_embd),
            }
            copy_box(&whole, &t.global_shape, &t.box_offset, out, &t.shape);
        }
    }

    /// The parts of the gradient buffer in the order backward finishes them: the final
    /// LayerNorm, each layer from the last to the first, then the embeddings (the tied token
    /// embedding gets gradient from the head first and from the input last). They tile the
    /// buffer from its end to its start; parts this shard does not hold are left out.
    pub fn backward_buckets(&self) -> Vec<Range<usize>> {
        let mut bounds = vec![self.numel];
        bounds.extend(self.lnf_w);
        bounds.extend(self.blocks.iter().rev().map(|b| b.ln1_w));
        bounds.push(0);
        bounds
            .windows(2)
            .map(|w| w[1]..w[0])
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// Whether weight decay applies, element by element ranges: `(range, decays)` for each tensor.
    pub fn decay_ranges(&self) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
        self.tensors.iter().map(|t| (t.range(), t.kind.decays()))
    }

    /// The ranges of the buffer whose elements this rank counts in a global sum over the model,
    /// such as the gradient norm: each element of the whole model is counted by exactly one
    /// rank of a model-parallel group. Tensors every tensor-parallel rank holds whole are
    /// counted by tensor-parallel rank 0, and the last stage's copy of the tied embedding not
    /// at all (the first stage counts it).
    pub fn unique_ranges(&self) -> &[Range<usize>] {
        &self.unique
    }

    /// The ranges of the tensors every tensor-parallel rank holds whole (norms, the position
    /// embedding, the row-parallel layers' biases), merged where they touch. Their copies must
    /// stay equal across the tensor-parallel group.
    pub fn tp_replicated_ranges(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for t in self.tensors.iter().filter(|t| t.split_dim.is_none()) {
            match out.last_mut() {
                Some(r) if r.end == t.offset => r.end = t.range().end,
                _ => out.push(t.range()),
            }
        }
        out
    }

    /// Computes [`ParamLayout::unique_ranges`] once, when the layout is built: the trainer sums
    /// over them every step.
    fn compute_unique(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for t in &self.tensors {
            let replica = (t.split_dim.is_none() && self.shard.tp_rank != 0)
                || (t.kind == TensorKind::TokenEmbedding && !self.shard.first_stage());
            if replica {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.end == t.offset => r.end = t.range().end,
                _ => out.push(t.range()),
            }
        }
        out
    }
}

/// Copies the box of `src` (laid out row-major as `src_shape`) that starts at `offset` and has
/// shape `dst_shape` into `dst`.
///
/// # Panics
/// If the box does not fit inside `src_shape` or the lengths do not match the shapes.
pub fn copy_box<F: Copy>(
    src: &[F],
    src_shape: &[usize],
    offset: &[usize],
    dst: &mut [F],
    dst_shape: &[usize],
) {
    let dims = src_shape.len();
    assert!(dims > 0 && offset.len() == dims && dst_shape.len() == dims);
    assert_eq!(src.len(), src_shape.iter().product::<usize>());
    assert_eq!(dst.len(), dst_shape.iter().product::<usize>());
    for d in 0..dims {
        assert!(
            offset[d] + dst_shape[d] <= src_shape[d],
            "box outside its tensor"
        );
    }
    let row = dst_shape[dims - 1];
    if row == 0 {
        return;
    }
    for (r, out) in dst.chunks_exact_mut(row).enumerate() {
        // The global index of this row's first element: walk the outer dimensions.
        let (mut rest, mut start, mut stride) = (r, offset[dims - 1], src_shape[dims - 1]);
        for d in (0..dims - 1).rev() {
            start += (rest % dst_shape[d] + offset[d]) * stride;
            rest /= dst_shape[d];
            stride *= src_shape[d];
        }
        out.copy_from_slice(&src[start..start + row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn megatron_order_puts_tensor_fastest() {
        let l = ParallelLayout::new(2, 2, 2);
        let coords = |r| {
            let p = l.place(r);
            (p.stage, p.replica, p.tp_rank)
        };
        assert_eq!(coords(0), (0, 0, 0));
        assert_eq!(coords(1), (0, 0, 1));
        assert_eq!(coords(2), (0, 1, 0));
        assert_eq!(coords(4), (1, 0, 0));
        assert_eq!(Place::at(l, 1, 0, 1), l.place(3));
        let p = l.place(5);
        assert_eq!(p.group(Axis::Tensor), (vec![4, 5], 1));
        assert_eq!(p.group(Axis::Data), (vec![5, 7], 0));
        assert_eq!(p.group(Axis::Pipeline), (vec![1, 5], 1));
        assert_eq!(
            p.embedding_group(),
            Some((vec![1, 5], 1, "emb-dp0-tp1".to_string()))
        );
        assert_eq!(
            ParallelLayout::new(2, 3, 1).place(2).embedding_group(),
            None
        );
        assert_eq!(
            ParallelLayout::new(2, 1, 2).place(0).embedding_group(),
            None
        );
        assert_eq!(
            p.shard(),
            Shard {
                tp: 2,
                tp_rank: 1,
                pp: 2,
                stage: 1
            }
        );
        assert_eq!(Place::ALONE, ParallelLayout::default().place(0));
    }

    #[test]
    fn groups_partition_the_world_along_each_axis() {
        // MT-NLG's layout: 8 x 35 x 16 = 4480 ranks.
        let l = ParallelLayout::new(8, 35, 16);
        for r in 0..l.world_size() {
            assert_eq!(l.place(r).rank(), r);
        }
        for (axis, size) in [(Axis::Tensor, 8), (Axis::Pipeline, 35), (Axis::Data, 16)] {
            let mut seen = HashSet::new();
            let mut names = HashSet::new();
            for r in 0..l.world_size() {
                let p = l.place(r);
                let (members, me) = p.group(axis);
                assert_eq!(members.len(), size);
                assert_eq!(members[me], r);
                // Every member computes the same group and the same name.
                for &m in &members {
                    assert_eq!(l.place(m).group(axis).0, members);
                    assert_eq!(l.place(m).group_name(axis), p.group_name(axis));
                }
                seen.insert(members);
                names.insert(p.group_name(axis));
            }
            assert_eq!(seen.len(), l.world_size() / size);
            assert_eq!(names.len(), seen.len());
        }
    }

    #[test]
    fn replicated_ranges_are_exactly_the_tensors_every_tensor_rank_holds_whole() {
        let config = GptConfig::gpt2_124m();
        let shard = Shard {
            tp: 2,
            tp_rank: 1,
            pp: 2,
            stage: 1,
        };
        let layout = ParamLayout::sharded(&config, shard);
        let mut covered = vec![false; layout.numel()];
        for r in layout.tp_replicated_ranges() {
            covered[r].fill(true);
        }
        for t in layout.tensors() {
            let whole = t.split_dim.is_none();
            assert!(
                covered[t.range()].iter().all(|&c| c == whole),
                "{}: replicated {whole}",
                t.name
            );
        }
        // Norms and row-parallel biases are replicated on every stage; the last stage's
        // vocabulary-parallel head is not.
        assert!(!layout.tp_replicated_ranges().is_empty());
    }

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
