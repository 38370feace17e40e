//! Data parallelism equals the single-process run: replicas on real TCP process groups, each
//! its own trainer, against one trainer holding the whole global batch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use marathon_elastic::InProcessCoordinator;
use marathon_runtime::comm::{GroupSpec, ProcessGroup};
use marathon_runtime::{TrainConfig, Trainer};

const STEPS: u64 = 10;

/// Losses of every step and the final parameters of a run.
type Run = (Vec<f32>, Vec<f32>);

fn single(cfg: &TrainConfig) -> Run {
    let mut t = Trainer::new(cfg.clone()).expect("single-process trainer");
    let losses = (0..STEPS)
        .map(|_| t.train_step().expect("step").loss)
        .collect();
    (losses, t.model.params)
}

/// Runs `cfg` as `dp` replicas, one thread each, and returns every replica's run.
fn replicated(cfg: &TrainConfig, dp: usize, distributed_optimizer: bool) -> Vec<Run> {
    let coord = Arc::new(InProcessCoordinator::new());
    let mut cfg = cfg.clone();
    cfg.parallel.dp = dp;
    cfg.parallel.distributed_optimizer = distributed_optimizer;
    let handles: Vec<_> = (0..dp)
        .map(|rank| {
            let (coord, cfg) = (coord.clone(), cfg.clone());
            std::thread::spawn(move || {
                let spec =
                    GroupSpec::loopback("dp-test", "dp-0", rank, dp, Duration::from_secs(60));
                let group =
                    ProcessGroup::connect(&*coord, spec).expect("join the data-parallel group");
                let mut t = Trainer::with_group(cfg, Some(group)).expect("replica trainer");
                let losses: Vec<f32> = (0..STEPS)
                    .map(|_| t.train_step().expect("step").loss)
                    .collect();
                (losses, t.model.params)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("replica thread"))
        .collect()
}

/// Asserts every replica matches the single-process run within 1e-5 relative (losses each
/// step, parameters in L2), and that the replicas agree bitwise with each other.
fn assert_equivalent(reference: &Run, replicas: &[Run], what: &str) {
    for (r, (losses, params)) in replicas.iter().enumerate() {
        for (s, (a, b)) in losses.iter().zip(&reference.0).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{what}: replica {r} step {}: loss {a} vs {b}",
                s + 1
            );
        }
        let diff = params
            .iter()
            .zip(&reference.1)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = reference
            .1
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-5 * norm,
            "{what}: replica {r} parameters differ by {:e} relative",
            diff / norm
        );
        assert!(
            params
                .iter()
                .zip(&replicas[0].1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: replica {r} disagrees with replica 0"
        );
    }
}

fn config(global_batch: usize, micro_batch: usize) -> (tempfile::TempDir, TrainConfig) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let train = synthetic_tokens(dir.path(), "train.bin", 40_000, 256, 11);
    let text = small_config_toml(&train, None, 256)
        .replace("micro_batch = 4", &format!("micro_batch = {micro_batch}"))
        .replace(
            "global_batch = 8",
            &format!("global_batch = {global_batch}"),
        )
        .replace("steps = 6", &format!("steps = {STEPS}"));
    (dir, parse(&text))
}

#[test]
fn dp2_equals_one_process() {
    let (_dir, cfg) = config(8, 2);
    assert_equivalent(&single(&cfg), &replicated(&cfg, 2, false), "dp2");
}

#[test]
fn dp2_with_the_distributed_optimizer_equals_one_process() {
    let (_dir, cfg) = config(8, 2);
    assert_equivalent(
        &single(&cfg),
        &replicated(&cfg, 2, true),
        "dp2 distributed optimizer",
    );
}

#[test]
fn dp3_with_uneven_microbatch_counts_equals_one_process() {
    // Four microbatches over three replicas: two, one and one.
    let (_dir, cfg) = config(8, 2);
    let reference = single(&cfg);
    assert_equivalent(&reference, &replicated(&cfg, 3, false), "dp3 uneven");
    assert_equivalent(
        &reference,
        &replicated(&cfg, 3, true),
        "dp3 uneven, distributed optimizer",
    );
}

#[test]
fn a_replica_without_microbatches_still_takes_part() {
    // Two microbatches over three replicas: the third runs none, yet joins every collective.
    let (_dir, cfg) = config(4, 2);
    let reference = single(&cfg);
    assert_equivalent(
        &reference,
        &replicated(&cfg, 3, false),
        "dp3, one idle replica",
    );
    assert_equivalent(
        &reference,
        &replicated(&cfg, 3, true),
        "dp3, one idle replica, distributed optimizer",
    );
}
