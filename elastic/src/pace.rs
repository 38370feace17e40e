//! Stragglers: a rank that is alive but slow sets every step's pace, since every other rank
//! waits for it in the step's collectives. Each step, every rank's compute time per microbatch
//! (its communication waits left out: those grow on the ranks that wait for a straggler, not on
//! the straggler) is compared with the median of its peers, the ranks of the same pipeline
//! stage, which do the same work per microbatch. A rank slower than `factor` times that median
//! for `steps` consecutive steps is flagged, once per generation. No I/O and no clock.

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

/// The rule applied to one generation's ranks.
#[derive(Debug, Clone)]
pub struct Pace {
    rule: StragglerRule,
    /// Each rank's pipeline stage: its peers are the ranks of the same one.
    stages: Vec<usize>,
    streak: Vec<u32>,
    flagged: Vec<bool>,
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
            let Some(median) = median(&mut others) else {
                self.streak[rank] = 0;
                continue;
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
        // A rank with no peer, or with no microbatch, is never flagged.
        let mut alone = Pace::new(RULE, vec![0, 1]);
        for step in 1..=10 {
            assert!(alone.observe(step, &[10.0, 400.0]).is_empty());
            assert!(alone.observe(step, &[f32::NAN, 400.0]).is_empty());
        }
    }
}
