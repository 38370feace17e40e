//! Checkpoints in the trainer: a run stopped and resumed equals the uninterrupted run bitwise,
//! in one process and in a dp2 x tp2 x pp2 layout; a checkpoint written in one layout resumes in
//! another; a damaged newest checkpoint falls back to the one before; a checkpoint of another
//! model is refused; concurrent committers of one step make exactly one commit, on Garage
//! (through the commit record in a real etcd) and on a local directory.

mod common;

use common::*;
use marathon_runtime::checkpoint::CheckpointRecord;
use marathon_runtime::config::{CheckpointConfig, Compression, Resume};
use marathon_runtime::records::StepRecord;
use marathon_runtime::trainer::Observer;
use marathon_runtime::{TrainConfig, Trainer};
use marathon_storage::format::Manifest;
use marathon_testkit::etcd::Etcd;
use marathon_testkit::garage::Garage;

const STEPS: u64 = 8;

/// A model every layout up to tp 2 x pp 2 x dp 2 splits, over 8 sequences a step in
/// microbatches of 2, checkpointing into `root` every 2 steps.
fn config(dir: &std::path::Path, root: &str) -> TrainConfig {
    let train = synthetic_tokens(dir, "train.bin", 40_000, 256, 11);
    let mut cfg = parse(
        &small_config_toml(&train, None, 256)
            .replace("micro_batch = 4", "micro_batch = 2")
            .replace("n_layer = 2", "n_layer = 4")
            .replace("n_head = 2", "n_head = 4"),
    );
    cfg.train.steps = STEPS;
    cfg.checkpoint = Some(CheckpointConfig {
        root: root.to_string(),
        every_steps: 2,
        keep_last: 10,
        keep_every: 0,
        compression: Compression::ZstdShuffle,
        level: 1,
        resume: Resume::Auto,
        abandoned_after_s: 3600,
        options: Default::default(),
        faults: None,
        single_writer: false,
        record: None,
    });
    cfg
}

#[derive(Default)]
struct Losses(Vec<(u64, f32)>, Vec<u64>);

impl Observer for Losses {
    fn on_step(&mut self, r: &StepRecord) {
        self.0.push((r.step, r.loss));
    }
    fn on_checkpoint(&mut self, r: &CheckpointRecord) {
        assert!(r.previous_failed.is_none(), "{:?}", r.previous_failed);
        self.1.push(r.step);
    }
}

/// What a run did: the (step, loss) of each step it ran, the checkpoints it took, the step it
/// resumed from and its final parameters.
type Ran = (Vec<(u64, f32)>, Vec<u64>, Option<u64>, Vec<f32>);

/// Runs to `steps`.
fn run_to(mut t: Trainer, steps: u64) -> Ran {
    t.cfg.train.steps = steps;
    let mut seen = Losses::default();
    t.run(&mut seen).expect("run");
    (seen.0, seen.1, t.resumed_from(), t.model.params)
}

/// Asserts a resumed run's losses and final parameters equal the reference's within 1e-5
/// relative (parameters in L2): what a different layout's summation order allows.
fn assert_close(losses: &[(u64, f32)], reference: &[(u64, f32)], params: &[f32], expected: &[f32]) {
    assert_eq!(losses.len(), reference.len());
    for ((s, a), (_, b)) in losses.iter().zip(reference) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {s}: {a} vs {b}");
    }
    let diff: f64 = params
        .iter()
        .zip(expected)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = expected
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        diff <= 1e-5 * norm,
        "parameters differ by {:e} relative",
        diff / norm
    );
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_resumed_run_equals_the_uninterrupted_one_bitwise() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let whole = config(dir.path(), &dir.path().join("whole").display().to_string());
    let (all, saved, from, params) = run_to(Trainer::new(whole).expect("trainer"), STEPS);
    assert_eq!((saved, from), (vec![2, 4, 6, 8], None));

    let root = dir.path().join("resumed").display().to_string();
    let cfg = config(dir.path(), &root);
    let (first, _, _, _) = run_to(Trainer::new(cfg.clone()).expect("trainer"), 5);
    assert_eq!(first[..], all[..5]);
    // Stopped after step 5: the newest committed checkpoint is step 4 (and one of step 5,
    // taken after the last step of that run).
    let (rest, _, from, resumed) = run_to(Trainer::new(cfg).expect("trainer"), STEPS);
    assert_eq!(from, Some(5));
    assert_eq!(rest[..], all[5..], "losses after resuming");
    assert_eq!(bits(&resumed), bits(&params), "final parameters");
}

