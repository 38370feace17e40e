//! Goodput planning: what a checkpoint of a layout weighs and costs, and what fraction of a
//! job's time becomes training (the effective training time ratio, ETTR) at a failure rate,
//! under checkpoint-restart at its optimal interval and under marathon's in-place recovery.
//!
//! The model is first order in the failure rate. Failures arrive at random with a mean time
//! between them of [`Assumptions::job_mtbf_s`], each costs the job the time it takes from
//! training (`lost_per_failure_s`), and the nodes under repair at any moment are
//! Poisson-distributed with mean `hardware_fraction x repair / MTBF` (repairs as an M/G/inf
//! queue), which sets the capacity missing while they are away. So
//!
//! ```text
//! ETTR = (1 - lost_per_failure / MTBF - capacity_missing) x interval / (interval + stall)
//! ```
//!
//! Every term is returned apart, so a reader sees where the time goes and can replace what
//! they know better.

use serde::Serialize;

use crate::config::GptConfig;
use crate::cost::params_per_rank_max;
use crate::layout::ParallelLayout;
use crate::layout::ParamLayout;

/// Llama 3 405B's pre-training had 419 unexpected interruptions in 54 days on 16,384 GPUs
/// (Dubey et al. 2024, section 3.3.4): one per 50,675 GPU-hours.
pub const LLAMA3_GPU_MTBF_HOURS: f64 = 54.0 * 24.0 * 16384.0 / 419.0;

/// The share of Llama 3's interruptions attributed to hardware (GPUs, memory, hosts, network):
/// about 78%. A hardware failure sends its node to repair; the rest restart in place.
pub const LLAMA3_HARDWARE_FRACTION: f64 = 0.78;

/// What a checkpoint of a layout holds, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointSize {
    /// The bf16 weights the step computes with. Not stored: rebuilt from the fp32 masters.
    pub weights_bf16_bytes: f64,
    pub master_bytes: f64,
    pub adam_m_bytes: f64,
    pub adam_v_bytes: f64,
    /// Master weights and both moments: what a checkpoint stores, uncompressed.
    pub total_bytes: f64,
    /// What the most loaded rank stages and writes. The replicas of a model-parallel rank
    /// split its state's writing between them, with or without the distributed optimizer.
    pub per_rank_bytes: f64,
    /// What a rank joining the job receives from a peer: the fp32 weights, and both moments
    /// (only its shard of them with the distributed optimizer).
    pub join_bytes: f64,
}

/// The checkpoint of `config` under `layout`.
pub fn checkpoint_size(config: &GptConfig, layout: &ParallelLayout) -> CheckpointSize {
    let params = ParamLayout::new(config).numel() as f64;
    let rank = params_per_rank_max(config, layout) as f64;
    let dp = layout.dp as f64;
    let moments_held = if layout.distributed_optimizer {
        (rank / dp).ceil()
    } else {
        rank
    };
    CheckpointSize {
        weights_bf16_bytes: 2.0 * params,
        master_bytes: 4.0 * params,
        adam_m_bytes: 4.0 * params,
        adam_v_bytes: 4.0 * params,
        total_bytes: 12.0 * params,
        per_rank_bytes: 12.0 * (rank / dp).ceil(),
        join_bytes: 4.0 * rank + 8.0 * moments_held,
    }
}

/// What the estimate assumes about the cluster, the store and the failures. Seconds and GB/s
/// (10^9 bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assumptions {
    /// Mean time between failures of the whole job.
    pub job_mtbf_s: f64,
    /// The share of failures that take their node away for repair.
    pub hardware_fraction: f64,
    /// One training step.
    pub step_s: f64,
    /// Copying a rank's checkpoint to host memory: the stall training sees.
    pub d2h_gbps: f64,
    /// The store's bandwidth for all ranks together, writing and reading.
    pub store_gbps: f64,
    /// One rank's stream to and from the store.
    pub rank_store_gbps: f64,
    /// Checkpoint-restart: from a failure's detection to every process started and its
    /// communicators formed, before the checkpoint loads (rescheduling, start-up).
    pub restart_s: f64,
    /// From a failure to its detection, the same for both ways of recovering.
    pub detect_s: f64,
    /// marathon: from detection to the new generation's groups formed.
    pub reform_s: f64,
    /// A rank's link to its peers, for state transfer.
    pub link_gbps: f64,
    pub gpus_per_node: usize,
    /// Nodes beside the job's own, ready to take a failed node's place.
    pub spare_nodes: usize,
    /// How long a node that failed in hardware is away.
    pub repair_s: f64,
}

