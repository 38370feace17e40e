//! marathon-model: the GPT math.
//!
//! Owns the GPT-2 architecture as plain arithmetic: one flat buffer for parameters, one for
//! gradients and one per AdamW moment, with named views from a size table ([`ParamLayout`]); an
//! explicit forward and backward for every layer ([`kernels`]); AdamW with global gradient-norm
//! clipping ([`optim`]); the learning-rate and batch-size schedules ([`schedule`]); and the cost
//! model that sizes a parallel layout ([`cost`]) with the goodput it can expect at a failure rate
//! ([`goodput`]). The CPU kernels are generic over `f32` and `f64`
//! so gradients can be checked against finite differences in double precision.
//!
//! Never knows about files, sockets, async, etcd or object stores: callers hand it token ids and
//! buffers, and it hands back numbers.

pub mod collective;
pub mod config;
pub mod cost;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dims;
pub mod float;
pub mod goodput;
pub mod gpt;
pub mod kernels;
pub mod layout;
pub mod optim;
pub mod rng;
pub mod schedule;

pub use collective::{Collective, Solo};
pub use config::GptConfig;
pub use float::Float;
pub use gpt::{Gpt, Recompute};
pub use layout::{Axis, ParallelLayout, ParamLayout, Place, Shard, TensorSpec};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::{BatchRamp, LrSchedule};

/// Errors of the model crate: all of them are a configuration the model cannot be built from.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("{field}: {reason}")]
    InvalidConfig {
        /// The configuration field, as the user writes it (`model.n_head`).
        field: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

impl ModelError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ModelError::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
