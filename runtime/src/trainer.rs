//! The single-process trainer: the step loop, validation and metrics.
//!
//! One step takes the global batch the schedule gives, runs it as microbatches through forward
//! and backward with every position's loss weighted by 1 / (tokens in the global batch), clips
//! the global gradient norm, and applies AdamW at the learning rate of the tokens consumed.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use marathon_model::optim::{clip_grads, sum_squares};
use marathon_model::{AdamW, BatchRamp, Gpt};
use serde::{Deserialize, Serialize};

use crate::comm::{chunk_range, ProcessGroup};
use crate::config::TrainConfig;
use crate::data::{DataOrder, TokenFile};
use crate::{Result, RuntimeError};

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean loss over the global batch.
    pub loss: f32,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub batch: u64,
    /// Tokens consumed by all steps up to and including this one.
    pub tokens_consumed: u64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Time the step waited on collectives (data-parallel gradient and loss sums, the
    /// distributed optimizer's gather): communication not hidden behind compute.
    #[serde(default)]
    pub comm_wait_ms: f64,
    /// Time collectives ran on the communication thread while backward went on.
    #[serde(default)]
    pub comm_overlapped_ms: f64,
}

/// Receives progress; `ops` draws it.
pub trait Observer {
    fn on_step(&mut self, _rec: &StepRecord) {}
    fn on_eval(&mut self, _step: u64, _val_loss: f32) {}
}

/// The end of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f32,
    pub final_val_loss: Option<f32>,
    pub tokens_consumed: u64,
    pub elapsed_s: f64,
}

#[derive(Debug)]
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Gpt<f32>,
    pub opt: AdamW<f32>,
    train: TokenFile,
    val: Option<TokenFile>,
    order: DataOrder,
    ramp: BatchRamp,
    /// Steps completed.
    pub step: u64,
    /// Samples consumed by the completed steps: the data order's position.
    pub consumed_samples: u64,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    metrics: Option<BufWriter<File>>,
    /// The data-parallel group, when this trainer is one replica of several.
    group: Option<ProcessGroup>,
}

