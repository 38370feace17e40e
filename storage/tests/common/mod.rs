//! Helpers shared by the storage tests: a tiny two-rank checkpoint and its expected values.
#![allow(dead_code)]

use std::time::Duration;

use marathon_storage::codec::Codec;
use marathon_storage::{CheckpointWriter, Piece, Reader, Store, TensorBox, WriterOptions};

/// Tensor `a` is (10, 12), `b` is (7); rank 0 writes rows 0..5 of `a` and all of `b`, rank 1
/// rows 5..10 of `a`.
pub const A: [u64; 2] = [10, 12];
pub const B: [u64; 1] = [7];

pub fn a_value(i: usize, step: u64) -> f32 {
    (i as f32 * 0.37).sin() * 0.02 + step as f32
}

pub fn b_value(i: usize, step: u64) -> f32 {
    i as f32 - step as f32
}

pub fn options() -> WriterOptions {
    WriterOptions {
        codec: Codec::ZstdShuffle4,
        level: 3,
        // 16 values a chunk: every piece spans several chunks.
        chunk_bytes: 64,
        commit_timeout: Duration::from_secs(30),
        // These tests write one step at a time: on a store that ignores create-only puts
        // (Garage), the writer checks for a manifest before it writes its own.
        single_writer: true,
        ..WriterOptions::default()
    }
}

/// The pieces of `rank` of two, and a filler for them.
pub fn pieces(rank: usize, step: u64) -> (Vec<Piece>, Vec<f32>) {
    let rows = if rank == 0 { 0..5u64 } else { 5..10 };
    let mut pieces = vec![Piece {
        tensor: "a".into(),
        shape: A.to_vec(),
        region: TensorBox {
            offset: vec![rows.start, 0],
            size: vec![5, 12],
        },
    }];
    let mut data: Vec<f32> = (rows.start as usize * 12..rows.end as usize * 12)
        .map(|i| a_value(i, step))
        .collect();
    if rank == 0 {
        pieces.push(Piece {
            tensor: "b".into(),
            shape: B.to_vec(),
            region: TensorBox::whole(&B),
        });
        data.extend((0..7).map(|i| b_value(i, step)));
    }
    (pieces, data)
}

/// Writes and commits step `step` from two ranks; returns rank 0's result.
pub fn save(store: &Store, step: u64) -> marathon_storage::Result<()> {
    let mut writers: Vec<CheckpointWriter> = (0..2)
        .map(|r| CheckpointWriter::new(store.clone(), r, 2, options()).expect("a writer"))
        .collect();
    for (r, w) in writers.iter_mut().enumerate().rev() {
        let (p, data) = pieces(r, step);
        let report = w.snapshot(step, serde_json::json!({ "step": step }), p, |buf| {
            buf.copy_from_slice(&data)
        });
        assert!(report.previous.is_none());
    }
    let one = writers[1].wait().expect("rank 1 persisted");
    let zero = writers[0].wait().expect("rank 0 persisted");
    one?;
    let report = zero?;
    assert!(report.committed.is_some(), "rank 0 commits");
    Ok(())
}

/// Reads all of `a` and `b` of `step` back and checks every value.
pub fn check(reader: &Reader, step: u64) -> marathon_storage::Result<()> {
    let m = reader.manifest(step)?;
    let mut a = vec![0f32; 120];
    reader.read_box(&m, "a", &TensorBox::whole(&A), &mut a)?;
    assert!(
        a.iter().enumerate().all(|(i, &v)| v == a_value(i, step)),
        "a of step {step}"
    );
    let mut b = vec![0f32; 7];
    reader.read_box(&m, "b", &TensorBox::whole(&B), &mut b)?;
    assert!(
        b.iter().enumerate().all(|(i, &v)| v == b_value(i, step)),
        "b of step {step}"
    );
    // A box across both ranks' rows and several chunks.
    let region = TensorBox {
        offset: vec![3, 5],
        size: vec![4, 6],
    };
    let mut part = vec![0f32; 24];
    reader.read_box(&m, "a", &region, &mut part)?;
    for r in 0..4 {
        for c in 0..6 {
            assert_eq!(part[r * 6 + c], a_value((3 + r) * 12 + 5 + c, step));
        }
    }
    Ok(())
}
