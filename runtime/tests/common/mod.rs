//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use marathon_runtime::data::tokens::write_token_file;
use marathon_runtime::TrainConfig;

/// A token file of `n` pseudo-random tokens below `vocab`, with some structure to learn
/// (each token usually follows from the one before).
pub fn synthetic_tokens(dir: &Path, name: &str, n: usize, vocab: u32, seed: u64) -> PathBuf {
    let mut rng = marathon_model::rng::Rng::new(seed);
    let mut tokens = Vec::with_capacity(n);
    let mut prev = 0u32;
    for _ in 0..n {
        let t = if rng.below(4) == 0 {
            rng.below(vocab as u64) as u32
        } else {
            (prev * 7 + 3) % vocab
        };
        tokens.push(t);
        prev = t;
    }
    let path = dir.join(name);
    write_token_file(&path, &tokens, vocab, 1).expect("write a synthetic token file");
    path
}

/// A small, valid configuration over the given token files, as TOML text.
pub fn small_config_toml(train: &Path, val: Option<&Path>, vocab: usize) -> String {
    marathon_runtime::small_job::SmallJob {
        vocab_size: vocab,
        train: train.display().to_string(),
        val: val.map(|v| v.display().to_string()),
        data_seed: Some(7),
        micro_batch: 4,
        global_batch: 8,
        seq_len: 16,
        peak_lr: 3e-3,
        steps: 6,
        seed: Some(3),
        ..Default::default()
    }
    .toml()
}

pub fn parse(text: &str) -> TrainConfig {
    TrainConfig::parse(text, Path::new("test.toml")).expect("a valid test configuration")
}

/// The error message `TrainConfig::parse` gives for `text`.
pub fn config_error(text: &str) -> String {
    TrainConfig::parse(text, Path::new("bad.toml"))
        .expect_err("an invalid configuration")
        .to_string()
}

/// Runs `f` on a trainer for every rank of a tp x pp x dp layout of `cfg`, one thread each, on
/// real TCP process groups; returns the results in rank order.
pub fn on_every_rank<R: Send + 'static>(
    cfg: &TrainConfig,
    (tp, pp, dp): (usize, usize, usize),
    distributed_optimizer: bool,
    f: impl Fn(marathon_runtime::Trainer) -> R + Send + Sync + 'static,
) -> Vec<R> {
    use std::sync::Arc;
    let coord = Arc::new(marathon_elastic::InProcessCoordinator::new());
    let mut cfg = cfg.clone();
    cfg.parallel.tp = tp;
    cfg.parallel.pp = pp;
    cfg.parallel.dp = dp;
    cfg.parallel.distributed_optimizer = distributed_optimizer;
    let layout = cfg.parallel;
    let f = Arc::new(f);
    let handles: Vec<_> = (0..layout.world_size())
        .map(|rank| {
            let (coord, cfg, f) = (coord.clone(), cfg.clone(), f.clone());
            std::thread::spawn(move || {
                let template = marathon_runtime::comm::GroupSpec::loopback(
                    "test",
                    "",
                    0,
                    1,
                    std::time::Duration::from_secs(60),
                );
                let groups =
                    marathon_runtime::Groups::connect(&*coord, layout.place(rank), &template)
                        .expect("join this rank's groups");
                f(marathon_runtime::Trainer::with_groups(cfg, groups).expect("rank trainer"))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}
