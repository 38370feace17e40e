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
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Result, RuntimeError};

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

/// Writes a token file as a stream: tokens go to `<path>.tmp` through a buffer, and
/// [`TokenWriter::finish`] writes the header, syncs and renames the file into place, so a crash
/// or an error never leaves a half-written file under the final name.
#[derive(Debug)]
pub struct TokenWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    n_tokens: u64,
    n_docs: u64,
    eot: Option<u32>,
}

impl TokenWriter {
    /// Starts writing `path`. Documents are counted by the end-of-text token `eot`, if given.
    pub fn create(path: &Path, eot: Option<u32>) -> Result<Self> {
        let tmp = path.with_extension("bin.tmp");
        let f = File::create(&tmp).map_err(|e| RuntimeError::io("create", &tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&[0u8; HEADER_BYTES])
            .map_err(|e| RuntimeError::io("write", &tmp, e))?;
        Ok(TokenWriter {
            path: path.to_owned(),
            tmp,
            out,
            n_tokens: 0,
            n_docs: 0,
            eot,
        })
    }

    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        for &t in tokens {
            let t16 = u16::try_from(t).map_err(|_| {
                RuntimeError::data(&self.path, format!("token id {t} does not fit in 16 bits"))
            })?;
            self.out
                .write_all(&t16.to_le_bytes())
                .map_err(|e| RuntimeError::io("write", &self.tmp, e))?;
            if Some(t) == self.eot {
                self.n_docs += 1;
            }
        }
        self.n_tokens += tokens.len() as u64;
        Ok(())
    }

    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Writes the header, syncs, and renames the file into place. Returns its header.
    pub fn finish(self, vocab_size: u32) -> Result<TokenFileHeader> {
        let header = TokenFileHeader {
            vocab_size,
            n_tokens: self.n_tokens,
            n_docs: self.n_docs,
        };
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| RuntimeError::io("write", &self.tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&header.encode()))
            .and_then(|_| f.sync_all())
            .map_err(|e| RuntimeError::io("write", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| RuntimeError::io("rename into place", &self.path, e))?;
        Ok(header)
    }

    /// Finishes the file with all but its last `tail` tokens, which go to a new token file at
    /// `tail_path` instead: how a validation split is held out of a stream whose length is known
    /// only at its end. Copies just the tail. Returns both headers.
    pub fn finish_split(
        mut self,
        tail: u64,
        tail_path: &Path,
        vocab_size: u32,
    ) -> Result<(TokenFileHeader, TokenFileHeader)> {
        assert!(tail <= self.n_tokens);
        self.out
            .flush()
            .map_err(|e| RuntimeError::io("write", &self.tmp, e))?;
        let keep = self.n_tokens - tail;
        let mut tail_writer = TokenWriter::create(tail_path, self.eot)?;
        let copied = (|| -> std::io::Result<()> {
            let mut f = File::open(&self.tmp)?;
            f.seek(SeekFrom::Start(HEADER_BYTES as u64 + 2 * keep))?;
            let mut r = std::io::BufReader::with_capacity(1 << 20, f);
            let mut buf = vec![0u8; 1 << 20];
            let mut left = 2 * tail as usize;
            let mut ids = Vec::with_capacity(buf.len() / 2);
            while left > 0 {
                let n = left.min(buf.len());
                r.read_exact(&mut buf[..n])?;
                ids.clear();
                ids.extend(
                    buf[..n]
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
                );
                tail_writer.push(&ids).map_err(std::io::Error::other)?;
                left -= n;
            }
            self.out.get_ref().set_len(HEADER_BYTES as u64 + 2 * keep)
        })();
        if let Err(e) = copied {
            tail_writer.abandon();
            return Err(RuntimeError::io("split", &self.tmp, e));
        }
        self.n_docs -= tail_writer.n_docs;
        self.n_tokens = keep;
        let tail_header = tail_writer.finish(vocab_size)?;
        Ok((self.finish(vocab_size)?, tail_header))
    }

    /// Drops the unfinished file.
    pub fn abandon(self) {
        drop(self.out);
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes `tokens` as a token file at `path` with `n_docs` documents in its header.
pub fn write_token_file(path: &Path, tokens: &[u32], vocab_size: u32, n_docs: u64) -> Result<()> {
    let mut w = TokenWriter::create(path, None)?;
    w.push(tokens)?;
    w.n_docs = n_docs;
    w.finish(vocab_size).map(|_| ())
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
        // Checked: a corrupt header must not wrap around into a size that matches.
        let want = header
            .n_tokens
            .checked_mul(2)
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if want != Some(len) {
            let want = want.map_or_else(|| "more than 2^64".to_string(), |w| w.to_string());
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
