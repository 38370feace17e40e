//! Faults through the fault-injecting store: a writer that stops between its shards and the
//! manifest or halfway through the manifest, and shards damaged after the commit. An
//! uncommitted checkpoint is never read, damage is found and named, and retention keeps the
//! newest checkpoint that verifies.

mod common;

use std::sync::Arc;

use common::*;
use marathon_storage::faulty::{Faults, FaultyStore};
use marathon_storage::format::manifest_name;
use marathon_storage::retention::{collect, Retention};
use marathon_storage::{CheckpointWriter, Reader, StorageError, Store, WriterOptions};
use object_store::{ObjectStoreExt, PutPayload};

fn faulty_memory() -> (Store, Arc<FaultyStore>) {
    let base = Store::open("memory://job").expect("open");
    let faulty = Arc::new(FaultyStore::new(base.inner.clone(), Faults::default(), 3));
    (base.wrapped(faulty.clone()), faulty)
}

#[test]
fn a_writer_stopped_before_the_manifest_leaves_no_checkpoint() {
    let (store, faulty) = faulty_memory();
    save(&store, 1).expect("save 1");
    faulty.set(Faults {
        refuse_puts_to: Some("manifest.json".into()),
        ..Faults::default()
    });
    let err = save(&store, 2).expect_err("the manifest put is refused");
    assert!(err.to_string().contains("commit manifest"), "{err}");
    let reader = Reader::new(store.clone());
    assert_eq!(reader.committed().expect("list"), vec![1]);
    assert!(reader
        .list()
        .expect("list")
        .iter()
        .any(|s| s.step == 2 && !s.committed));
    assert!(matches!(
        reader.manifest(2),
        Err(StorageError::NotFound { .. })
    ));
}

#[test]
fn a_manifest_torn_halfway_is_refused() {
    let (store, faulty) = faulty_memory();
    save(&store, 1).expect("save 1");
    faulty.set(Faults {
        tear_puts_to: Some("manifest.json".into()),
        ..Faults::default()
    });
    save(&store, 2).expect_err("the manifest put tears");
    let reader = Reader::new(store.clone());
    let err = reader.manifest(2).expect_err("a torn manifest");
    assert!(
        matches!(err, StorageError::BadManifest { .. })
            && err.to_string().contains("step-000000000002/manifest.json"),
        "{err}"
    );
    check(&reader, 1).expect("the previous checkpoint still reads");
    // A torn manifest commits nothing: retention keeping the newest two keeps 1 and 3, and
    // collects the torn prefix as abandoned.
    faulty.set(Faults::default());
    save(&store, 3).expect("save 3");
    let policy = Retention {
        keep_last: 2,
        keep_every: 0,
        grace_ms: 0,
    };
    let done = collect(&reader, policy, u64::MAX / 2, false, |_| true).expect("collect");
    assert_eq!((done.expired, done.abandoned), (vec![], vec![2]));
    assert_eq!(reader.committed().expect("list"), vec![1, 3]);
    check(&reader, 1).expect("step 1 kept");
}

/// A committed manifest with one byte changed (a digit of a chunk's offset: still a manifest
/// that parses and covers its tensors) is refused, named; its neighbours still read.
#[test]
fn a_manifest_with_one_flipped_byte_is_refused_with_its_name() {
    let store = Store::open("memory://sealed").expect("open");
    for step in [1, 2] {
        save(&store, step).expect("save");
    }
    let name = manifest_name(2);
    damage(&store, &name, |bytes| {
        let key = b"\"byte_offset\": ";
        let at = bytes
            .windows(key.len())
            .position(|w| w == key)
            .expect("a chunk's offset")
            + key.len();
        bytes[at] ^= 1;
    });
    let reader = Reader::new(store);
    let err = reader.manifest(2).expect_err("a damaged manifest");
    assert!(
        matches!(err, StorageError::BadManifest { .. })
            && err.to_string().contains(&name)
            && err.to_string().contains("do not match its digest"),
        "{err}"
    );
    check(&reader, 1).expect("the previous checkpoint still reads");
}

