//! Recovery: a new generation's groups from memory, a reload from storage, a transfer of
//! state between replicas, and reconciling the replicas at a generation's start. Written on the
//! host state; a GPU engine's state is fetched before and pushed after.

use marathon_model::{AdamW, Place};

use super::{checkpointing, open_metrics, Trainer};
use crate::comm::ProcessGroup;
use crate::error::{Result, RuntimeError};
use crate::groups::Groups;
use crate::records::StepRecord;

impl Trainer {
    /// Continues with new process groups: a new generation of the job, with the same tensor
    /// and pipeline layout and a data-parallel degree that may differ (a replica lost or added).
    /// The rank keeps its shard of the model and its optimizer state; the next step splits the
    /// global batch over the new replicas, so the data order continues exactly.
    ///
    /// With the distributed optimizer the rank sets its moments aside; [`Trainer::reconcile`]
    /// re-partitions them among the new replicas.
    ///
    /// Errors: a group whose tensor or pipeline size differs from the layout's.
    pub fn regroup(&mut self, groups: Groups) -> Result<()> {
        let Place {
            tp_rank,
            tp,
            stage,
            pp,
            dp,
            ..
        } = groups.place();
        let shard = self.model.layout.shard;
        let bad = |reason: String| RuntimeError::Config {
            path: self.cfg.source.clone(),
            field: "parallel".into(),
            reason,
        };
        if (tp, tp_rank, pp, stage) != (shard.tp, shard.tp_rank, shard.pp, shard.stage) {
            return Err(bad(format!(
                "a new generation must keep each rank's shard: this rank holds tensor rank {} of \
                 {} and stage {} of {}, the new groups give {tp_rank} of {tp} and {stage} of {pp}",
                shard.tp_rank, shard.tp, shard.stage, shard.pp
            )));
        }
        if self.cfg.parallel.distributed_optimizer
            && self.cfg.train.device != crate::device::Device::Cpu
        {
            return Err(bad(
                "a new generation re-partitions the distributed optimizer's chunks, which runs \
                 on the CPU so far; on a GPU train without the distributed optimizer, or resume \
                 from a checkpoint in the new layout"
                    .into(),
            ));
        }
        self.cfg.parallel.dp = dp;
        self.groups = groups;
        self.resize_pace(false);
        if self.cfg.parallel.distributed_optimizer {
            self.fetch_state()?;
            self.place_chunks();
        }
        // The writers of the new generation are its ranks. A persist still running belongs to
        // the old one: it finishes (or fails, when a writer died) on its own thread, and the
        // newest checkpoint that committed is what a later resume finds.
        if let Some(mut old) = self.ckpt.take() {
            std::thread::spawn(move || {
                if let Some(Err(e)) = old.writer.wait() {
                    tracing::warn!("a checkpoint of the previous generation did not commit: {e}");
                }
            });
        }
        self.ckpt = checkpointing(&self.cfg, &self.model, &self.opt, &self.groups)?;
        if let Some(epoch) = self.checkpoint_epoch {
            self.set_checkpoint_epoch(epoch);
        }
        if let (Some(ck), Some(signal)) = (self.ckpt.as_mut(), &self.stop_signal) {
            ck.writer.set_cancel(Some(signal.clone()));
        }
        // The first rank of the new generation writes the metrics, after the old one's lines.
        let first = self.groups.rank() == 0;
        self.metrics = match (&self.cfg.train.metrics, first, self.metrics.take()) {
            (Some(_), true, Some(m)) => Some(m),
            (Some(p), true, None) => Some(open_metrics(p, true)?),
            _ => None,
        };
        self.open_samples_log()?;
        self.choose_transports()
    }

    /// Reloads this rank's state from the newest committed checkpoint, as a fresh trainer
    /// would: every rank of the job calls it, together. `None` when there is none (the state
    /// is then the initial one, from step 0). The last resort of an elastic job whose
    /// some stage has no live copy left.
    pub fn reload(&mut self) -> Result<Option<u64>> {
        // Until the load completes, this rank's state is nobody's.
        self.holds_state = false;
        self.model
            .init_params(self.cfg.train.seed, self.cfg.optim.init_std);
        self.opt = AdamW::for_shard(
            self.cfg.optim.adamw(),
            &self.model.layout,
            self.opt.shard.clone(),
        );
        self.step = 0;
        self.consumed_samples = 0;
        self.lineage = self.generation;
        // What was held before is dropped: the checkpoint's state replaces it.
        self.held.clear();
        self.mirror_valid = false;
        self.pending = None;
        self.last_record = None;
        self.resumed_from = self.resume()?;
        self.engine.push_state(&self.model, &self.opt)?;
        self.holds_state = true;
        Ok(self.resumed_from)
    }