/// Checkpoint-restart: every process stops at a failure, the job is started again and loads
/// its newest committed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restart {
    pub detect_s: f64,
    pub restart_s: f64,
    pub load_s: f64,
    /// Training since the newest committed checkpoint, done again: half an interval plus the
    /// persist that had not committed yet, on average.
    pub rework_s: f64,
    pub lost_per_failure_s: f64,
    /// The share of time lost to failures: lost per failure / MTBF.
    pub failures_fraction: f64,
    /// The share of time the job cannot run for want of nodes.
    pub capacity_fraction: f64,
    pub ettr: f64,
}

/// marathon's in-place recovery: the survivors re-form without the failed ranks and keep their
/// state in memory; the failed ranks' places are filled again when a spare or the repaired
/// node joins, from a peer's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InPlace {
    pub detect_s: f64,
    pub reform_s: f64,
    /// Moving the lost replica's shard of the moments to the survivors (the distributed
    /// optimizer's re-partition; nothing without it).
    pub transfer_s: f64,
    /// Training done again: the step the failure interrupted, or with one replica everything
    /// since the newest committed checkpoint.
    pub recompute_s: f64,
    /// A second re-forming when capacity returns, the joining ranks' state from a peer.
    pub rejoin_s: f64,
    /// With one replica there is no peer to recover from: the checkpoint's load, as
    /// checkpoint-restart pays it.
    pub reload_s: f64,
    pub lost_per_failure_s: f64,
    pub failures_fraction: f64,
    /// The share of the job's replicas missing while nodes are repaired, on average.
    pub capacity_fraction: f64,
    pub ettr: f64,
}

/// What a job of a layout pays for its checkpoints and failures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goodput {
    pub checkpoint: CheckpointSize,
    /// The stall of one checkpoint: the most loaded rank's copy to host memory.
    pub stall_s: f64,
    /// From the stall's end to the checkpoint committed in the store.
    pub persist_s: f64,
    /// Reading a checkpoint back.
    pub load_s: f64,
    /// Young's and Daly's optimum of the interval for the stall.
    pub young_interval_s: f64,
    pub daly_interval_s: f64,
    /// The interval used by both ways: Daly's, at least one persist (a snapshot waits for the
    /// previous one's persist), in whole steps.
    pub interval_steps: u64,
    pub interval_s: f64,
    /// The share of training time spent stalled: stall / (interval + stall).
    pub checkpoint_fraction: f64,
    pub restart: Restart,
    pub in_place: InPlace,
}

/// Young's (1974) optimal checkpoint interval for a checkpoint costing `delta` at a mean time
/// between failures `m`.
pub fn young_interval(delta: f64, m: f64) -> f64 {
    (2.0 * delta * m).sqrt()
}

/// Daly's (2006) higher-order optimum: sqrt(2 delta m) (1 + sqrt(delta / 2m) / 3 + delta / 18m)
/// - delta, or `m` once a checkpoint costs twice the mean time between failures.
pub fn daly_interval(delta: f64, m: f64) -> f64 {
    if delta >= 2.0 * m {
        return m;
    }
    young_interval(delta, m) * (1.0 + (delta / (2.0 * m)).sqrt() / 3.0 + delta / (18.0 * m)) - delta
}