/// The shard object `rank` wrote for the checkpoint of `step`.
fn shard(store: &Store, step: u64, rank: usize) -> String {
    let m = Reader::new(store.clone())
        .manifest(step)
        .expect("the manifest");
    m.shard_of(rank).expect("the rank's shard").to_owned()
}

/// Replaces an object's bytes behind the store's back.
fn damage(store: &Store, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let path = store.path(name);
    let mut bytes = rt
        .block_on(async { store.inner.get(&path).await?.bytes().await })
        .expect("read the object")
        .to_vec();
    f(&mut bytes);
    rt.block_on(store.inner.put(&path, PutPayload::from(bytes)))
        .expect("write the object back");
}

#[test]
fn a_flipped_bit_or_a_truncated_shard_is_found_and_named() {
    for (what, harm) in [
        (
            "flipped bit",
            Box::new(|b: &mut Vec<u8>| b[100] ^= 0x10) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
        ),
    ] {
        let (store, _) = faulty_memory();
        save(&store, 1).expect("save 1");
        save(&store, 2).expect("save 2");
        damage(&store, &shard(&store, 2, 0), |b| harm(b));
        let reader = Reader::new(store.clone());
        let err = check(&reader, 2).expect_err(what);
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                StorageError::Corrupt { .. } | StorageError::Store { .. }
            ) && msg.contains("shard-r00000-"),
            "{what}: {msg}"
        );
        if let StorageError::Corrupt { tensor, .. } = &err {
            assert!(tensor == "a" || tensor == "b", "{what}: {msg}");
        }
        // Verification finds it too, and retention keeps the newest checkpoint that verifies.
        let m = reader.manifest(2).expect("the manifest itself is sound");
        assert!(reader.verify(&m).is_err(), "{what}");
        save(&store, 3).expect("save 3");
        damage(&store, &shard(&store, 3, 1), |b| harm(b));
        let policy = Retention {
            keep_last: 1,
            keep_every: 0,
            grace_ms: 0,
        };
        let done = collect(&reader, policy, u64::MAX / 2, false, |s| {
            reader.manifest(s).and_then(|m| reader.verify(&m)).is_ok()
        })
        .expect("collect");
        assert_eq!(done.newest_verified, Some(1), "{what}");
        assert_eq!(
            reader.committed().expect("list"),
            vec![1, 3],
            "{what}: kept the newest and the newest verified"
        );
        check(&reader, 1).expect("the verified checkpoint is whole");
    }
}

#[test]
fn a_manifest_of_an_unknown_version_or_a_missing_root_is_refused() {
    let (store, _) = faulty_memory();
    save(&store, 1).expect("save 1");
    damage(&store, &manifest_name(1), |b| {
        let text = String::from_utf8(b.clone())
            .expect("json")
            .replace("\"version\": 1", "\"version\": 99");
        *b = text.into_bytes();
    });
    let err = Reader::new(store.clone())
        .manifest(1)
        .expect_err("version 99");
    assert!(
        matches!(err, StorageError::UnknownVersion { version: 99, .. })
            && err
                .to_string()
                .contains("this build reads marathon-checkpoint version 1"),
        "{err}"
    );
    let err = Store::open("ftp://host/x").expect_err("unknown scheme");
    assert!(err.to_string().contains("unknown scheme ftp://"), "{err}");
}

