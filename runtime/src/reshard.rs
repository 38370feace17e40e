//! Offline resharding (`marathon ckpt reshard`): a committed checkpoint written again, as a
//! new committed checkpoint of the same step, the way a job of another layout would store it.
//! Each target rank's boxes are read straight from the source chunks they intersect, with
//! bounded memory.

use std::time::Instant;

use marathon_model::{ParallelLayout, ParamLayout};
use marathon_storage::codec::Codec;
use marathon_storage::{CheckpointWriter, Piece, Reader, Store, WriterOptions};

use crate::checkpoint::{plan_pieces, run_state};
use crate::comm::chunk_range;
use crate::error::{Result, RuntimeError};

/// What an offline reshard did.
#[derive(Debug, serde::Serialize)]
pub struct ReshardReport {
    pub step: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
    /// The objects the new checkpoint was written as, each at most `bound_bytes` of values.
    pub writers: usize,
    pub bound_bytes: u64,
    pub largest_box_bytes: u64,
    /// Peak resident memory of this process (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// This process's peak resident memory, from /proc.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Holds this process's allocator to two arenas. glibc gives a thread that allocates while
/// another holds its arena an arena of its own (up to eight per core) and keeps what is freed
/// there for that arena's next use. The reshard's read, encode and upload threads each free
/// chunk-sized buffers (4 MiB and more) on whichever thread ran last, so a run could keep a
/// dozen arenas' worth of them resident, and its peak varied by twice the staging from one
/// run to the next.
fn few_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; any thread may call it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Writes the checkpoint of `step` under `reader` as a new committed checkpoint of the same
/// step under `dst`, stored the way a job in `target` would store it: every box each target
/// rank owns (parameters and, with `target.distributed_optimizer`, each replica's moment shard)
/// read straight from the chunks it intersects, checksums checked as they stream.
///
/// Memory: the pieces are written in batches of at most the largest tensor box (or 16 MiB of
/// values, if more), each batch as one writer of the new checkpoint, through two writers in
/// turn: one batch is read while the previous one is written. So two of the largest box are
/// held, plus one batch's bytes read ahead and the writers' upload and encode buffers; the allocator keeps few arenas, so
/// what is freed is used again rather than kept beside it.
///
/// `open_dst` opens the destination once the source and the target layout are checked;
/// `progress` is told the bytes read so far and the total, as reading goes.
pub fn reshard(
    reader: &Reader,
    step: u64,
    open_dst: impl FnOnce() -> Result<Store>,
    target: ParallelLayout,
    codec: Codec,
    single_writer: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReshardReport> {
    few_allocator_arenas();
    let started = Instant::now();
    let m = reader.manifest(step)?;
    let url = &reader.store.url;
    let content = |reason: String| RuntimeError::content(url, step, reason);
    let mut state = run_state(&m, url)?;
    target
        .validate(&state.model)
        .map_err(|e| RuntimeError::Argument {
            name: "target layout",
            reason: format!("tp {} pp {} dp {}: {e}", target.tp, target.pp, target.dp),
        })?;
    let dst = open_dst()?;
    if Reader::new(dst.clone()).committed()?.contains(&step) {
        return Err(RuntimeError::Argument {
            name: "destination",
            reason: format!(
                "{} already holds a committed checkpoint of step {step}; it is left as it is. \
                 Reshard into another root",
                dst.url
            ),
        });
    }
    // Every target rank's pieces, in rank order.
    let mut pieces: Vec<Piece> = Vec::new();
    for rank in 0..target.world_size() {
        let place = target.place(rank);
        let layout = ParamLayout::sharded(&state.model, place.shard());
        let n = layout.numel();
        let opt = if target.distributed_optimizer {
            chunk_range(n, target.dp, place.replica)
        } else {
            0..n
        };
        let mine = plan_pieces(&layout, &opt, place, target.distributed_optimizer);
        pieces.extend(mine.into_iter().map(|(p, _, _)| p));
    }
    for p in &pieces {
        let entry = m
            .tensor(&p.tensor)
            .ok_or_else(|| content(format!("it has no tensor {}", p.tensor)))?;
        if entry.shape != p.shape {
            return Err(content(format!(
                "{} has shape {:?}, but the model needs {:?}",
                p.tensor, entry.shape, p.shape
            )));
        }
    }
    let largest = pieces.iter().map(|p| p.region.numel()).max().unwrap_or(0);
    let bound = largest.max(4 << 20);
    // The first writer commits once every writer's index exists, so its staging lives to the
    // end: it takes only the smallest piece.
    let smallest = (0..pieces.len())
        .min_by_key(|&i| pieces[i].region.numel())
        .ok_or_else(|| content("the model has no tensors".into()))?;
    let mut batches: Vec<Vec<Piece>> = vec![vec![pieces.remove(smallest)], Vec::new()];
    let mut filled = 0u64;
    for p in pieces {
        let n = p.region.numel();
        if filled + n > bound && !batches.last().expect("a batch").is_empty() {
            batches.push(Vec::new());
            filled = 0;
        }
        filled += n;
        batches.last_mut().expect("a batch").push(p);
    }
    let total: u64 = batches.iter().flatten().map(|p| 4 * p.region.numel()).sum();
    let mut read = 0u64;
    progress(read, total);
    state.layout = target;
    let run = serde_json::to_value(&state).expect("run states serialise");
    let writers = batches.len();
    // Upload and encode buffers kept small: two writers are alive at once.
    let opts = WriterOptions {
        retention: None,
        codec,
        uploads_inflight_max: 2,
        encoders_max: 1,
        single_writer,
        // The writers of this one persist share its epoch.
        epoch: Some(
            std::time::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.as_nanos() as u64),
        ),
        ..WriterOptions::default()
    };
    // The first writer commits once every writer's index exists, so it stays until the end;
    // the others are one writer taking each rank in turn, reusing its staging buffer.
    // Two more writers take the other ranks in turn, each reusing its staging buffer, so one
    // batch is read while the one before it is written.
    let mut first = CheckpointWriter::new(dst.clone(), 0, writers, opts.clone())?;
    let mut turns = [1, 2]
        .map(|r| CheckpointWriter::new(dst.clone(), r.min(writers - 1), writers, opts.clone()));
    let mut failed: Option<RuntimeError> = None;
    let wanted = batches
        .iter()
        .flatten()
        .map(|p| (p.tensor.as_str(), &p.region));
    // Read ahead by at most one batch's bytes, within the memory bound.
    let _ahead = reader.prefetch_within(&m, wanted, 4 * bound);
    for (i, batch) in batches.into_iter().enumerate() {
        let w = if i == 0 {
            &mut first
        } else {
            let w = match &mut turns[i % 2] {
                Ok(w) => w,
                Err(e) => return Err(content(format!("a writer of the new checkpoint: {e}"))),
            };
            if let Some(done) = w.set_rank(i) {
                done?;
            }
            w
        };
        w.snapshot(step, run.clone(), batch.clone(), |buf| {
            let mut at = 0;
            for p in &batch {
                let n = p.region.numel() as usize;
                if failed.is_none() {
                    if let Err(e) = reader.read_box(&m, &p.tensor, &p.region, &mut buf[at..at + n])
                    {
                        failed = Some(content(format!("reading {}: {e}", p.tensor)));
                    }
                }
                at += n;
                read += 4 * n as u64;
                progress(read, total);
            }
        });
        if let Some(e) = failed.take() {
            // Nothing commits without every writer's index; the first writer gives up at its
            // deadline, leaving an uncommitted prefix for `ckpt gc`.
            return Err(e);
        }
    }
    for w in turns.iter_mut().flatten() {
        if let Some(done) = w.wait() {
            done?;
        }
    }
    if let Some(done) = first.wait() {
        done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(ReshardReport {
        step,
        bytes: total,
        seconds,
        gb_per_s: total as f64 / seconds / 1e9,
        writers,
        bound_bytes: 4 * bound,
        largest_box_bytes: 4 * largest,
        peak_rss_bytes: peak_rss(),
    })
}
