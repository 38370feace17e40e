//! One step: the data this replica feeds, its microbatches through this stage in Megatron's
//! 1F1B order, and the update; validation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use marathon_model::Place;

use super::Trainer;
use crate::comm::{chunk_range, ProcessGroup};
use crate::error::{Result, RuntimeError};
use crate::groups::TensorGroup;
use crate::records::{unix_ms, StepRecord, StepTimes};

/// `train.samples_log`, open on the rank that logs for its replica, and the sample ids it fed
/// in the step running.
#[derive(Debug)]
pub(super) struct SamplesLog {
    file: File,
    fed: Vec<u64>,
}

impl Trainer {
    /// Opens `train.samples_log` for appending on the rank that logs for its replica (the first
    /// stage's first tensor rank); closes it on the others.
    pub(super) fn open_samples_log(&mut self) -> Result<()> {
        let place = self.groups.place();
        self.samples_log = None;
        let writes = place.tp_rank == 0 && place.stage == 0;
        if let (Some(p), true) = (&self.cfg.train.samples_log, writes) {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| RuntimeError::io("open the samples log", p, e))?;
            self.samples_log = Some(SamplesLog {
                file,
                fed: Vec::new(),
            });
        }
        Ok(())
    }

    /// Runs one optimizer step. With `train.samples_log`, the samples this replica will feed
    /// are logged before any of its gradients leave it: a replica that dies after sending them
    /// has its samples in a step the others apply, and its line must already be there. A step
    /// that completes checks that what it fed is what it logged.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        if self.samples_log.is_none() {
            return self.step_once();
        }
        let planned = self.replica_samples();
        let line = serde_json::json!({
            "generation": self.generation,
            "step": self.step + 1,
            "replica": self.groups.place().replica,
            "samples": &planned,
        });
        let log = self.samples_log.as_mut().expect("checked above");
        // One write per line: appends from several processes stay whole lines.
        if let Err(e) = log.file.write_all(format!("{line}\n").as_bytes()) {
            let path = self.cfg.train.samples_log.clone().unwrap_or_default();
            return Err(RuntimeError::io("append to the samples log", path, e));
        }
        let done = self.step_once();
        let log = self.samples_log.as_mut().expect("still open");
        let fed = std::mem::take(&mut log.fed);
        if done.is_ok() {
            assert_eq!(
                fed, planned,
                "step {}: the samples fed are not those logged",
                self.step
            );
        }
        done
    }

    /// The ids of the samples this replica feeds in the next step, in the order it feeds them.
    fn replica_samples(&mut self) -> Vec<u64> {
        let mb = self.cfg.batch.micro_batch;
        let micro_steps = self.next_batch() as usize / mb;
        let place = self.groups.place();
        let first = self.consumed_samples;
        chunk_range(micro_steps, place.dp, place.replica)
            .flat_map(|m| m * mb..(m + 1) * mb)
            .map(|j| self.order.sample(first + j as u64) as u64)
            .collect()
    }

    fn step_once(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let batch = self.next_batch();
        let micro_steps = batch as usize / mb;
        let dloss = 1.0 / (batch as f32 * seq as f32);
        self.engine.zero_grad(&mut self.model)?;
        // This replica's microbatches: a contiguous run, one more on the first replicas when
        // they do not divide evenly. Which replica runs a microbatch changes nothing else.
        let place = self.groups.place();
        // Without the distributed optimizer, the last microbatch's backward overlaps with the
        // all-reduce of the gradient buckets it has finished.
        let overlap = self.groups.dp.is_some() && !self.cfg.parallel.distributed_optimizer;
        let mine = chunk_range(micro_steps, place.dp, place.replica);
        let mut times = StepTimes::default();
        self.pipeline(mine.clone(), dloss, overlap, &mut times)?;
        let loss_sum = self.engine.loss_sum()?;
        crate::moments::reach(crate::moments::Moment::MidStep);
        let sync_started = Instant::now();
        if let (true, true, Some(group)) = (overlap, mine.is_empty(), &mut self.groups.dp) {
            // No backward to overlap with; reduce the same buckets in the same order as the
            // replicas that have one, since collectives pair up by order.
            for bucket in self.model.layout.backward_buckets() {
                self.engine
                    .all_reduce_grads(&mut self.model, group, bucket)?;
            }
        }
        let waits = times.pipeline_wait + times.tp_comm + times.comm_wait;
        let compute = sync_started.duration_since(started).saturating_sub(waits);
        let compute_ms = (compute.as_secs_f64() * 1e3 / mine.len() as f64) as f32;
        let (loss_sum, shard, grad_norm) = self.sync_gradients(loss_sum, overlap, compute_ms)?;
        let loss = (loss_sum / micro_steps as f64) as f32;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            // Refuse the update: the parameters stay those of the last good step.
            return Err(RuntimeError::Diverged {
                step: self.step + 1,
                loss,
                grad_norm,
            });
        }
        let tokens_consumed = (self.consumed_samples + batch) * seq as u64;
        let lr = self.cfg.optim.lr.lr_at(tokens_consumed);
        let clip = self.cfg.optim.grad_clip;
        self.engine
            .update(&mut self.model, &mut self.opt, shard, lr, grad_norm, clip)?;
        if let Some(mirror) = self.mirror.as_mut() {
            // The successor's chunk, as the successor updates it: same gradient, same norm.
            let r = mirror.shard.clone();
            self.engine
                .update(&mut self.model, mirror, r, lr, grad_norm, clip)?;
        }
        if self.cfg.parallel.distributed_optimizer {
            // Until the all-gather completes, this rank's chunks are a step ahead of the rest,
            // and the step's record is the one as it stands now: a generation that carries the
            // step forward after the all-gather failed logs this one.
            self.pending = Some((self.step + 1, self.consumed_samples + batch));
            self.last_record = Some(self.record(started, batch, loss, lr, grad_norm, &times));
        }
        if let (Some(g), true) = (&mut self.groups.dp, self.cfg.parallel.distributed_optimizer) {
            self.engine.all_gather_params(&mut self.model, g)?;
        }
        if self.groups.dp.is_some() || self.groups.pp.is_some() || self.groups.tp.is_some() {
            times.comm_wait += sync_started.elapsed();
        }
        self.finish_step(started, batch, loss, lr, grad_norm, times)
    }

    /// Closes a step whose update is applied: advances the data order and the step count, and
    /// records the step (returned, and written to the metrics).
    fn finish_step(
        &mut self,
        started: Instant,
        batch: u64,
        loss: f32,
        lr: f64,
        grad_norm: f64,
        times: StepTimes,
    ) -> Result<StepRecord> {
        let rec = self.record(started, batch, loss, lr, grad_norm, &times);
        self.consumed_samples += batch;
        self.step += 1;
        self.pending = None;
        self.last_record = Some(rec.clone());
        self.log_step(&rec)?;
        Ok(rec)
    }

    /// The record of the step after `self.step`, which started at `started`.
    fn record(
        &self,
        started: Instant,
        batch: u64,
        loss: f32,
        lr: f64,
        grad_norm: f64,
        times: &StepTimes,
    ) -> StepRecord {
        let seq = self.cfg.batch.seq_len as u64;
        let step_ms = started.elapsed().as_secs_f64() * 1e3;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        StepRecord {
            step: self.step + 1,
            loss,
            lr,
            grad_norm,
            batch,
            tokens_consumed: (self.consumed_samples + batch) * seq,
            step_ms,
            tokens_per_s: (batch * seq) as f64 / (step_ms / 1e3),
            comm_wait_ms: ms(times.comm_wait),
            comm_overlapped_ms: ms(times.comm_overlapped),
            tp_comm_ms: ms(times.tp_comm),
            pipeline_wait_ms: ms(times.pipeline_wait),
            at_ms: unix_ms(),
        }
    }

    /// Writes a step's record to the metrics (on the rank that writes them) and notes it as
    /// the last logged.
    pub(super) fn log_step(&mut self, rec: &StepRecord) -> Result<()> {
        if self.metrics.is_some() {
            self.write_metric(&serde_json::json!({ "kind": "step", "data": rec }))?;
            self.logged_step = Some(rec.step);
        }
        Ok(())
    }

    /// Fills the input and target buffers with microbatch `m` of the current step.
    fn load_microbatch(&mut self, m: usize) {
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let first = self.consumed_samples + (m * mb) as u64;
        for j in 0..mb {
            let k = self.order.sample(first + j as u64);
            if let Some(log) = self.samples_log.as_mut() {
                log.fed.push(k as u64);
            }
            let r = j * seq..(j + 1) * seq;
            self.train
                .sample(k, &mut self.inputs[r.clone()], &mut self.targets[r]);
        }
    }

    /// Runs this replica's microbatches `mine` through this stage in Megatron's 1F1B order:
    /// warm-up forwards (one per later stage), then one forward and one backward at a time,
    /// then the remaining backwards. Neighbouring stages exchange activations and gradients,
    /// pairing a send with the matching receive where both sides send at once. The last
    /// stage's engine sums the microbatches' mean losses.
    fn pipeline(
        &mut self,
        mine: std::ops::Range<usize>,
        dloss: f32,
        overlap: bool,
        times: &mut StepTimes,
    ) -> Result<()> {
        let Place {
            stage, pp: stages, ..
        } = self.groups.place();
        let (first, last) = (stage == 0, stage + 1 == stages);
        let count = mine.len();
        let warmup = (stages - stage - 1).min(count);
        // A stage keeps one microbatch in flight per later stage, plus its own.
        let slots = stages - stage;
        let (mut next_fwd, mut next_bwd) = (0, 0);
        // Each call runs the next forward (or backward) of this stage and does its sends.
        for i in 0..count + count {
            // The op order of 1F1B: `warmup` forwards, then alternate, then backwards.
            let forward = if i < warmup {
                true
            } else if next_fwd < count {
                (i - warmup) % 2 == 0
            } else {
                false
            };
            if forward {
                let m = next_fwd;
                next_fwd += 1;
                self.load_microbatch(mine.start + m);
                if !first && m <= warmup {
                    // Warm-up forwards, and the first steady one, receive on their own; the
                    // later ones arrived with the previous backward's send.
                    let act_in = &mut self.act_in;
                    pipe(&mut self.groups.pp, times, |pp| pp.recv(act_in, stage - 1))?;
                }
                let slot = m % slots;
                let mut tp = TensorGroup {
                    group: self.groups.tp.as_mut(),
                    busy: Duration::ZERO,
                };
                let input = (!first).then_some(&self.act_in[..]);
                self.engine.forward(
                    &mut self.model,
                    slot,
                    &self.inputs,
                    &self.targets,
                    input,
                    dloss,
                    &mut tp,
                )?;
                times.tp_comm += tp.busy;
                if !last {
                    let out = self.engine.stage_output(&self.model, slot)?;
                    let grad_in = &mut self.grad_in;
                    if m < warmup {
                        pipe(&mut self.groups.pp, times, |pp| pp.send(out, stage + 1))?;
                    } else {
                        // Steady state: the next stage sends this stage a gradient while
                        // this stage sends it an activation.
                        pipe(&mut self.groups.pp, times, |pp| {
                            pp.send_recv(out, stage + 1, grad_in, stage + 1)
                        })?;
                    }
                }
            } else {
                let m = next_bwd;
                next_bwd += 1;
                if !last && m + warmup >= count {
                    // Cool-down backwards receive on their own.
                    let grad_in = &mut self.grad_in;
                    pipe(&mut self.groups.pp, times, |pp| pp.recv(grad_in, stage + 1))?;
                }
                let slot = m % slots;
                let final_backward = m + 1 == count;
                let output_grad = (!last).then_some(&self.grad_in[..]);
                let mut tp = TensorGroup {
                    group: self.groups.tp.as_mut(),
                    busy: Duration::ZERO,
                };
                let dp = self
                    .groups
                    .dp
                    .as_mut()
                    .filter(|_| overlap && final_backward);
                self.engine.backward(
                    &mut self.model,
                    slot,
                    dloss,
                    output_grad,
                    &mut tp,
                    dp,
                    times,
                )?;
                times.tp_comm += tp.busy;
                if !first {
                    let grad = self.engine.input_grad(&self.model)?;
                    let act_in = &mut self.act_in;
                    if next_fwd < count {
                        // Steady state: the previous stage sends the next activation meanwhile.
                        pipe(&mut self.groups.pp, times, |pp| {
                            pp.send_recv(grad, stage - 1, act_in, stage - 1)
                        })?;
                    } else {
                        pipe(&mut self.groups.pp, times, |pp| pp.send(grad, stage - 1))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Mean loss over the first `train.eval_batches` microbatches of the validation file, in
    /// file order, run through the pipeline's stages. Every rank returns the same value. Leaves
    /// the gradients untouched.
    pub fn evaluate(&mut self) -> Result<Option<f32>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let batches = self
            .cfg
            .train
            .eval_batches
            .min(val.samples(seq) / mb)
            .max(1);
        let Place {
            stage, pp: stages, ..
        } = self.groups.place();
        self.engine.reset_loss()?;
        for b in 0..batches {
            for j in 0..mb {
                let r = j * seq..(j + 1) * seq;
                val.sample(
                    b * mb + j,
                    &mut self.inputs[r.clone()],
                    &mut self.targets[r],
                );
            }
            if stage > 0 {
                let pp = self
                    .groups
                    .pp
                    .as_mut()
                    .expect("stages have a pipeline group");
                pp.recv(&mut self.act_in, stage - 1)?;
            }
            let mut tp = TensorGroup {
                group: self.groups.tp.as_mut(),
                busy: Duration::ZERO,
            };
            let input = (stage > 0).then_some(&self.act_in[..]);
            self.engine.forward(
                &mut self.model,
                0,
                &self.inputs,
                &self.targets,
                input,
                0.0,
                &mut tp,
            )?;
            if stage + 1 < stages {
                let pp = self
                    .groups
                    .pp
                    .as_mut()
                    .expect("stages have a pipeline group");
                pp.send(self.engine.stage_output(&self.model, 0)?, stage + 1)?;
            }
        }
        let mut sum = self.engine.loss_sum()?;
        if let Some(pp) = self.groups.pp.as_mut() {
            // The last stage has the loss; the others learn it (as a high and a low part).
            let part = if stage + 1 == stages { sum } else { 0.0 };
            let mut v = [part as f32, (part - (part as f32) as f64) as f32];
            pp.all_reduce(&mut v)?;
            sum = v[0] as f64 + v[1] as f64;
        }
        let loss = (sum / batches as f64) as f32;
        self.write_metric(
            &serde_json::json!({ "kind": "eval", "data": { "step": self.step, "val_loss": loss } }),
        )?;
        Ok(Some(loss))
    }
}

/// Runs one transfer between neighbouring pipeline stages, adding its time to the step's
/// pipeline wait.
fn pipe(
    pp: &mut Option<ProcessGroup>,
    times: &mut StepTimes,
    op: impl FnOnce(&mut ProcessGroup) -> Result<()>,
) -> Result<()> {
    let pp = pp.as_mut().expect("stages have a pipeline group");
    let t0 = Instant::now();
    let done = op(pp);
    times.pipeline_wait += t0.elapsed();
    done
}