impl Trainer {
    /// Opens the data, checks it against the configuration, and builds the model with fresh
    /// weights from `train.seed`, in one process (`parallel.dp` must be 1).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        Self::with_group(cfg, None)
    }

    /// As [`Trainer::new`], as one data-parallel replica of `group`, whose size must be
    /// `parallel.dp`. Every replica starts from the same weights and ends each step with the
    /// same ones.
    pub fn with_group(cfg: TrainConfig, group: Option<ProcessGroup>) -> Result<Self> {
        let layout = cfg.parallel;
        let replicas = group.as_ref().map_or(1, |g| g.size());
        if replicas != layout.dp {
            return Err(RuntimeError::Config {
                path: cfg.source.clone(),
                field: "parallel.dp".into(),
                reason: format!(
                    "{} needs {} data-parallel worker processes, but this trainer is one of \
                     {replicas}; `marathon train` starts the workers",
                    layout.dp, layout.dp
                ),
            });
        }
        let (train, val) = preflight(&cfg)?;
        let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
        let order = DataOrder::new(cfg.data.seed, train.samples(seq));
        let mut model = Gpt::new(cfg.model.clone(), mb, seq).map_err(|e| cfg.error(e))?;
        model.init_params(cfg.train.seed, cfg.optim.init_std);
        let rank = group.as_ref().map_or(0, |g| g.rank());
        let shard = if layout.distributed_optimizer {
            chunk_range(model.layout.numel(), replicas, rank)
        } else {
            0..model.layout.numel()
        };
        let opt = AdamW::for_shard(cfg.optim.adamw(), &model.layout, shard);
        // One replica writes the metrics: the others hold the same numbers.
        let metrics = match &cfg.train.metrics {
            Some(p) if rank == 0 => Some(open_metrics(p)?),
            _ => None,
        };
        let ramp = cfg.batch_ramp();
        Ok(Trainer {
            cfg,
            model,
            opt,
            train,
            val,
            order,
            ramp,
            step: 0,
            consumed_samples: 0,
            inputs: vec![0; mb * seq],
            targets: vec![0; mb * seq],
            metrics,
            group,
        })
    }

    /// Positions the trainer after `step` completed steps, as a resumed run is: the data order
    /// and both schedules continue from there. Parameters and optimizer state (including
    /// `opt.step`) are the caller's to restore, from a checkpoint or a peer.
    pub fn seek(&mut self, step: u64) {
        self.step = step;
        self.consumed_samples = self.ramp.consumed_before(step);
    }

    /// The global batch, in sequences, of the next step.
    pub fn next_batch(&self) -> u64 {
        self.ramp.batch_at(self.consumed_samples)
    }

    /// Runs one optimizer step.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let (mb, seq) = (self.cfg.batch.micro_batch, self.cfg.batch.seq_len);
        let batch = self.next_batch();
        let micro_steps = batch as usize / mb;
        let dloss = 1.0 / (batch as f32 * seq as f32);
        self.model.zero_grad();
        let mut loss_sum = 0.0f64;
        // This replica's microbatches: a contiguous run, one more on the first replicas when
        // they do not divide evenly. Which replica runs a microbatch changes nothing else.
        let (replica, replicas) = self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.size()));
        // Without the distributed optimizer, the last microbatch's backward overlaps with the
        // all-reduce of the gradient buckets it has finished.
        let overlap = self.group.is_some() && !self.cfg.parallel.distributed_optimizer;
        let mine = chunk_range(micro_steps, replicas, replica);
        let (mut comm_wait, mut comm_overlapped) = (Duration::ZERO, Duration::ZERO);
        for m in mine.clone() {
            let first = self.consumed_samples + (m * mb) as u64;
            for j in 0..mb {
                let k = self.order.sample(first + j as u64);
                let r = j * seq..(j + 1) * seq;
                self.train
                    .sample(k, &mut self.inputs[r.clone()], &mut self.targets[r]);
            }
            loss_sum += self.model.forward(&self.inputs, &self.targets) as f64;
            if overlap && m + 1 == mine.end {
                let (wait, overlapped) = self.backward_overlapped(dloss)?;
                comm_wait += wait;
                comm_overlapped += overlapped;
            } else {
                self.model.backward(dloss);
            }
        }
        let sync_started = Instant::now();
        if overlap && mine.is_empty() {
            // No backward to overlap with; reduce the same buckets in the same order as the
            // replicas that have one, since collectives pair up by order.
            let group = self.group.as_mut().expect("overlap needs a group");
            for bucket in self.model.layout.backward_buckets() {
                group.all_reduce(&mut self.model.grads[bucket])?;
            }
        }
        let (loss_sum, shard, grad_norm) = self.sync_gradients(loss_sum, overlap)?;
        if self.group.is_some() {
            comm_wait += sync_started.elapsed();
        }
        let loss = (loss_sum / micro_steps as f64) as f32;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            // Refuse the update: the parameters stay those of the last good step.
            return Err(RuntimeError::Diverged {
                step: self.step + 1,
                loss,
                grad_norm,
            });
        }
        let grads = &mut self.model.grads[shard.clone()];
        clip_grads(grads, grad_norm, self.cfg.optim.grad_clip);
        let tokens_consumed = (self.consumed_samples + batch) * seq as u64;
        let lr = self.cfg.optim.lr.lr_at(tokens_consumed);
        self.opt.update(&mut self.model.params[shard], grads, lr);
        if let (Some(g), true) = (&mut self.group, self.cfg.parallel.distributed_optimizer) {
            let gather_started = Instant::now();
            g.all_gather(&mut self.model.params)?;
            comm_wait += gather_started.elapsed();
        }
        self.consumed_samples += batch;
        self.step += 1;
        let step_ms = started.elapsed().as_secs_f64() * 1e3;
        let rec = StepRecord {
            step: self.step,
            loss,
            lr,
            grad_norm,
            batch,
            tokens_consumed,
            step_ms,
            tokens_per_s: (batch * seq as u64) as f64 / (step_ms / 1e3),
            comm_wait_ms: comm_wait.as_secs_f64() * 1e3,
            comm_overlapped_ms: comm_overlapped.as_secs_f64() * 1e3,
        };
        self.write_metric(&serde_json::json!({ "kind": "step", "data": &rec }))?;
        Ok(rec)
    }

    /// Sums the replicas' losses and gradients. Returns the summed loss, the range of the
    /// gradient buffer this replica updates (all of it, or its shard with the distributed
    /// optimizer), and the global gradient norm.
    /// `reduced` says the gradients were already all-reduced, overlapped with backward.
    fn sync_gradients(
        &mut self,
        loss_sum: f64,
        reduced: bool,
    ) -> Result<(f64, std::ops::Range<usize>, f64)> {
        let grads = &mut self.model.grads;
        let Some(g) = &mut self.group else {
            return Ok((loss_sum, 0..grads.len(), sum_squares(grads).sqrt()));
        };
        let shard = if self.cfg.parallel.distributed_optimizer {
            g.reduce_scatter(grads)?
        } else {
            if !reduced {
                g.all_reduce(grads)?;
            }
            0..grads.len()
        };
        // With the distributed optimizer each replica holds the sum for its shard only, so the
        // squared norm is summed across replicas too; otherwise every replica adds up the same.
        let own_sq = sum_squares(&grads[shard.clone()]);
        let shard_sq = if self.cfg.parallel.distributed_optimizer {
            own_sq
        } else {
            0.0
        };
        // Each f64 travels as a high and a low f32, which keeps about 48 bits of the sum.
        let split = |x: f64| [x as f32, (x - (x as f32) as f64) as f32];
        let ([l_hi, l_lo], [n_hi, n_lo]) = (split(loss_sum), split(shard_sq));
        let mut totals = [l_hi, l_lo, n_hi, n_lo];
        g.all_reduce(&mut totals)?;
        let join = |hi: f32, lo: f32| hi as f64 + lo as f64;
        let norm_sq = if self.cfg.parallel.distributed_optimizer {
            join(totals[2], totals[3])
        } else {
            own_sq
        };
        Ok((join(totals[0], totals[1]), shard, norm_sq.sqrt()))
    }

    /// Backward of the last microbatch with each finished gradient bucket all-reduced on a
    /// communication thread while backward goes on with the layers below. Returns how long the
    /// step then waited for the last buckets, and how long the communication thread worked.
    fn backward_overlapped(&mut self, dloss: f32) -> Result<(Duration, Duration)> {
        let group = self.group.as_mut().expect("overlap needs a group");
        let model = &mut self.model;
        let mut grads = std::mem::take(&mut model.grads);
        let result = std::thread::scope(|s| {
            let (buckets, ready) = std::sync::mpsc::channel::<&mut [f32]>();
            let comm = s.spawn(move || -> Result<Duration> {
                let mut busy = Duration::ZERO;
                for bucket in ready {
                    let t0 = Instant::now();
                    group.all_reduce(bucket)?;
                    busy += t0.elapsed();
                }
                Ok(busy)
            });
            model.backward_into(&mut grads, dloss, |bucket| {
                // After a failed all-reduce the receiver is gone; the error comes from join.
                let _ = buckets.send(bucket);
            });
            drop(buckets);
            let waiting = Instant::now();
            let busy = comm
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            Ok((waiting.elapsed(), busy))
        });
        model.grads = grads;
        result
    }

    /// Mean loss over the first `train.eval_batches` microbatches of the validation file, in
    /// file order. Leaves the gradients untouched.
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
        let mut sum = 0.0f64;
        for b in 0..batches {
            for j in 0..mb {
                let r = j * seq..(j + 1) * seq;
                val.sample(
                    b * mb + j,
                    &mut self.inputs[r.clone()],
                    &mut self.targets[r],
                );
            }
            sum += self.model.forward(&self.inputs, &self.targets) as f64;
        }
        let loss = (sum / batches as f64) as f32;
        self.write_metric(
            &serde_json::json!({ "kind": "eval", "data": { "step": self.step, "val_loss": loss } }),
        )?;
        Ok(Some(loss))
    }

    /// Runs the configured number of steps with periodic validation.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Summary> {
        let started = Instant::now();
        let (mut last, mut last_val) = (f32::NAN, None);
        let every = self.cfg.train.eval_every_steps;
        while self.step < self.cfg.train.steps {
            let rec = self.train_step()?;
            observer.on_step(&rec);
            last = rec.loss;
            if every > 0 && (self.step % every == 0 || self.step == self.cfg.train.steps) {
                if let Some(v) = self.evaluate()? {
                    observer.on_eval(self.step, v);
                    last_val = Some(v);
                }
            }
        }
        if let Some(m) = &mut self.metrics {
            m.flush().map_err(|e| {
                RuntimeError::io(
                    "write metrics",
                    self.cfg.train.metrics.clone().unwrap_or_default(),
                    e,
                )
            })?;
        }
        Ok(Summary {
            steps: self.step,
            final_loss: last,
            final_val_loss: last_val,
            tokens_consumed: self.consumed_samples * self.cfg.batch.seq_len as u64,
            elapsed_s: started.elapsed().as_secs_f64(),
        })
    }

    fn write_metric(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            let path = self.cfg.train.metrics.as_deref().unwrap_or(Path::new(""));
            writeln!(m, "{v}").map_err(|e| RuntimeError::io("write metrics", path, e))?;
        }
        Ok(())
    }
}

