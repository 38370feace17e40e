//! Reading checkpoints: which are committed, their manifests, and any box of any tensor.
//!
//! A reader trusts only committed manifests. Every chunk it reads is decoded and its checksum
//! verified before a value of it is used; a mismatch names the tensor, the chunk and the object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::ahead::Ahead;
use crate::boxes::{copy_intersection, TensorBox};
use crate::codec::{checksum, decode};
use crate::format::{self, Manifest};
use crate::store::{retry, Store};
use crate::{runtime, Result, StorageError};

/// Bytes of checkpoint state (tensor chunks) this process has read from storage. Manifests are
/// not counted: the writer's retention reads them too.
static BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// Bytes of checkpoint state this process has read from storage so far: what an elastic worker
/// reports, so that "nothing was read from storage" is a measured fact.
pub fn bytes_read() -> u64 {
    BYTES_READ.load(Ordering::Relaxed)
}

/// The buffers a thread's chunk reads reuse, from chunk to chunk and call to call: a load's
/// chunks are a few MiB each, and fresh buffers for each cost a page fault per page.
#[derive(Debug, Default)]
struct Buffers {
    stored: Vec<u8>,
    raw: Vec<u8>,
    scratch: Vec<u8>,
    values: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Buffers> = std::cell::Cell::default();
}

/// `raw` (little-endian) as values: in place where it is aligned on a little-endian machine,
/// else copied into `values`.
fn as_f32<'a>(raw: &'a [u8], values: &'a mut Vec<f32>) -> &'a [f32] {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: every bit pattern of four bytes is an f32.
        let (head, body, tail) = unsafe { raw.align_to::<f32>() };
        if head.is_empty() && tail.is_empty() {
            return body;
        }
    }
    values.clear();
    values.extend(
        raw.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    values
}

/// A checkpoint prefix found under a root.
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub step: u64,
    pub committed: bool,
    /// Objects under the prefix, and their total size.
    pub objects: usize,
    pub bytes: u64,
    /// The newest object's modification time, in milliseconds since the Unix epoch.
    pub newest_unix_ms: u64,
}

/// Reads the checkpoints under one job's root.
#[derive(Debug, Clone)]
pub struct Reader {
    pub store: Store,
    /// The read-ahead of the load under way through this reader (and its clones), if any.
    ahead: Arc<Mutex<Option<Arc<Ahead>>>>,
}

/// How far [`Reader::prefetch`] reads ahead of the load.
const AHEAD: u64 = 256 << 20;

/// A load's read-ahead ([`Reader::prefetch`]); dropping it stops it.
#[derive(Debug)]
#[must_use = "the read-ahead stops when this is dropped"]
pub struct Prefetch {
    ahead: Option<Arc<Ahead>>,
    slot: Arc<Mutex<Option<Arc<Ahead>>>>,
}

impl Prefetch {
    /// Bytes read ahead of the load and not yet taken by it.
    pub fn held(&self) -> u64 {
        self.ahead.as_ref().map_or(0, |a| a.held())
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        let Some(ahead) = self.ahead.take() else {
            return;
        };
        ahead.stop();
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|a| Arc::ptr_eq(a, &ahead)) {
            *slot = None;
        }
    }
}

impl Reader {
    pub fn new(store: Store) -> Self {
        Reader {
            store,
            ahead: Arc::default(),
        }
    }

