//! The training configuration: a TOML file, parsed strictly and validated field by field.
//!
//! Unknown fields are refused (a typo never silently falls back to a default), and every value
//! is checked before anything runs; errors name the field as written in the file
//! (`batch.micro_batch`) and say what is accepted.

use std::path::{Path, PathBuf};

use marathon_model::ParallelLayout;
use marathon_model::{AdamWConfig, BatchRamp, GptConfig, LrSchedule, ModelError};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: GptConfig,
    pub data: DataConfig,
    pub batch: BatchConfig,
    pub optim: OptimConfig,
    pub train: RunConfig,
    #[serde(default)]
    pub parallel: ParallelLayout,
    /// Checkpoints; without this section none are written or resumed from.
    pub checkpoint: Option<CheckpointConfig>,
    /// How an elastic job (`--etcd`) treats stragglers.
    #[serde(default)]
    pub elastic: ElasticConfig,
    /// The file this configuration came from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Token file to train on (from `marathon data prepare`).
    pub train: PathBuf,
    /// Token file for validation loss; without it no validation runs.
    pub val: Option<PathBuf>,
    /// Seed of the data order.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Sequences per microbatch: one forward and backward pass.
    pub micro_batch: usize,
    /// Sequences per optimizer step once any ramp-up is over.
    pub global_batch: usize,
    /// Tokens per training sequence, at most `model.seq_len`.
    pub seq_len: usize,
    pub rampup: Option<RampupConfig>,
}

/// Megatron's batch-size ramp-up: from `start` sequences, `increment` at a time, over
/// `ramp_tokens` tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampupConfig {
    pub start: usize,
    pub increment: usize,
    pub ramp_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: LrSchedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Optimizer steps to run.
    pub steps: u64,
    /// Seed of the initial weights.
    #[serde(default)]
    pub seed: u64,
    /// Run validation every this many steps (and after the last); 0 disables it.
    #[serde(default)]
    pub eval_every_steps: u64,
    /// Microbatches of the validation file each validation averages over.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Where to append one JSON line per step and per validation.
    pub metrics: Option<PathBuf>,
    /// Where each data-parallel replica appends the ids of the samples it feeds, one JSON line
    /// per step and replica (`generation`, `step`, `replica`, `samples`), written as the step
    /// starts: an audit trail of the data order, which shows every sample consumed once across
    /// resizes (a step's samples are those its last generation logged).
    #[serde(default)]
    pub samples_log: Option<PathBuf>,
    /// Where the model computes: `cpu` (the default) or `cuda` (GPUs, one per rank or shared;
    /// needs a build with the `cuda` feature).
    #[serde(default)]
    pub device: crate::device::Device,
    /// How GPU ranks move device memory within each group: `auto` (NCCL where every member
    /// has a GPU of its own, host-staged otherwise), `host-staged` or `nccl`
    /// ([`crate::transport`]). The trainer runs host-staged in this release: `auto` says in
    /// the log where NCCL could serve, and `nccl` is refused.
    #[serde(default)]
    pub transport: crate::transport::TransportChoice,
    /// What backward recomputes instead of keeping from forward: `none` (the default),
    /// `selective` (attention and GELU, from the kept matrix products) or `full` (each layer
    /// from its input). Memory falls; the gradients are bitwise the same on the CPU, and the
    /// same to bf16 rounding on a GPU.
    #[serde(default)]
    pub recompute: marathon_model::Recompute,
}

fn default_eval_batches() -> usize {
    8
}