    /// A digest of this rank's state: parameters, both moments and the counters, bit for bit.
    /// Replicas of one shard that agree on it hold the same state.
    /// On a GPU the state is fetched from the device first.
    pub fn state_digest(&mut self) -> Result<u64> {
        self.fetch_state()?;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut mix = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
        for buf in [&self.model.params, &self.opt.m, &self.opt.v] {
            buf.iter().for_each(|x| mix(x.to_bits() as u64));
        }
        [self.step, self.consumed_samples, self.opt.step]
            .into_iter()
            .for_each(mix);
        Ok(h)
    }

    /// Makes this rank's state that of replica `source` of its data-parallel group: parameters,
    /// both Adam moments, the optimizer step and the data order's position, broadcast over the
    /// group. A replica joining a running job receives its state this way from a healthy one,
    /// instead of from storage; every member of the group calls it.
    ///
    /// With the distributed optimizer each replica holds other moments: [`Trainer::reconcile`]
    /// moves them instead.
    pub fn transfer_state(&mut self, source: usize) -> Result<()> {
        if self.groups.dp.is_none() {
            return Ok(());
        }
        if self.cfg.parallel.distributed_optimizer {
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "parallel.distributed_optimizer".into(),
                reason: "replicas of the distributed optimizer hold different chunks of the \
                         moments, so one cannot take another's state whole; reconcile moves the \
                         chunks"
                    .into(),
            });
        }
        self.fetch_state()?;
        let dp = self.groups.dp.as_mut().expect("checked above");
        // A transfer cut off halfway leaves a receiver with the source's parameters and its
        // own optimizer state: no one's state until the transfer completes.
        if dp.rank() != source {
            self.holds_state = false;
        }
        dp.broadcast(&mut self.model.params, source)?;
        crate::moments::reach(crate::moments::Moment::Transfer);
        dp.broadcast(&mut self.opt.m, source)?;
        dp.broadcast(&mut self.opt.v, source)?;
        // Counters travel bit for bit, as the f32s that share their bits.
        let mut counters = [self.step, self.consumed_samples, self.opt.step].map(to_words);
        dp.broadcast(counters.as_flattened_mut(), source)?;
        [self.step, self.consumed_samples, self.opt.step] = counters.map(|w| from_words(&w));
        self.engine.push_state(&self.model, &self.opt)?;
        self.holds_state = true;
        Ok(())
    }

    /// Brings the replicas of this rank's shard to one step at the start of a generation. A
    /// peer that died in the middle of a step's last collective can leave some survivors with
    /// the step applied and others without it; every replica then takes the state of the most
    /// advanced one (the lowest-numbered when several are). Afterwards every rank of the job
    /// must be at the same step, or all of them fail with [`RuntimeError::Config`] naming the
    /// steps seen, and the job must resume from its newest checkpoint. The same happens when
    /// no replica of some shard holds state (every one of them joined with this generation):
    /// the initial weights are never taken for the job's. Every rank calls it. Returns the
    /// step the generation continues from.
    pub fn reconcile(&mut self) -> Result<u64> {
        let Place {
            replica,
            dp: replicas,
            ..
        } = self.groups.place();
        // State from an older history (kept by a rank that missed a reload from storage)
        // counts as none: only holders of the newest lineage are taken.
        // With it, the record of the newest step each applied, for the metrics writer.
        let mut mine = vec![u64::from(self.holds_state), self.lineage, self.step];
        let none = [0; StepRecord::WORDS];
        mine.extend(self.last_record.as_ref().map_or(none, StepRecord::words));
        let all = gather_u64s(self.groups.dp.as_mut(), &mine, replica, replicas)?;
        let lineage_of = |r: &Vec<u64>| if r[0] == 1 { r[1] } else { 0 };
        let newest = all.iter().map(lineage_of).max().unwrap_or(0);
        let current = self.holds_state && self.lineage == newest;
        let (stateless, uncovered) = if self.cfg.parallel.distributed_optimizer {
            self.reconcile_chunks(current)?
        } else {
            // Step + 1 from a holder of the newest state, 0 from a rank that holds none.
            let held: Vec<u64> = all
                .iter()
                .map(|r| {
                    if r[0] == 1 && r[1] == newest {
                        r[2] + 1
                    } else {
                        0
                    }
                })
                .collect();
            let best = held.iter().copied().max().unwrap_or(held[replica]);
            if best != 0 && held.iter().any(|&s| s != best) {
                let source = held.iter().position(|&s| s == best).unwrap_or(0);
                self.transfer_state(source)?;
            }
            (best == 0, false)
        };
        if !stateless {
            self.lineage = newest;
        }
        // The replicas of each shard now agree; the shards must agree with each other, on the
        // step and on the history.
        let Place {
            tp_rank,
            tp,
            stage,
            pp,
            ..
        } = self.groups.place();
        let (step, lineage) = (self.step, self.lineage);
        let tp_all = gather_u64s(self.groups.tp.as_mut(), &[step, lineage], tp_rank, tp)?;
        let pp_all = gather_u64s(self.groups.pp.as_mut(), &[step, lineage], stage, pp)?;
        let column = |all: &[Vec<u64>], i: usize| all.iter().map(|r| r[i]).collect::<Vec<_>>();
        let (across_tp, lineage_tp) = (column(&tp_all, 0), column(&tp_all, 1));
        let (across_pp, lineage_pp) = (column(&pp_all, 0), column(&pp_all, 1));
        let differ = tp_all
            .iter()
            .chain(&pp_all)
            .any(|r| r[..] != [step, lineage]);
        let [differ_n, stateless_n, uncovered_n] = self.sum_over_ranks([
            f32::from(differ),
            f32::from(stateless),
            f32::from(uncovered),
        ])?;
        if differ_n + stateless_n + uncovered_n > 0.0 {
            let reason = if stateless_n > 0.0 {
                format!(
                    "{stateless_n} ranks hold shards of which no replica holds state (every \
                     one joined with this generation), so the job must resume from its newest \
                     checkpoint"
                )
            } else if uncovered_n > 0.0 {
                format!(
                    "{uncovered_n} ranks hold chunks of the distributed optimizer's moments of \
                     which, at every step they hold, some chunk has no live copy (two \
                     neighbouring replicas lost together), so the job must resume from its \
                     newest checkpoint"
                )
            } else {
                format!(
                    "the shards of the model stopped at different steps or come from different \
                     reloads (this rank's tensor group: steps {across_tp:?}, reloaded in \
                     generations {lineage_tp:?}; pipeline group: {across_pp:?}, \
                     {lineage_pp:?}); no replica holds every shard at one step, so the job \
                     must resume from its newest checkpoint"
                )
            };
            return Err(RuntimeError::Config {
                path: self.cfg.source.clone(),
                field: "parallel".into(),
                reason,
            });
        }
        // A step a replica applied but whose last collective failed is carried forward by
        // this generation, and a rank that writes the metrics anew has not written the step
        // it continues from: either way it logs that step's record now, as a replica that
        // applied it made it. A step logged twice has the same loss both times (its timings
        // may differ); readers keep a step's last record.
        if self.metrics.is_some() && self.logged_step != Some(step) {
            let carried = all
                .iter()
                .filter(|w| w[0] == 1 && w[1] == newest)
                .filter_map(|w| StepRecord::from_words(&w[3..]))
                .find(|r| r.step == step);
            if let Some(rec) = carried {
                self.log_step(&rec)?;
            }
        }
        Ok(step)
    }
}

/// A u64 as the two f32s that share its bits, to travel bit for bit in an f32 collective.
fn to_words(x: u64) -> [f32; 2] {
    [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}

/// The u64 whose bits two f32s carry ([`to_words`]).
fn from_words(w: &[f32]) -> u64 {
    w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32
}

/// Every member's `mine` (of the same length on each) gathered over `group`, in member order;
/// this rank's alone without a group. `me` and `n` are this rank's place and the group's size.
pub(super) fn gather_u64s(
    group: Option<&mut ProcessGroup>,
    mine: &[u64],
    me: usize,
    n: usize,
) -> Result<Vec<Vec<u64>>> {
    let k = 2 * mine.len();
    let mut all = vec![0f32; k * n];
    for (i, &x) in mine.iter().enumerate() {
        all[k * me + 2 * i..k * me + 2 * i + 2].copy_from_slice(&to_words(x));
    }
    if let Some(g) = group {
        g.all_gather(&mut all)?;
    }
    Ok(all
        .chunks_exact(k.max(1))
        .map(|c| c.chunks_exact(2).map(from_words).collect())
        .collect())
}
