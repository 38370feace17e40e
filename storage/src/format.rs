//! The checkpoint format, version 1 (docs/checkpoint-format.md describes it for readers in any
//! language).
//!
//! A checkpoint of step N lives under `<root>/step-<N, 12 digits>/`: one shard object per
//! writing rank (`shard-r<rank, 5 digits>-<writer, 16 hex digits>.bin`), one index per writing
//! rank saying what its shard holds (`index-r<rank>-<epoch, 16 hex digits>.json`), and the
//! manifest (`manifest.json`), written last by the one writer that won the step's commit (see
//! `writer`). The checkpoint exists if and only if the manifest does. Each persist names its
//! shard afresh, so a second writer of a step never changes the bytes a committed manifest
//! points at. The manifest carries the SHA-256 of its own bytes ([`seal`], [`check_seal`]).

use serde::{Deserialize, Serialize};

use crate::boxes::TensorBox;
use crate::codec::Codec;

/// The `format` field of every manifest.
pub const FORMAT: &str = "marathon-checkpoint";
/// The manifest version this build writes and reads.
pub const VERSION: u32 = 1;

/// The prefix of step `step`'s checkpoint, relative to the job's root.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:012}")
}

/// The step a `step-<N>` prefix names.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 12 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The shard object of `rank` in one persist of `step`; `writer` tells persists apart.
pub fn shard_name(step: u64, rank: usize, writer: u64) -> String {
    format!("{}{writer:016x}.bin", shard_prefix(step, rank))
}

/// What every shard object of `rank` at `step` begins with.
pub fn shard_prefix(step: u64, rank: usize) -> String {
    format!("{}/shard-r{rank:05}-", step_dir(step))
}

/// The index `rank` wrote in the persist of `step` that writers of `epoch` make together (an
/// elastic job's generation, a launch's token): a committer merges only its own persist's
/// indexes, never one an earlier persist of the same step left.
pub fn index_name(step: u64, rank: usize, epoch: u64) -> String {
    format!("{}/index-r{rank:05}-{epoch:016x}.json", step_dir(step))
}

pub fn manifest_name(step: u64) -> String {
    format!("{}/manifest.json", step_dir(step))
}

/// One stored piece of a tensor: a box of it, as a byte range of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Where the chunk lies in the global tensor.
    #[serde(flatten)]
    pub region: TensorBox,
    /// The object, relative to the job's root.
    pub object: String,
    pub byte_offset: u64,
    pub byte_len: u64,
    pub codec: Codec,
    /// Bytes once decoded: the box's elements, little-endian, row-major in the box.
    pub raw_len: u64,
    /// CRC-32C of the decoded bytes, computed from the snapshot before encoding.
    pub crc32c: u32,
}

/// A tensor and where its pieces are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// Element type; `f32` is the only one written today.
    pub dtype: String,
    pub shape: Vec<u64>,
    pub chunks: Vec<Chunk>,
}

/// What one rank wrote: its index object, merged into the manifest by the committer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankIndex {
    pub rank: usize,
    pub tensors: Vec<TensorEntry>,
}

/// The manifest: everything needed to read the checkpoint back into any layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `sha256:` and the hex SHA-256 of the manifest's bytes as written, with this field's 64
    /// hex digits read as zeros. First, so that it is the first such string in the bytes.
    /// Manifests written before it existed have none and are read unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub format: String,
    pub version: u32,
    pub step: u64,
    /// Milliseconds since the Unix epoch at commit.
    pub created_unix_ms: u64,
    /// Ranks that wrote shards.
    pub writers: usize,
    /// The training state the runtime needs beside the tensors (model configuration, layout,
    /// data order, schedules, optimizer step, seeds), opaque to storage.
    pub run: serde_json::Value,
    /// Every tensor, sorted by name; every element of every tensor is in exactly one chunk.
    pub tensors: Vec<TensorEntry>,
}

impl Manifest {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// The shard object rank `rank` wrote, if it wrote one (also under the name checkpoints
    /// written before shards were named per persist used: `shard-r<rank>.bin`).
    pub fn shard_of(&self, rank: usize) -> Option<&str> {
        let prefix = shard_prefix(self.step, rank);
        let before = format!("{}/shard-r{rank:05}.bin", step_dir(self.step));
        self.tensors
            .iter()
            .flat_map(|t| &t.chunks)
            .map(|c| c.object.as_str())
            .find(|o| o.starts_with(&prefix) || *o == before)
    }

    /// Stored bytes over all chunks, and decoded bytes.
    pub fn sizes(&self) -> (u64, u64) {
        let chunks = self.tensors.iter().flat_map(|t| &t.chunks);
        chunks.fold((0, 0), |(s, r), c| (s + c.byte_len, r + c.raw_len))
    }

