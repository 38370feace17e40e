//! The MT-NLG schedules: learning rate by tokens consumed, global batch size by samples consumed.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Linear warm-up to `peak_lr` over `warmup_tokens`, then cosine decay to
/// `min_lr_ratio * peak_lr` at `decay_tokens` (counted from the start of training, as Megatron's
/// `lr-decay-tokens`), constant after.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_tokens: u64,
    pub decay_tokens: u64,
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
}

fn default_min_lr_ratio() -> f64 {
    0.1
}

impl LrSchedule {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.peak_lr.is_finite() && self.peak_lr > 0.0 && self.peak_lr < 1.0) {
            return Err(ModelError::invalid(
                "optim.lr.peak_lr",
                format!(
                    "{} is out of range; use a number in (0, 1), for example 6e-4",
                    self.peak_lr
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(ModelError::invalid(
                "optim.lr.min_lr_ratio",
                format!(
                    "{} is out of range; use a fraction of the peak from 0 to 1 (MT-NLG: 0.1)",
                    self.min_lr_ratio
                ),
            ));
        }
        if self.decay_tokens < self.warmup_tokens {
            return Err(ModelError::invalid(
                "optim.lr.decay_tokens",
                format!(
                    "{} is less than warmup_tokens {}; decay is counted from the start of training, \
                     so it must be at least the warm-up",
                    self.decay_tokens, self.warmup_tokens
                ),
            ));
        }
        Ok(())
    }

    /// The learning rate for a step after which `tokens` tokens will have been consumed
    /// (counting the step's own batch, so the first step does not run at zero).
    pub fn lr_at(&self, tokens: u64) -> f64 {
        let min_lr = self.peak_lr * self.min_lr_ratio;
        if tokens < self.warmup_tokens {
            return self.peak_lr * tokens as f64 / self.warmup_tokens as f64;
        }
        if tokens >= self.decay_tokens || self.decay_tokens == self.warmup_tokens {
            return if tokens >= self.decay_tokens {
                min_lr
            } else {
                self.peak_lr
            };
        }
        let progress =
            (tokens - self.warmup_tokens) as f64 / (self.decay_tokens - self.warmup_tokens) as f64;
        min_lr + (self.peak_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// The global batch size: `start` sequences, growing by `increment` in equal slices of
/// `ramp_samples` until it reaches `global` (Megatron's `rampup-batch-size`). With
/// `ramp_samples == 0` it is `global` from the first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRamp {
    pub start: u64,
    pub increment: u64,
    pub ramp_samples: u64,
    pub global: u64,
}

impl BatchRamp {
    pub fn constant(global: u64) -> Self {
        BatchRamp {
            start: global,
            increment: 0,
            ramp_samples: 0,
            global,
        }
    }

    /// Checks the ramp against the microbatch size: every batch on the way must be a whole
    /// number of microbatches.
    pub fn validate(&self, micro_batch: u64) -> Result<(), ModelError> {
        if self.global == 0 || self.global % micro_batch != 0 {
            return Err(ModelError::invalid(
                "batch.global_batch",
                format!(
                    "{} is not a positive multiple of batch.micro_batch {micro_batch}; use for \
                     example {}",
                    self.global,
                    micro_batch * (self.global / micro_batch).max(1)
                ),
            ));
        }
        if self.ramp_samples == 0 {
            return Ok(());
        }
        if self.start == 0 || self.start > self.global || self.start % micro_batch != 0 {
            return Err(ModelError::invalid(
                "batch.rampup.start",
                format!(
                    "{} must be a positive multiple of batch.micro_batch {micro_batch} no larger \
                     than batch.global_batch {}",
                    self.start, self.global
                ),
            ));
        }
        if self.increment == 0
            || self.increment % micro_batch != 0
            || (self.global - self.start) % self.increment != 0
        {
            return Err(ModelError::invalid(
                "batch.rampup.increment",
                format!(
                    "{} must be a positive multiple of batch.micro_batch {micro_batch} that divides \
                     global_batch - start = {}",
                    self.increment,
                    self.global - self.start
                ),
            ));
        }
        Ok(())
    }

    /// The global batch of a step that starts after `consumed_samples` samples.
    pub fn batch_at(&self, consumed_samples: u64) -> u64 {
        if self.ramp_samples == 0 || self.start >= self.global {
            return self.global;
        }
        let increments = (self.global - self.start) / self.increment;
        let samples_per_increment = (self.ramp_samples / increments).max(1);
        let done = consumed_samples / samples_per_increment;
        (self.start + done * self.increment).min(self.global)
    }

    /// Samples consumed before step `step` (steps count from 0): the data order's position.
    pub fn consumed_before(&self, step: u64) -> u64 {
        let mut consumed = 0;
        for s in 0..step {
            let b = self.batch_at(consumed);
            if b == self.global {
                // Constant from here on: close the remaining steps in one product.
                return consumed + (step - s) * self.global;
            }
            consumed += b;
        }
        consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_warms_up_then_decays_to_ten_percent() {
        let s = LrSchedule {
            peak_lr: 5e-5,
            warmup_tokens: 1000,
            decay_tokens: 11_000,
            min_lr_ratio: 0.1,
        };
        assert_eq!(s.lr_at(500), 2.5e-5);
        assert_eq!(s.lr_at(1000), 5e-5);
        assert!((s.lr_at(6000) - 0.55 * 5e-5).abs() < 1e-18);
        assert!((s.lr_at(11_000) - 5e-6).abs() < 1e-18);
        assert!((s.lr_at(50_000) - 5e-6).abs() < 1e-18);
    }

    #[test]
    fn batch_ramps_like_megatron() {
        // 32 -> 96 in steps of 32 over 300 samples: 2 increments of 150 samples each.
        let r = BatchRamp {
            start: 32,
            increment: 32,
            ramp_samples: 300,
            global: 96,
        };
        r.validate(8).unwrap();
        let batches: Vec<u64> = (0..8).map(|s| r.batch_at(r.consumed_before(s))).collect();
        assert_eq!(batches, [32, 32, 32, 32, 32, 64, 64, 64]);
        assert_eq!(r.batch_at(r.consumed_before(8)), 96);
        for s in 0..20 {
            assert_eq!(
                r.consumed_before(s + 1),
                r.consumed_before(s) + r.batch_at(r.consumed_before(s))
            );
        }
        assert!(r
            .validate(24)
            .unwrap_err()
            .to_string()
            .contains("batch.global_batch"));
        let c = BatchRamp::constant(16);
        assert_eq!(c.consumed_before(5), 80);
    }
}
