//! What a worker checks before it trains that needs no peers.

use marathon_model::{Gpt, Place};

use crate::config::TrainConfig;
use crate::data::TokenFile;
use crate::device::Device;
use crate::error::{Result, RuntimeError};

/// Everything a worker checks before it trains that needs no peers: the layout is one this
/// build runs, the data files open and fit the model and batch, and the buffers fit in memory.
/// A launcher runs it before starting any worker. Returns the opened train and val files.
pub fn preflight(cfg: &TrainConfig) -> Result<(TokenFile, Option<TokenFile>)> {
    check_memory(cfg)?;
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
/// allocating anything, naming the fields to change. Every rank of the layout runs on this
/// machine, so the need is the sum over all of them.
fn check_memory(cfg: &TrainConfig) -> Result<()> {
    let p = cfg.parallel;
    // On a GPU the host holds the state only; the device's memory is checked when it opens.
    let (mb, seq, recompute) = match cfg.train.device {
        Device::Cpu => (
            cfg.batch.micro_batch,
            cfg.batch.seq_len,
            cfg.train.recompute,
        ),
        Device::Cuda => (1, 1, marathon_model::Recompute::None),
    };
    let per_replica: f64 = (0..p.pp)
        .map(|stage| {
            let shard = Place::at(p, 0, stage, 0).shard();
            let slots = p.pp - stage;
            p.tp as f64
                * Gpt::<f32>::shard_memory_bytes(&cfg.model, shard, mb, seq, slots, recompute)
        })
        .sum();
    let need = p.dp as f64 * per_replica;
    let Some(have) = physical_memory_bytes() else {
        return Ok(());
    };
    if need > have as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(RuntimeError::Config {
            path: cfg.source.clone(),
            field: "batch.micro_batch".into(),
            reason: format!(
                "the {} ranks of this layout need {:.1} GiB for the model's buffers with \
                 microbatches of {} x {} tokens, more than this machine's {:.1} GiB; lower \
                 batch.micro_batch or batch.seq_len, choose a smaller [model], or run the layout \
                 across machines",
                p.world_size(),
                gib(need),
                cfg.batch.micro_batch,
                cfg.batch.seq_len,
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