#[test]
fn a_resumed_dp2_tp2_pp2_run_equals_the_uninterrupted_one_bitwise() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let layout = (2, 2, 2);
    for zero in [false, true] {
        let whole = config(
            dir.path(),
            &dir.path()
                .join(format!("whole-{zero}"))
                .display()
                .to_string(),
        );
        let uninterrupted = on_every_rank(&whole, layout, zero, |t| run_to(t, STEPS));
        let cfg = config(
            dir.path(),
            &dir.path()
                .join(format!("resumed-{zero}"))
                .display()
                .to_string(),
        );
        on_every_rank(&cfg, layout, zero, |t| run_to(t, 3));
        let resumed = on_every_rank(&cfg, layout, zero, |t| run_to(t, STEPS));
        for (r, (a, b)) in uninterrupted.iter().zip(&resumed).enumerate() {
            assert_eq!(b.2, Some(3), "rank {r}");
            assert_eq!(
                b.0[..],
                a.0[3..],
                "rank {r} (distributed optimizer {zero}): losses"
            );
            assert_eq!(
                bits(&b.3),
                bits(&a.3),
                "rank {r} (distributed optimizer {zero}): parameters"
            );
        }
    }
}

#[test]
fn a_checkpoint_resumes_in_another_layout() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let whole = config(dir.path(), &dir.path().join("whole").display().to_string());
    let (all, _, _, params) = run_to(Trainer::new(whole).expect("trainer"), STEPS);
    // Written by dp2 x tp2 x pp2 with the distributed optimizer, continued by one process.
    let cfg = config(dir.path(), &dir.path().join("moved").display().to_string());
    on_every_rank(&cfg, (2, 2, 2), true, |t| run_to(t, 4));
    let (rest, _, from, moved) = run_to(Trainer::new(cfg).expect("trainer"), STEPS);
    assert_eq!(from, Some(4));
    assert_close(&rest, &all[4..], &moved, &params);
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().join("ckpt");
    let cfg = config(dir.path(), &root.display().to_string());
    run_to(Trainer::new(cfg.clone()).expect("trainer"), 4);
    // Flip one bit in the middle of the newest checkpoint's shard.
    let manifest = std::fs::read(root.join("step-000000000004/manifest.json")).expect("manifest");
    let manifest: Manifest = serde_json::from_slice(&manifest).expect("the manifest parses");
    let shard = root.join(manifest.shard_of(0).expect("rank 0's shard"));
    let mut bytes = std::fs::read(&shard).expect("the shard");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&shard, bytes).expect("write it back");
    let t = Trainer::new(cfg).expect("a trainer resuming from the step before");
    assert_eq!(t.resumed_from(), Some(2));
}

#[test]
fn a_checkpoint_of_another_model_or_an_unwanted_resume_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().join("ckpt").display().to_string();
    let cfg = config(dir.path(), &root);
    run_to(Trainer::new(cfg.clone()).expect("trainer"), 2);
    let mut other = cfg.clone();
    other.model.n_embd = 64;
    let err = Trainer::new(other).expect_err("another model").to_string();
    assert!(
        err.contains("model.n_embd: the checkpoint of step 2 under")
            && err.contains("model.n_embd = 32"),
        "{err}"
    );
    let mut never = cfg;
    never.checkpoint.as_mut().expect("checkpointing").resume = Resume::Never;
    let err = Trainer::new(never)
        .expect_err("resume = never over checkpoints")
        .to_string();
    assert!(err.contains("checkpoint.resume: is never, but"), "{err}");
}

