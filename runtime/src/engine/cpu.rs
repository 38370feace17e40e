//! The CPU engine: the host model computes in place, in fp32, bitwise reproducible at any
//! thread count. The reference every other engine is checked against.

use std::ops::Range;
use std::time::{Duration, Instant};

use marathon_model::optim::{clip_grads, sum_squares};
use marathon_model::{AdamW, Gpt};
use marathon_storage::writer::SnapshotReport;
use marathon_storage::CheckpointWriter;
use rayon::prelude::*;

use super::{Engine, Piece};
use crate::checkpoint::Source;
use crate::comm::ProcessGroup;
use crate::error::Result;
use crate::groups::TensorGroup;
use crate::records::StepTimes;

/// Elements per block of the checkpoint snapshot's parallel copy (1 MiB).
const COPY_BLOCK: usize = 1 << 18;

/// The host model as the engine: it holds nothing but the step's loss sum.
#[derive(Debug, Default)]
pub struct CpuEngine {
    loss_sum: f64,
}

impl Engine for CpuEngine {
    fn zero_grad(&mut self, model: &mut Gpt<f32>) -> Result<()> {
        model.zero_grad();
        self.loss_sum = 0.0;
        Ok(())
    }

    fn forward(
        &mut self,
        model: &mut Gpt<f32>,
        slot: usize,
        tokens: &[u32],
        targets: &[u32],
        input: Option<&[f32]>,
        _dloss: f32,
        tp: &mut TensorGroup,
    ) -> Result<()> {
        let loss = model.forward_stage(slot, tokens, targets, input, tp)?;
        self.loss_sum += loss.map_or(0.0, |l| l as f64);
        Ok(())
    }

    fn loss_sum(&mut self) -> Result<f64> {
        Ok(self.loss_sum)
    }

    fn reset_loss(&mut self) -> Result<()> {
        self.loss_sum = 0.0;
        Ok(())
    }

    fn stage_output<'a>(&'a mut self, model: &'a Gpt<f32>, slot: usize) -> Result<&'a [f32]> {
        Ok(model.stage_output(slot))
    }

    /// With `overlap`, each finished gradient bucket is all-reduced on a communication thread
    /// while backward goes on with the layers below; the step then waits only for the last
    /// buckets.
    fn backward(
        &mut self,
        model: &mut Gpt<f32>,
        slot: usize,
        dloss: f32,
        output_grad: Option<&[f32]>,
        tp: &mut TensorGroup,
        overlap: Option<&mut ProcessGroup>,
        times: &mut StepTimes,
    ) -> Result<()> {
        let mut grads = std::mem::take(&mut model.grads);
        let result = match overlap {
            Some(dp) => std::thread::scope(|s| {
                let (buckets, ready) = std::sync::mpsc::channel::<&mut [f32]>();
                let comm = s.spawn(move || -> Result<Duration> {
                    let mut busy = Duration::ZERO;
                    for bucket in ready {
                        let t0 = Instant::now();
                        dp.all_reduce(bucket)?;
                        busy += t0.elapsed();
                    }
                    Ok(busy)
                });
                let done = model.backward_stage(slot, &mut grads, dloss, output_grad, tp, |b| {
                    // After a failed all-reduce the receiver is gone; the error comes from join.
                    let _ = buckets.send(b);
                });
                drop(buckets);
                let waiting = Instant::now();
                let busy = comm
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                done?;
                times.comm_overlapped += busy?;
                times.comm_wait += waiting.elapsed();
                Ok(())
            }),
            None => model.backward_stage(slot, &mut grads, dloss, output_grad, tp, |_| {}),
        };
        model.grads = grads;
        result
    }

    fn input_grad<'a>(&'a mut self, model: &'a Gpt<f32>) -> Result<&'a [f32]> {
        Ok(model.input_grad())
    }

    fn all_reduce_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        range: Range<usize>,
    ) -> Result<()> {
        group.all_reduce(&mut model.grads[range])
    }

    fn broadcast_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        ranges: &[Range<usize>],
        root: usize,
    ) -> Result<()> {
        for r in ranges {
            group.broadcast(&mut model.grads[r.clone()], root)?;
        }
        Ok(())
    }

    fn reduce_scatter_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
    ) -> Result<Range<usize>> {
        group.reduce_scatter(&mut model.grads)
    }

    fn send_recv_grads(
        &mut self,
        model: &mut Gpt<f32>,
        group: &mut ProcessGroup,
        (send, to): (Range<usize>, usize),
        (recv, from): (Range<usize>, usize),
    ) -> Result<()> {
        let (out, into) = disjoint(&mut model.grads, send, recv);
        group.send_recv(out, to, into, from)
    }

    fn grad_sum_squares(&mut self, model: &Gpt<f32>, ranges: &[Range<usize>]) -> Result<f64> {
        Ok(ranges
            .iter()
            .map(|r| sum_squares(&model.grads[r.clone()]))
            .sum())
    }

    fn update(
        &mut self,
        model: &mut Gpt<f32>,
        opt: &mut AdamW<f32>,
        shard: Range<usize>,
        lr: f64,
        grad_norm: f64,
        max_norm: f64,
    ) -> Result<()> {
        let grads = &mut model.grads[shard.clone()];
        clip_grads(grads, grad_norm, max_norm);
        opt.update(&mut model.params[shard], grads, lr);
        Ok(())
    }

    fn all_gather_params(&mut self, model: &mut Gpt<f32>, group: &mut ProcessGroup) -> Result<()> {
        group.all_gather(&mut model.params)
    }

    fn fetch_state(&mut self, _model: &mut Gpt<f32>, _opt: &mut AdamW<f32>) -> Result<()> {
        Ok(())
    }

    fn push_state(&mut self, _model: &Gpt<f32>, _opt: &AdamW<f32>) -> Result<()> {
        Ok(())
    }

    fn snapshot(
        &mut self,
        model: &Gpt<f32>,
        opt: &AdamW<f32>,
        writer: &mut CheckpointWriter,
        step: u64,
        run: serde_json::Value,
        pieces: &[Piece],
    ) -> Result<SnapshotReport> {
        let (params, m, v) = (&model.params, &opt.m, &opt.v);
        Ok(writer.snapshot(
            step,
            run,
            pieces.iter().map(|(p, _, _)| p.clone()).collect(),
            |buf| {
                // Training waits for this copy, so it uses every core: each piece's
                // destination, copied in blocks in parallel.
                let mut jobs: Vec<(&mut [f32], &[f32])> = Vec::with_capacity(pieces.len());
                let mut rest = buf;
                for (_, source, r) in pieces {
                    let (dst, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
                    let src = match source {
                        Source::Params => &params[r.clone()],
                        Source::AdamM => &m[r.clone()],
                        Source::AdamV => &v[r.clone()],
                    };
                    jobs.push((dst, src));
                    rest = tail;
                }
                jobs.into_par_iter().for_each(|(dst, src)| {
                    dst.par_chunks_mut(COPY_BLOCK)
                        .zip(src.par_chunks(COPY_BLOCK))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                });
            },
        ))
    }
}

/// `a` of `buf` to read and `b` to write, two ranges that do not overlap.
fn disjoint(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "{a:?} and {b:?} overlap"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}
