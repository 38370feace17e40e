//! The distributed optimizer across generations. Each replica updates one chunk of the flat
//! buffers and holds that chunk's Adam moments; in an elastic job it also mirrors its ring
//! successor's chunk ([`Trainer::mirror_moments`]), updated every step from the successor's
//! reduced gradient, bit for bit as the successor updates it. A lost replica's moments then
//! still have a live copy, and a generation that changes the data-parallel degree re-partitions
//! the moments among its replicas from memory ([`Trainer::reconcile`]): every chunk of the new
//! partition is taken from a replica that holds it, and storage is needed only when two
//! neighbours of the ring are lost together.
//!
//! A step's update and its parameter all-gather are two phases: a replica cut off between them
//! holds its chunks at the new step and the rest at the old one. Each rank therefore describes
//! what it holds (which ranges, at which step, and whether its parameters are whole at that
//! step), and the generation continues from the newest step at which the live ranks together
//! hold every range.

use std::ops::Range;

use marathon_model::{AdamW, Place};

use super::Trainer;
use crate::comm::chunk_range;
use crate::device::Device;
use crate::error::{Result, RuntimeError};

/// Words of one rank's description of what it holds.
const WORDS: usize = 10;

/// What one rank of a data-parallel group holds of the state, as gathered at reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holding {
    /// It holds state at all (a joining rank holds none).
    holds: bool,
    /// The step its held ranges are at.
    step: u64,
    /// Samples consumed at that step.
    consumed: u64,
    /// The optimizer's step count at that step.
    opt_step: u64,
    /// Its parameters are all at `step` (it completed that step's all-gather).
    whole: bool,
    /// The ranges of the flat buffers whose moments (and parameters) it holds at `step`.
    ranges: Vec<Range<usize>>,
}

impl Holding {
    fn words(&self) -> [u64; WORDS] {
        let mut w = [0; WORDS];
        w[0] = u64::from(self.holds);
        w[1] = self.step;
        w[2] = self.consumed;
        w[3] = self.opt_step;
        w[4] = u64::from(self.whole);
        w[5] = self.ranges.len() as u64;
        for (i, r) in self.ranges.iter().take(2).enumerate() {
            w[6 + 2 * i] = r.start as u64;
            w[7 + 2 * i] = r.end as u64;
        }
        w
    }

    fn from_words(w: &[u64]) -> Self {
        let n = (w[5] as usize).min(2);
        Holding {
            holds: w[0] != 0,
            step: w[1],
            consumed: w[2],
            opt_step: w[3],
            whole: w[4] != 0,
            ranges: (0..n)
                .map(|i| w[6 + 2 * i] as usize..w[7 + 2 * i] as usize)
                .collect(),
        }
    }

    fn covers(&self, r: &Range<usize>) -> bool {
        self.ranges
            .iter()
            .any(|h| h.start <= r.start && r.end <= h.end)
    }
}

/// The chunk replica `replica` of `replicas` updates, and the one it mirrors (its ring
/// successor's) when the moments are mirrored and there is more than one replica.
pub(crate) fn zero_chunks(
    numel: usize,
    replicas: usize,
    replica: usize,
    mirrored: bool,
) -> (Range<usize>, Option<Range<usize>>) {
    let own = chunk_range(numel, replicas, replica);
    let mirror =
        (mirrored && replicas > 1).then(|| chunk_range(numel, replicas, (replica + 1) % replicas));
    (own, mirror)
}

/// How the replicas of one data-parallel group continue, decided alike on each of them from
/// every member's [`Holding`].
#[derive(Debug, PartialEq, Eq)]
enum Continue {
    /// No member holds state: they all joined with this generation.
    Stateless,
    /// The members hold state, but at no step do they hold every range between them.
    Uncovered { steps: Vec<u64> },
    /// Continue from `step`, each interval of the buffers sent by the member `root`.
    From {
        step: u64,
        intervals: Vec<(Range<usize>, usize)>,
    },
}