#[test]
fn a_run_resumes_from_an_s3_api_store_that_was_killed_and_restarted() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let whole = config(dir.path(), &dir.path().join("whole").display().to_string());
    let (all, _, _, params) = run_to(Trainer::new(whole).expect("trainer"), STEPS);
    let mut server = Garage::start();
    let mut cfg = config(dir.path(), "s3://ckpt/jobs/resume");
    let c = cfg.checkpoint.as_mut().expect("checkpointing");
    c.options = server.options().into_iter().collect();
    c.keep_last = 1;
    // Garage does not refuse a second create-only put: with nothing to record its commits
    // the job is refused at its start, naming the root and the ways out.
    let err = Trainer::new(cfg.clone())
        .expect_err("an unsafe commit point")
        .to_string();
    assert!(
        err.contains("s3://ckpt/jobs/resume")
            && err.contains("does not refuse a second create-only write")
            && err.contains("--etcd")
            && err.contains("single_writer = true"),
        "{err}"
    );
    cfg.checkpoint
        .as_mut()
        .expect("checkpointing")
        .single_writer = true;
    on_every_rank(&cfg, (1, 2, 2), false, |t| run_to(t, 4));
    server.restart();
    let (rest, _, from, resumed) = run_to(Trainer::new(cfg.clone()).expect("trainer"), STEPS);
    assert_eq!(from, Some(4));
    assert_close(&rest, &all[4..], &resumed, &params);
    // Retention kept only the newest committed checkpoint.
    let store = marathon_runtime::checkpoint::open_store(cfg.checkpoint.as_ref().expect("set"))
        .expect("store");
    let reader = marathon_storage::Reader::new(store);
    assert_eq!(reader.committed().expect("list"), vec![STEPS]);
}

#[test]
fn a_run_accounts_for_its_time() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut t = Trainer::new(config(
        dir.path(),
        &dir.path().join("c").display().to_string(),
    ))
    .expect("trainer");
    let s = t.run(&mut Losses::default()).expect("run");
    let g = &s.goodput;
    assert!(g.training_s > 0.0 && g.checkpoint_stall_s > 0.0, "{g:?}");
    let accounted = g.training_s + g.eval_s + g.checkpoint_stall_s + g.final_checkpoint_s;
    assert!(
        accounted <= s.elapsed_s * 1.001,
        "{g:?} in {} s",
        s.elapsed_s
    );
    assert!((g.effective_fraction - g.training_s / s.elapsed_s).abs() < 1e-9);
    assert!(
        g.effective_fraction > 0.0 && g.effective_fraction <= 1.0,
        "{g:?}"
    );
}

/// Rounds of `n` committers of one step at once (steps from `first`), each a one-rank job with
/// values of its own:
/// every round makes exactly one commit, every other committer is told `AlreadyCommitted`, and
/// the committed checkpoint holds the winner's values. `record` gives each committer its
/// commit record (none: the store's create-only put decides).
fn concurrent_committers(
    store: &marathon_storage::Store,
    n: usize,
    first: u64,
    rounds: u64,
    record: Option<marathon_storage::writer::CommitRecord>,
) {
    use marathon_storage::{
        CheckpointWriter, Piece, Reader, StorageError, TensorBox, WriterOptions,
    };
    let shape = vec![64u64];
    let reader = Reader::new(store.clone());
    for round in 0..rounds {
        let step = first + round;
        let values = |c: usize| -> Vec<f32> {
            (0..64)
                .map(|i| (c * 1000 + i) as f32 + step as f32)
                .collect()
        };
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let results: Vec<_> = (0..n)
            .map(|c| {
                let (store, barrier, shape) = (store.clone(), barrier.clone(), shape.clone());
                let opts = WriterOptions {
                    record: record.clone(),
                    chunk_bytes: 64,
                    ..WriterOptions::default()
                };
                let data = values(c);
                std::thread::spawn(move || {
                    let mut w = CheckpointWriter::new(store, 0, 1, opts).expect("a writer");
                    let piece = Piece {
                        tensor: "w".into(),
                        region: TensorBox::whole(&shape),
                        shape,
                    };
                    barrier.wait();
                    w.snapshot(
                        step,
                        serde_json::json!({ "committer": c }),
                        vec![piece],
                        |b| b.copy_from_slice(&data),
                    );
                    w.wait().expect("a persist")
                })
            })
            .collect();
        let results: Vec<_> = results
            .into_iter()
            .map(|h| h.join().expect("committer"))
            .collect();
        let won: Vec<usize> = (0..n).filter(|&c| results[c].is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for (c, r) in results.iter().enumerate().filter(|(c, _)| *c != won[0]) {
            assert!(
                matches!(r, Err(StorageError::AlreadyCommitted { .. })),
                "round {round}, committer {c}: {r:?}"
            );
        }
        let m = reader.manifest(step).expect("the committed manifest");
        assert_eq!(m.run["committer"], won[0], "round {round}");
        let mut got = vec![0f32; 64];
        reader
            .read_box(&m, "w", &TensorBox::whole(&shape), &mut got)
            .expect("read back");
        assert_eq!(got, values(won[0]), "round {round}: the winner's bytes");
    }
}

#[test]
fn concurrent_committers_of_a_step_make_one_commit_on_a_local_directory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store =
        marathon_storage::Store::open(&dir.path().display().to_string()).expect("a directory");
    concurrent_committers(&store, 2, 100, 20, None);
    concurrent_committers(&store, 4, 200, 20, None);
}

