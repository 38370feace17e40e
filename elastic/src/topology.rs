//! Where each rank sits in a tensor x pipeline x data parallel layout, and which ranks form its
//! groups.
//!
//! Ranks are ordered as Megatron orders them, tensor fastest, then data, then pipeline:
//! `rank = (pp * dp_size + dp) * tp_size + tp`. Tensor-parallel peers are neighbours (inside a
//! node, on NVLink in production), and a pipeline stage's ranks are contiguous.

/// A rank's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub tp: usize,
}

/// A (tp, pp, dp) layout of `tp * pp * dp` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
}

/// The three kinds of group every rank belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Tensor,
    Pipeline,
    Data,
}

impl Topology {
    /// # Panics
    /// If any size is zero.
    pub fn new(tp: usize, pp: usize, dp: usize) -> Self {
        assert!(
            tp > 0 && pp > 0 && dp > 0,
            "every parallel size is at least 1"
        );
        Topology { tp, pp, dp }
    }

    pub fn world_size(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// # Panics
    /// If `rank` is outside the layout.
    pub fn coords(&self, rank: usize) -> Coords {
        assert!(
            rank < self.world_size(),
            "rank {rank} outside a world of {}",
            self.world_size()
        );
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    pub fn rank(&self, c: Coords) -> usize {
        assert!(
            c.tp < self.tp && c.dp < self.dp && c.pp < self.pp,
            "{c:?} outside {self:?}"
        );
        (c.pp * self.dp + c.dp) * self.tp + c.tp
    }

    /// The ranks of `rank`'s group along `axis`, in group-rank order, and `rank`'s place in it.
    pub fn group(&self, rank: usize, axis: Axis) -> (Vec<usize>, usize) {
        let c = self.coords(rank);
        let (members, me): (Vec<usize>, usize) = match axis {
            Axis::Tensor => (
                (0..self.tp)
                    .map(|tp| self.rank(Coords { tp, ..c }))
                    .collect(),
                c.tp,
            ),
            Axis::Data => (
                (0..self.dp)
                    .map(|dp| self.rank(Coords { dp, ..c }))
                    .collect(),
                c.dp,
            ),
            Axis::Pipeline => (
                (0..self.pp)
                    .map(|pp| self.rank(Coords { pp, ..c }))
                    .collect(),
                c.pp,
            ),
        };
        (members, me)
    }

    /// A name for `rank`'s group along `axis`, the same for every member and different for
    /// every other group: the coordinates the members share.
    pub fn group_name(&self, rank: usize, axis: Axis) -> String {
        let c = self.coords(rank);
        match axis {
            Axis::Tensor => format!("tp-pp{}-dp{}", c.pp, c.dp),
            Axis::Data => format!("dp-pp{}-tp{}", c.pp, c.tp),
            Axis::Pipeline => format!("pp-dp{}-tp{}", c.dp, c.tp),
        }
    }

    /// The group that shares the tied token embedding's gradient: the first and the last stage
    /// of `rank`'s pipeline, when it has more than one stage and `rank` is one of them. Returns
    /// the members, `rank`'s place among them and the group's name.
    pub fn embedding_group(&self, rank: usize) -> Option<(Vec<usize>, usize, String)> {
        let c = self.coords(rank);
        if self.pp == 1 || (c.pp != 0 && c.pp != self.pp - 1) {
            return None;
        }
        let members = vec![
            self.rank(Coords { pp: 0, ..c }),
            self.rank(Coords {
                pp: self.pp - 1,
                ..c
            }),
        ];
        let me = usize::from(c.pp != 0);
        Some((members, me, format!("emb-dp{}-tp{}", c.dp, c.tp)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn megatron_order_puts_tensor_fastest() {
        let t = Topology::new(2, 2, 2);
        assert_eq!(
            t.coords(0),
            Coords {
                pp: 0,
                dp: 0,
                tp: 0
            }
        );
        assert_eq!(
            t.coords(1),
            Coords {
                pp: 0,
                dp: 0,
                tp: 1
            }
        );
        assert_eq!(
            t.coords(2),
            Coords {
                pp: 0,
                dp: 1,
                tp: 0
            }
        );
        assert_eq!(
            t.coords(4),
            Coords {
                pp: 1,
                dp: 0,
                tp: 0
            }
        );
        assert_eq!(t.group(5, Axis::Tensor), (vec![4, 5], 1));
        assert_eq!(t.group(5, Axis::Data), (vec![5, 7], 0));
        assert_eq!(t.group(5, Axis::Pipeline), (vec![1, 5], 1));
        assert_eq!(
            t.embedding_group(5),
            Some((vec![1, 5], 1, "emb-dp0-tp1".to_string()))
        );
        assert_eq!(Topology::new(2, 3, 1).embedding_group(2), None);
        assert_eq!(Topology::new(2, 1, 2).embedding_group(0), None);
    }

    #[test]
    fn groups_partition_the_world_along_each_axis() {
        // MT-NLG's layout: 8 x 35 x 16 = 4480 ranks.
        let t = Topology::new(8, 35, 16);
        for r in 0..t.world_size() {
            assert_eq!(t.rank(t.coords(r)), r);
        }
        for (axis, size) in [(Axis::Tensor, 8), (Axis::Pipeline, 35), (Axis::Data, 16)] {
            let mut seen = HashSet::new();
            let mut names = HashSet::new();
            for r in 0..t.world_size() {
                let (members, me) = t.group(r, axis);
                assert_eq!(members.len(), size);
                assert_eq!(members[me], r);
                // Every member computes the same group and the same name.
                for &m in &members {
                    assert_eq!(t.group(m, axis).0, members);
                    assert_eq!(t.group_name(m, axis), t.group_name(r, axis));
                }
                seen.insert(members);
                names.insert(t.group_name(r, axis));
            }
            assert_eq!(seen.len(), t.world_size() / size);
            assert_eq!(names.len(), seen.len());
        }
    }
}
