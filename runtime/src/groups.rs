//! The process groups of one worker in a tensor x pipeline x data layout.

use marathon_elastic::Coordinator;
use marathon_model::{Axis, Collective, Place};

use crate::comm::{GroupSpec, ProcessGroup};
use crate::error::{Result, RuntimeError};

/// A worker's groups. A group of one is `None`: a dimension the layout does not split costs
/// nothing.
#[derive(Debug, Default)]
pub struct Groups {
    /// Tensor parallelism: the ranks that split this rank's layers.
    pub tp: Option<ProcessGroup>,
    /// Pipeline parallelism: one rank per stage; group rank = stage.
    pub pp: Option<ProcessGroup>,
    /// Data parallelism: one rank per replica; group rank = replica.
    pub dp: Option<ProcessGroup>,
    /// The first and last pipeline stage, which both hold the tied token embedding and sum its
    /// gradient (pipelines of two or more stages, on those two stages only).
    pub emb: Option<ProcessGroup>,
}

impl Groups {
    /// Only data parallelism, over `dp` (or one process when `None`).
    pub fn data(dp: Option<ProcessGroup>) -> Self {
        Groups {
            dp,
            ..Groups::default()
        }
    }

    /// Joins every group of the rank at `place`: tensor, pipeline, data, then embedding, the
    /// same order on every rank, so no two ranks wait on each other's groups in opposite
    /// orders. `template` gives the job, generation, address and timeouts.
    pub fn connect(coord: &dyn Coordinator, place: Place, template: &GroupSpec) -> Result<Self> {
        let join = |name: String, members: usize, me: usize| -> Result<Option<ProcessGroup>> {
            if members == 1 {
                return Ok(None);
            }
            let spec = GroupSpec {
                name,
                rank: me,
                size: members,
                ..template.clone()
            };
            ProcessGroup::connect(coord, spec).map(Some)
        };
        let axis = |a: Axis| {
            let (members, me) = place.group(a);
            join(place.group_name(a), members.len(), me)
        };
        let (tp, pp, dp) = (
            axis(Axis::Tensor)?,
            axis(Axis::Pipeline)?,
            axis(Axis::Data)?,
        );
        let emb = match place.embedding_group() {
            Some((members, me, name)) => join(name, members.len(), me)?,
            None => None,
        };
        Ok(Groups { tp, pp, dp, emb })
    }

    /// Where this rank sits, read from its groups (a group of one is a degree of 1).
    pub fn place(&self) -> Place {
        let at = |g: &Option<ProcessGroup>| g.as_ref().map_or((0, 1), |g| (g.rank(), g.size()));
        let ((tp_rank, tp), (stage, pp), (replica, dp)) =
            (at(&self.tp), at(&self.pp), at(&self.dp));
        Place {
            tp,
            pp,
            dp,
            tp_rank,
            stage,
            replica,
        }
    }

    /// This rank's number in the job (Megatron's order), as the checkpoint writers number
    /// ranks.
    pub fn rank(&self) -> usize {
        self.place().rank()
    }
}

/// Tensor parallelism's collectives, on a TCP process group.
impl Collective<f32> for ProcessGroup {
    type Error = RuntimeError;

    fn size(&self) -> usize {
        ProcessGroup::size(self)
    }

    fn rank(&self) -> usize {
        ProcessGroup::rank(self)
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        ProcessGroup::all_reduce(self, buf)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        ProcessGroup::all_gather(self, buf)
    }
}

/// The tensor-parallel group as the model sees it: absent means one rank. Counts the time the
/// model spends in its collectives.
#[derive(Debug)]
pub(crate) struct TensorGroup<'a> {
    pub group: Option<&'a mut ProcessGroup>,
    pub busy: std::time::Duration,
}

impl TensorGroup<'_> {
    fn timed(&mut self, op: impl FnOnce(&mut ProcessGroup) -> Result<()>) -> Result<()> {
        let Some(g) = self.group.as_deref_mut() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let done = op(g);
        self.busy += started.elapsed();
        done
    }
}

impl Collective<f32> for TensorGroup<'_> {
    type Error = RuntimeError;

    fn size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.size())
    }

    fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        self.timed(|g| g.all_reduce(buf))
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        self.timed(|g| g.all_gather(buf))
    }
}
