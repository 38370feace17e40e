//! The asynchronous checkpoint writer: snapshot into a staging buffer, persist in the
//! background, commit when every rank's shard is durable.
//!
//! `snapshot` copies this rank's pieces into a staging buffer that is allocated once and reused;
//! training goes on as soon as the copy is done. A background thread then cuts the pieces into
//! chunks, checksums each chunk's raw bytes, encodes it and streams it into this rank's shard
//! object as a multipart upload with bounded concurrency, then writes the rank's index. Rank 0
//! commits: it waits until every rank's index of its persist exists and merges them into the
//! manifest, which it seals with its digest.
//!
//! The commit point is one write that cannot be raced:
//! - with a [`CommitRecord`] (a coordinator's create-only record of the step, which an elastic
//!   job's generation fences in the same transaction), the record decides, and only its winner
//!   then writes the manifest;
//! - else the manifest's create-only put decides, on a store that refuses a second one;
//! - a store that accepts it anyway (Garage 2.5) is refused at the start
//!   ([`StorageError::UnsafeCommit`]), unless the writer was told that it alone writes under
//!   the root ([`WriterOptions::single_writer`]).
//!
//! There is at most one staged copy: a snapshot that comes while the previous persist is still
//! running waits for it, and reports how long.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::boxes::{range_to_boxes, TensorBox};
use crate::codec::{checksum, encode, Codec};
use crate::format::{self, Chunk, Manifest, RankIndex, TensorEntry};
use crate::retention::Retention;
use crate::store::{is_transient, retry, Store, ATTEMPTS_MAX};
use crate::{runtime, Result, StorageError};

/// How a writer encodes and uploads.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub codec: Codec,
    /// zstd level (1 fastest; 3 the default; up to 19).
    pub level: i32,
    /// Raw bytes per chunk at most: a ranged read decodes no more than this.
    pub chunk_bytes: usize,
    /// Multipart part size.
    pub part_bytes: usize,
    /// Parts uploading at once, at most.
    pub uploads_inflight_max: usize,
    /// Chunks encoding at once, at most, each on a blocking thread.
    pub encoders_max: usize,
    /// How long the committer waits for every rank's shard.
    pub commit_timeout: Duration,
    /// Applied by the committing rank after each commit; the checkpoint it just committed
    /// counts as the newest verified one.
    pub retention: Option<Retention>,
    /// Decides each commit, before the manifest is written (see the module's notes).
    pub record: Option<CommitRecord>,
    /// The operator's word that no other writer ever commits under this root: accepted on a
    /// store that ignores create-only puts, where the committer then checks that no manifest
    /// exists before it writes its own.
    pub single_writer: bool,
    /// What the writers of one persist share and no other persist of the same step does (an
    /// elastic job's generation, a launch's token): indexes are named by it. A writer of one
    /// rank draws its own.
    pub epoch: Option<u64>,
    /// Raised when the job moved on without this writer (an elastic job's newer generation):
    /// a committer still waiting for ranks' shards gives up at once, as [`StorageError::Fenced`],
    /// rather than at `commit_timeout`, since its commit would be refused anyway, and training
    /// waits for it at the next snapshot.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// A committer's claim on a step: the digest of the manifest it is about to write, and who it
/// is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    pub step: u64,
    /// The persist's epoch (an elastic job's generation, which the record checks is still the
    /// running one).
    pub epoch: u64,
    /// The manifest's `sha256:` digest.
    pub digest: String,
    /// The committing process: host, pid and the persist's writer id.
    pub writer: String,
}

/// What a commit record said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The claim is the step's commit.
    Won,
    /// Another claim was recorded first: the step's commit is that one.
    Taken(Claim),
    /// The claim may not commit at all: the job moved on without its writer (why).
    Fenced(String),
}

/// A create-only record of each step's commit, in a store other than the checkpoint's own
/// (etcd). It runs on a blocking thread and may block; `Err` is a failure to ask, which leaves
/// the checkpoint uncommitted.
#[derive(Clone)]
pub struct CommitRecord(pub Arc<RecordFn>);

/// What a [`CommitRecord`] runs: the claim in, what the record said out.
pub type RecordFn = dyn Fn(&Claim) -> std::result::Result<Recorded, String> + Send + Sync;

impl std::fmt::Debug for CommitRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitRecord")
    }
}

