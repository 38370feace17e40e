//! Corpus preparation, the tokenizer, and token files, good and bad.

mod common;

use std::path::Path;

use common::*;
use marathon_runtime::data::prepare::{gpt2_tokenizer, GPT2_EOT, GPT2_VOCAB_SIZE};
use marathon_runtime::data::tokens::{write_token_file, HEADER_BYTES};
use marathon_runtime::data::{prepare, PrepareOptions, TokenFile};
use marathon_testkit::shakespeare;

fn opts(inputs: &[&Path], out: &Path, val_fraction: f64) -> PrepareOptions {
    PrepareOptions {
        inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
        out_dir: out.to_owned(),
        val_fraction,
    }
}

#[test]
fn tokenizer_round_trips_shakespeare_and_prepare_counts_are_exact() {
    let path = shakespeare();
    let text = std::fs::read_to_string(&path).unwrap();
    let bpe = gpt2_tokenizer();
    let ids = bpe.encode_ordinary(&text);
    assert_eq!(
        bpe.decode(&ids).unwrap(),
        text,
        "GPT-2 BPE must round-trip the text exactly"
    );
    // About 0.3 tokens per byte for English prose with GPT-2 BPE.
    assert!(
        (300_000..360_000).contains(&ids.len()),
        "{} tokens",
        ids.len()
    );
    assert!(ids.iter().all(|&t| t < GPT2_EOT));

    let dir = tempfile::tempdir().unwrap();
    let r = prepare(&opts(&[&path], dir.path(), 0.1)).unwrap();
    assert_eq!((r.files, r.docs), (1, 1));
    let total = ids.len() as u64 + 1; // the end-of-text token before the document
    assert_eq!(r.train_tokens + r.val_tokens, total);
    assert_eq!(r.val_tokens, (total as f64 * 0.1).ceil() as u64);
    let train = TokenFile::open(&r.train_path, GPT2_VOCAB_SIZE as usize).unwrap();
    let val = TokenFile::open(r.val_path.as_ref().unwrap(), GPT2_VOCAB_SIZE as usize).unwrap();
    assert_eq!(
        (train.header.n_tokens, train.header.n_docs),
        (r.train_tokens, 1)
    );
    assert_eq!((val.header.n_tokens, val.header.n_docs), (r.val_tokens, 0));
    let stream: Vec<u32> = train.iter().chain(val.iter()).collect();
    assert_eq!(stream[0], GPT2_EOT);
    assert_eq!(&stream[1..], &ids[..]);
    assert_eq!(bpe.decode(&stream[1..]).unwrap(), text);
}

#[test]
fn jsonl_documents_are_separated_by_end_of_text() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.jsonl");
    std::fs::write(&corpus, "{\"text\": \"First document.\"}\n\n{\"text\": \"Second one.\", \"id\": 2}\n{\"text\": \"Third.\"}\n").unwrap();
    let plain = dir.path().join("p.txt");
    std::fs::write(&plain, "A plain text file is one document.").unwrap();
    let r = prepare(&opts(&[&corpus, &plain], &dir.path().join("out"), 0.0)).unwrap();
    assert_eq!((r.files, r.docs, r.val_tokens, r.val_path), (2, 4, 0, None));
    assert!(
        !dir.path().join("out/val.bin").exists(),
        "no empty validation file is written"
    );
    let f = TokenFile::open(&r.train_path, 50257).unwrap();
    assert_eq!(f.header.n_docs, 4);
    let tokens: Vec<u32> = f.iter().collect();
    let docs: Vec<String> = tokens
        .split(|&t| t == GPT2_EOT)
        .skip(1)
        .map(|d| gpt2_tokenizer().decode(d).unwrap())
        .collect();
    assert_eq!(
        docs,
        [
            "First document.",
            "Second one.",
            "Third.",
            "A plain text file is one document."
        ]
    );
}