/// Where and how often checkpoints are written, which are kept, and whether a run resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The job's checkpoint root: a directory, or a URL (`file://`, `s3://bucket/prefix`,
    /// `az://container/prefix`, `gs://bucket/prefix`, `memory://`).
    pub root: String,
    /// Take a checkpoint every this many steps, and after the last step; 0: after the last only.
    #[serde(default)]
    pub every_steps: u64,
    /// The newest committed checkpoints kept.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Steps that are multiples of this are kept for good; 0: none.
    #[serde(default)]
    pub keep_every: u64,
    /// Chunk encoding.
    #[serde(default)]
    pub compression: Compression,
    /// zstd level, 1 (fastest) to 19.
    #[serde(default = "default_level")]
    pub level: i32,
    /// `auto` continues from the newest committed checkpoint under `root` when there is one;
    /// `never` starts from fresh weights (and refuses a root that already holds checkpoints).
    #[serde(default)]
    pub resume: Resume,
    /// Uncommitted checkpoints older than this are collected.
    #[serde(default = "default_grace_s")]
    pub abandoned_after_s: u64,
    /// Object store options on top of the environment's, in object_store's key names
    /// (`aws_endpoint`, `aws_region`, `aws_access_key_id`, ...).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Faults injected into this process's requests to the store, for failure-injection runs
    /// (`marathon chaos`): none unless the table is given.
    #[serde(default)]
    pub faults: Option<StoreFaults>,
    /// The operator's word that nothing but this job ever writes under `root`. Needed on a
    /// store that does not refuse a second create-only write (Garage) when the job has no
    /// coordinator to record its commits: without either, the job is refused at its start.
    #[serde(default)]
    pub single_writer: bool,
    /// Where each commit is decided beside the store: an elastic job's coordinator. Set by the
    /// runtime, never read from a file.
    #[serde(skip)]
    pub record: Option<marathon_storage::writer::CommitRecord>,
}

/// `[checkpoint.faults]`: what goes wrong in the store's requests, drawn from `seed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFaults {
    /// Probability that a request fails with a transient error (retried by the writer and the
    /// reader like a real one).
    #[serde(default)]
    pub error_rate: f64,
    /// Added to every request, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Puts to paths containing this store only half of their bytes and fail (a torn write).
    #[serde(default)]
    pub tear_puts_to: Option<String>,
    /// Puts to paths containing this fail for good (a writer lost between its shards and its
    /// manifest).
    #[serde(default)]
    pub refuse_puts_to: Option<String>,
    #[serde(default)]
    pub seed: u64,
}

/// `[elastic]`: stragglers. A rank whose compute time per microbatch exceeds
/// `straggler_factor` times the median of its peers' (the ranks of its pipeline stage) for
/// `straggler_steps` consecutive steps is flagged: logged with its node and slot and counted in
/// the goodput report, and with `evict_stragglers` evicted as a hung worker is, so the job
/// re-forms without it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticConfig {
    pub straggler_factor: f64,
    pub straggler_steps: u32,
    pub evict_stragglers: bool,
}

impl Default for ElasticConfig {
    fn default() -> Self {
        ElasticConfig {
            straggler_factor: 2.0,
            straggler_steps: 10,
            evict_stragglers: false,
        }
    }
}

fn default_keep_last() -> usize {
    3
}

fn default_level() -> i32 {
    1
}

fn default_grace_s() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    None,
    Zstd,
    /// zstd of the byte planes of the values: smaller for floats at the same speed.
    #[default]
    ZstdShuffle,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resume {
    #[default]
    Auto,
    Never,
}

impl TrainConfig {
    /// Reads, parses and validates the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::ConfigSyntax {
            path: path.to_owned(),
            message: format!("cannot read: {e}; pass the path of a TOML configuration (examples are in configs/)"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut cfg: TrainConfig =
            toml::from_str(text).map_err(|e| RuntimeError::ConfigSyntax {
                path: path.to_owned(),
                message: e.to_string().trim_end().replace('\n', "\n  "),
            })?;
        cfg.source = path.to_owned();
        cfg.validate().map_err(|e| cfg.error(e))?;
        Ok(cfg)
    }