/// Everything a worker checks before it trains that needs no peers: the layout is one this
/// build runs, the data files open and fit the model and batch, and the buffers fit in memory.
/// A launcher runs it before starting any worker. Returns the opened train and val files.
pub fn preflight(cfg: &TrainConfig) -> Result<(TokenFile, Option<TokenFile>)> {
    let layout = cfg.parallel;
    if layout.tp != 1 || layout.pp != 1 {
        return Err(RuntimeError::Config {
            path: cfg.source.clone(),
            field: "parallel".into(),
            reason: format!(
                "tp={} pp={}: tensor and pipeline parallelism are not available yet; set tp = pp = 1 \
                 (data parallelism works). Use `marathon plan` to size a 3D layout",
                layout.tp, layout.pp
            ),
        });
    }
    let (mb, seq) = (cfg.batch.micro_batch, cfg.batch.seq_len);
    let train = TokenFile::open(&cfg.data.train, cfg.model.vocab_size)?;
    check_samples(&train, seq, mb, "data.train")?;
    if train.samples(seq) > u32::MAX as usize {
        return Err(RuntimeError::data(
            train.path(),
            format!(
                "holds {} samples of {seq} tokens; the sampler indexes at most 2^32 per epoch, so \
                 raise batch.seq_len or split the corpus",
                train.samples(seq)
            ),
        ));
    }
    let val = match &cfg.data.val {
        Some(p) => {
            let v = TokenFile::open(p, cfg.model.vocab_size)?;
            check_samples(&v, seq, mb, "data.val")?;
            Some(v)
        }
        None => None,
    };
    check_memory(cfg)?;
    Ok((train, val))
}