impl PartialEq for CommitRecord {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            codec: Codec::ZstdShuffle4,
            level: 1,
            chunk_bytes: 4 << 20,
            part_bytes: 8 << 20,
            uploads_inflight_max: 4,
            encoders_max: 2,
            commit_timeout: Duration::from_secs(600),
            retention: None,
            record: None,
            single_writer: false,
            epoch: None,
            cancel: None,
        }
    }
}

/// One piece of a rank's snapshot: a box of a named tensor of `shape`. Its values, row-major in
/// the box, follow the previous piece's in the staging buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub tensor: String,
    pub shape: Vec<u64>,
    pub region: TensorBox,
}

/// How create-only commits are made safe on this store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// The store refuses a second create-only put: the manifest put itself decides.
    CreateOnly,
    /// The store accepts a create-only put over an existing object (Garage 2.5 does): a commit
    /// record decides, or the single writer checks that no manifest exists before it writes.
    LeaderChecked,
}

/// What a snapshot cost the training loop.
#[derive(Debug)]
pub struct SnapshotReport {
    /// Time waiting for the previous persist to finish.
    pub waited: Duration,
    /// Time copying into the staging buffer.
    pub copied: Duration,
    /// How the previous persist ended, if one was running.
    pub previous: Option<Result<PersistReport>>,
}

/// What a persist did.
#[derive(Debug, Clone)]
pub struct PersistReport {
    pub step: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// From the end of the snapshot to this rank's shard and index being durable.
    pub upload: Duration,
    /// On the committing rank: the time until the manifest was written.
    pub committed: Option<Duration>,
}

type Persist = JoinHandle<(Vec<f32>, Result<PersistReport>)>;

/// A rank's checkpoint writer.
pub struct CheckpointWriter {
    store: Store,
    rank: usize,
    writers: usize,
    opts: WriterOptions,
    mode: CommitMode,
    staging: Vec<f32>,
    inflight: Option<Persist>,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("url", &self.store.url)
            .field("rank", &self.rank)
            .field("writers", &self.writers)
            .field("mode", &self.mode)
            .finish()
    }
}

impl CheckpointWriter {
    /// A writer for `rank` of `writers` ranks. Rank 0 commits; it probes once whether the store
    /// enforces create-only puts (see [`CommitMode`]), and refuses a store that does not when
    /// nothing else decides its commits.
    pub fn new(store: Store, rank: usize, writers: usize, mut opts: WriterOptions) -> Result<Self> {
        assert!(rank < writers, "rank {rank} outside {writers} writers");
        if writers == 1 {
            opts.epoch = opts.epoch.or_else(|| Some(writer_id()));
        }
        let mode = if rank == 0 {
            runtime().block_on(probe_create_only(&store))?
        } else {
            CommitMode::CreateOnly
        };
        if mode == CommitMode::LeaderChecked && opts.record.is_none() && !opts.single_writer {
            return Err(StorageError::UnsafeCommit {
                url: store.url.clone(),
            });
        }
        Ok(CheckpointWriter {
            store,
            rank,
            writers,
            opts,
            mode,
            staging: Vec::new(),
            inflight: None,
        })
    }

    /// Makes this writer write as `rank` from the next snapshot on, keeping its staging buffer:
    /// one process writing several writers' shares of a checkpoint in turn (an offline reshard)
    /// reuses one buffer instead of allocating one per share. Waits for the persist in flight
    /// first and returns how it ended.
    pub fn set_rank(&mut self, rank: usize) -> Option<Result<PersistReport>> {
        assert!(
            rank < self.writers,
            "rank {rank} of {} writers",
            self.writers
        );
        let previous = self.wait();
        self.rank = rank;
        previous
    }

