//! The trainer: determinism and gradient-accumulation equivalence.

mod common;

use common::*;
use marathon_runtime::Trainer;

fn losses_and_params(cfg: marathon_runtime::TrainConfig) -> (Vec<f32>, Vec<f32>) {
    let mut t = Trainer::new(cfg).expect("build the trainer");
    let steps = t.cfg.train.steps;
    let losses = (0..steps)
        .map(|_| t.train_step().expect("train a step").loss)
        .collect();
    (losses, t.model.params.clone())
}

#[test]
fn same_seed_gives_bitwise_identical_runs() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 1);
    let cfg = parse(&small_config_toml(&train, None, 256));
    let (a, pa) = losses_and_params(cfg.clone());
    let (b, pb) = losses_and_params(cfg.clone());
    assert_eq!(
        a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(
        pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "parameters differ bitwise"
    );
    // And the seed matters: another weight seed or data seed gives another run.
    let mut other = cfg.clone();
    other.train.seed += 1;
    assert_ne!(losses_and_params(other).0, a);
    let mut other = cfg;
    other.data.seed += 1;
    assert_ne!(losses_and_params(other).0, a);
    // The loss fell on data with structure to learn.
    assert!(a.last().unwrap() < &a[0], "{a:?}");
}

#[test]
fn microbatch_split_does_not_change_the_update() {
    // One microbatch of 8 and two of 4 weight every token by 1 / (tokens in the global batch),
    // so the gradients, and so every step, agree up to float rounding.
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 2);
    let cfg = parse(&small_config_toml(&train, None, 256));
    let mut whole = cfg.clone();
    whole.batch.micro_batch = 8;
    let (la, pa) = losses_and_params(cfg);
    let (lb, pb) = losses_and_params(whole);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "losses {la:?} vs {lb:?}");
    }
    // Adam turns float rounding in near-zero gradients into visible differences for those few
    // elements, so the parameters are compared over the whole buffer, in L2.
    let diff = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = pb.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let max_diff = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!(
        "parameter difference: {:e} relative in L2, {max_diff:e} at most",
        diff / norm
    );
    assert!(
        diff <= 1e-5 * norm,
        "parameters differ by {:e} relative",
        diff / norm
    );
}

#[test]
fn batch_ramp_grows_the_global_batch_and_data_order_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 3);
    let text = small_config_toml(&train, None, 256).replace(
        "seq_len = 16\n",
        "seq_len = 16\n[batch.rampup]\nstart = 4\nincrement = 4\nramp_tokens = 128\n",
    );
    let mut t = Trainer::new(parse(&text)).unwrap();
    let batches: Vec<u64> = (0..6).map(|_| t.train_step().unwrap().batch).collect();
    // 4 -> 8 over 128 tokens = 8 samples of 16 tokens: two steps of 4, then 8.
    assert_eq!(batches, [4, 4, 8, 8, 8, 8]);
    assert_eq!(t.consumed_samples, 4 + 4 + 8 * 4);
    assert_eq!(t.consumed_samples, t.cfg.batch_ramp().consumed_before(6));
}

#[test]
fn a_resumed_run_continues_exactly_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 4);
    // A batch ramp makes the data position depend on the schedule, not just on step x batch.
    let text = small_config_toml(&train, None, 256).replace(
        "seq_len = 16\n",
        "seq_len = 16\n[batch.rampup]\nstart = 4\nincrement = 4\nramp_tokens = 128\n",
    );
    let mut whole = Trainer::new(parse(&text)).unwrap();
    let mut resumed = Trainer::new(parse(&text)).unwrap();
    let losses: Vec<f32> = (0..6).map(|_| whole.train_step().unwrap().loss).collect();

    // Run 3 steps, carry the state over as a checkpoint would, and continue in a fresh trainer.
    let mut first = Trainer::new(parse(&text)).unwrap();
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    resumed.model.params.copy_from_slice(&first.model.params);
    resumed.opt = first.opt.clone();
    resumed.seek(3);
    let rest: Vec<f32> = (0..3).map(|_| resumed.train_step().unwrap().loss).collect();
    assert_eq!(
        rest.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        losses[3..].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(resumed.model.params, whole.model.params);
    assert_eq!(resumed.consumed_samples, whole.consumed_samples);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 5);
    let cfg = parse(&small_config_toml(&train, None, 256));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| losses_and_params(cfg.clone()))
    };
    let (l1, p1) = run(1);
    let (l3, p3) = run(3);
    assert_eq!(
        l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        l3.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(
        p1.iter().zip(&p3).all(|(a, b)| a.to_bits() == b.to_bits()),
        "parameters differ between 1 and 3 threads"
    );
}

#[test]
fn a_diverged_step_is_refused_and_leaves_the_state_alone() {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_tokens(dir.path(), "train.bin", 20_000, 256, 6);
    let mut t = Trainer::new(parse(&small_config_toml(&train, None, 256))).unwrap();
    t.train_step().unwrap();
    let lnf = t.model.layout.get("ln_f.weight").unwrap().offset;
    t.model.params[lnf] = f32::NAN;
    let (params, m, step) = (t.model.params.clone(), t.opt.m.clone(), t.opt.step);
    let e = t.train_step().unwrap_err().to_string();
    assert!(
        e.starts_with("training diverged at step 2: loss NaN"),
        "{e}"
    );
    assert!(e.contains("the update was not applied"), "{e}");
    assert!(t
        .model
        .params
        .iter()
        .zip(&params)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!((t.opt.m == m, t.opt.step, t.step), (true, step, 1));
}
