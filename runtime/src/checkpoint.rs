//! Checkpoints of a training run: what each rank stores, the training state beside the
//! tensors, snapshots at step boundaries, and resuming in any layout.
//!
//! A rank stores each element of its shard that no other rank stores: elements every
//! tensor-parallel rank holds are stored by tensor-parallel rank 0, the tied embedding by the
//! first stage, and what data-parallel replicas hold alike is split evenly between them; with the
//! distributed optimizer each replica stores its own shard of the Adam moments. Tensors are
//! stored under their global names and shapes (`params/h.0.attn.c_attn.weight`, `adam_m/...`,
//! `adam_v/...`) as boxes, so a run in any other layout reads back exactly the boxes it holds.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use marathon_model::{GptConfig, ParamLayout};
use marathon_model::{ParallelLayout, Place};
use marathon_storage::boxes::range_to_boxes;
use marathon_storage::codec::Codec;
use marathon_storage::faulty::{Faults, FaultyStore};
use marathon_storage::retention::Retention;
use marathon_storage::writer::{Claim, CommitRecord, Recorded, SnapshotReport};
use marathon_storage::{
    CheckpointWriter, Manifest, Piece, Reader, Store, TensorBox, WriterOptions,
};
use serde::{Deserialize, Serialize};

use crate::comm::chunk_range;
use crate::config::{CheckpointConfig, Compression, TrainConfig};
use crate::error::{Result, RuntimeError};

/// The training state stored in the manifest beside the tensors: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Steps completed.
    pub step: u64,
    /// The data order's position: samples consumed by those steps.
    pub consumed_samples: u64,
    pub tokens_consumed: u64,
    /// The data order is a seeded permutation per epoch of this many samples.
    pub data_seed: u64,
    pub samples_per_epoch: u64,
    /// Seed of the initial weights (the only other random draw; there is no dropout).
    pub init_seed: u64,
    /// AdamW's step count, for its bias correction.
    pub optimizer_step: u64,
    /// The learning rate of the last step; the schedule is a function of tokens consumed.
    pub lr: f64,
    pub model: GptConfig,
    /// The layout that wrote the checkpoint; any layout can read it.
    pub layout: ParallelLayout,
    pub seq_len: usize,
    /// Where weights that no run trained came from (`marathon ckpt import`); such a checkpoint
    /// starts a new run on any data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// The run state in the manifest `m` of a checkpoint under `url`.
pub fn run_state(m: &Manifest, url: &str) -> Result<RunState> {
    serde_json::from_value(m.run.clone()).map_err(|e| {
        RuntimeError::content(url, m.step, format!("it has no marathon run state: {e}"))
    })
}

/// Which of a rank's buffers a piece is copied from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Params,
    AdamM,
    AdamV,
}

impl Source {
    fn prefix(self) -> &'static str {
        match self {
            Source::Params => "params",
            Source::AdamM => "adam_m",
            Source::AdamV => "adam_v",
        }
    }
}

/// The pieces the rank at `place` stores, and where each one's values are in its buffers
/// (ranges of the parameter buffer, or of the optimizer state's shard for the moments).
/// `layout` is the rank's size table, of `place`'s shard.
pub fn plan_pieces(
    layout: &ParamLayout,
    opt_shard: &Range<usize>,
    place: Place,
    distributed_optimizer: bool,
) -> Vec<(Piece, Source, Range<usize>)> {
    assert_eq!(
        layout.shard,
        place.shard(),
        "a size table of another rank's shard"
    );
    let unique = layout.unique_ranges();
    // This replica's even share of the elements the model-parallel group stores once.
    let total: usize = unique.iter().map(|r| r.len()).sum();
    let share = chunk_range(total, place.dp, place.replica);
    let mut mine = Vec::new();
    let mut seen = 0;
    for r in unique {
        let (lo, hi) = (share.start.max(seen), share.end.min(seen + r.len()));
        if lo < hi {
            mine.push(r.start + lo - seen..r.start + hi - seen);
        }
        seen += r.len();
    }
    let moments: Vec<Range<usize>> = if distributed_optimizer {
        unique
            .iter()
            .map(|r| r.start.max(opt_shard.start)..r.end.min(opt_shard.end))
            .filter(|r| !r.is_empty())
            .collect()
    } else {
        mine.clone()
    };
    let mut out = Vec::new();
    for (source, ranges) in [
        (Source::Params, &mine),
        (Source::AdamM, &moments),
        (Source::AdamV, &moments),
    ] {
        for t in layout.tensors() {
            let global: Vec<u64> = t.global_shape.iter().map(|&d| d as u64).collect();
            let local: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            let offset: Vec<u64> = t.box_offset.iter().map(|&d| d as u64).collect();
            for r in ranges.iter() {
                let (lo, hi) = (r.start.max(t.offset), r.end.min(t.range().end));
                if lo >= hi {
                    continue;
                }
                let mut at = lo;
                for b in range_to_boxes(&local, (lo - t.offset) as u64, (hi - t.offset) as u64) {
                    let n = b.numel() as usize;
                    // Buffer positions: the moments cover only the optimizer's shard.
                    let base = if source == Source::Params {
                        0
                    } else {
                        opt_shard.start
                    };
                    out.push((
                        Piece {
                            tensor: format!("{}/{}", source.prefix(), t.name),
                            shape: global.clone(),
                            region: b.shifted(&offset),
                        },
                        source,
                        at - base..at - base + n,
                    ));
                    at += n;
                }
            }
        }
    }
    out
}

