//! `marathon data prepare`: plain text and JSON-lines corpora to token files with GPT-2 BPE.
//!
//! Each document is prefixed with the end-of-text token, so documents are separated by it and
//! the document count is the count of that token. A plain text file is one document; each line
//! of a `.jsonl` file is a JSON object whose `text` field is one document. The last
//! `val_fraction` of the token stream is held out as the validation split.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tiktoken_rs::CoreBPE;

use super::tokens::TokenWriter;
use crate::error::{Result, RuntimeError};

/// GPT-2's vocabulary size and its end-of-text token.
pub const GPT2_VOCAB_SIZE: u32 = 50257;
pub const GPT2_EOT: u32 = 50256;

/// Extensions read when a directory is given as input; a file named explicitly is read whatever
/// its extension.
const TEXT_EXTENSIONS: &[&str] = &["txt", "md", "jsonl", "rs", "toml", "py", "sh"];

/// Text is tokenized in batches of about this many bytes, so memory stays bounded however
/// large a JSON-lines file is.
const BATCH_BYTES: usize = 16 << 20;

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files or directories (searched recursively for [`TEXT_EXTENSIONS`]).
    pub inputs: Vec<PathBuf>,
    /// Receives `train.bin` and, with a validation split, `val.bin`.
    pub out_dir: PathBuf,
    /// Fraction of tokens held out for validation, from the end of the stream.
    pub val_fraction: f64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareReport {
    pub files: usize,
    pub docs: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_path: PathBuf,
    /// None when `val_fraction` held out no tokens.
    pub val_path: Option<PathBuf>,
}

/// The GPT-2 tokenizer (the `r50k_base` encoding), which the tokenizer crate ships inside
/// itself: no download.
pub fn gpt2_tokenizer() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

/// Tokenizes the inputs and writes the splits, streaming: memory holds one batch of text, not
/// the corpus. Nothing appears under the final names unless every input reads and parses, and a
/// failed run removes the output directory if it created it.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    if !(opts.val_fraction >= 0.0 && opts.val_fraction < 1.0) {
        return Err(RuntimeError::Argument {
            name: "--val-fraction",
            reason: format!(
                "{} is out of range; use a fraction in [0, 1), for example 0.1",
                opts.val_fraction
            ),
        });
    }
    if opts.inputs.is_empty() {
        return Err(RuntimeError::Argument {
            name: "--input",
            reason: "no input given; pass files or directories of text".into(),
        });
    }
    let mut files = Vec::new();
    for input in &opts.inputs {
        collect_files(input, &mut files)?;
    }
    files.sort();
    files.dedup();
    let created = !opts.out_dir.exists();
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RuntimeError::io("create directory", &opts.out_dir, e))?;
    let result = write_splits(&files, opts);
    if result.is_err() && created {
        let _ = std::fs::remove_dir_all(&opts.out_dir);
    }
    result
}

fn write_splits(files: &[PathBuf], opts: &PrepareOptions) -> Result<PrepareReport> {
    let train_path = opts.out_dir.join("train.bin");
    let mut w = TokenWriter::create(&train_path, Some(GPT2_EOT))?;
    let mut docs = 0u64;
    for f in files {
        if let Err(e) = stream_file(f, &mut w, &mut docs) {
            w.abandon();
            return Err(e);
        }
    }
    let n = w.n_tokens();
    let val_len = (n as f64 * opts.val_fraction).ceil() as u64;
    if docs == 0 || n - val_len < 2 {
        w.abandon();
        let what = if docs == 0 {
            "the inputs hold no text; nothing to prepare".to_string()
        } else {
            format!("the corpus is only {n} tokens; too small to train on")
        };
        return Err(RuntimeError::data(&opts.inputs[0], what));
    }
    let (train, val, val_path) = if val_len == 0 {
        (w.finish(GPT2_VOCAB_SIZE)?, None, None)
    } else {
        let val_path = opts.out_dir.join("val.bin");
        let (train, val) = w.finish_split(val_len, &val_path, GPT2_VOCAB_SIZE)?;
        (train, Some(val), Some(val_path))
    };
    Ok(PrepareReport {
        files: files.len(),
        docs,
        train_tokens: train.n_tokens,
        val_tokens: val.map_or(0, |v| v.n_tokens),
        train_path,
        val_path,
    })
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| RuntimeError::data(path, format!("cannot read input: {e}")))?;
    if meta.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| RuntimeError::io("list directory", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RuntimeError::io("list directory", path, e))?;
        let p = entry.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" {
            continue; // hidden files, git metadata and build output are not corpus
        }
        // file_type does not follow symbolic links: a linked directory is skipped, so a link
        // cycle cannot recurse forever.
        let kind = entry
            .file_type()
            .map_err(|e| RuntimeError::io("stat", &p, e))?;
        if kind.is_dir() {
            collect_files(&p, out)?;
        } else if kind.is_file()
            && p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Tokenizes one file into `w`, each document prefixed with end-of-text.
fn stream_file(path: &Path, w: &mut TokenWriter, docs: &mut u64) -> Result<()> {
    let not_utf8 =
        |at: String| RuntimeError::data(at, "is not UTF-8 text; convert it to UTF-8 first");
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("read", path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            RuntimeError::data(
                path,
                format!(
                    "is not UTF-8 text (invalid byte at offset {}); convert it to UTF-8 first",
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        if !text.trim().is_empty() {
            write_batch(&[text], w, docs)?;
        }
        return Ok(());
    }
    let file = File::open(path).map_err(|e| RuntimeError::io("open", path, e))?;
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                not_utf8(at())
            } else {
                RuntimeError::io("read", path, e)
            }
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            RuntimeError::data(
                at(),
                format!(
                    "is not valid JSON ({e}); each line must be an object with a \"text\" field"
                ),
            )
        })?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => {
                batch_bytes += s.len();
                batch.push(s.clone());
            }
            Some(other) => {
                return Err(RuntimeError::data(
                    at(),
                    format!(
                        "field \"text\" must be a string, found {}",
                        json_kind(other)
                    ),
                ))
            }
            None => {
                return Err(RuntimeError::data(
                    at(),
                    "has no \"text\" field; each line must be an object with a \"text\" string",
                ))
            }
        }
        if batch_bytes >= BATCH_BYTES {
            write_batch(&batch, w, docs)?;
            batch.clear();
            batch_bytes = 0;
        }
    }
    write_batch(&batch, w, docs)
}

/// Tokenizes a batch of documents in parallel and appends them in order.
fn write_batch(batch: &[String], w: &mut TokenWriter, docs: &mut u64) -> Result<()> {
    let bpe = gpt2_tokenizer();
    let encoded: Vec<Vec<u32>> = batch
        .par_iter()
        .map(|text| bpe.encode_ordinary(text))
        .collect();
    for doc in &encoded {
        w.push(&[GPT2_EOT])?;
        w.push(doc)?;
    }
    *docs += batch.len() as u64;
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
