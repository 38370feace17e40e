//! Gradient synchronisation: the sums over replicas and over the tied embedding's two copies,
//! and the step's closing sums (loss, gradient norm, the stop and finish flags) over every
//! rank.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Trainer;
use crate::error::Result;

/// The closing sums before the pace: the loss and the norm (a high and a low f32 each), the
/// stop flag and the finish flag.
const SUMS: usize = 6;

impl Trainer {
    /// The sums of `v` over every rank of the job: over the tensor, then pipeline, then data
    /// groups.
    pub(super) fn sum_over_ranks<const N: usize>(&mut self, mut v: [f32; N]) -> Result<[f32; N]> {
        for g in [
            self.groups.tp.as_mut(),
            self.groups.pp.as_mut(),
            self.groups.dp.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            g.all_reduce(&mut v)?;
        }
        Ok(v)
    }

    /// Sums the gradients over replicas and the tied embedding's two copies, and the loss and
    /// squared gradient norm over every rank. Returns the summed loss, the range of the gradient
    /// buffer this rank updates (all of it, or its shard with the distributed optimizer), and
    /// the global gradient norm.
    /// `reduced` says the gradients were already all-reduced, overlapped with backward.
    /// `compute_ms` is this rank's compute time per microbatch in the step (not finite when it
    /// ran none); with [`Trainer::gather_pace`] every rank's rides in the closing sums.
    pub(super) fn sync_gradients(
        &mut self,
        loss_sum: f64,
        reduced: bool,
        compute_ms: f32,
    ) -> Result<(f64, std::ops::Range<usize>, f64)> {
        let zero = self.cfg.parallel.distributed_optimizer && self.groups.dp.is_some();
        let Trainer {
            model,
            engine,
            groups,
            stop_signal,
            stop_agreed,
            finish_signal,
            finish_agreed,
            norm_ranges,
            replicated,
            mirror,
            closing,
            pace,
            ..
        } = self;
        if let (false, Some(tp)) = (engine.deterministic(), groups.tp.as_mut()) {
            // Tensor-parallel rank 0's gradient of each replicated tensor for every rank, so
            // their copies never drift apart.
            engine.broadcast_grads(model, tp, replicated, 0)?;
        }
        let wte = model.layout.get("wte").map(|t| t.range());
        // The first and last stages each hold part of the tied embedding's gradient (input and
        // head); both need the sum. Summing before or after the replicas gives the same total.
        let mut tie = |engine: &mut Box<dyn crate::engine::Engine>,
                       model: &mut marathon_model::Gpt<f32>|
         -> Result<()> {
            if let (Some(emb), Some(wte)) = (groups.emb.as_mut(), wte.clone()) {
                engine.all_reduce_grads(model, emb, wte)?;
            }
            Ok(())
        };
        let n = model.layout.numel();
        let shard = match groups.dp.as_mut() {
            Some(dp) if zero => {
                tie(engine, model)?;
                let own = engine.reduce_scatter_grads(model, dp)?;
                if let Some(mirror) = mirror {
                    // The ring successor's reduced chunk, for the mirror of its moments; this
                    // chunk to the predecessor, for its mirror.
                    let (r, p) = (dp.rank(), dp.size());
                    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
                    let recv = mirror.shard.clone();
                    engine.send_recv_grads(model, dp, (own.clone(), prev), (recv, next))?;
                }
                own
            }
            dp => {
                if let (Some(dp), false) = (dp, reduced) {
                    engine.all_reduce_grads(model, dp, 0..n)?;
                }
                tie(engine, model)?;
                0..n
            }
        };
        // Each element of the model is counted by one rank of its model-parallel group, and
        // with the distributed optimizer by the one replica whose shard holds it.
        norm_ranges.clear();
        norm_ranges.extend(
            model
                .layout
                .unique_ranges()
                .iter()
                .map(|r| r.start.max(shard.start)..r.end.min(shard.end))
                .filter(|r| !r.is_empty()),
        );
        let own_sq = engine.grad_sum_squares(model, norm_ranges)?;
        // The loss is known to the last stage's ranks; one of them counts it.
        let place = groups.place();
        let loss_part = if place.tp_rank == 0 && place.stage + 1 == place.pp {
            loss_sum
        } else {
            0.0
        };
        // Each f64 travels as a high and a low f32, which keeps about 48 bits of the sum.
        let split = |x: f64| [x as f32, (x - (x as f32) as f64) as f32];
        let join = |hi: f32, lo: f32| hi as f64 + lo as f64;
        let ([l_hi, l_lo], [n_hi, n_lo]) = (split(loss_part), split(own_sq));
        let raised = |s: &Option<Arc<AtomicBool>>| {
            f32::from(s.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)))
        };
        let (stop, finish) = (raised(stop_signal), raised(finish_signal));
        // The six sums, then (with the pace gathered) one slot per rank, zero but its own.
        closing.clear();
        closing.extend([l_hi, l_lo, n_hi, n_lo, stop, finish]);
        if let Some(pace) = pace.as_ref() {
            closing.resize(SUMS + pace.len(), 0.0);
            closing[SUMS + groups.rank()] = compute_ms;
        }
        let totals = &mut closing[..];
        for g in [groups.tp.as_mut(), groups.pp.as_mut()]
            .into_iter()
            .flatten()
        {
            g.all_reduce(totals)?;
        }
        if let Some(dp) = groups.dp.as_mut() {
            // Replicas hold the same norm unless each holds a shard of the gradient.
            let norm = [totals[2], totals[3]];
            if !zero {
                totals[2..4].fill(0.0);
            }
            dp.all_reduce(totals)?;
            if !zero {
                totals[2..4].copy_from_slice(&norm);
            }
        }
        *stop_agreed = totals[4] > 0.0;
        *finish_agreed = totals[5] > 0.0;
        if let Some(pace) = pace.as_mut() {
            pace.copy_from_slice(&totals[SUMS..]);
        }
        let norm_sq = join(totals[2], totals[3]);
        Ok((join(totals[0], totals[1]), shard, norm_sq.sqrt()))
    }
}
