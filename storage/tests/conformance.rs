//! The storage conformance suite, run against every store a checkpoint can live in: a local
//! directory, memory, the fault-injecting wrapper, and a real S3-API server (Garage).

mod common;
use marathon_testkit::garage::Garage;

use std::sync::Arc;

use common::*;
use marathon_storage::faulty::{Faults, FaultyStore};
use marathon_storage::retention::{collect, Retention};
use marathon_storage::writer::probe_create_only;
use marathon_storage::{
    CheckpointWriter, Piece, Reader, StorageError, Store, TensorBox, WriterOptions,
};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as u64
}

/// Save, read back, refuse a second commit, leave an unfinished step uncommitted, stream a
/// multi-part shard, and apply retention.
fn suite(store: Store) {
    let what = store.url.clone();
    let reader = Reader::new(store.clone());
    assert_eq!(
        reader.committed().expect("list"),
        Vec::<u64>::new(),
        "{what}: empty root"
    );
    save(&store, 10).expect("save step 10");
    assert_eq!(reader.committed().expect("list"), vec![10], "{what}");
    check(&reader, 10).expect("read step 10 back");

    // A second writer of the same step cannot replace the committed checkpoint.
    let err = save(&store, 10).expect_err("a second commit of step 10");
    assert!(
        matches!(err, StorageError::AlreadyCommitted { step: 10, .. }),
        "{what}: {err}"
    );
    check(&reader, 10).expect("step 10 unchanged");

    // Only one of two ranks finishes step 20: its shard exists, no manifest does.
    let mut lone = CheckpointWriter::new(store.clone(), 1, 2, options()).expect("writer");
    let (p, data) = pieces(1, 20);
    lone.snapshot(20, serde_json::json!({}), p, |b| b.copy_from_slice(&data));
    lone.wait()
        .expect("persisted")
        .expect("rank 1's shard is durable");
    let steps = reader.list().expect("list");
    assert!(
        steps.iter().any(|s| s.step == 20 && !s.committed),
        "{what}: {steps:?}"
    );
    assert_eq!(reader.committed().expect("list"), vec![10], "{what}");

    // A shard of several multipart parts (20 MiB, 8 MiB parts), from one writer.
    let big = 5 << 20;
    let mut w = CheckpointWriter::new(
        store.clone(),
        0,
        1,
        WriterOptions {
            chunk_bytes: 1 << 20,
            single_writer: true,
            ..WriterOptions::default()
        },
    )
    .expect("writer");
    let shape = vec![big as u64];
    let piece = Piece {
        tensor: "big".into(),
        shape: shape.clone(),
        region: TensorBox::whole(&shape),
    };
    let values: Vec<f32> = (0..big).map(|i| ((i % 1000) as f32).sqrt()).collect();
    w.snapshot(30, serde_json::json!({}), vec![piece], |b| {
        b.copy_from_slice(&values)
    });
    let report = w.wait().expect("persisted").expect("big shard");
    assert_eq!(report.raw_bytes, 4 * big as u64);
    let m = reader.manifest(30).expect("manifest 30");
    let region = TensorBox {
        offset: vec![big as u64 - 1000],
        size: vec![1000],
    };
    let mut tail = vec![0f32; 1000];
    reader
        .read_box(&m, "big", &region, &mut tail)
        .expect("ranged read");
    assert_eq!(&tail[..], &values[big - 1000..]);

    // Retention: keep the last two, collect the abandoned step 20 once it is old enough.
    save(&store, 40).expect("save 40");
    save(&store, 50).expect("save 50");
    let policy = Retention {
        keep_last: 2,
        keep_every: 0,
        grace_ms: 60_000,
    };
    let dry = collect(&reader, policy, now_ms() + 3_600_000, true, |_| true).expect("dry run");
    assert_eq!(
        (dry.expired.clone(), dry.abandoned.clone()),
        (vec![10, 30], vec![20]),
        "{what}"
    );
    assert_eq!(
        reader.committed().expect("list"),
        vec![10, 30, 40, 50],
        "{what}: a dry run deletes nothing"
    );
    // Within the grace period the unfinished step is left alone.
    let now = collect(&reader, policy, now_ms(), false, |_| true).expect("collect");
    assert_eq!(
        (now.expired, now.abandoned),
        (vec![10, 30], vec![]),
        "{what}"
    );
    assert_eq!(reader.committed().expect("list"), vec![40, 50], "{what}");
    check(&reader, 50).expect("the newest survives");
}

#[test]
fn local_directory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(&dir.path().join("job").display().to_string()).expect("open");
    let mode = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(probe_create_only(&store))
        .expect("probe");
    assert_eq!(mode, marathon_storage::writer::CommitMode::CreateOnly);
    suite(store);
}

#[test]
fn memory() {
    suite(Store::open("memory://job").expect("open"));
}

#[test]
fn fault_injecting_wrapper_with_transient_failures_and_delays() {
    let base = Store::open("memory://job").expect("open");
    let faulty = Arc::new(FaultyStore::new(
        base.inner.clone(),
        Faults {
            error_rate: 0.05,
            delay: std::time::Duration::from_millis(1),
            ..Faults::default()
        },
        7,
    ));
    suite(base.wrapped(faulty.clone()));
    let counts = faulty.counts();
    assert!(counts.errors > 0, "no fault was injected: {counts:?}");
}

#[test]
fn s3_api_server() {
    let garage = Garage::start();
    let store = Store::open_with("s3://ckpt/jobs/conformance", garage.options()).expect("open s3");
    let mode = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(probe_create_only(&store))
        .expect("probe");
    // Garage 2.5 accepts a create-only put over an existing object: its manifest's put cannot
    // decide a commit, so a writer with nothing else to decide it is refused at its start.
    assert_eq!(mode, marathon_storage::writer::CommitMode::LeaderChecked);
    let refused = CheckpointWriter::new(store.clone(), 0, 1, WriterOptions::default())
        .expect_err("an unsafe commit point");
    assert!(
        matches!(&refused, StorageError::UnsafeCommit { url } if url == "s3://ckpt/jobs/conformance")
            && refused.to_string().contains("single_writer"),
        "{refused}"
    );
    suite(store);
}