    /// Sets the epoch of later persists (see [`WriterOptions::epoch`]): every writer of the
    /// persist sets the same.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.opts.epoch = Some(epoch);
    }

    /// Sets the flag that cancels a later commit still waiting (see [`WriterOptions::cancel`]).
    pub fn set_cancel(&mut self, cancel: Option<Arc<AtomicBool>>) {
        self.opts.cancel = cancel;
    }

    pub fn commit_mode(&self) -> CommitMode {
        self.mode
    }

    pub fn url(&self) -> &str {
        &self.store.url
    }

    /// Stages the checkpoint of `step`: waits for the previous persist if it is still running,
    /// lets `fill` copy this rank's `pieces` into the staging buffer (in order, each row-major
    /// in its box), and starts persisting it in the background. `run` is the training state
    /// the committing rank puts in the manifest.
    pub fn snapshot(
        &mut self,
        step: u64,
        run: serde_json::Value,
        pieces: Vec<Piece>,
        fill: impl FnOnce(&mut [f32]),
    ) -> SnapshotReport {
        self.snapshot_fenced(step, run, pieces, |buf| {
            fill(buf);
            None
        })
    }

    /// As [`CheckpointWriter::snapshot`] for a `fill` that only starts the copy (a device's
    /// asynchronous copy into the staging buffer) and returns the fence that waits for it to
    /// finish. The background persist waits on the fence before it reads the buffer; a fence
    /// that fails fails the persist, and nothing is written.
    pub fn snapshot_fenced(
        &mut self,
        step: u64,
        run: serde_json::Value,
        pieces: Vec<Piece>,
        fill: impl FnOnce(&mut [f32]) -> Option<Fence>,
    ) -> SnapshotReport {
        let started = Instant::now();
        let previous = self.wait();
        let waited = started.elapsed();
        let copy_started = Instant::now();
        let n: u64 = pieces.iter().map(|p| p.region.numel()).sum();
        // Allocated on the first snapshot; the same size every time after. Exactly: a writer
        // reused for pieces of other sizes (a reshard's) would otherwise double its buffer.
        self.staging
            .reserve_exact((n as usize).saturating_sub(self.staging.len()));
        self.staging.resize(n as usize, 0.0);
        let fence = fill(&mut self.staging);
        let copied = copy_started.elapsed();
        let job = Job {
            store: self.store.clone(),
            step,
            rank: self.rank,
            writers: self.writers,
            opts: self.opts.clone(),
            mode: self.mode,
            run,
            pieces,
            object: format::shard_name(step, self.rank, writer_id()),
        };
        let staging = std::mem::take(&mut self.staging);
        self.inflight = Some(std::thread::spawn(move || {
            let (store, retention) = (job.store.clone(), job.opts.retention);
            if let Some(Err(reason)) = fence.map(|f| f()) {
                let err = StorageError::Snapshot { step, reason };
                return (staging, Err(err));
            }
            let result = runtime().block_on(job.persist(&staging));
            if let (
                Ok(PersistReport {
                    committed: Some(_), ..
                }),
                Some(policy),
            ) = (&result, retention)
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let reader = crate::Reader::new(store);
                // The checkpoint committed; what retention could not delete now, the next
                // checkpoint's collection deletes.
                if let Err(e) =
                    crate::retention::collect(&reader, policy, now, false, |s| s == step)
                {
                    tracing::warn!(
                        "the checkpoint of step {step} committed, but collecting older ones \
                         failed ({e}); the next checkpoint tries again"
                    );
                }
            }
            (staging, result)
        }));
        SnapshotReport {
            waited,
            copied,
            previous,
        }
    }

    /// Waits for the persist in flight, if any, and returns how it ended.
    pub fn wait(&mut self) -> Option<Result<PersistReport>> {
        let handle = self.inflight.take()?;
        let (staging, result) = handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        self.staging = staging;
        Some(result)
    }
}

/// Waits until an asynchronous copy into the staging buffer has finished; the error says why
/// it could not.
pub type Fence = Box<dyn FnOnce() -> std::result::Result<(), String> + Send>;

/// One rank's persist of one checkpoint.
struct Job {
    store: Store,
    step: u64,
    rank: usize,
    writers: usize,
    opts: WriterOptions,
    mode: CommitMode,
    run: serde_json::Value,
    pieces: Vec<Piece>,
    /// This persist's shard object, named afresh for every persist.
    object: String,
}

