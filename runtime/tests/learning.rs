//! Learning real text: a small GPT-2 on tinyshakespeare gets its validation loss below 6.0
//! nats per token (an untrained model is at ln(50257) = 10.8, and predicting tokens by their
//! frequency alone gives about 7).

mod common;

use common::*;
use marathon_runtime::data::{prepare, PrepareOptions};
use marathon_runtime::Trainer;
use marathon_testkit::shakespeare;

/// Steps the test allows; the run stops as soon as validation passes the goal.
const STEPS_MAX: u64 = 250;
const GOAL: f32 = 6.0;

#[test]
fn validation_loss_on_shakespeare_falls_below_six_nats() {
    let dir = tempfile::tempdir().unwrap();
    let r = prepare(&PrepareOptions {
        inputs: vec![shakespeare()],
        out_dir: dir.path().to_owned(),
        val_fraction: 0.1,
    })
    .unwrap();
    let text = marathon_runtime::small_job::SmallJob {
        context: 64,
        n_head: 4,
        n_embd: 64,
        train: r.train_path.display().to_string(),
        val: Some(
            r.val_path
                .as_ref()
                .expect("a validation split")
                .display()
                .to_string(),
        ),
        data_seed: Some(1),
        micro_batch: 16,
        global_batch: 16,
        seq_len: 64,
        peak_lr: 1.2e-2,
        warmup_tokens: 10240,
        decay_tokens: 256000,
        steps: STEPS_MAX,
        seed: Some(1),
        train_lines: "eval_every_steps = 10\neval_batches = 8\n".into(),
        ..Default::default()
    }
    .toml();
    let mut t = Trainer::new(parse(&text)).unwrap();
    let first = t.evaluate().unwrap().unwrap();
    assert!(
        first > 10.0,
        "an untrained model starts near ln(50257): {first}"
    );
    let mut history = vec![(0, first)];
    while t.step < STEPS_MAX {
        t.train_step().unwrap();
        if t.step % 10 == 0 {
            let v = t.evaluate().unwrap().unwrap();
            history.push((t.step, v));
            if v < GOAL {
                println!("validation loss {v:.4} after {} steps: {history:?}", t.step);
                return;
            }
        }
    }
    panic!("validation loss stayed above {GOAL} for {STEPS_MAX} steps: {history:?}");
}