#[test]
fn a_fenced_snapshot_persists_after_its_fence_and_a_failed_fence_writes_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = Store::open("memory://fenced").expect("open");
    for (step, fail) in [(1, false), (2, true)] {
        // Rank 0 waits for rank 1's shard only briefly when rank 1 is meant to fail.
        let opts = WriterOptions {
            commit_timeout: std::time::Duration::from_millis(if fail { 300 } else { 30_000 }),
            ..options()
        };
        let mut writers: Vec<CheckpointWriter> = (0..2)
            .map(|r| CheckpointWriter::new(store.clone(), r, 2, opts.clone()).expect("a writer"))
            .collect();
        let fenced = Arc::new(AtomicBool::new(false));
        for (r, w) in writers.iter_mut().enumerate().rev() {
            let (p, data) = pieces(r, step);
            let flag = fenced.clone();
            w.snapshot_fenced(step, serde_json::json!({ "step": step }), p, |buf| {
                buf.copy_from_slice(&data);
                // A device copy would still be running here; the persist must wait for it.
                Some(Box::new(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    flag.store(true, Ordering::SeqCst);
                    if fail && r == 1 {
                        Err("device copy failed".into())
                    } else {
                        Ok(())
                    }
                }))
            });
        }
        let one = writers[1].wait().expect("rank 1 ran");
        let zero = writers[0].wait().expect("rank 0 ran");
        assert!(fenced.load(Ordering::SeqCst));
        let reader = Reader::new(store.clone());
        if fail {
            let err = one.expect_err("a failed fence fails the persist");
            assert!(
                matches!(err, StorageError::Snapshot { step: 2, .. })
                    && err.to_string().contains("device copy failed"),
                "{err}"
            );
            let err = zero.expect_err("rank 0 cannot commit without rank 1's shard");
            assert!(matches!(err, StorageError::CommitTimeout { .. }), "{err}");
            assert_eq!(reader.committed().expect("list"), vec![1]);
        } else {
            one.expect("rank 1 persisted");
            assert!(zero.expect("rank 0 committed").committed.is_some());
            check(&reader, step).expect("the fenced checkpoint reads back");
        }
    }
}

