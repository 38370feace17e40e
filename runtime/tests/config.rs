//! Every class of bad configuration gets an error naming the file, the field and what is accepted.

mod common;

use std::path::Path;

use common::*;

fn base() -> String {
    small_config_toml(Path::new("train.bin"), Some(Path::new("val.bin")), 50257)
}

/// Replaces the first occurrence of `from` in the base configuration, checking it was there.
fn with(from: &str, to: &str) -> String {
    let b = base();
    assert!(b.contains(from), "base config has no {from:?}");
    b.replacen(from, to, 1)
}

#[test]
fn the_base_configuration_is_valid() {
    let cfg = parse(&base());
    assert_eq!(cfg.model.padded_vocab_size(), 50304);
    assert_eq!(cfg.parallel.world_size(), 1);
}

#[test]
fn syntax_errors_name_the_field() {
    let cases = [
        (
            with("n_layer = 2", "n_layers = 2"),
            "unknown field `n_layers`",
        ),
        (
            with("n_layer = 2", "n_layer = \"two\""),
            "invalid type: string \"two\", expected usize",
        ),
        (with("n_layer = 2\n", ""), "missing field `n_layer`"),
        (with("[train]", "[training]"), "unknown field `training`"),
        (
            with("peak_lr = 3e-3", "peak_lr = 3e-3\npeak = 1"),
            "unknown field `peak`",
        ),
        (with("steps = 6", "steps = -6"), "steps"),
        ("[model\n".to_string(), "bad.toml"),
    ];
    for (text, want) in cases {
        let e = config_error(&text);
        assert!(e.starts_with("config bad.toml: "), "{e}");
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
}

#[test]
fn value_errors_name_the_field_and_what_is_accepted() {
    let cases = [
        (with("n_layer = 2", "n_layer = 0"), "model.n_layer: 0 is out of range; use a whole number from 1"),
        (with("n_head = 2", "n_head = 3"), "model.n_head: 3 heads do not divide n_embd 32"),
        (with("vocab_size = 50257", "vocab_size = 0"), "model.vocab_size: 0 is out of range"),
        (with("micro_batch = 4", "micro_batch = 0"), "batch.micro_batch: must be at least 1"),
        (with("global_batch = 8", "global_batch = 10"), "batch.global_batch: 10 is not a positive multiple of batch.micro_batch 4"),
        (with("seq_len = 16", "seq_len = 64"), "batch.seq_len: 64 is out of range; use 1 to model.seq_len (32)"),
        (
            with("seq_len = 16\n", "seq_len = 16\n[batch.rampup]\nstart = 4\nincrement = 3\nramp_tokens = 100\n"),
            "batch.rampup.increment: 3 must be a positive multiple of batch.micro_batch 4",
        ),
        (
            with("seq_len = 16\n", "seq_len = 16\n[batch.rampup]\nstart = 12\nincrement = 4\nramp_tokens = 100\n"),
            "batch.rampup.start: 12 must be a positive multiple of batch.micro_batch 4 no larger than batch.global_batch 8",
        ),
        (
            with("seq_len = 16\n", "seq_len = 16\n[batch.rampup]\nstart = 4\nincrement = 4\nramp_tokens = 8\n"),
            "batch.rampup.ramp_tokens: 8 is too short for 1 increments of whole sequences of batch.seq_len 16",
        ),
        (with("peak_lr = 3e-3", "peak_lr = 3"), "optim.lr.peak_lr: 3 is out of range; use a number in (0, 1)"),
        (with("decay_tokens = 4096", "decay_tokens = 100"), "optim.lr.decay_tokens: 100 is less than warmup_tokens 256"),
        (with("beta2 = 0.95", "beta2 = 1.5"), "optim.beta2: 1.5 is out of range"),
        (with("eps = 1e-8", "eps = 0.0"), "optim.eps: 0 is out of range"),
        (with("weight_decay = 0.1", "weight_decay = -1.0"), "optim.weight_decay: -1 is out of range"),
        (with("grad_clip = 1.0", "grad_clip = 0.0"), "optim.grad_clip: 0 must be a positive number"),
        (with("init_std = 0.02", "init_std = 2.0"), "optim.init_std: 2 is out of range"),
        (with("steps = 6", "steps = 0"), "train.steps: must be at least 1"),
        (with("steps = 6", "steps = 6\neval_every_steps = 2\neval_batches = 0"), "train.eval_batches: must be at least 1"),
        (
            small_config_toml(Path::new("t.bin"), None, 50257).replace("steps = 6", "steps = 6\neval_every_steps = 2"),
            "train.eval_every_steps: is set but data.val names no validation file",
        ),
        (format!("{}\n[parallel]\ntp = 4\n", base()), "parallel.tp: tensor parallel size 4 does not divide model.n_head 2"),
        (format!("{}\n[parallel]\npp = 3\n", base()), "parallel.pp: pipeline parallel size 3 does not divide model.n_layer 2"),
        (format!("{}\n[parallel]\ndp = 0\n", base()), "parallel.dp: must be at least 1"),
        (with("n_embd = 32", "n_embd = 16000000"), "parameters is more than the 1125899906842624 this build supports"),
    ];
    for (text, want) in cases {
        let e = config_error(&text);
        assert_eq!(
            e,
            format!(
                "config bad.toml: {}",
                e.trim_start_matches("config bad.toml: ")
            )
        );
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
}