    /// Checks that the chunks of every tensor fit it and cover each element exactly once.
    /// Returns the first problem found.
    pub fn check_coverage(&self) -> Result<(), String> {
        for t in &self.tensors {
            let numel: u64 = t.shape.iter().product();
            let mut covered = 0u64;
            for (i, c) in t.chunks.iter().enumerate() {
                if !c.region.fits(&t.shape) {
                    return Err(format!(
                        "tensor {} chunk {i} lies outside its shape {:?}",
                        t.name, t.shape
                    ));
                }
                if c.raw_len != 4 * c.region.numel() {
                    return Err(format!(
                        "tensor {} chunk {i}: {} bytes for {} elements",
                        t.name,
                        c.raw_len,
                        c.region.numel()
                    ));
                }
                covered += c.region.numel();
                for (j, d) in t.chunks[..i].iter().enumerate() {
                    if c.region.intersect(&d.region).is_some() {
                        return Err(format!("tensor {} chunks {j} and {i} overlap", t.name));
                    }
                }
            }
            if covered != numel {
                return Err(format!(
                    "tensor {}: chunks cover {covered} of {numel} elements",
                    t.name
                ));
            }
        }
        Ok(())
    }
}

const DIGEST_PREFIX: &str = "sha256:";
const DIGEST_HEX: usize = 64;

/// The bytes of `manifest`, sealed: its `digest` set to the SHA-256 of the bytes themselves (the
/// digest's own digits taken as zeros). Returns the bytes and the digest.
pub fn seal(manifest: &Manifest) -> (Vec<u8>, String) {
    let blank = format!("{DIGEST_PREFIX}{}", "0".repeat(DIGEST_HEX));
    let mut m = manifest.clone();
    m.digest = Some(blank.clone());
    let mut bytes = serde_json::to_vec_pretty(&m).expect("a manifest serialises");
    let at = find(&bytes, blank.as_bytes()).expect("the blank digest is in the bytes")
        + DIGEST_PREFIX.len();
    let digest = hex_sha256(&bytes);
    bytes[at..at + DIGEST_HEX].copy_from_slice(digest.as_bytes());
    (bytes, format!("{DIGEST_PREFIX}{digest}"))
}

/// Checks that `bytes`, which parsed as `manifest`, are the bytes its writer sealed. `Err` says
/// what is wrong.
pub fn check_seal(manifest: &Manifest, bytes: &[u8]) -> Result<(), String> {
    let Some(digest) = &manifest.digest else {
        return Ok(());
    };
    let hex = digest
        .strip_prefix(DIGEST_PREFIX)
        .filter(|h| h.len() == DIGEST_HEX && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("its digest {digest:?} is not {DIGEST_PREFIX}<64 hex digits>"))?;
    let at = find(bytes, digest.as_bytes()).ok_or("its digest is not where the writer put it")?
        + DIGEST_PREFIX.len();
    let mut blank = bytes.to_vec();
    blank[at..at + DIGEST_HEX].fill(b'0');
    let actual = hex_sha256(&blank);
    if actual != hex {
        return Err(format!(
            "its bytes do not match its digest (sha256 {actual}, sealed as {hex}): it was \
             damaged after it was written"
        ));
    }
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_step_and_parse_back() {
        assert_eq!(manifest_name(42), "step-000000000042/manifest.json");
        assert_eq!(parse_step_dir("step-000000000042"), Some(42));
        assert_eq!(parse_step_dir("step-42"), None);
        assert!(step_dir(9) < step_dir(10));
        assert_eq!(
            shard_name(42, 3, 0xab),
            "step-000000000042/shard-r00003-00000000000000ab.bin"
        );
        assert!(shard_name(42, 3, u64::MAX).starts_with(&shard_prefix(42, 3)));
    }

    #[test]
    fn a_sealed_manifest_checks_and_any_flipped_byte_is_found() {
        let m = Manifest {
            digest: None,
            format: FORMAT.into(),
            version: VERSION,
            step: 7,
            created_unix_ms: 1,
            writers: 1,
            run: serde_json::json!({"lr": 0.1f32, "note": "digest"}),
            tensors: vec![],
        };
        let (bytes, digest) = seal(&m);
        let read: Manifest = serde_json::from_slice(&bytes).expect("parses");
        assert_eq!(read.digest.as_deref(), Some(digest.as_str()));
        check_seal(&read, &bytes).expect("sealed bytes check");
        // Every byte, flipped in its low bit, either no longer parses or fails the check.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            if let Ok(m) = serde_json::from_slice::<Manifest>(&bad) {
                assert!(
                    check_seal(&m, &bad).is_err(),
                    "byte {i} flipped went unseen"
                );
            }
        }
    }
}
