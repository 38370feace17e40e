//! The asynchronous checkpoint writer: snapshot into a staging buffer, persist in the
//! background, commit when every rank's shard is durable.
//!
//! `snapshot` copies this rank's pieces into a staging buffer that is allocated once and reused;
//! training goes on as soon as the copy is done. A background thread then cuts the pieces into
//! chunks, checksums each chunk's raw bytes, encodes it and streams it into this rank's shard
//! object as a multipart upload with bounded concurrency, then writes the rank's index. Rank 0
//! commits: it waits until every rank's index exists, merges them into the manifest and writes
//! the manifest create-only. There is at most one staged copy: a snapshot that comes while the
//! previous persist is still running waits for it, and reports how long.

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
    /// Asked by the committing rank, with the step, just before it writes the manifest; a
    /// refusal leaves the checkpoint uncommitted ([`StorageError::Fenced`]).
    pub commit_guard: Option<CommitGuard>,
    /// Raised when the job moved on without this writer (an elastic job's newer generation):
    /// a committer still waiting for ranks' shards gives up at once, as [`StorageError::Fenced`],
    /// rather than at `commit_timeout`, since its commit would be refused anyway, and training
    /// waits for it at the next snapshot.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Whether a commit may go ahead: `Ok(())`, or why not. It runs on a blocking thread and may
/// block (an elastic job asks etcd whether the writer's generation still runs).
#[derive(Clone)]
pub struct CommitGuard(pub Arc<dyn Fn(u64) -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for CommitGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitGuard")
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
            commit_guard: None,
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
    /// The store accepts a create-only put over an existing object (Garage 2.5 does): the
    /// single committing rank checks that no manifest exists before it writes.
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
    /// enforces create-only puts (see [`CommitMode`]).
    pub fn new(store: Store, rank: usize, writers: usize, opts: WriterOptions) -> Result<Self> {
        assert!(rank < writers, "rank {rank} outside {writers} writers");
        let mode = if rank == 0 {
            runtime().block_on(probe_create_only(&store))?
        } else {
            CommitMode::CreateOnly
        };
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

    /// Sets the guard asked before each later commit (see [`WriterOptions::commit_guard`]).
    pub fn set_commit_guard(&mut self, guard: Option<CommitGuard>) {
        self.opts.commit_guard = guard;
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
        // Allocated on the first snapshot; the same size every time after.
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
                    eprintln!(
                        "warning: the checkpoint of step {step} committed, but collecting older ones \
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
        let index_path = self.store.path(&format::index_name(self.step, self.rank));
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
        let upload = self.store.inner.put_multipart(&path).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.opts.part_bytes);
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
                w.wait_for_capacity(self.opts.uploads_inflight_max).await?;
                w.write(raw);
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
                w.wait_for_capacity(self.opts.uploads_inflight_max).await?;
                w.write(&stored);
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
                let path = self.store.path(&format::index_name(self.step, r));
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
        let already = || StorageError::AlreadyCommitted {
            step: self.step,
            url: self.store.url.clone(),
        };
        if self.mode == CommitMode::LeaderChecked {
            match self.store.inner.head(&path).await {
                Ok(_) => return Err(already()),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StorageError::store("check manifest", &path, e)),
            }
        }
        if let Some(CommitGuard(guard)) = self.opts.commit_guard.clone() {
            let step = self.step;
            let asked = tokio::task::spawn_blocking(move || guard(step))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if let Err(reason) = asked {
                return Err(StorageError::Fenced {
                    step: self.step,
                    url: self.store.url.clone(),
                    reason,
                });
            }
        }
        let body = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
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
}

/// A random name for one persist's shard: the standard library's hasher keys are random per
/// process, and the clock tells persists of one process apart.
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

/// Whether `store` refuses a second create-only put of the same object.
pub async fn probe_create_only(store: &Store) -> Result<CommitMode> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = store.path(&format!(".marathon-probe-{}-{nanos}", std::process::id()));
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
