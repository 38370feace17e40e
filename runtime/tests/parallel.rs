//! Every parallel layout equals the single-process run: tensor, pipeline and data parallel
//! ranks on real TCP process groups, each its own trainer holding its shard of the model,
//! against one trainer holding the whole model and the whole global batch.

mod common;

use common::*;
use marathon_model::layout::copy_box;
use marathon_model::ParamLayout;
use marathon_runtime::{TrainConfig, Trainer};

const STEPS: u64 = 10;

/// Losses of every step, and a rank's final parameters with the layout they are in.
struct Run {
    losses: Vec<f32>,
    params: Vec<f32>,
    layout: ParamLayout,
}

fn single(cfg: &TrainConfig) -> Run {
    let mut t = Trainer::new(cfg.clone()).expect("single-process trainer");
    let losses = (0..STEPS)
        .map(|_| t.train_step().expect("step").loss)
        .collect();
    Run {
        losses,
        params: t.model.params,
        layout: t.model.layout,
    }
}

/// Runs `cfg` in a tp x pp x dp layout, one thread per rank, and returns every rank's run in
/// rank order.
fn parallel(
    cfg: &TrainConfig,
    tp: usize,
    pp: usize,
    dp: usize,
    distributed_optimizer: bool,
) -> Vec<Run> {
    on_every_rank(cfg, (tp, pp, dp), distributed_optimizer, |mut t| {
        let losses: Vec<f32> = (0..STEPS)
            .map(|_| t.train_step().expect("step").loss)
            .collect();
        Run {
            losses,
            params: t.model.params,
            layout: t.model.layout,
        }
    })
}

/// Asserts every rank matches the single-process run within 1e-5 relative: the loss of each
/// step, and its parameters (in L2, against the same boxes of the whole model's). Ranks that
/// hold the same shard in different replicas must agree bitwise.
fn assert_equivalent(reference: &Run, ranks: &[Run], what: &str) {
    for (r, run) in ranks.iter().enumerate() {
        for (s, (a, b)) in run.losses.iter().zip(&reference.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{what}: rank {r} step {}: loss {a} vs {b}",
                s + 1
            );
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for t in run.layout.tensors() {
            let g = reference
                .layout
                .get(&t.name)
                .expect("the whole model has every tensor");
            let mut want = vec![0.0f32; t.numel()];
            copy_box(
                &reference.params[g.range()],
                &g.global_shape,
                &t.box_offset,
                &mut want,
                &t.shape,
            );
            for (x, y) in run.params[t.range()].iter().zip(&want) {
                diff += ((x - y) as f64).powi(2);
                norm += (*y as f64).powi(2);
            }
        }
        let rel = diff.sqrt() / norm.sqrt();
        assert!(
            rel <= 1e-5,
            "{what}: rank {r} parameters differ by {rel:e} relative"
        );
        let twin = ranks
            .iter()
            .find(|o| o.layout.shard == run.layout.shard)
            .expect("a rank is its own twin");
        assert!(
            run.params
                .iter()
                .zip(&twin.params)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: rank {r} disagrees with the other replicas of its shard"
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
    assert_equivalent(&single(&cfg), &parallel(&cfg, 1, 1, 2, false), "dp2");
}

#[test]
fn dp2_with_the_distributed_optimizer_equals_one_process() {
    let (_dir, cfg) = config(8, 2);
    assert_equivalent(
        &single(&cfg),
        &parallel(&cfg, 1, 1, 2, true),
        "dp2 distributed optimizer",
    );
}

#[test]
fn dp3_with_uneven_microbatch_counts_equals_one_process() {
    // Four microbatches over three replicas: two, one and one.
    let (_dir, cfg) = config(8, 2);
    let reference = single(&cfg);
    assert_equivalent(&reference, &parallel(&cfg, 1, 1, 3, false), "dp3 uneven");
    assert_equivalent(
        &reference,
        &parallel(&cfg, 1, 1, 3, true),
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
        &parallel(&cfg, 1, 1, 3, false),
        "dp3, one idle replica",
    );
    assert_equivalent(
        &reference,
        &parallel(&cfg, 1, 1, 3, true),
        "dp3, one idle replica, distributed optimizer",
    );
}

/// A model with four layers and four heads, so tensor parallelism up to 4 and pipelines of up
/// to 4 stages split it, over `global_batch` sequences in microbatches of 2.
fn deep_config(global_batch: usize) -> (tempfile::TempDir, TrainConfig) {
    let (dir, mut cfg) = config(global_batch, 2);
    cfg.model.n_layer = 4;
    cfg.model.n_head = 4;
    (dir, cfg)
}

/// Runs each (tp, pp, dp, distributed optimizer) layout of the deep model over
/// `global_batch` sequences and checks it against one process.
fn check_layouts(global_batch: usize, layouts: &[(usize, usize, usize, bool)]) {
    let (_dir, cfg) = deep_config(global_batch);
    let reference = single(&cfg);
    for &(tp, pp, dp, zero) in layouts {
        let what = format!(
            "tp{tp} x pp{pp} x dp{dp}{}, {} microbatches",
            if zero { " distributed optimizer" } else { "" },
            global_batch / 2
        );
        assert_equivalent(&reference, &parallel(&cfg, tp, pp, dp, zero), &what);
    }
}

#[test]
fn tp2_and_tp4_equal_one_process() {
    check_layouts(8, &[(2, 1, 1, false), (4, 1, 1, false)]);
}

#[test]
fn pp2_with_4_microbatches_equals_one_process() {
    check_layouts(8, &[(1, 2, 1, false)]);
}

#[test]
fn pp4_with_8_microbatches_equals_one_process() {
    check_layouts(16, &[(1, 4, 1, false)]);
}

#[test]
fn tp2_pp2_equals_one_process() {
    check_layouts(8, &[(2, 2, 1, false)]);
}

#[test]
fn dp2_tp2_pp2_equals_one_process() {
    check_layouts(8, &[(2, 2, 2, false), (2, 2, 2, true)]);
}

#[test]
fn fewer_microbatches_than_stages_still_equal_one_process() {
    // Three microbatches over four stages, and over two uneven replicas of two stages.
    check_layouts(6, &[(1, 4, 1, false), (1, 2, 2, true)]);
}

/// Asserts two runs of the same layout are bitwise equal, rank by rank: losses and parameters.
fn assert_bitwise(a: &[Run], b: &[Run], what: &str) {
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x.losses), bits(&y.losses), "{what}: rank {r} losses");
        assert!(
            bits(&x.params) == bits(&y.params),
            "{what}: rank {r} parameters differ bitwise"
        );
    }
}

#[test]
fn recomputation_is_bitwise_equal_to_keeping_everything() {
    use marathon_model::Recompute;
    let (_dir, cfg) = deep_config(8);
    let with = |r: Recompute| {
        let mut c = cfg.clone();
        c.train.recompute = r;
        c
    };
    // One process.
    let none = single(&cfg);
    for r in [Recompute::Selective, Recompute::Full] {
        assert_bitwise(
            std::slice::from_ref(&none),
            std::slice::from_ref(&single(&with(r))),
            &format!("one process, {r:?}"),
        );
    }
    // tp2 x pp2: full recomputation runs each layer's tensor-parallel all-reduces again in
    // backward, and a stage keeps two microbatches in flight.
    let none = parallel(&cfg, 2, 2, 1, false);
    for r in [Recompute::Selective, Recompute::Full] {
        assert_bitwise(
            &none,
            &parallel(&with(r), 2, 2, 1, false),
            &format!("tp2 x pp2, {r:?}"),
        );
    }
}