    /// Reads ahead of a load from a local directory, on a thread of its own: every chunk that
    /// reading `wanted` (each a tensor's box) in that order will touch, at most [`AHEAD`] bytes
    /// beyond what the load has taken, while the load decodes and verifies. A load that reads
    /// off this order reads for itself. Nothing is read ahead from an object store: its chunks
    /// are ranged requests made as they are read.
    pub fn prefetch<'a>(
        &self,
        m: &Manifest,
        wanted: impl IntoIterator<Item = (&'a str, &'a TensorBox)>,
    ) -> Prefetch {
        self.prefetch_within(m, wanted, AHEAD)
    }

    /// [`Reader::prefetch`], at most `window` bytes ahead.
    pub fn prefetch_within<'a>(
        &self,
        m: &Manifest,
        wanted: impl IntoIterator<Item = (&'a str, &'a TensorBox)>,
        window: u64,
    ) -> Prefetch {
        let none = Prefetch {
            ahead: None,
            slot: self.ahead.clone(),
        };
        let mut plan = Vec::new();
        for (name, region) in wanted {
            let Some(t) = m.tensor(name) else { continue };
            for c in t
                .chunks
                .iter()
                .filter(|c| c.region.intersect(region).is_some())
            {
                let Some(path) = self.store.direct_file(&c.object) else {
                    return none;
                };
                plan.push((path, c.byte_offset, c.byte_len));
            }
        }
        let ahead = Ahead::start(plan, window);
        *self.ahead.lock().unwrap_or_else(|e| e.into_inner()) = Some(ahead.clone());
        Prefetch {
            ahead: Some(ahead),
            slot: self.ahead.clone(),
        }
    }

    /// Every checkpoint prefix under the root, committed or not, oldest first.
    pub fn list(&self) -> Result<Vec<StepInfo>> {
        runtime().block_on(self.list_async())
    }

    async fn list_async(&self) -> Result<Vec<StepInfo>> {
        let root = self.store.prefix.clone();
        let objects: Vec<ObjectMeta> = self
            .store
            .inner
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(|e| StorageError::store("list", &root, e))?;
        let mut steps: std::collections::BTreeMap<u64, StepInfo> = Default::default();
        let depth = root.parts().count();
        for o in objects {
            let parts: Vec<_> = o.location.parts().skip(depth).collect();
            let Some(step) = parts
                .first()
                .and_then(|p| format::parse_step_dir(p.as_ref()))
            else {
                continue;
            };
            let info = steps.entry(step).or_insert(StepInfo {
                step,
                committed: false,
                objects: 0,
                bytes: 0,
                newest_unix_ms: 0,
            });
            info.objects += 1;
            info.bytes += o.size;
            info.newest_unix_ms = info
                .newest_unix_ms
                .max(o.last_modified.timestamp_millis().max(0) as u64);
            if parts.len() == 2 && parts[1].as_ref() == "manifest.json" {
                info.committed = true;
            }
        }
        Ok(steps.into_values().collect())
    }

    /// Steps of the committed checkpoints, oldest first.
    pub fn committed(&self) -> Result<Vec<u64>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|s| s.committed)
            .map(|s| s.step)
            .collect())
    }

    /// The manifest of `step`, checked: format, version, its digest, and whole tensors.
    pub fn manifest(&self, step: u64) -> Result<Manifest> {
        let path = self.store.path(&format::manifest_name(step));
        let bytes = runtime()
            .block_on(async {
                retry(|| async { self.store.inner.get(&path).await?.bytes().await }).await
            })
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => StorageError::NotFound {
                    what: format!(
                        "no committed checkpoint of step {step} under {}",
                        self.store.url
                    ),
                },
                e => StorageError::store("read manifest", &path, e),
            })?;
        let bad = |reason: String| StorageError::BadManifest {
            path: format!("{}/{}", self.store.url, format::manifest_name(step)),
            reason,
        };
        // The header first, so a newer version is named as such rather than failing to parse.
        #[derive(serde::Deserialize)]
        struct Header {
            format: String,
            version: u32,
        }
        let header: Header = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("does not parse as a checkpoint manifest: {e}")))?;
        if header.format != format::FORMAT || header.version != format::VERSION {
            return Err(StorageError::UnknownVersion {
                path: format!("{}/{}", self.store.url, format::manifest_name(step)),
                format: header.format,
                version: header.version,
            });
        }
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
        format::check_seal(&m, &bytes).map_err(bad)?;
        if m.step != step {
            return Err(bad(format!(
                "says step {} but lives under step {step}",
                m.step
            )));
        }
        m.check_coverage().map_err(bad)?;
        Ok(m)
    }

    /// Fills `dst` (the box `region` of tensor `name`, row-major) from the checkpoint, reading
    /// only the chunks that intersect it and verifying each one's checksum.
    pub fn read_box(
        &self,
        m: &Manifest,
        name: &str,
        region: &TensorBox,
        dst: &mut [f32],
    ) -> Result<()> {
        runtime().block_on(self.read_box_async(m, name, region, dst))
    }

    async fn read_box_async(
        &self,
        m: &Manifest,
        name: &str,
        region: &TensorBox,
        dst: &mut [f32],
    ) -> Result<()> {
        let t = m.tensor(name).ok_or_else(|| StorageError::NotFound {
            what: format!(
                "checkpoint of step {} under {} has no tensor {name}",
                m.step, self.store.url
            ),
        })?;
        assert!(
            region.fits(&t.shape),
            "{region:?} outside tensor {name} {:?}",
            t.shape
        );
        let mut b = BUFFERS.take();
        let filled = self.fill(t, region, dst, &mut b).await;
        BUFFERS.set(b);
        assert_eq!(
            filled?,
            region.numel(),
            "a checked manifest covers every element"
        );
        Ok(())
    }

    /// Reads every chunk of `t` that intersects `region` into `dst` through the buffers `b`,
    /// verifying each; returns the elements filled.
    async fn fill(
        &self,
        t: &format::TensorEntry,
        region: &TensorBox,
        dst: &mut [f32],
        b: &mut Buffers,
    ) -> Result<u64> {
        let Buffers {
            stored,
            raw,
            scratch,
            values,
        } = b;
        let mut filled = 0u64;
        for (i, c) in t.chunks.iter().enumerate() {
            if c.region.intersect(region).is_none() {
                continue;
            }
            let start = self.chunk_bytes(c, stored).await?;
            let corrupt = |reason: String| StorageError::Corrupt {
                tensor: t.name.clone(),
                chunk: i,
                object: format!("{}/{}", self.store.url, c.object),
                reason,
            };
            let raw = decode(c.codec, &stored[start..], c.raw_len as usize, raw, scratch)
                .map_err(|e| corrupt(format!("does not decode: {e}")))?;
            let crc = checksum(raw);
            if crc != c.crc32c {
                return Err(corrupt(format!(
                    "checksum {crc:08x} where {:08x} was written",
                    c.crc32c
                )));
            }
            filled += copy_intersection(as_f32(raw, values), &c.region, dst, region);
        }
        Ok(filled)
    }

    /// Reads chunk `c`'s stored bytes into `into` (emptied first, its capacity reused), from
    /// the load's read-ahead when it has them; returns where they start in `into`.
    async fn chunk_bytes(&self, c: &format::Chunk, into: &mut Vec<u8>) -> Result<usize> {
        let path = self.store.path(&c.object);
        let start = if let Some(file) = self.store.direct_file(&c.object) {
            let ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let taken = ahead.and_then(|a| a.take(&file, c.byte_offset, c.byte_len, into));
            let read = taken.unwrap_or_else(|| {
                crate::direct::read_chunk(&file, c.byte_offset, c.byte_len as usize, into)
            });
            read.map_err(|e| {
                let source = Box::new(e);
                let e = if source.kind() == std::io::ErrorKind::NotFound {
                    object_store::Error::NotFound {
                        path: path.to_string(),
                        source,
                    }
                } else {
                    object_store::Error::Generic {
                        store: "marathon",
                        source,
                    }
                };
                StorageError::store("read chunk", &path, e)
            })?
        } else {
            let range = c.byte_offset..c.byte_offset + c.byte_len;
            let bytes = retry(|| self.store.inner.get_range(&path, range.clone()))
                .await
                .map_err(|e| StorageError::store("read chunk", &path, e))?;
            into.clear();
            into.extend_from_slice(&bytes);
            0
        };
        BYTES_READ.fetch_add(c.byte_len, Ordering::Relaxed);
        Ok(start)
    }

    /// Reads every chunk of `m` and checks every checksum; returns the chunks read.
    pub fn verify(&self, m: &Manifest) -> Result<usize> {
        // In the order the bytes lie in the shards.
        let mut tensors: Vec<&format::TensorEntry> = m.tensors.iter().collect();
        tensors.sort_by_cached_key(|t| t.chunks.first().map(|c| (c.object.clone(), c.byte_offset)));
        let wholes: Vec<(&str, TensorBox)> = tensors
            .iter()
            .map(|t| (t.name.as_str(), TensorBox::whole(&t.shape)))
            .collect();
        let _ahead = self.prefetch(m, wholes.iter().map(|(n, b)| (*n, b)));
        // One buffer, of the largest tensor, for them all.
        let largest = wholes.iter().map(|(_, b)| b.numel()).max().unwrap_or(0);
        let mut dst = vec![0f32; largest as usize];
        let mut n = 0;
        for (t, (_, whole)) in tensors.iter().zip(&wholes) {
            self.read_box(m, &t.name, whole, &mut dst[..whole.numel() as usize])?;
            n += t.chunks.len();
        }
        Ok(n)
    }
}
