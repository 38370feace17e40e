//! The runtime's errors: one enum, each variant naming the file, field, step or rank involved.

use std::path::PathBuf;

/// Errors of the runtime. Each names the file, field or step involved.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The configuration file cannot be used: `field` says where, `reason` what to do.
    #[error("config {path}: {field}: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    /// The configuration file does not parse (unknown field, wrong type, bad TOML).
    #[error("config {path}: {message}")]
    ConfigSyntax { path: PathBuf, message: String },
    /// A command-line argument is out of range.
    #[error("{name}: {reason}")]
    Argument { name: &'static str, reason: String },
    /// A data file is missing, empty, malformed or does not fit the model.
    #[error("data file {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    /// The GPU cannot be used: no driver, no device, a failed CUDA call, or a build without
    /// the `cuda` feature. The message says which and what to do.
    #[error("GPU: {0}")]
    Device(String),
    /// The loss stopped being a finite number.
    #[error(
        "training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the update was \
         not applied; lower optim.lr.peak_lr or raise optim.lr.warmup_tokens"
    )]
    Diverged {
        step: u64,
        loss: f32,
        grad_norm: f64,
    },
    /// A process-group operation was aborted (by the runtime, on a membership change).
    #[error("{op} on group {group} (rank {rank}): aborted")]
    Aborted {
        op: &'static str,
        group: String,
        rank: usize,
    },
    /// A peer made no progress before the operation's deadline.
    #[error(
        "{op} on group {group} (rank {rank}): no progress from rank {peer} within {timeout_ms} ms"
    )]
    CommTimeout {
        op: &'static str,
        group: String,
        rank: usize,
        peer: usize,
        timeout_ms: u128,
    },
    /// A peer's connection broke: it died or closed the group.
    #[error("{op} on group {group} (rank {rank}): lost rank {peer}: {reason}")]
    PeerLost {
        op: &'static str,
        group: String,
        rank: usize,
        peer: usize,
        reason: String,
    },
    /// A process group could not form.
    #[error("rendezvous of group {group} (rank {rank}): {reason}")]
    Rendezvous {
        group: String,
        rank: usize,
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint holds something other than what is asked of it: no run state, a tensor
    /// missing or of another shape.
    #[error("the checkpoint of step {step} under {url}: {reason}")]
    CheckpointContent {
        url: String,
        step: u64,
        reason: String,
    },
    /// Checkpoint storage failed: the message names the step, object, tensor or URL. Shown as
    /// the storage error itself, so a chain of causes names it once.
    #[error(transparent)]
    Checkpoint(#[from] marathon_storage::StorageError),
    /// The coordinator (etcd) failed or could not be reached, shown as its own error.
    #[error(transparent)]
    Coordinator(#[from] marathon_elastic::ElasticError),
}

impl RuntimeError {
    /// A [`RuntimeError::CheckpointContent`] of the checkpoint of `step` under `url`.
    pub(crate) fn content(url: &str, step: u64, reason: impl Into<String>) -> Self {
        RuntimeError::CheckpointContent {
            url: url.to_string(),
            step,
            reason: reason.into(),
        }
    }

    pub(crate) fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        RuntimeError::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        RuntimeError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message in an error's chain of causes, joined as `{e:#}` joins them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(s) = next {
            out = format!("{out}: {s}");
            next = s.source();
        }
        out
    }

    #[test]
    fn a_wrapped_storage_or_coordinator_error_is_named_once_in_its_chain() {
        let storage = RuntimeError::from(marathon_storage::StorageError::AlreadyCommitted {
            step: 7,
            url: "file:///ck".into(),
        });
        let coordinator = RuntimeError::from(marathon_elastic::ElasticError::Corrupt {
            key: "/marathon/j/generation".into(),
            reason: "holds \"two\"".into(),
        });
        for (e, part) in [
            (storage, "file:///ck"),
            (coordinator, "/marathon/j/generation"),
        ] {
            let text = chain(&e);
            assert_eq!(text.matches(part).count(), 1, "{text}");
        }
    }
}
