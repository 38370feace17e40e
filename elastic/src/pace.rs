//! Stragglers: a rank that is alive but slow sets every step's pace, since every other rank
//! waits for it in the step's collectives. Each step, every rank's compute time per microbatch
//! (its communication waits left out: those grow on the ranks that wait for a straggler, not on
//! the straggler) is compared with the median of its peers, the ranks of the same pipeline
//! stage, which do the same work per microbatch. A rank with no peer (the only rank of its
//! stage) is compared with its own pace instead: the median of its first
//! [`BASELINE_STEPS`] steps of the generation. A rank slower than `factor` times its yardstick
//! for `steps` consecutive steps is flagged, once per generation. A job of one rank has nobody
//! waiting for it, and flags nothing. No I/O and no clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When a rank is a straggler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StragglerRule {
    /// A rank is slow in a step when its compute time exceeds this many times its peers' median.
    pub factor: f64,
    /// Consecutive slow steps that flag it.
    pub steps: u32,
}

/// A flagged rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Straggler {
    /// Its global rank in the generation.
    pub rank: usize,
    /// The step at which it was flagged.
    pub step: u64,
    /// Its compute time over its peers' median, in that step.
    pub ratio: f64,
}

/// Steps of a generation whose compute times set the yardstick of a rank with no peer.
pub const BASELINE_STEPS: usize = 5;

/// The rule applied to one generation's ranks.
#[derive(Debug, Clone)]
pub struct Pace {
    rule: StragglerRule,
    /// Each rank's pipeline stage: its peers are the ranks of the same one.
    stages: Vec<usize>,
    streak: Vec<u32>,
    flagged: Vec<bool>,
    /// A rank's first compute times of the generation, for a rank with no peer.
    own: Vec<Vec<f64>>,
}

impl Pace {
    /// For a generation whose rank `r` holds stage `stages[r]`.
    pub fn new(rule: StragglerRule, stages: Vec<usize>) -> Self {
        let n = stages.len();
        Pace {
            rule,
            stages,
            streak: vec![0; n],
            flagged: vec![false; n],
            own: vec![Vec::new(); n],
        }
    }

    /// Takes step `step`'s compute time per microbatch of every rank (by global rank; not
    /// finite for a rank that ran no microbatch) and returns the ranks flagged at it.
    pub fn observe(&mut self, step: u64, compute: &[f32]) -> Vec<Straggler> {
        assert_eq!(compute.len(), self.stages.len(), "one time per rank");
        let mut by_stage: BTreeMap<usize, Vec<(usize, f64)>> = BTreeMap::new();
        for (rank, &c) in compute.iter().enumerate() {
            if c.is_finite() {
                by_stage
                    .entry(self.stages[rank])
                    .or_default()
                    .push((rank, f64::from(c)));
            }
        }
        let mut out = Vec::new();
        for rank in 0..compute.len() {
            let Some(peers) = by_stage.get(&self.stages[rank]) else {
                self.streak[rank] = 0;
                continue;
            };
            let Some(&(_, mine)) = peers.iter().find(|(r, _)| *r == rank) else {
                self.streak[rank] = 0;
                continue;
            };
            let mut others: Vec<f64> = peers
                .iter()
                .filter(|(r, _)| *r != rank)
                .map(|&(_, c)| c)
                .collect();
            let median = match median(&mut others) {
                Some(m) => m,
                // No peer: its own pace, once it has one; alone in the job, nobody waits.
                None if compute.len() > 1 => {
                    let own = &mut self.own[rank];
                    if own.len() < BASELINE_STEPS {
                        own.push(mine);
                        self.streak[rank] = 0;
                        continue;
                    }
                    median(&mut own.clone()).expect("a full baseline")
                }
                None => {
                    self.streak[rank] = 0;
                    continue;
                }
            };
            let ratio = mine / median.max(f64::MIN_POSITIVE);
            if ratio > self.rule.factor {
                self.streak[rank] += 1;
            } else {
                self.streak[rank] = 0;
            }
            if self.streak[rank] >= self.rule.steps.max(1) && !self.flagged[rank] {
                self.flagged[rank] = true;
                out.push(Straggler { rank, step, ratio });
            }
        }
        out
    }
}

/// The median of `xs` (the mean of the middle two when their count is even).
fn median(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: StragglerRule = StragglerRule {
        factor: 2.0,
        steps: 3,
    };

    #[test]
    fn a_rank_slow_for_the_given_steps_is_flagged_once() {
        let mut p = Pace::new(RULE, vec![0; 4]);
        let slow = [10.0, 10.5, 31.0, 9.8];
        assert!(p.observe(1, &slow).is_empty());
        assert!(p.observe(2, &slow).is_empty());
        let f = p.observe(3, &slow);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].rank, f[0].step), (2, 3));
        assert!((f[0].ratio - 3.1).abs() < 1e-9, "{f:?}");
        assert!(p.observe(4, &slow).is_empty(), "flagged once");
    }

    #[test]
    fn a_normal_step_resets_the_count() {
        let mut p = Pace::new(RULE, vec![0; 3]);
        let (slow, normal) = ([10.0, 10.0, 25.0], [10.0, 10.0, 11.0]);
        for step in 1..=20 {
            let times = if step % 3 == 0 { normal } else { slow };
            assert!(p.observe(step, &times).is_empty(), "step {step}");
        }
    }

    #[test]
    fn peers_are_the_ranks_of_the_same_stage() {
        // The last stage computes the head and is always slower; it is compared with itself.
        let mut p = Pace::new(RULE, vec![0, 1, 0, 1]);
        for step in 1..=10 {
            assert!(p.observe(step, &[10.0, 40.0, 10.5, 41.0]).is_empty());
        }
        // A rank with no microbatch is never flagged, nor the rank of a one-rank job.
        let mut idle = Pace::new(RULE, vec![0, 0]);
        let mut single = Pace::new(RULE, vec![0]);
        for step in 1..=20 {
            assert!(idle.observe(step, &[f32::NAN, 400.0]).is_empty());
            let t = if step > 5 { 400.0 } else { 10.0 };
            assert!(single.observe(step, &[t]).is_empty());
        }
    }

    #[test]
    fn the_only_rank_of_a_stage_is_compared_with_its_own_pace() {
        // pp 2, dp 1: each stage has one rank. Stage 1 always computes more (the head) and is
        // steady; stage 0's rank slows to 3x its own pace from step 8.
        let mut p = Pace::new(RULE, vec![0, 1]);
        let mut flagged = Vec::new();
        for step in 1..=20u64 {
            let t0 = if step >= 8 { 30.0 } else { 10.0 };
            flagged.extend(p.observe(step, &[t0, 40.0]));
        }
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        assert_eq!((flagged[0].rank, flagged[0].step), (0, 10));
        assert!((flagged[0].ratio - 3.0).abs() < 1e-9, "{flagged:?}");
        // A rank slow from the generation's first step sets its own pace: not flagged.
        let mut slow_from_start = Pace::new(RULE, vec![0, 1]);
        for step in 1..=20 {
            assert!(slow_from_start.observe(step, &[30.0, 40.0]).is_empty());
        }
    }
}