/// The record decides each commit: a won claim is written and names the manifest's digest; a
/// fenced one and one taken by another writer leave no manifest of theirs.
#[test]
fn a_commit_record_decides_whether_the_manifest_is_written() {
    use marathon_storage::writer::{Claim, CommitRecord, Recorded};
    use std::sync::Mutex;
    let store = Store::open("memory://recorded").expect("open");
    let asked: Arc<Mutex<Vec<Claim>>> = Arc::default();
    let record = {
        let asked = asked.clone();
        CommitRecord(Arc::new(move |claim: &Claim| {
            asked.lock().expect("asked").push(claim.clone());
            Ok(match claim.step {
                1 => Recorded::Won,
                2 => Recorded::Fenced(format!("fenced at step {}", claim.step)),
                _ => Recorded::Taken(Claim {
                    writer: "another".into(),
                    ..claim.clone()
                }),
            })
        }))
    };
    let opts = WriterOptions {
        record: Some(record),
        epoch: Some(9),
        ..options()
    };
    for step in [1, 2, 3] {
        let mut writers: Vec<CheckpointWriter> = (0..2)
            .map(|r| CheckpointWriter::new(store.clone(), r, 2, opts.clone()).expect("a writer"))
            .collect();
        for (r, w) in writers.iter_mut().enumerate().rev() {
            let (p, data) = pieces(r, step);
            w.snapshot(step, serde_json::json!({ "step": step }), p, |buf| {
                buf.copy_from_slice(&data)
            });
        }
        writers[1]
            .wait()
            .expect("rank 1")
            .expect("rank 1 persisted");
        let zero = writers[0].wait().expect("rank 0");
        match step {
            1 => drop(zero.expect("step 1 is committed")),
            2 => {
                let e = zero.expect_err("step 2 is refused");
                assert!(
                    matches!(e, StorageError::Fenced { step: 2, .. })
                        && e.to_string().contains("fenced at step 2"),
                    "{e}"
                );
            }
            _ => {
                let e = zero.expect_err("step 3 was taken");
                assert!(
                    matches!(e, StorageError::AlreadyCommitted { step: 3, .. }),
                    "{e}"
                );
            }
        }
    }
    // Only the committing rank asks, once per commit, with its persist's epoch; the claim
    // that won names the manifest written. The refused steps have shards but no manifest.
    let asked = asked.lock().expect("asked");
    assert_eq!(
        asked.iter().map(|c| c.step).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(asked.iter().all(|c| c.epoch == 9));
    let reader = Reader::new(store);
    assert_eq!(reader.committed().expect("list"), vec![1]);
    let m = reader.manifest(1).expect("the manifest of step 1");
    assert_eq!(m.digest.as_deref(), Some(asked[0].digest.as_str()));
}

/// A second writer of a step that commits meanwhile (an elastic job's superseded generation
/// still persisting, with other values or another layout): it looks for the manifest before it
/// uploads, finds none, and its shard lands only after the first writer's checkpoint committed.
/// That checkpoint must still read back exactly, and the second writer must say so.
#[test]
fn a_second_writer_of_a_step_never_changes_its_committed_checkpoint() {
    let base = Store::open("memory://job").expect("open");
    let slow = Faults {
        delay: std::time::Duration::from_millis(400),
        ..Faults::default()
    };
    let slow = base.wrapped(Arc::new(FaultyStore::new(base.inner.clone(), slow, 5)));
    let mut late = CheckpointWriter::new(slow, 0, 2, options()).expect("a writer");
    let (p, data) = pieces(0, 2);
    late.snapshot(2, serde_json::json!({ "step": 2 }), p, |buf| {
        for (b, d) in buf.iter_mut().zip(&data) {
            *b = d + 1000.0;
        }
    });
    // The late writer found no manifest at 0.4 s; its shard lands from 1.2 s on.
    std::thread::sleep(std::time::Duration::from_millis(600));
    save(&base, 2).expect("the first writer commits");
    let err = late
        .wait()
        .expect("a persist ran")
        .expect_err("the step is committed");
    assert!(
        matches!(err, StorageError::AlreadyCommitted { step: 2, .. }),
        "{err}"
    );
    let reader = Reader::new(base.clone());
    check(&reader, 2).expect("the committed checkpoint reads back as it was written");
    let m = reader.manifest(2).expect("manifest");
    reader.verify(&m).expect("and verifies");
    // The late writer's shard, which no manifest names, goes at the next collection; what the
    // manifest names stays.
    let policy = Retention {
        keep_last: 1,
        keep_every: 0,
        grace_ms: 0,
    };
    let done = collect(&reader, policy, u64::MAX / 2, false, |_| true).expect("collect");
    assert_eq!(done.orphans.len(), 1, "{done:?}");
    assert!(done.orphans[0].starts_with("step-000000000002/shard-r00000-"));
    assert!(m.shard_of(0) != Some(done.orphans[0].as_str()));
    check(&reader, 2).expect("the checkpoint still reads back");
    let again = collect(&reader, policy, u64::MAX / 2, false, |_| true).expect("collect");
    assert!(again.orphans.is_empty(), "{again:?}");
}

/// A committer waiting for a rank that died (its shard never comes) gives up as soon as the job
/// moves on without it, not at the commit timeout: training waits for this persist at its next
/// snapshot, and an elastic job's newer generation would refuse the commit anyway.
#[test]
fn a_commit_waiting_for_a_dead_rank_gives_up_when_the_job_moves_on() {
    let (store, _) = faulty_memory();
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut opts = options();
    opts.commit_timeout = std::time::Duration::from_secs(600);
    opts.cancel = Some(cancel.clone());
    let mut rank0 = CheckpointWriter::new(store.clone(), 0, 2, opts).expect("a writer");
    let (p, data) = pieces(0, 1);
    rank0.snapshot(1, serde_json::json!({ "step": 1 }), p, |buf| {
        buf.copy_from_slice(&data)
    });
    // Rank 1 never writes. The job moves on after a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = rank0
        .wait()
        .expect("a persist ran")
        .expect_err("it cannot commit");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, StorageError::Fenced { step: 1, .. }) && err.to_string().contains("[1]"),
        "{err}"
    );
    assert!(Reader::new(store).committed().expect("list").is_empty());
}
