//! marathon-runtime: the worker.
//!
//! Owns what runs a training job once its configuration is known: the configuration and its
//! validation, the data pipeline (token files, corpus preparation, the deterministic sampler),
//! the process groups and their transports, the trainer (any tensor x pipeline x data layout,
//! on the CPU or a GPU, through [`engine`]), checkpoints, the elastic worker and the node agent,
//! live metrics, job status and run reports.
//!
//! Never parses command lines or draws on a terminal: it reports progress through
//! [`trainer::Observer`] and logs through `tracing`, and `ops` renders both.

pub mod agent;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod device;
pub mod diff;
pub mod engine;
mod error;
pub mod groups;
pub mod handshake;
pub mod hf;
pub mod metrics;
pub mod moments;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod records;
pub mod report;
pub mod reshard;
/// The GPU's self-test: every GPU path against the CPU's, and the GPU bench.
#[cfg(feature = "cuda")]
pub mod selftest;
mod shm;
pub mod small_job;
pub mod status;
pub mod trainer;
pub mod transport;
pub mod worker;

pub use config::TrainConfig;
pub use error::{Result, RuntimeError};
pub use groups::Groups;
pub use records::StepRecord;
pub use trainer::{Observer, Trainer};