/// The store and options of a configuration's `[checkpoint]`.
pub fn open_store(c: &CheckpointConfig) -> Result<Store> {
    let store = Store::open_with(&c.root, c.options.clone()).map_err(RuntimeError::from)?;
    let Some(f) = &c.faults else {
        return Ok(store);
    };
    let faults = Faults {
        error_rate: f.error_rate,
        delay: Duration::from_millis(f.delay_ms),
        refuse_puts_to: f.refuse_puts_to.clone(),
        tear_puts_to: f.tear_puts_to.clone(),
    };
    Ok(store.wrapped(Arc::new(FaultyStore::new(
        store.inner.clone(),
        faults,
        f.seed,
    ))))
}

pub(crate) fn writer_options(c: &CheckpointConfig) -> WriterOptions {
    WriterOptions {
        codec: match c.compression {
            Compression::None => Codec::Raw,
            Compression::Zstd => Codec::Zstd,
            Compression::ZstdShuffle => Codec::ZstdShuffle4,
        },
        level: c.level,
        retention: Some(retention(c)),
        record: c.record.clone(),
        single_writer: c.single_writer,
        ..WriterOptions::default()
    }
}

/// The commit record of a job in its coordinator: `checkpoints/<step>`, created once. With
/// `fenced`, an elastic job's, whose persists' epoch is their generation: the record is created
/// in the same transaction that checks that this generation still runs. A coordinator out of
/// reach is waited for `outage`, as long as any other of the job's writes.
pub fn coordinator_record(
    coord: Arc<dyn marathon_elastic::Coordinator>,
    keys: marathon_elastic::JobKeys,
    outage: Duration,
    fenced: bool,
) -> CommitRecord {
    use marathon_elastic::job::{record_checkpoint, CheckpointRecord};
    CommitRecord(Arc::new(move |claim: &Claim| {
        crate::moments::reach(crate::moments::Moment::BeforeManifest);
        let mut value = serde_json::to_value(claim).expect("a claim serialises");
        value["at_ms"] = unix_ms().into();
        let value = value.to_string();
        let generation = if fenced { claim.epoch } else { 0 };
        let record = || record_checkpoint(&*coord, &keys, generation, claim.step, value.as_bytes());
        match marathon_elastic::retrying(outage, record).map_err(|e| e.to_string())? {
            CheckpointRecord::Won => Ok(Recorded::Won),
            CheckpointRecord::Taken(v) => Ok(Recorded::Taken(
                // A record this build cannot read is someone else's.
                serde_json::from_slice(&v).unwrap_or_else(|_| Claim {
                    writer: String::from_utf8_lossy(&v).into_owned(),
                    digest: String::new(),
                    ..claim.clone()
                }),
            )),
            CheckpointRecord::Fenced => Ok(Recorded::Fenced(format!(
                "fenced: generation {} of the job is no longer the running one",
                claim.epoch
            ))),
        }
    }))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn retention(c: &CheckpointConfig) -> Retention {
    Retention {
        keep_last: c.keep_last,
        keep_every: c.keep_every,
        grace_ms: c.abandoned_after_s.saturating_mul(1000),
    }
}

/// A rank's checkpointing: its writer, what it stores, and how the last snapshot went.
pub(crate) struct Checkpointing {
    pub writer: CheckpointWriter,
    pub reader: Reader,
    pub pieces: Vec<(Piece, Source, Range<usize>)>,
    pub every_steps: u64,
    /// The step of the last snapshot taken.
    pub last_step: Option<u64>,
}

impl std::fmt::Debug for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointing")
            .field("writer", &self.writer)
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

/// What a checkpoint cost the step loop, for progress and benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    /// Training stalled this long: waiting for the previous persist plus the copy.
    pub stall_ms: f64,
    /// Of which waiting for the previous persist.
    pub waited_ms: f64,
    pub staged_bytes: u64,
    /// Why the previous checkpoint's persist failed, if it did (it stays uncommitted).
    pub previous_failed: Option<String>,
    /// The previous checkpoint's persist, if it finished here.
    #[serde(default)]
    pub previous_persisted: Option<Persisted>,
}

