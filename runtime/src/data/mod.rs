//! The data pipeline: binary token files, corpus preparation and the deterministic sampler.

pub mod prepare;
pub mod sampler;
pub mod tokens;

pub use prepare::{prepare, PrepareOptions, PrepareReport};
pub use sampler::DataOrder;
pub use tokens::{TokenFile, TokenFileHeader};
