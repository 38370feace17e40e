//! `marathon data prepare`: plain text and JSON-lines corpora to token files with GPT-2 BPE.
//!
//! Each document is prefixed with the end-of-text token, so documents are separated by it and
//! the document count is the count of that token. A plain text file is one document; each line
//! of a `.jsonl` file is a JSON object whose `text` field is one document. The last
//! `val_fraction` of the token stream is held out as the validation split.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tiktoken_rs::CoreBPE;

use super::tokens::write_token_file;
use crate::{Result, RuntimeError};

/// GPT-2's vocabulary size and its end-of-text token.
pub const GPT2_VOCAB_SIZE: u32 = 50257;
pub const GPT2_EOT: u32 = 50256;

/// Extensions read when a directory is given as input; a file named explicitly is read whatever
/// its extension.
const TEXT_EXTENSIONS: &[&str] = &["txt", "md", "jsonl", "rs", "toml", "py", "sh"];

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files or directories (searched recursively for [`TEXT_EXTENSIONS`]).
    pub inputs: Vec<PathBuf>,
    /// Receives `train.bin` and `val.bin`.
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
    pub val_path: PathBuf,
}

/// The GPT-2 tokenizer (the `r50k_base` encoding), which the tokenizer crate ships inside
/// itself: no download.
pub fn gpt2_tokenizer() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

/// Tokenizes the inputs and writes the two splits. Nothing is written unless every input reads
/// and parses, so a bad file never leaves a partial corpus behind.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    if !(opts.val_fraction >= 0.0 && opts.val_fraction < 1.0) {
        return Err(RuntimeError::data(
            &opts.out_dir,
            format!("val fraction {} must be in [0, 1)", opts.val_fraction),
        ));
    }
    if opts.inputs.is_empty() {
        return Err(RuntimeError::data(
            &opts.out_dir,
            "no input files given; pass --input <file or directory>",
        ));
    }
    let mut files = Vec::new();
    for input in &opts.inputs {
        collect_files(input, &mut files)?;
    }
    files.sort();
    files.dedup();
    let mut docs: Vec<(PathBuf, String)> = Vec::new();
    for f in &files {
        read_documents(f, &mut docs)?;
    }
    if docs.is_empty() {
        return Err(RuntimeError::data(
            &opts.inputs[0],
            "the inputs hold no text; nothing to prepare",
        ));
    }
    let bpe = gpt2_tokenizer();
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|(_, text)| bpe.encode_ordinary(text))
        .collect();
    let mut stream = Vec::with_capacity(encoded.iter().map(|d| d.len() + 1).sum());
    for doc in &encoded {
        stream.push(GPT2_EOT);
        stream.extend_from_slice(doc);
    }
    let val_len = (stream.len() as f64 * opts.val_fraction).ceil() as usize;
    let (train, val) = stream.split_at(stream.len() - val_len);
    if train.len() < 2 {
        return Err(RuntimeError::data(
            &opts.inputs[0],
            format!(
                "the corpus is only {} tokens; too small to train on",
                stream.len()
            ),
        ));
    }
    let count_docs = |s: &[u32]| s.iter().filter(|&&t| t == GPT2_EOT).count() as u64;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RuntimeError::io("create directory", &opts.out_dir, e))?;
    let train_path = opts.out_dir.join("train.bin");
    let val_path = opts.out_dir.join("val.bin");
    write_token_file(&train_path, train, GPT2_VOCAB_SIZE, count_docs(train))?;
    write_token_file(&val_path, val, GPT2_VOCAB_SIZE, count_docs(val))?;
    Ok(PrepareReport {
        files: files.len(),
        docs: docs.len() as u64,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
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
        let p = entry
            .map_err(|e| RuntimeError::io("list directory", path, e))?
            .path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" {
            continue; // hidden files, git metadata and build output are not corpus
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
        {
            out.push(p);
        }
    }
    Ok(())
}

fn read_documents(path: &Path, docs: &mut Vec<(PathBuf, String)>) -> Result<()> {
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
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        if !text.trim().is_empty() {
            docs.push((path.to_owned(), text));
        }
        return Ok(());
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            RuntimeError::data(
                at(),
                format!(
                    "is not valid JSON ({e}); each line must be an object with a \"text\" field"
                ),
            )
        })?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => docs.push((path.to_owned(), s.clone())),
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
    }
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