fn check_samples(f: &TokenFile, seq: usize, mb: usize, field: &str) -> Result<()> {
    if f.samples(seq) < mb {
        return Err(RuntimeError::data(
            f.path(),
            format!(
                "({field}) holds {} tokens, fewer than one microbatch of {mb} sequences of {seq} \
                 tokens needs ({}); use more text or a smaller batch.micro_batch or batch.seq_len",
                f.len(),
                mb * seq + 1
            ),
        ));
    }
    Ok(())
}

/// Refuses a model and microbatch whose buffers would not fit in this machine's memory, before
/// allocating anything, naming the fields to change.
fn check_memory(cfg: &TrainConfig) -> Result<()> {
    let need = Gpt::<f32>::memory_bytes(&cfg.model, cfg.batch.micro_batch, cfg.batch.seq_len);
    let Some(have) = physical_memory_bytes() else {
        return Ok(());
    };
    if need > have as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(RuntimeError::Config {
            path: cfg.source.clone(),
            field: "batch.micro_batch".into(),
            reason: format!(
                "the model's buffers for microbatches of {} x {} tokens need {:.1} GiB, more than \
                 this machine's {:.1} GiB; lower batch.micro_batch or batch.seq_len, or choose a \
                 smaller [model]",
                cfg.batch.micro_batch,
                cfg.batch.seq_len,
                gib(need),
                gib(have as f64)
            ),
        });
    }
    Ok(())
}

/// Total physical memory, from /proc/meminfo where there is one.
fn physical_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn open_metrics(path: &Path) -> Result<BufWriter<File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("create directory", dir, e))?;
    }
    // A new run starts a new file; appending would mix runs with the same step numbers.
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| RuntimeError::io("open metrics file", path, e))?;
    Ok(BufWriter::new(f))
}