/// What a finished persist did, as a rank reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    pub step: u64,
    /// From the snapshot to this rank's shard being durable.
    pub seconds: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// This rank committed the checkpoint.
    pub committed: bool,
}

impl From<&marathon_storage::writer::PersistReport> for Persisted {
    fn from(p: &marathon_storage::writer::PersistReport) -> Self {
        Persisted {
            step: p.step,
            seconds: p.upload.as_secs_f64(),
            bytes: p.stored_bytes,
            committed: p.committed.is_some(),
        }
    }
}

impl CheckpointRecord {
    pub(crate) fn new(step: u64, staged_bytes: u64, r: &SnapshotReport) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        CheckpointRecord {
            step,
            stall_ms: ms(r.waited + r.copied),
            waited_ms: ms(r.waited),
            staged_bytes,
            previous_failed: match &r.previous {
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            },
            previous_persisted: match &r.previous {
                Some(Ok(p)) => Some(p.into()),
                _ => None,
            },
        }
    }
}

/// Reads every local tensor's box of the parameters from `m` into `params` (laid out by
/// `layout`), from a checkpoint of any layout of the same model.
pub fn load_params(
    reader: &Reader,
    m: &Manifest,
    layout: &ParamLayout,
    params: &mut [f32],
) -> marathon_storage::Result<()> {
    read_state(
        reader,
        m,
        &state_reads(layout, None),
        [params, &mut [], &mut []],
    )
}

/// Reads the whole global tensor `name` of shape `shape` from the checkpoint `m` under `reader`.
pub(crate) fn read_whole(
    reader: &Reader,
    m: &Manifest,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut out = vec![0f32; shape.iter().product::<u64>() as usize];
    reader
        .read_box(m, name, &TensorBox::whole(&shape), &mut out)
        .map_err(|e| {
            RuntimeError::content(&reader.store.url, m.step, format!("reading {name}: {e}"))
        })?;
    Ok(out)
}

/// Reads this rank's state from `m`: every local tensor's box of the parameters, and the boxes
/// of the optimizer's shard of both moments. Works from a checkpoint of any layout of the same
/// model.
pub fn load_tensors(
    reader: &Reader,
    m: &Manifest,
    layout: &ParamLayout,
    params: &mut [f32],
    opt_shard: &Range<usize>,
    adam_m: &mut [f32],
    adam_v: &mut [f32],
) -> marathon_storage::Result<()> {
    let reads = state_reads(layout, Some(opt_shard));
    read_state(reader, m, &reads, [params, adam_m, adam_v])
}

/// One box of a rank's state to read: the checkpoint's tensor and box, and where it goes
/// (0: the parameters, 1 and 2: Adam's moments) at which elements.
type StateRead = (String, TensorBox, usize, Range<usize>);

/// The boxes of a rank's state in the order they are read: every local tensor's parameters,
/// then, with an optimizer shard, each tensor's part of it in the first moment, then in the
/// second (the order a shard holds them in).
fn state_reads(layout: &ParamLayout, opt_shard: Option<&Range<usize>>) -> Vec<StateRead> {
    let mut reads = Vec::new();
    for t in layout.tensors() {
        let region = TensorBox {
            offset: t.box_offset.iter().map(|&d| d as u64).collect(),
            size: t.shape.iter().map(|&d| d as u64).collect(),
        };
        reads.push((format!("params/{}", t.name), region, 0, t.range()));
    }
    let Some(shard) = opt_shard else {
        return reads;
    };
    // Each moment whole after the other, as a shard holds them.
    let mut moments: [Vec<StateRead>; 2] = Default::default();
    for t in layout.tensors() {
        let (lo, hi) = (t.offset.max(shard.start), t.range().end.min(shard.end));
        if lo >= hi {
            continue;
        }
        let local: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        let offset: Vec<u64> = t.box_offset.iter().map(|&d| d as u64).collect();
        let mut at = lo - shard.start;
        for b in range_to_boxes(&local, (lo - t.offset) as u64, (hi - t.offset) as u64) {
            let n = b.numel() as usize;
            let global = b.shifted(&offset);
            moments[0].push((format!("adam_m/{}", t.name), global.clone(), 1, at..at + n));
            moments[1].push((format!("adam_v/{}", t.name), global, 2, at..at + n));
            at += n;
        }
    }
    let [m, v] = moments;
    reads.extend(m);
    reads.extend(v);
    reads
}