impl Job {
    async fn persist(self, staging: &[f32]) -> Result<PersistReport> {
        let started = Instant::now();
        // A committed step keeps its shards: writing them again (another writer of the same
        // step, perhaps in another layout) would change the bytes its manifest points at.
        let manifest = self.store.path(&format::manifest_name(self.step));
        match retry(|| self.store.inner.head(&manifest)).await {
            Ok(_) => {
                return Err(StorageError::AlreadyCommitted {
                    step: self.step,
                    url: self.store.url.clone(),
                })
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(StorageError::store("check manifest", &manifest, e)),
        }
        let path = self.store.path(&self.object);
        // A failed upload is started again from the staging buffer, which is still ours.
        let mut attempt = 1;
        let (tensors, stored_bytes) = loop {
            match self.upload_shard(staging).await {
                Err(e) if attempt < ATTEMPTS_MAX && is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    attempt += 1;
                }
                done => break done.map_err(|e| StorageError::store("upload shard", &path, e))?,
            }
        };
        self.store.sync(&self.object).await?;
        let index = RankIndex {
            rank: self.rank,
            tensors,
        };
        let index_path = self
            .store
            .path(&format::index_name(self.step, self.rank, self.epoch()));
        let body = serde_json::to_vec(&index).expect("an index serialises");
        retry(|| {
            self.store
                .inner
                .put(&index_path, PutPayload::from(body.clone()))
        })
        .await
        .map_err(|e| StorageError::store("write index", &index_path, e))?;
        let upload = started.elapsed();
        let committed = if self.rank == 0 {
            self.commit().await?;
            Some(started.elapsed())
        } else {
            None
        };
        Ok(PersistReport {
            step: self.step,
            raw_bytes: 4 * staging.len() as u64,
            stored_bytes,
            upload,
            committed,
        })
    }

    /// This rank's chunks in order: each a box of a tensor, and where its values are in the
    /// staging buffer.
    fn cuts(&self) -> Vec<(usize, TensorBox, std::ops::Range<usize>)> {
        let chunk_elems = (self.opts.chunk_bytes / 4).max(1) as u64;
        let mut out = Vec::new();
        let mut pos = 0usize;
        for (i, piece) in self.pieces.iter().enumerate() {
            let n = piece.region.numel();
            let mut start = 0u64;
            while start < n {
                let end = (start + chunk_elems).min(n);
                // Each run of the piece is one or a few boxes of it, contiguous in order.
                let mut at = pos + start as usize;
                for b in range_to_boxes(&piece.region.size, start, end) {
                    let len = b.numel() as usize;
                    out.push((i, b.shifted(&piece.region.offset), at..at + len));
                    at += len;
                }
                start = end;
            }
            pos += n as usize;
        }
        out
    }

    /// Streams every chunk of this rank's pieces into its shard object. Encoding runs on up to
    /// `encoders_max` blocking threads at once, ahead of the upload, and chunks are written in
    /// order.
    async fn upload_shard(&self, staging: &[f32]) -> object_store::Result<(Vec<TensorEntry>, u64)> {
        let object = self.object.clone();
        let path = self.store.path(&object);
        let mut w = match self.store.direct_file(&object) {
            Some(file) => Sink::file(&file)?,
            None => {
                let upload = self.store.inner.put_multipart(&path).await?;
                Sink::Upload(WriteMultipart::new_with_chunk_size(
                    upload,
                    self.opts.part_bytes,
                ))
            }
        };
        let inflight = self.opts.uploads_inflight_max;
        let mut entries: Vec<TensorEntry> = Vec::new();
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        let mut byte_offset = 0u64;
        let mut scratch = Vec::new();
        let (codec, level) = (self.opts.codec, self.opts.level);
        type Encoded = std::io::Result<(Vec<u8>, u32, u64)>;
        let mut pending: std::collections::VecDeque<(
            usize,
            TensorBox,
            tokio::task::JoinHandle<Encoded>,
        )> = Default::default();
        let failed = |e: String| object_store::Error::Generic {
            store: "marathon",
            source: e.into(),
        };
        let mut record =
            |piece: usize, region: TensorBox, stored_len: u64, raw_len: u64, crc32c: u32| {
                let p = &self.pieces[piece];
                let e = *index.entry(p.tensor.as_str()).or_insert_with(|| {
                    entries.push(TensorEntry {
                        name: p.tensor.clone(),
                        dtype: "f32".into(),
                        shape: p.shape.clone(),
                        chunks: Vec::new(),
                    });
                    entries.len() - 1
                });
                entries[e].chunks.push(Chunk {
                    region,
                    object: object.clone(),
                    byte_offset,
                    byte_len: stored_len,
                    codec,
                    raw_len,
                    crc32c,
                });
                byte_offset += stored_len;
            };
        let cuts = self.cuts();
        let total = cuts.len();
        for (k, (piece, region, range)) in cuts.into_iter().enumerate() {
            let raw = le_bytes(&staging[range], &mut scratch);
            if codec == Codec::Raw {
                let crc32c = checksum(raw);
                w.write(raw, inflight).await?;
                record(piece, region, raw.len() as u64, raw.len() as u64, crc32c);
                continue;
            }
            let bytes = raw.to_vec();
            pending.push_back((
                piece,
                region,
                tokio::task::spawn_blocking(move || {
                    let (mut out, mut scratch) = (Vec::new(), Vec::new());
                    let crc32c = checksum(&bytes);
                    encode(codec, level, &bytes, &mut out, &mut scratch)?;
                    Ok((out, crc32c, bytes.len() as u64))
                }),
            ));
            // Write encoded chunks in order once enough are in flight, and all after the last.
            let keep = if k + 1 == total {
                0
            } else {
                self.opts.encoders_max.max(1) - 1
            };
            while pending.len() > keep {
                let (piece, region, task) = pending.pop_front().expect("a pending chunk");
                let (stored, crc32c, raw_len) = task
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .map_err(|e| failed(e.to_string()))?;
                w.write(&stored, inflight).await?;
                record(piece, region, stored.len() as u64, raw_len, crc32c);
            }
        }
        w.finish().await?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((entries, byte_offset))
    }

