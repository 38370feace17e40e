//! marathon-storage: checkpoints in object storage.
//!
//! Owns the checkpoint format and its manifest ([`format`]), the boxes every stored piece is
//! ([`boxes`]), the codecs (zstd with byte-plane shuffling) and checksums ([`codec`]), the
//! asynchronous writer ([`writer`]), the reader ([`reader`]), retention and garbage collection
//! ([`retention`]), object store URLs ([`store`]: file://, memory://, s3://, az://, gs://) and a
//! fault-injecting store wrapper for tests ([`faulty`]).
//!
//! Never knows about the model, processes or etcd: it stores named, shaped boxes of f32 values
//! and the metadata that says where each one lives; what the tensors mean, and the training
//! state beside them, belong to the caller.

mod ahead;
pub mod boxes;
pub mod codec;
pub mod direct;
pub mod faulty;
pub mod format;
pub mod reader;
pub mod retention;
pub mod store;
pub mod writer;

pub use boxes::TensorBox;
pub use format::Manifest;
pub use reader::Reader;
pub use store::Store;
pub use writer::{CheckpointWriter, Fence, Piece, WriterOptions};

use std::sync::{Arc, OnceLock};

/// Errors of checkpoint storage. Each names the step, object, tensor or URL involved.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The checkpoint root URL cannot be used.
    #[error("checkpoint root {url}: {reason}")]
    Url { url: String, reason: String },
    /// A request to the object store failed (after retries where it could be retried).
    #[error("{op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: object_store::Error,
    },
    /// Nothing is where it was looked for.
    #[error("{what}")]
    NotFound { what: String },
    /// A manifest this build cannot read.
    #[error(
        "manifest {path}: format {format:?} version {version}; this build reads {} version {}; \
         use a marathon that writes that version",
        format::FORMAT,
        format::VERSION
    )]
    UnknownVersion {
        path: String,
        format: String,
        version: u32,
    },
    /// A manifest that does not parse or does not describe whole tensors.
    #[error("manifest {path}: {reason}")]
    BadManifest { path: String, reason: String },
    /// Stored bytes differ from what was written.
    #[error("tensor {tensor} chunk {chunk} in {object}: {reason}")]
    Corrupt {
        tensor: String,
        chunk: usize,
        object: String,
        reason: String,
    },
    /// The copy of a snapshot into the staging buffer failed (a device error).
    #[error("checkpoint of step {step}: the snapshot copy failed: {reason}; nothing was written")]
    Snapshot { step: u64, reason: String },
    /// The store accepts a create-only put over an existing object, so the manifest's put
    /// cannot decide a commit, and nothing else was given to decide it.
    #[error(
        "checkpoint root {url}: this store does not refuse a second create-only write (Garage \
         does not), so two writers of one step could each commit and the later would silently \
         replace the first. Either run the job under a coordinator that records each commit \
         (`marathon train --etcd <endpoints>`: an elastic job, which may be one node), or, if \
         nothing but this job ever writes under this root, say so with `single_writer = true` in \
         [checkpoint] (`--single-writer` for `marathon ckpt`)"
    )]
    UnsafeCommit { url: String },
    /// A checkpoint of this step is already committed; a second writer cannot replace it.
    #[error("checkpoint of step {step} at {url} is already committed; it is left as it is")]
    AlreadyCommitted { step: u64, url: String },
    /// The writer's commit guard refused the commit: the writer no longer speaks for the job
    /// (an elastic job moved to a newer generation). Nothing was committed.
    #[error("checkpoint of step {step} at {url} was not committed: {reason}")]
    Fenced {
        step: u64,
        url: String,
        reason: String,
    },
    /// Ranks that did not report their shards before the commit deadline.
    #[error("checkpoint of step {step}: ranks {missing:?} did not finish their shards within {timeout_s} s; it stays uncommitted")]
    CommitTimeout {
        step: u64,
        missing: Vec<usize>,
        timeout_s: u64,
    },
}

impl StorageError {
    pub(crate) fn store(
        op: &'static str,
        path: &object_store::path::Path,
        source: object_store::Error,
    ) -> Self {
        StorageError::Store {
            op,
            path: path.to_string(),
            source,
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The tokio runtime storage's requests run on: two worker threads, shared by every reader and
/// writer of the process, so background uploads never take more than that from training.
pub(crate) fn runtime() -> Arc<tokio::runtime::Runtime> {
    static RT: OnceLock<Arc<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("marathon-storage")
                .enable_all()
                .build()
                .expect("a tokio runtime starts"),
        )
    })
    .clone()
}