/// Does `reads` into `into`, the files read ahead of it where the store is local.
fn read_state(
    reader: &Reader,
    m: &Manifest,
    reads: &[StateRead],
    into: [&mut [f32]; 3],
) -> marathon_storage::Result<()> {
    let _ahead = reader.prefetch(m, reads.iter().map(|(name, b, _, _)| (name.as_str(), b)));
    for (name, region, dst, range) in reads {
        reader.read_box(m, name, region, &mut into[*dst][range.clone()])?;
    }
    Ok(())
}

/// Checks that a checkpoint's run state fits this configuration: the same model, and a data
/// order and sequence length it can continue.
pub(crate) fn check_compatible(cfg: &TrainConfig, state: &RunState, url: &str) -> Result<()> {
    let mismatch = |field: &str, there: String, here: String| RuntimeError::Config {
        path: cfg.source.clone(),
        field: field.into(),
        reason: format!(
            "the checkpoint of step {} under {url} was written with {there}, this configuration \
             has {here}; use a root of this model's checkpoints, or set checkpoint.resume = \
             \"never\" with a new root",
            state.step
        ),
    };
    let (a, b) = (&state.model, &cfg.model);
    for (field, there, here) in [
        ("model.vocab_size", a.vocab_size, b.vocab_size),
        ("model.seq_len", a.seq_len, b.seq_len),
        ("model.n_layer", a.n_layer, b.n_layer),
        ("model.n_head", a.n_head, b.n_head),
        ("model.n_embd", a.n_embd, b.n_embd),
    ] {
        if there != here {
            return Err(mismatch(
                field,
                format!("{field} = {there}"),
                format!("{here}"),
            ));
        }
    }
    if state.origin.is_some() {
        // Imported weights: no data order or sequence length to continue.
        return Ok(());
    }
    if state.seq_len != cfg.batch.seq_len {
        return Err(mismatch(
            "batch.seq_len",
            format!("batch.seq_len = {}", state.seq_len),
            format!("{}", cfg.batch.seq_len),
        ));
    }
    if state.data_seed != cfg.data.seed {
        return Err(mismatch(
            "data.seed",
            format!("data.seed = {}", state.data_seed),
            format!("{}", cfg.data.seed),
        ));
    }
    Ok(())
}

/// Writes one committed checkpoint of the whole model from one process: `params` and both
/// moments laid out by [`ParamLayout::new`], with `state` as its run state. Used for weights
/// that no training run wrote (`marathon ckpt import`). Refuses a store that already holds a
/// committed checkpoint of `state.step`, before writing anything.
pub fn save_whole(
    store: Store,
    state: &RunState,
    params: &[f32],
    adam_m: &[f32],
    adam_v: &[f32],
    opts: marathon_storage::WriterOptions,
) -> Result<marathon_storage::writer::PersistReport> {
    let layout = ParamLayout::new(&state.model);
    let n = layout.numel();
    assert!(params.len() == n && adam_m.len() == n && adam_v.len() == n);
    if Reader::new(store.clone())
        .committed()?
        .contains(&state.step)
    {
        return Err(marathon_storage::StorageError::AlreadyCommitted {
            step: state.step,
            url: store.url.clone(),
        }
        .into());
    }
    let mut writer = CheckpointWriter::new(store, 0, 1, opts)?;
    let pieces = plan_pieces(&layout, &(0..n), Place::ALONE, false);
    let run = serde_json::to_value(state).expect("the run state serialises");
    writer.snapshot(
        state.step,
        run,
        pieces.iter().map(|(p, _, _)| p.clone()).collect(),
        |buf| {
            let mut at = 0;
            for (_, source, r) in &pieces {
                let src = match source {
                    Source::Params => &params[r.clone()],
                    Source::AdamM => &adam_m[r.clone()],
                    Source::AdamV => &adam_v[r.clone()],
                };
                buf[at..at + r.len()].copy_from_slice(src);
                at += r.len();
            }
        },
    );
    match writer.wait() {
        Some(done) => Ok(done?),
        None => unreachable!("a snapshot was just started"),
    }
}