    /// Waits for every rank's index, merges them into the manifest and writes it create-only.
    async fn commit(&self) -> Result<()> {
        let deadline = Instant::now() + self.opts.commit_timeout;
        let mut indexes: Vec<Option<RankIndex>> = vec![None; self.writers];
        let mut backoff = Duration::from_millis(10);
        loop {
            for (r, slot) in indexes.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                let path = self
                    .store
                    .path(&format::index_name(self.step, r, self.epoch()));
                match retry(|| self.store.inner.get(&path)).await {
                    Ok(got) => {
                        let bytes = got
                            .bytes()
                            .await
                            .map_err(|e| StorageError::store("read index", &path, e))?;
                        let index = serde_json::from_slice(&bytes).map_err(|e| {
                            StorageError::BadManifest {
                                path: path.to_string(),
                                reason: format!("rank index does not parse: {e}"),
                            }
                        })?;
                        *slot = Some(index);
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(StorageError::store("read index", &path, e)),
                }
            }
            let missing: Vec<usize> = (0..self.writers)
                .filter(|&r| indexes[r].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            if self
                .opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
            {
                return Err(StorageError::Fenced {
                    step: self.step,
                    url: self.store.url.clone(),
                    reason: format!(
                        "the job moved on to a newer generation while the shards of ranks \
                         {missing:?} were missing"
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(StorageError::CommitTimeout {
                    step: self.step,
                    missing,
                    timeout_s: self.opts.commit_timeout.as_secs(),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        for index in indexes.into_iter().flatten() {
            for t in index.tensors {
                match tensors.get_mut(&t.name) {
                    Some(e) => e.chunks.extend(t.chunks),
                    None => {
                        tensors.insert(t.name.clone(), t);
                    }
                }
            }
        }
        let mut tensors: Vec<TensorEntry> = tensors.into_values().collect();
        for t in &mut tensors {
            t.chunks
                .sort_by(|a, b| a.region.offset.cmp(&b.region.offset));
        }
        let manifest = Manifest {
            digest: None,
            format: format::FORMAT.into(),
            version: format::VERSION,
            step: self.step,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            writers: self.writers,
            run: self.run.clone(),
            tensors,
        };
        let path = self.store.path(&format::manifest_name(self.step));
        // What the ranks wrote must be whole tensors before it may be committed.
        manifest
            .check_coverage()
            .map_err(|reason| StorageError::BadManifest {
                path: path.to_string(),
                reason: format!("not committed: {reason}"),
            })?;
        let (body, digest) = format::seal(&manifest);
        let already = || StorageError::AlreadyCommitted {
            step: self.step,
            url: self.store.url.clone(),
        };
        if let Some(CommitRecord(record)) = self.opts.record.clone() {
            let claim = Claim {
                step: self.step,
                epoch: self.epoch(),
                digest,
                writer: format!("{}:{}:{}", host(), std::process::id(), self.object),
            };
            let mine = claim.clone();
            let said = tokio::task::spawn_blocking(move || record(&claim))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match said {
                Ok(Recorded::Won) => {}
                // Our own claim, recorded by an attempt whose answer was lost.
                Ok(Recorded::Taken(c)) if c == mine => {}
                Ok(Recorded::Taken(_)) => return Err(already()),
                Ok(Recorded::Fenced(reason)) | Err(reason) => {
                    return Err(StorageError::Fenced {
                        step: self.step,
                        url: self.store.url.clone(),
                        reason,
                    })
                }
            }
        } else if self.mode == CommitMode::LeaderChecked {
            match self.store.inner.head(&path).await {
                Ok(_) => return Err(already()),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StorageError::store("check manifest", &path, e)),
            }
        }
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match retry(|| {
            self.store
                .inner
                .put_opts(&path, PutPayload::from(body.clone()), create.clone())
        })
        .await
        {
            Ok(_) => self.store.sync(&format::manifest_name(self.step)).await,
            Err(object_store::Error::AlreadyExists { .. }) => Err(already()),
            Err(e) => Err(StorageError::store("commit manifest", &path, e)),
        }
    }

    /// The persist's epoch; 0 for writers of several ranks that were given none (a caller
    /// that runs one persist of each step at a time).
    fn epoch(&self) -> u64 {
        self.opts.epoch.unwrap_or(0)
    }
}

/// This machine's name, for commit claims.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// A random name for one persist's shard or one probe: the standard library's hasher keys are
/// random per thread and move on at each use, so no two calls hash with the same keys (the
/// clock's reading is hashed too).
fn writer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The little-endian bytes of `values`: a view of them where the machine is little-endian (no
/// copy), else converted into `buf`.
fn le_bytes<'a>(values: &'a [f32], buf: &'a mut Vec<u8>) -> &'a [u8] {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte pattern is a valid u8; the view covers
        // exactly the slice's memory and lives no longer than it.
        unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        }
    } else {
        buf.clear();
        buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        buf
    }
}

/// Where a shard's bytes go: a multipart upload, or, for a local directory, the object's file
/// written by this process around the page cache ([`crate::direct`]; no part buffers, no
/// staging file), made durable by the persist's sync.
enum Sink {
    Upload(WriteMultipart),
    File(crate::direct::DirectFile),
}

impl Sink {
    fn file(path: &std::path::Path) -> object_store::Result<Sink> {
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "marathon",
            source: format!("create {}: {e}", path.display()).into(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        Ok(Sink::File(
            crate::direct::DirectFile::create(path).map_err(io)?,
        ))
    }

    /// Appends `bytes`; an upload waits while `inflight` parts are in flight.
    async fn write(&mut self, bytes: &[u8], inflight: usize) -> object_store::Result<()> {
        match self {
            Sink::Upload(w) => {
                w.wait_for_capacity(inflight).await?;
                w.write(bytes);
                Ok(())
            }
            Sink::File(f) => f.write_all(bytes).map_err(shard_write),
        }
    }

    async fn finish(self) -> object_store::Result<()> {
        match self {
            Sink::Upload(w) => w.finish().await.map(|_| ()),
            Sink::File(f) => f.finish().map(|_| ()).map_err(shard_write),
        }
    }
}

fn shard_write(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "marathon",
        source: format!("write a shard: {e}").into(),
    }
}

/// Whether `store` refuses a second create-only put of the same object.
pub async fn probe_create_only(store: &Store) -> Result<CommitMode> {
    // A name no other probe has, in this process or another: two probes of one name would
    // each see the other's object, and the one whose object the other deleted would find its
    // second put accepted (a clock read twice in one tick gives two writers the same time).
    let path = store.path(&format!(
        ".marathon-probe-{}-{:016x}",
        std::process::id(),
        writer_id()
    ));
    let create = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    let put = || {
        store
            .inner
            .put_opts(&path, PutPayload::from_static(b"probe"), create.clone())
    };
    // Transient failures are retried like every other request; a first put whose answer was
    // lost and that is retried finds its own object.
    match retry(put).await {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(StorageError::store("probe create-only put", &path, e)),
    }
    let mode = match retry(put).await {
        Err(object_store::Error::AlreadyExists { .. }) => CommitMode::CreateOnly,
        Ok(_) | Err(object_store::Error::NotImplemented { .. }) => CommitMode::LeaderChecked,
        Err(e) => return Err(StorageError::store("probe create-only put", &path, e)),
    };
    let _ = store.inner.delete(&path).await;
    Ok(mode)
}
