//! Reading checkpoints: which are committed, their manifests, and any box of any tensor.
//!
//! A reader trusts only committed manifests. Every chunk it reads is decoded and its checksum
//! verified before a value of it is used; a mismatch names the tensor, the chunk and the object.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::boxes::{copy_intersection, TensorBox};
use crate::codec::{checksum, decode};
use crate::format::{self, Manifest};
use crate::store::{retry, Store};
use crate::{runtime, Result, StorageError};

/// Bytes of checkpoint state (tensor chunks) this process has read from storage. Manifests are
/// not counted: the writer's retention reads them too.
static BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of checkpoint state this process has read from storage so far: what an elastic worker
/// reports, so that "nothing was read from storage" is a measured fact.
pub fn bytes_read() -> u64 {
    BYTES_READ.load(std::sync::atomic::Ordering::Relaxed)
}

fn count(bytes: Bytes) -> Bytes {
    BYTES_READ.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    bytes
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
}

impl Reader {
    pub fn new(store: Store) -> Self {
        Reader { store }
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
        let (mut raw, mut scratch, mut values) = (Vec::new(), Vec::new(), Vec::new());
        let mut filled = 0u64;
        for (i, c) in t.chunks.iter().enumerate() {
            if c.region.intersect(region).is_none() {
                continue;
            }
            let stored = self.chunk_bytes(c).await?;
            let corrupt = |reason: String| StorageError::Corrupt {
                tensor: name.to_string(),
                chunk: i,
                object: format!("{}/{}", self.store.url, c.object),
                reason,
            };
            decode(c.codec, &stored, c.raw_len as usize, &mut raw, &mut scratch)
                .map_err(|e| corrupt(format!("does not decode: {e}")))?;
            let crc = checksum(&raw);
            if crc != c.crc32c {
                return Err(corrupt(format!(
                    "checksum {crc:08x} where {:08x} was written",
                    c.crc32c
                )));
            }
            values.clear();
            values.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            filled += copy_intersection(&values, &c.region, dst, region);
        }
        assert_eq!(
            filled,
            region.numel(),
            "a checked manifest covers every element"
        );
        Ok(())
    }

    async fn chunk_bytes(&self, c: &format::Chunk) -> Result<Bytes> {
        let path = self.store.path(&c.object);
        if let Some(file) = self.store.direct_file(&c.object) {
            let bytes = crate::direct::read_range(&file, c.byte_offset, c.byte_len as usize)
                .map_err(|e| {
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
                })?;
            return Ok(count(Bytes::from(bytes)));
        }
        let range = c.byte_offset..c.byte_offset + c.byte_len;
        retry(|| self.store.inner.get_range(&path, range.clone()))
            .await
            .map(count)
            .map_err(|e| StorageError::store("read chunk", &path, e))
    }

    /// Reads every chunk of `m` and checks every checksum; returns the chunks read.
    pub fn verify(&self, m: &Manifest) -> Result<usize> {
        let mut n = 0;
        for t in &m.tensors {
            let whole = TensorBox::whole(&t.shape);
            let mut dst = vec![0f32; whole.numel() as usize];
            self.read_box(m, &t.name, &whole, &mut dst)?;
            n += t.chunks.len();
        }
        Ok(n)
    }
}
