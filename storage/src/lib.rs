//! marathon-storage: checkpoints in object storage.
//!
//! Owns the checkpoint format and its manifest, the codecs (zstd with byte-plane shuffling),
//! checksums, the asynchronous writer, the reader with its resharding planner, retention and
//! garbage collection, object store URLs (file://, s3://, az://, gs://, memory://) and a
//! fault-injecting store wrapper for tests.
//!
//! Never knows about the model, processes or etcd: it stores named, shaped byte ranges and the
//! metadata that says where each one lives.
//!
//! Nothing is implemented here yet; the checkpoint issue fills this crate.
