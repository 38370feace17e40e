//! The checkpoint format, version 1 (docs/checkpoint-format.md describes it for readers in any
//! language).
//!
//! A checkpoint of step N lives under `<root>/step-<N, 12 digits>/`: one shard object per
//! writing rank (`shard-r<rank, 5 digits>-<writer, 16 hex digits>.bin`), one index per writing
//! rank saying what its shard holds (`index-r<rank>.json`), and the manifest (`manifest.json`),
//! written last with a create-only put. The checkpoint exists if and only if the manifest does.
//! Each persist names its shard afresh, so a second writer of a step never changes the bytes a
//! committed manifest points at.

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

pub fn index_name(step: u64, rank: usize) -> String {
    format!("{}/index-r{rank:05}.json", step_dir(step))
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
pub struct Manifest {
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
}
