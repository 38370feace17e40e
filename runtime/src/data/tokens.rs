//! The binary token file: a 64-byte header, then the tokens as little-endian u16.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "MRTNTOK1"
//!      8     4  format version (1), u32 LE
//!     12     4  bytes per token (2), u32 LE
//!     16     4  vocabulary size of the tokenizer, u32 LE
//!     20     4  reserved, zero
//!     24     8  number of tokens, u64 LE
//!     32     8  number of documents (end-of-text tokens), u64 LE
//!     40    24  reserved, zero
//!     64   2*n  tokens
//! ```
//! The file is memory-mapped, so a corpus larger than memory trains without being read whole.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Result, RuntimeError};

pub const MAGIC: &[u8; 8] = b"MRTNTOK1";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
const TOKEN_BYTES: u32 = 2;

/// What a token file's header says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFileHeader {
    pub vocab_size: u32,
    pub n_tokens: u64,
    pub n_docs: u64,
}

impl TokenFileHeader {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&TOKEN_BYTES.to_le_bytes());
        h[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[32..40].copy_from_slice(&self.n_docs.to_le_bytes());
        h
    }
}

/// Writes `tokens` as a token file at `path`, through a temporary file renamed into place so a
/// crash never leaves a half-written file under the final name.
pub fn write_token_file(path: &Path, tokens: &[u32], vocab_size: u32, n_docs: u64) -> Result<()> {
    let header = TokenFileHeader {
        vocab_size,
        n_tokens: tokens.len() as u64,
        n_docs,
    };
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    bytes.extend_from_slice(&header.encode());
    for &t in tokens {
        let t = u16::try_from(t).map_err(|_| {
            RuntimeError::data(path, format!("token id {t} does not fit in 16 bits"))
        })?;
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    let tmp = path.with_extension("bin.tmp");
    let mut f = File::create(&tmp).map_err(|e| RuntimeError::io("create", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| RuntimeError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| RuntimeError::io("rename into place", path, e))
}

/// A token file opened for reading, checked whole at open: header, size, and every token id.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
    pub header: TokenFileHeader,
}

impl TokenFile {
    /// Opens and checks `path`. `vocab_size` is the model's: a file whose tokenizer has a larger
    /// vocabulary, or that holds any token id at or past it, is refused.
    pub fn open(path: &Path, vocab_size: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                "; create it with `marathon data prepare --input <text files or dirs> --out <dir>`"
            } else {
                ""
            };
            RuntimeError::data(path, format!("cannot open: {e}{hint}"))
        })?;
        let len = file
            .metadata()
            .map_err(|e| RuntimeError::io("stat", path, e))?
            .len();
        if len == 0 {
            return Err(RuntimeError::data(
                path,
                "is empty; expected a token file written by `marathon data prepare`",
            ));
        }
        if len < HEADER_BYTES as u64 {
            return Err(RuntimeError::data(
                path,
                format!(
                    "is {len} bytes, shorter than the {HEADER_BYTES}-byte header: not a token file"
                ),
            ));
        }
        // SAFETY: the map is read-only; a file truncated underneath us by another process would
        // fault, which is the documented hazard of any memory-mapped reader.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io("memory-map", path, e))?;
        let h = &map[..HEADER_BYTES];
        if &h[0..8] != MAGIC {
            return Err(RuntimeError::data(
                path,
                "does not start with the token-file magic MRTNTOK1; prepare raw text with `marathon data prepare`",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(RuntimeError::data(
                path,
                format!("has format version {version}; this build reads version {VERSION}"),
            ));
        }
        if u32_at(12) != TOKEN_BYTES {
            return Err(RuntimeError::data(
                path,
                format!(
                    "stores {} bytes per token; this build reads {TOKEN_BYTES}",
                    u32_at(12)
                ),
            ));
        }
        let header = TokenFileHeader {
            vocab_size: u32_at(16),
            n_tokens: u64_at(24),
            n_docs: u64_at(32),
        };
        let want = HEADER_BYTES as u64 + 2 * header.n_tokens;
        if len != want {
            return Err(RuntimeError::data(
                path,
                format!(
                    "header says {} tokens ({want} bytes) but the file is {len} bytes: truncated or \
                     corrupt; prepare it again",
                    header.n_tokens
                ),
            ));
        }
        if header.n_tokens == 0 {
            return Err(RuntimeError::data(
                path,
                "holds no tokens; prepare it from a non-empty corpus",
            ));
        }
        if header.vocab_size as usize > vocab_size {
            return Err(RuntimeError::data(
                path,
                format!(
                    "was tokenized with a vocabulary of {} but model.vocab_size is {vocab_size}; \
                     set model.vocab_size to at least {}",
                    header.vocab_size, header.vocab_size
                ),
            ));
        }
        let tf = TokenFile {
            path: path.to_owned(),
            map,
            header,
        };
        if let Some((i, t)) = tf
            .iter()
            .enumerate()
            .find(|&(_, t)| t as usize >= vocab_size)
        {
            return Err(RuntimeError::data(
                path,
                format!(
                    "token {i} has id {t}, outside the vocabulary of {vocab_size}: corrupt file"
                ),
            ));
        }
        Ok(tf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.header.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn body(&self) -> &[u8] {
        &self.map[HEADER_BYTES..]
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.body()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
    }

    /// Copies tokens `start..start + out.len()` into `out`.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let bytes = &self.body()[2 * start..2 * (start + out.len())];
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([b[0], b[1]]) as u32;
        }
    }

    /// How many training samples of `seq` inputs (plus one target past the end) the file holds:
    /// sample k covers tokens `k * seq ..= k * seq + seq`.
    pub fn samples(&self, seq: usize) -> usize {
        (self.len().saturating_sub(1)) / seq
    }

    /// Fills `inputs` and `targets` (each `seq` long) with sample `k`.
    pub fn sample(&self, k: usize, inputs: &mut [u32], targets: &mut [u32]) {
        let seq = inputs.len();
        self.read(k * seq, inputs);
        self.read(k * seq + 1, targets);
    }
}