/// On Garage, which accepts a create-only put over an existing object, the commit record in
/// etcd decides; a committer of a generation that no longer runs cannot commit, even once it
/// has uploaded everything.
#[test]
fn concurrent_committers_of_a_step_make_one_commit_on_garage_through_etcd() {
    use marathon_elastic::job::{propose, JobKeys};
    use marathon_elastic::plan::Plan;
    use marathon_elastic::Coordinator;
    use marathon_storage::writer::{Claim, CommitRecord};
    let (server, etcd) = (Garage::start(), Etcd::start());
    let coord: std::sync::Arc<dyn Coordinator> = std::sync::Arc::new(etcd.connect());
    let keys = JobKeys::new("committers");
    let store = marathon_storage::Store::open_with("s3://ckpt/jobs/committers", server.options())
        .expect("open s3");
    let record = |fenced| {
        marathon_runtime::checkpoint::coordinator_record(
            coord.clone(),
            keys.clone(),
            std::time::Duration::from_secs(5),
            fenced,
        )
    };
    concurrent_committers(&store, 2, 100, 20, Some(record(false)));
    concurrent_committers(&store, 4, 200, 20, Some(record(false)));

    // A committer of generation 1 stalls between its upload and its commit while generation 2
    // starts: its record is refused, and no manifest of its step appears.
    let plan = Plan {
        tp: 1,
        pp: 1,
        dp: 1,
        blocks: vec![],
        microbatches: vec![1],
        standby: vec![],
    };
    assert!(propose(&*coord, &keys, 0, 1, &plan, &[]).expect("generation 1"));
    let (stalled_tx, stalled_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let stalling = {
        let record = record(true);
        CommitRecord(std::sync::Arc::new(move |claim: &Claim| {
            stalled_tx.send(()).expect("tell");
            go_rx.lock().expect("go").recv().expect("go");
            (record.0)(claim)
        }))
    };
    let opts = marathon_storage::WriterOptions {
        record: Some(stalling),
        epoch: Some(1),
        ..marathon_storage::WriterOptions::default()
    };
    let mut w = marathon_storage::CheckpointWriter::new(store.clone(), 0, 1, opts).expect("writer");
    let shape = vec![8u64];
    let piece = marathon_storage::Piece {
        tensor: "w".into(),
        region: marathon_storage::TensorBox::whole(&shape),
        shape,
    };
    w.snapshot(500, serde_json::json!({}), vec![piece], |b| b.fill(1.0));
    stalled_rx.recv().expect("the committer reached its commit");
    assert!(propose(&*coord, &keys, 1, 2, &plan, &[]).expect("generation 2"));
    go_tx.send(()).expect("go");
    let err = w.wait().expect("a persist").expect_err("a fenced commit");
    assert!(
        matches!(
            err,
            marathon_storage::StorageError::Fenced { step: 500, .. }
        ) && err.to_string().contains("generation 1"),
        "{err}"
    );
    let reader = marathon_storage::Reader::new(store);
    assert!(!reader.committed().expect("list").contains(&500));
}