fn decide(all: &[Holding], numel: usize) -> Continue {
    let mut steps: Vec<u64> = all.iter().filter(|h| h.holds).map(|h| h.step).collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    if steps.is_empty() {
        return Continue::Stateless;
    }
    for &step in &steps {
        let at: Vec<usize> = (0..all.len())
            .filter(|&q| all[q].holds && all[q].step == step)
            .collect();
        let mut cuts: Vec<usize> = vec![0, numel];
        for &q in &at {
            for r in &all[q].ranges {
                cuts.extend([r.start.min(numel), r.end.min(numel)]);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let intervals: Option<Vec<(Range<usize>, usize)>> = cuts
            .windows(2)
            .map(|w| {
                let r = w[0]..w[1];
                at.iter()
                    .copied()
                    .find(|&q| all[q].covers(&r))
                    .map(|q| (r, q))
            })
            .collect();
        if let Some(intervals) = intervals {
            return Continue::From { step, intervals };
        }
    }
    Continue::Uncovered { steps }
}

/// Copies the part of `src` (covering `src_range` of the flat buffers) that falls in `dst`'s
/// range `dst_range`, restricted to `within`.
fn copy_overlap(
    dst: &mut [f32],
    dst_range: &Range<usize>,
    src: &[f32],
    src_range: &Range<usize>,
    within: &Range<usize>,
) {
    let lo = dst_range.start.max(src_range.start).max(within.start);
    let hi = dst_range.end.min(src_range.end).min(within.end);
    if lo < hi {
        dst[lo - dst_range.start..hi - dst_range.start]
            .copy_from_slice(&src[lo - src_range.start..hi - src_range.start]);
    }
}

impl Trainer {
    /// Keeps a mirror of the ring successor's moment chunk, so that the moments of a lost
    /// replica survive in memory (see the module's comment). An elastic job with the
    /// distributed optimizer calls it once, before its first reconcile; the mirror costs one
    /// more chunk of moments per rank and one point-to-point send of a gradient chunk per step.
    pub fn mirror_moments(&mut self) -> Result<()> {
        if !self.cfg.parallel.distributed_optimizer || self.mirrored {
            return Ok(());
        }
        if self.cfg.train.device != Device::Cpu {
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "parallel.distributed_optimizer".into(),
                reason: "an elastic job mirrors each replica's optimizer chunk on a neighbour, \
                         which runs on the CPU so far; on a GPU set distributed_optimizer = \
                         false, or train without --etcd"
                    .into(),
            });
        }
        self.mirrored = true;
        self.place_chunks();
        Ok(())
    }

    /// The chunk this rank updates and the one it mirrors, in the current groups.
    fn chunks(&self) -> (Range<usize>, Option<Range<usize>>) {
        let place = self.groups.place();
        zero_chunks(
            self.model.layout.numel(),
            place.dp,
            place.replica,
            self.mirrored,
        )
    }

    /// Sets aside the moments this rank holds (`held`) and gives it empty ones for its chunks
    /// in the current groups, which [`Trainer::reconcile`] fills. Moments already set aside
    /// and not yet placed stay the ones held.
    pub(super) fn place_chunks(&mut self) {
        if self.held.is_empty() && self.holds_state {
            let (own, mirror) = (self.opt.shard.clone(), self.mirror.take());
            let empty = AdamW::for_shard(self.cfg.optim.adamw(), &self.model.layout, own);
            self.held.push(std::mem::replace(&mut self.opt, empty));
            if let (Some(m), true) = (mirror, self.mirror_valid) {
                self.held.push(m);
            }
        }
        let (own, mirror) = self.chunks();
        let adamw = self.cfg.optim.adamw();
        self.opt = AdamW::for_shard(adamw, &self.model.layout, own);
        self.mirror = mirror.map(|r| AdamW::for_shard(adamw, &self.model.layout, r));
        self.mirror_valid = false;
    }

    /// What this rank holds, for [`decide`].
    fn holding(&self) -> Holding {
        let (step, consumed) = self.pending.unwrap_or((self.step, self.consumed_samples));
        Holding {
            holds: self.holds_state && !self.held.is_empty(),
            step,
            consumed,
            opt_step: self.held.first().map_or(0, |o| o.step),
            whole: self.holds_state && self.pending.is_none(),
            ranges: self.held.iter().map(|o| o.shard.clone()).collect(),
        }
    }

    /// The distributed optimizer's part of [`Trainer::reconcile`]: brings every replica of
    /// this shard to one step with its chunks' moments in place. Returns (no member holds
    /// state, the members hold no step whole); in either case nothing moved.
    /// `current`: this rank holds state of the group's newest lineage (see `reconcile`); what
    /// the others hold is counted only when they do too.
    pub(super) fn reconcile_chunks(&mut self, current: bool) -> Result<(bool, bool)> {
        self.fetch_state()?;
        if self.held.is_empty() {
            // Nothing was set aside since the chunks were last placed: what this rank holds is
            // its chunks, which it may now hold in another place.
            self.place_chunks();
        }
        let Place {
            replica,
            dp: replicas,
            ..
        } = self.groups.place();
        let numel = self.model.layout.numel();
        let mut mine = self.holding();
        mine.holds &= current;
        let all: Vec<Holding> = super::recovery::gather_u64s(
            self.groups.dp.as_mut(),
            &mine.words(),
            replica,
            replicas,
        )?
        .iter()
        .map(|w| Holding::from_words(w))
        .collect();
        let (step, intervals) = match decide(&all, numel) {
            Continue::Stateless => return Ok((true, false)),
            Continue::Uncovered { steps } => {
                tracing::warn!(
                    "the replicas of this shard hold optimizer chunks at steps \
                     {steps:?}, but at none of them every chunk"
                );
                return Ok((false, true));
            }
            Continue::From { step, intervals } => (step, intervals),
        };
        let at_step = |h: &Holding| h.holds && h.step == step;
        // Parameters travel when some member's are not all at the step.
        let send_params = all.iter().any(|h| !(at_step(h) && h.whole));
        if !at_step(&mine) {
            // Its parameters are about to be overwritten: until this completes, they are
            // nobody's state.
            self.holds_state = false;
        }
        let wanted: Vec<Vec<Range<usize>>> = (0..replicas)
            .map(|q| {
                let (own, mirror) = zero_chunks(numel, replicas, q, self.mirrored);
                std::iter::once(own).chain(mirror).collect()
            })
            .collect();
        let source = all
            .iter()
            .find(|h| at_step(h))
            .expect("decide found a member at the step");
        let (consumed, opt_step) = (source.consumed, source.opt_step);
        let mut scratch = Vec::new();
        for (interval, root) in &intervals {
            let overlaps = |r: &Range<usize>| r.start < interval.end && interval.start < r.end;
            // Moments travel when a member wants some of them and does not hold them itself.
            let send_moments = (0..replicas).any(|q| {
                wanted[q].iter().any(overlaps) && !(at_step(&all[q]) && all[q].covers(interval))
            });
            if let (true, Some(dp)) = (send_params, self.groups.dp.as_mut()) {
                dp.broadcast(&mut self.model.params[interval.clone()], *root)?;
            }
            let Trainer {
                opt,
                mirror,
                held,
                groups,
                ..
            } = self;
            let targets = std::iter::once(opt).chain(mirror.as_mut());
            let src = held
                .iter()
                .find(|o| o.shard.start <= interval.start && interval.end <= o.shard.end)
                .filter(|_| at_step(&mine));
            if send_moments {
                // Every member takes part; the root sends what it holds.
                scratch.clear();
                match src.filter(|_| replica == *root) {
                    Some(src) => {
                        let at = interval.start - src.shard.start..interval.end - src.shard.start;
                        scratch.extend_from_slice(&src.m[at.clone()]);
                        scratch.extend_from_slice(&src.v[at]);
                    }
                    None => scratch.resize(2 * interval.len(), 0.0),
                }
                let dp = groups.dp.as_mut().expect("moments travel within a group");
                dp.broadcast(&mut scratch, *root)?;
                let (m, v) = scratch.split_at(interval.len());
                for t in targets {
                    copy_overlap(&mut t.m, &t.shard, m, interval, interval);
                    copy_overlap(&mut t.v, &t.shard, v, interval, interval);
                }
            } else if let Some(src) = src {
                for t in targets {
                    copy_overlap(&mut t.m, &t.shard, &src.m, &src.shard, interval);
                    copy_overlap(&mut t.v, &t.shard, &src.v, &src.shard, interval);
                }
            }
        }
        self.step = step;
        self.consumed_samples = consumed;
        self.opt.step = opt_step;
        if let Some(m) = self.mirror.as_mut() {
            m.step = opt_step;
        }
        self.pending = None;
        self.held.clear();
        self.mirror_valid = true;
        self.holds_state = true;
        self.engine.push_state(&self.model, &self.opt)?;
        Ok((false, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(step: u64, whole: bool, ranges: &[Range<usize>]) -> Holding {
        Holding {
            holds: true,
            step,
            consumed: step * 8,
            opt_step: step,
            whole,
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn holdings_travel_as_words() {
        let a = h(7, false, &[3..9, 0..3]);
        assert_eq!(Holding::from_words(&a.words()), a);
    }

    #[test]
    fn a_lost_replica_chunk_comes_from_its_mirror() {
        // dp 3 over 30 elements, replica 1 lost: replica 0 mirrors chunk 1.
        let all = [h(5, true, &[0..10, 10..20]), h(5, true, &[20..30, 0..10])];
        let Continue::From { step, intervals } = decide(&all, 30) else {
            panic!("every chunk is held")
        };
        assert_eq!(step, 5);
        assert_eq!(intervals, [(0..10, 0), (10..20, 0), (20..30, 1)]);
    }

    #[test]
    fn two_neighbours_lost_leave_a_chunk_uncovered() {
        // dp 3, replicas 1 and 2 lost: chunk 2 had its copies on them alone.
        let all = [h(5, true, &[0..10, 10..20])];
        assert_eq!(decide(&all, 30), Continue::Uncovered { steps: vec![5] });
        let joined = Holding {
            holds: false,
            ..h(0, false, &[])
        };
        assert_eq!(decide(&[joined], 30), Continue::Stateless);
    }

    #[test]
    fn a_step_half_applied_continues_forward_when_every_chunk_was_updated() {
        // Both replicas updated their chunks for step 6; one was cut off in the all-gather.
        let all = [h(6, true, &[0..15, 15..30]), h(6, false, &[15..30, 0..15])];
        assert!(matches!(decide(&all, 30), Continue::From { step: 6, .. }));
        // Only one replica updated: step 6 is not whole, step 5 is not held whole either,
        // since the updated replica's moments moved on.
        let all = [h(6, false, &[0..10, 10..20]), h(5, true, &[10..20, 20..30])];
        assert_eq!(decide(&all, 30), Continue::Uncovered { steps: vec![6, 5] });
    }
}