    /// Checks every value and every relation between values.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.model.validate()?;
        self.parallel.validate(&self.model)?;
        let b = &self.batch;
        if b.micro_batch == 0 {
            return Err(invalid("batch.micro_batch", "must be at least 1"));
        }
        let e = &self.elastic;
        if !(e.straggler_factor.is_finite() && e.straggler_factor > 1.0) {
            return Err(invalid(
                "elastic.straggler_factor",
                format!(
                    "{} flags ranks no slower than their peers; use a number above 1 (2.0: \
                     twice the peers' median)",
                    e.straggler_factor
                ),
            ));
        }
        if e.straggler_steps == 0 {
            return Err(invalid(
                "elastic.straggler_steps",
                "must be at least 1 (consecutive slow steps that flag a rank)",
            ));
        }
        if b.seq_len == 0 || b.seq_len > self.model.seq_len {
            return Err(invalid(
                "batch.seq_len",
                format!(
                    "{} is out of range; use 1 to model.seq_len ({})",
                    b.seq_len, self.model.seq_len
                ),
            ));
        }
        if let Some(r) = &b.rampup {
            let increments =
                (b.global_batch.saturating_sub(r.start) / r.increment.max(1)).max(1) as u64;
            if r.ramp_tokens < increments * b.seq_len as u64 {
                return Err(invalid(
                    "batch.rampup.ramp_tokens",
                    format!(
                        "{} is too short for {increments} increments of whole sequences of batch.seq_len {}; \
                         use at least {}, or remove [batch.rampup] for a constant batch",
                        r.ramp_tokens,
                        b.seq_len,
                        increments * b.seq_len as u64
                    ),
                ));
            }
        }
        self.batch_ramp().validate(b.micro_batch as u64)?;
        let o = &self.optim;
        o.lr.validate()?;
        for (field, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(
                    field,
                    format!("{v} is out of range; use a number in [0, 1), for example 0.9"),
                ));
            }
        }
        if !(o.eps > 0.0 && o.eps < 1.0) {
            return Err(invalid(
                "optim.eps",
                format!(
                    "{} is out of range; use a small positive number such as 1e-8",
                    o.eps
                ),
            ));
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay < 1.0) {
            return Err(invalid(
                "optim.weight_decay",
                format!(
                    "{} is out of range; use a number in [0, 1), for example 0.1",
                    o.weight_decay
                ),
            ));
        }
        if !(o.grad_clip > 0.0 && o.grad_clip.is_finite()) {
            return Err(invalid(
                "optim.grad_clip",
                format!("{} must be a positive number, for example 1.0", o.grad_clip),
            ));
        }
        if !(o.init_std > 0.0 && o.init_std < 1.0) {
            return Err(invalid(
                "optim.init_std",
                format!(
                    "{} is out of range; use a small positive number such as 0.02",
                    o.init_std
                ),
            ));
        }
        let r = &self.train;
        if r.steps == 0 {
            return Err(invalid("train.steps", "must be at least 1"));
        }
        if r.eval_every_steps > 0 && self.data.val.is_none() {
            return Err(invalid(
                "train.eval_every_steps",
                "is set but data.val names no validation file; set data.val or eval_every_steps = 0",
            ));
        }
        if let Some(c) = &self.checkpoint {
            if c.root.trim().is_empty() {
                return Err(invalid(
                    "checkpoint.root",
                    "is empty; name a directory or a URL such as s3://bucket/job",
                ));
            }
            if c.keep_last == 0 {
                return Err(invalid(
                    "checkpoint.keep_last",
                    "must be at least 1: the newest checkpoint is always kept",
                ));
            }
            if let Some(f) = &c.faults {
                if !(0.0..1.0).contains(&f.error_rate) {
                    return Err(invalid(
                        "checkpoint.faults.error_rate",
                        format!(
                            "{} is out of range; use a probability from 0 up to (not including) 1",
                            f.error_rate
                        ),
                    ));
                }
            }
            if !(1..=19).contains(&c.level) {
                return Err(invalid(
                    "checkpoint.level",
                    format!("{} is out of range; use a zstd level from 1 to 19", c.level),
                ));
            }
        }
        if r.eval_every_steps > 0 && r.eval_batches == 0 {
            return Err(invalid(
                "train.eval_batches",
                "must be at least 1 when train.eval_every_steps is set",
            ));
        }
        Ok(())
    }

    /// A model-crate error about this configuration, as a runtime error naming the file.
    pub fn error(&self, e: ModelError) -> RuntimeError {
        match e {
            ModelError::InvalidConfig { field, reason } => RuntimeError::Config {
                path: self.source.clone(),
                field,
                reason,
            },
        }
    }

    /// The global batch schedule, in sequences.
    pub fn batch_ramp(&self) -> BatchRamp {
        let global = self.batch.global_batch as u64;
        match &self.batch.rampup {
            None => BatchRamp::constant(global),
            Some(r) => BatchRamp {
                start: r.start as u64,
                increment: r.increment as u64,
                ramp_samples: r.ramp_tokens / self.batch.seq_len as u64,
                global,
            },
        }
    }
}

impl OptimConfig {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}
