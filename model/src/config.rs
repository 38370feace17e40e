//! The shape of a GPT model.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The vocabulary is padded to a multiple of this so the head's matrix product and a
/// vocabulary-parallel split both see aligned sizes (Megatron's `make-vocab-size-divisible-by`).
pub const VOCAB_PAD_MULTIPLE: usize = 128;

/// The largest value any dimension may take: turns a typo like `n_embd = 1e12` into a clear
/// error. Products of dimensions are bounded by [`PARAMS_MAX`].
const DIM_MAX: usize = 1 << 24;

/// The most parameters a model may have (about a quadrillion): keeps every size and offset of
/// the flat buffers far inside `usize`.
const PARAMS_MAX: u128 = 1 << 50;

/// A GPT-2 model's shape: the `[model]` section of a training configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Number of real tokens; GPT-2's BPE has 50257.
    pub vocab_size: usize,
    /// Longest sequence the position embedding covers.
    pub seq_len: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Hidden size C; each head has C / n_head dimensions.
    pub n_embd: usize,
}

impl GptConfig {
    /// GPT-2 124M.
    pub fn gpt2_124m() -> Self {
        GptConfig {
            vocab_size: 50257,
            seq_len: 1024,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
        }
    }

    /// The vocabulary rounded up to a multiple of [`VOCAB_PAD_MULTIPLE`]; rows past
    /// `vocab_size` are never looked up and their logits never enter the softmax.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks every field, naming the first one that is wrong as `model.<field>`.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("seq_len", self.seq_len),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if value == 0 || value > DIM_MAX {
                return Err(ModelError::invalid(
                    format!("model.{field}"),
                    format!("{value} is out of range; use a whole number from 1 to {DIM_MAX}"),
                ));
            }
        }
        let (c, l) = (self.n_embd as u128, self.n_layer as u128);
        let params = self.padded_vocab_size() as u128 * c
            + self.seq_len as u128 * c
            + l * (12 * c * c + 13 * c)
            + 2 * c;
        if params > PARAMS_MAX {
            return Err(ModelError::invalid(
                "model",
                format!("{params} parameters is more than the {PARAMS_MAX} this build supports; check n_layer and n_embd"),
            ));
        }
        if self.n_embd % self.n_head != 0 {
            return Err(ModelError::invalid(
                "model.n_head",
                format!(
                    "{} heads do not divide n_embd {}; choose n_head so that n_embd / n_head is \
                     a whole number (for example {})",
                    self.n_head,
                    self.n_embd,
                    divisors_near(self.n_embd, self.n_head)
                ),
            ));
        }
        Ok(())
    }
}

/// The divisor of `n` closest to `want`, offered in error messages.
fn divisors_near(n: usize, want: usize) -> usize {
    (1..=n)
        .filter(|d| n % d == 0)
        .min_by_key(|d| d.abs_diff(want))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_vocab_to_multiple_of_128() {
        assert_eq!(GptConfig::gpt2_124m().padded_vocab_size(), 50304);
        let mut c = GptConfig::gpt2_124m();
        c.vocab_size = 128;
        assert_eq!(c.padded_vocab_size(), 128);
    }

    #[test]
    fn rejects_heads_that_do_not_divide() {
        let mut c = GptConfig::gpt2_124m();
        c.n_head = 7;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("model.n_head: 7 heads do not divide n_embd 768"),
            "{e}"
        );
        c.n_head = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("model.n_head: 0 is out of range"), "{e}");
    }
}