#[test]
fn bad_corpora_are_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "bad.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": oops}\n",
            "bad.jsonl:2: is not valid JSON",
        ),
        (
            "notext.jsonl",
            b"{\"body\": \"x\"}\n",
            "notext.jsonl:1: has no \"text\" field",
        ),
        (
            "num.jsonl",
            b"{\"text\": 5}\n",
            "num.jsonl:1: field \"text\" must be a string, found a number",
        ),
        (
            "latin1.txt",
            b"caf\xe9",
            "latin1.txt: is not UTF-8 text (invalid byte at offset 3)",
        ),
        ("empty.txt", b"", "the inputs hold no text"),
    ];
    for (name, content, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let e = prepare(&opts(&[&p], &out, 0.1)).unwrap_err().to_string();
        assert!(e.contains(want), "{name}: {e}");
        assert!(!out.exists(), "{name}: a failed prepare must write nothing");
    }
    let e = prepare(&opts(&[&dir.path().join("missing.txt")], &out, 0.1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.txt: cannot read input"), "{e}");
    let ok = dir.path().join("ok.txt");
    std::fs::write(&ok, "Some text.").unwrap();
    let e = prepare(&opts(&[&ok], &out, 1.5)).unwrap_err().to_string();
    assert_eq!(
        e,
        "--val-fraction: 1.5 is out of range; use a fraction in [0, 1), for example 0.1"
    );
    // A failure leaves an existing corpus as it was.
    let r = prepare(&opts(&[&ok], &out, 0.0)).unwrap();
    let before = std::fs::read(&r.train_path).unwrap();
    let bad = dir.path().join("bad.jsonl");
    assert!(prepare(&opts(&[&ok, &bad], &out, 0.0)).is_err());
    assert_eq!(std::fs::read(&r.train_path).unwrap(), before);
    assert!(!out.join("train.bin.tmp").exists());
}

#[test]
fn bad_token_files_are_refused_with_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.bin");
    write_token_file(&good, &[1, 2, 3, 4, 5], 50257, 1).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    let mut bad_version = bytes.clone();
    bad_version[8] = 9;
    let mut bad_width = bytes.clone();
    bad_width[12] = 4;
    let mut no_tokens = bytes[..HEADER_BYTES].to_vec();
    no_tokens[24..32].fill(0);
    let mut bad_token = bytes.clone();
    bad_token[HEADER_BYTES + 2..HEADER_BYTES + 4].copy_from_slice(&60000u16.to_le_bytes());
    let cases = [
        (dir.path().join("nope.bin"), "cannot open: No such file or directory (os error 2); create it with `marathon data prepare"),
        (write("empty.bin", b""), "is empty; expected a token file"),
        (write("short.bin", b"MRTNTOK1"), "shorter than the 64-byte header"),
        (write("magic.bin", &bad_magic), "does not start with the token-file magic"),
        (write("version.bin", &bad_version), "has format version 9"),
        (write("width.bin", &bad_width), "stores 4 bytes per token; this build reads 2"),
        (write("none.bin", &no_tokens), "holds no tokens"),
        (write("cut.bin", &bytes[..bytes.len() - 1]), "header says 5 tokens (74 bytes) but the file is 73 bytes"),
        (write("token.bin", &bad_token), "token 1 has id 60000, outside the vocabulary of 50257"),
    ];
    for (path, want) in cases {
        let e = TokenFile::open(&path, 50257).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("data file {}: ", path.display())),
            "{e}"
        );
        assert!(e.contains(want), "{}: {e}", path.display());
    }
    let e = TokenFile::open(&good, 1000).unwrap_err().to_string();
    assert!(
        e.contains("tokenized with a vocabulary of 50257 but model.vocab_size is 1000"),
        "{e}"
    );
}

#[test]
fn a_corpus_too_small_for_one_microbatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "tiny.bin", 40, 256, 1);
    let cfg = parse(&small_config_toml(&train, None, 256));
    let e = marathon_runtime::Trainer::new(cfg).unwrap_err().to_string();
    assert!(e.contains("tiny.bin: (data.train) holds 40 tokens, fewer than one microbatch of 4 sequences of 16 tokens needs (65)"), "{e}");
}

#[test]
fn a_validation_file_too_small_for_one_microbatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 5_000, 256, 1);
    let val = synthetic_tokens(dir.path(), "val.bin", 30, 256, 2);
    let cfg = parse(&small_config_toml(&train, Some(&val), 256));
    let e = marathon_runtime::Trainer::new(cfg).unwrap_err().to_string();
    assert!(e.contains("val.bin: (data.val) holds 30 tokens"), "{e}");
}