/// The expected value of `f(k)` for `k` Poisson-distributed with mean `lambda`, summed until
/// the remaining tail is below 1e-12 (or `k` reaches `k_max`, past which `f` no longer changes).
fn poisson_mean(lambda: f64, k_max: usize, f: impl Fn(usize) -> f64) -> f64 {
    // In logarithms, so that a large mean does not underflow e^-lambda.
    let (mut ln_p, mut left, mut sum) = (-lambda, 1.0f64, 0.0);
    for k in 0..=k_max {
        if k == k_max {
            return sum + left.max(0.0) * f(k);
        }
        let p = ln_p.exp();
        sum += p * f(k);
        left -= p;
        if left < 1e-12 && k as f64 > lambda {
            break;
        }
        ln_p += lambda.ln() - ((k + 1) as f64).ln();
    }
    sum
}

/// The estimate for `config` under `layout`.
pub fn estimate(config: &GptConfig, layout: &ParallelLayout, a: &Assumptions) -> Goodput {
    let checkpoint = checkpoint_size(config, layout);
    let gb = 1e9;
    let stall_s = checkpoint.per_rank_bytes / (a.d2h_gbps * gb);
    let persist_s = (checkpoint.total_bytes / (a.store_gbps * gb))
        .max(checkpoint.per_rank_bytes / (a.rank_store_gbps * gb));
    let load_s = persist_s;
    let m = a.job_mtbf_s;
    let young = young_interval(stall_s, m);
    let daly = daly_interval(stall_s, m);
    let interval_steps = (daly.max(persist_s) / a.step_s).ceil().max(1.0) as u64;
    let interval_s = interval_steps as f64 * a.step_s;
    let checkpoint_fraction = stall_s / (interval_s + stall_s);
    let rework_s = interval_s / 2.0 + persist_s;

    // Nodes down for repair at a moment: Poisson, mean hardware failures per second x repair.
    let world = layout.world_size();
    let gpn = a.gpus_per_node.max(1);
    let nodes = world.div_ceil(gpn) + a.spare_nodes;
    let lambda = a.hardware_fraction * a.repair_s / m;
    let gpus_up = |down: usize| nodes.saturating_sub(down) * gpn;
    let restart_capacity = poisson_mean(lambda, nodes, |down| {
        if gpus_up(down) >= world {
            0.0
        } else {
            1.0
        }
    });
    let model_parallel = layout.tp * layout.pp;
    let in_place_capacity = poisson_mean(lambda, nodes, |down| {
        let replicas = (gpus_up(down) / model_parallel).min(layout.dp);
        (layout.dp - replicas) as f64 / layout.dp as f64
    });
    let ettr = |lost: f64, capacity: f64| {
        ((1.0 - lost / m - capacity) * (1.0 - checkpoint_fraction)).max(0.0)
    };

    let lost = a.detect_s + a.restart_s + load_s + rework_s;
    let restart = Restart {
        detect_s: a.detect_s,
        restart_s: a.restart_s,
        load_s,
        rework_s,
        lost_per_failure_s: lost,
        failures_fraction: lost / m,
        capacity_fraction: restart_capacity,
        ettr: ettr(lost, restart_capacity),
    };

    let link = a.link_gbps * gb;
    let params_rank = params_per_rank_max(config, layout) as f64;
    let (transfer_s, recompute_s, rejoin_s, reload_s) = if layout.dp > 1 {
        let shard_moved = if layout.distributed_optimizer {
            8.0 * (params_rank / layout.dp as f64).ceil() / link
        } else {
            0.0
        };
        (
            shard_moved,
            a.step_s,
            a.reform_s + checkpoint.join_bytes / link,
            0.0,
        )
    } else {
        (0.0, rework_s, 0.0, load_s)
    };
    let lost = a.detect_s + a.reform_s + transfer_s + recompute_s + rejoin_s + reload_s;
    let in_place = InPlace {
        detect_s: a.detect_s,
        reform_s: a.reform_s,
        transfer_s,
        recompute_s,
        rejoin_s,
        reload_s,
        lost_per_failure_s: lost,
        failures_fraction: lost / m,
        capacity_fraction: in_place_capacity,
        ettr: ettr(lost, in_place_capacity),
    };
    Goodput {
        checkpoint,
        stall_s,
        persist_s,
        load_s,
        young_interval_s: young,
        daly_interval_s: daly,
        interval_steps,
        interval_s,
        checkpoint_fraction,
        restart,
        in_place,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtnlg() -> (GptConfig, ParallelLayout) {
        (
            GptConfig {
                vocab_size: 50257,
                seq_len: 2048,
                n_layer: 105,
                n_head: 128,
                n_embd: 20480,
            },
            ParallelLayout {
                tp: 8,
                pp: 35,
                dp: 16,
                distributed_optimizer: true,
            },
        )
    }

    fn assumptions() -> Assumptions {
        Assumptions {
            job_mtbf_s: 36_000.0,
            hardware_fraction: 0.5,
            step_s: 20.0,
            d2h_gbps: 25.0,
            store_gbps: 100.0,
            rank_store_gbps: 2.0,
            restart_s: 600.0,
            detect_s: 5.0,
            reform_s: 10.0,
            link_gbps: 25.0,
            gpus_per_node: 8,
            spare_nodes: 0,
            repair_s: 3600.0,
        }
    }

    #[test]
    fn the_mtnlg_checkpoint_is_6_35_tb_of_fp32_masters_and_moments() {
        let (config, layout) = mtnlg();
        let c = checkpoint_size(&config, &layout);
        let params = ParamLayout::new(&config).numel() as f64;
        assert_eq!(c.total_bytes, 12.0 * params);
        assert!(
            (6.35e12..6.36e12).contains(&c.total_bytes),
            "{}",
            c.total_bytes
        );
        assert_eq!(c.master_bytes, c.adam_m_bytes);
        assert_eq!(c.adam_v_bytes, c.total_bytes / 3.0);
        // The most loaded rank holds 2.06B parameters (3 layers, an 8th of the embedding and
        // the positions); its 16 replicas write a 16th each.
        let rank = params_per_rank_max(&config, &layout) as f64;
        assert!((2.05e9..2.07e9).contains(&rank), "{rank}");
        assert_eq!(c.per_rank_bytes, 12.0 * (rank / 16.0).ceil());
        // A joining rank receives its weights and a 16th of the moments.
        assert_eq!(c.join_bytes, 4.0 * rank + 8.0 * (rank / 16.0).ceil());
        let replicated = checkpoint_size(
            &config,
            &ParallelLayout {
                distributed_optimizer: false,
                ..layout
            },
        );
        assert_eq!(replicated.per_rank_bytes, c.per_rank_bytes);
        assert_eq!(replicated.join_bytes, 12.0 * rank);
    }

    #[test]
    fn young_and_daly_match_hand_computed_intervals() {
        // delta 60 s, M 10 h: Young sqrt(2 x 60 x 36000) = 2078.46 s; Daly 2078.46 x (1 +
        // sqrt(60 / 72000) / 3 + 60 / 648000) - 60 = 2038.65 s.
        assert!((young_interval(60.0, 36_000.0) - 2078.461).abs() < 1e-3);
        assert!((daly_interval(60.0, 36_000.0) - 2038.654).abs() < 1e-3);
        assert_eq!(daly_interval(100.0, 40.0), 40.0);
    }

    #[test]
    fn poisson_means_sum_to_the_hand_computed_tails() {
        // P(k >= 1) for mean 0.2 is 1 - e^-0.2 = 0.181269.
        let p = poisson_mean(0.2, 100, |k| if k >= 1 { 1.0 } else { 0.0 });
        assert!((p - 0.181_269_25).abs() < 1e-8, "{p}");
        // E[k] = lambda, and the tail past k_max counts at f(k_max).
        assert!((poisson_mean(3.0, 1000, |k| k as f64) - 3.0).abs() < 1e-9);
        assert!((poisson_mean(3.0, 0, |_| 1.0) - 1.0).abs() < 1e-12);
        // A mean far past e^-lambda's range still sums to one.
        assert!((poisson_mean(2000.0, 100_000, |_| 1.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_mtnlg_estimate_matches_a_hand_computed_case() {
        let (config, layout) = mtnlg();
        let a = assumptions();
        let g = estimate(&config, &layout, &a);
        let c = &g.checkpoint;
        // Stall: a rank's 1.54 GB at 25 GB/s; persist: 6.355 TB at 100 GB/s, more than a
        // rank's 1.54 GB at 2 GB/s.
        assert!((g.stall_s - c.per_rank_bytes / 25e9).abs() < 1e-12);
        assert!((g.persist_s - c.total_bytes / 100e9).abs() < 1e-9);
        assert!((63.5..63.6).contains(&g.persist_s), "{}", g.persist_s);
        // Daly's interval for a 62 ms stall at 10 h is 67 s; a snapshot waits for the previous
        // persist (63.6 s), so 4 steps of 20 s.
        assert!(
            (60.0..70.0).contains(&g.daly_interval_s),
            "{}",
            g.daly_interval_s
        );
        assert_eq!(g.interval_steps, 4);
        assert_eq!(g.interval_s, 80.0);
        let r = &g.restart;
        assert!((r.rework_s - (40.0 + g.persist_s)).abs() < 1e-9);
        assert!((r.lost_per_failure_s - (5.0 + 600.0 + 2.0 * g.persist_s + 40.0)).abs() < 1e-9);
        // 560 nodes, none spare: the job stops whenever one is away. Nodes away: Poisson with
        // mean 0.5 x 3600 / 36000 = 0.05, so 1 - e^-0.05.
        assert!((r.capacity_fraction - (1.0 - (-0.05f64).exp())).abs() < 1e-9);
        let overhead = g.stall_s / (80.0 + g.stall_s);
        let expect =
            (1.0 - r.lost_per_failure_s / 36_000.0 - r.capacity_fraction) * (1.0 - overhead);
        assert!((r.ettr - expect).abs() < 1e-12, "{} {expect}", r.ettr);
        // In place: 5 + 10 + the moved 16th of the moments + one step + a rejoin (10 s and a
        // joining rank's state at 25 GB/s).
        let p = &g.in_place;
        let rank = params_per_rank_max(&config, &layout) as f64;
        let moved = 8.0 * (rank / 16.0).ceil() / 25e9;
        assert!((p.transfer_s - moved).abs() < 1e-12);
        assert!((p.rejoin_s - (10.0 + c.join_bytes / 25e9)).abs() < 1e-12);
        assert!((p.lost_per_failure_s - (15.0 + moved + 20.0 + p.rejoin_s)).abs() < 1e-9);
        // One node away costs one replica of 16 (559 x 8 GPUs hold 15 replicas of 280); 35
        // away, still one; 36, two.
        let one = 1.0 - (-0.05f64).exp();
        assert!(
            (p.capacity_fraction - one / 16.0).abs() < 1e-6,
            "{} {}",
            p.capacity_fraction,
            one / 16.0
        );
        assert!(p.ettr > r.ettr, "{} {}", p.ettr, r.ettr);
    }

    #[test]
    fn spares_take_a_failed_nodes_place_and_one_replica_reloads_from_storage() {
        let (config, layout) = mtnlg();
        let mut a = assumptions();
        a.spare_nodes = 35;
        let g = estimate(&config, &layout, &a);
        // The job stops only with more than 35 nodes away, which Poisson(0.05) all but never is.
        assert!(g.restart.capacity_fraction < 1e-60);
        assert!(g.in_place.capacity_fraction < 1e-60);
        // With one replica, marathon has no peer to recover from.
        let single = ParallelLayout {
            dp: 1,
            distributed_optimizer: false,
            ..layout
        };
        let g = estimate(&config, &single, &assumptions());
        let p = &g.in_place;
        assert_eq!(p.reload_s, g.load_s);
        assert_eq!(p.recompute_s, g.restart.rework_s);
        assert_eq!(p.transfer_s + p.rejoin_s, 0.0);
        assert_eq!(p.capacity_fraction, g.restart.capacity_fraction);
    }
}
