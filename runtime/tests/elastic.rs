//! Generations in the trainer: a running job's ranks re-form their process groups with a
//! different data-parallel degree at a step boundary and continue from their in-memory state;
//! a joining replica receives its state from a healthy one over the data-parallel group. The
//! job still computes what one process computes, and the data order goes on exactly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use marathon_elastic::InProcessCoordinator;
use marathon_model::ParallelLayout;
use marathon_runtime::comm::GroupSpec;
use marathon_runtime::{Groups, TrainConfig, Trainer};

const STEPS: u64 = 8;
const SWITCH: u64 = 3;

fn config(dir: &std::path::Path) -> TrainConfig {
    let train = synthetic_tokens(dir, "train.bin", 40_000, 256, 11);
    let mut cfg = parse(
        &small_config_toml(&train, None, 256)
            .replace("micro_batch = 4", "micro_batch = 2")
            .replace("global_batch = 8", "global_batch = 12"),
    );
    cfg.train.steps = STEPS;
    cfg
}

fn groups(
    coord: &InProcessCoordinator,
    generation: u64,
    layout: ParallelLayout,
    rank: usize,
) -> Groups {
    let mut template = GroupSpec::loopback("elastic", "", 0, 1, Duration::from_secs(60));
    template.generation = generation;
    Groups::connect(coord, layout.place(rank), &template).expect("join the generation's groups")
}

/// What one rank saw: the loss of every step it ran, its parameters right after joining (for
/// a joining rank) or at the switch, and at the end.
struct Seen {
    losses: Vec<(u64, f32)>,
    at_switch: Vec<f32>,
    params: Vec<f32>,
}

fn steps(t: &mut Trainer, to: u64, losses: &mut Vec<(u64, f32)>) {
    while t.step < to {
        let r = t.train_step().expect("step");
        losses.push((r.step, r.loss));
    }
}

/// Runs tp 2 x dp `before` to the switch, then tp 2 x dp `after`: ranks of replicas beyond
/// `after` leave, new ones join and receive replica 0's state.
fn resize(cfg: &TrainConfig, before: usize, after: usize) -> Vec<Seen> {
    let coord = Arc::new(InProcessCoordinator::new());
    let (old, new) = (
        ParallelLayout::new(2, 1, before),
        ParallelLayout::new(2, 1, after),
    );
    let ranks = old.world_size().max(new.world_size());
    let handles: Vec<_> = (0..ranks)
        .map(|rank| {
            let (coord, cfg) = (coord.clone(), cfg.clone());
            std::thread::spawn(move || {
                let mut losses = Vec::new();
                let mut t = if rank < old.world_size() {
                    let mut c = cfg.clone();
                    c.parallel.tp = 2;
                    c.parallel.dp = before;
                    let mut t =
                        Trainer::with_groups(c, groups(&coord, 0, old, rank)).expect("trainer");
                    steps(&mut t, SWITCH, &mut losses);
                    if rank >= new.world_size() {
                        // This replica leaves at the step boundary.
                        return Seen {
                            losses,
                            at_switch: Vec::new(),
                            params: t.model.params,
                        };
                    }
                    t.regroup(groups(&coord, 1, new, rank)).expect("regroup");
                    t
                } else {
                    let mut c = cfg.clone();
                    c.parallel.tp = 2;
                    c.parallel.dp = after;
                    Trainer::with_groups(c, groups(&coord, 1, new, rank)).expect("joining trainer")
                };
                // Healthy replicas and joiners alike take replica 0's state.
                t.transfer_state(0).expect("state transfer");
                let at_switch = t.model.params.clone();
                assert_eq!(t.step, SWITCH, "rank {rank} continues at the switch");
                steps(&mut t, STEPS, &mut losses);
                Seen {
                    losses,
                    at_switch,
                    params: t.model.params,
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

/// The losses of the same job in one process, step by step.
fn one_process(cfg: &TrainConfig) -> Vec<f32> {
    let mut single = Trainer::new(cfg.clone()).expect("single process");
    (0..STEPS)
        .map(|_| single.train_step().expect("step").loss)
        .collect()
}

/// Every (step, loss) a rank saw is one process's loss of that step, within 1e-5 relative.
fn assert_losses(what: &str, losses: &[(u64, f32)], reference: &[f32]) {
    for &(step, loss) in losses {
        let want = reference[step as usize - 1];
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "{what} step {step}: {loss} vs {want}"
        );
    }
}

fn check(cfg: &TrainConfig, seen: &[Seen], survivors: usize, what: &str) {
    let reference = one_process(cfg);
    for (r, s) in seen.iter().enumerate().take(survivors) {
        assert_losses(&format!("{what}: rank {r}"), &s.losses, &reference);
        assert_eq!(
            s.losses.last().map(|l| l.0),
            Some(STEPS),
            "{what}: rank {r} finished"
        );
        // Ranks with the same tensor rank hold the same shard: they agree bitwise.
        let twin = &seen[r % 2];
        assert!(
            s.params
                .iter()
                .zip(&twin.params)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: rank {r} disagrees with rank {}",
            r % 2
        );
        assert!(
            s.at_switch
                .iter()
                .zip(&twin.at_switch)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: rank {r} did not start the new generation from replica 0's state"
        );
    }
}

#[test]
fn a_replica_joins_a_running_job_and_receives_its_state_from_a_peer() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let seen = resize(&cfg, 2, 3);
    // The joining replica (ranks 4 and 5) ran only the steps after the switch.
    assert_eq!(seen[4].losses.first().map(|l| l.0), Some(SWITCH + 1));
    check(&cfg, &seen, 6, "dp2 -> dp3");
}

#[test]
fn a_job_shrinks_at_a_step_boundary_and_continues_from_memory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let seen = resize(&cfg, 3, 2);
    check(&cfg, &seen, 4, "dp3 -> dp2");
}

#[test]
fn a_new_generation_must_keep_each_ranks_shard() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    // Groups that would make a one-process rank tensor rank 1 of 2.
    let coord = Arc::new(InProcessCoordinator::new());
    let joins: Vec<_> = (0..2)
        .map(|rank| {
            let coord = coord.clone();
            std::thread::spawn(move || groups(&coord, 1, ParallelLayout::new(2, 1, 1), rank))
        })
        .collect();
    let mut both: Vec<Groups> = joins.into_iter().map(|h| h.join().expect("join")).collect();
    let mut t = Trainer::new(cfg).expect("trainer");
    let err = t
        .regroup(both.pop().expect("rank 1's groups"))
        .expect_err("a different shard");
    assert!(
        err.to_string().contains(
            "a new generation must keep each rank's shard: this rank holds tensor rank 0 of 1"
        ),
        "{err}"
    );
}

#[test]
fn replicas_that_ended_a_step_apart_continue_from_the_most_advanced() {
    // Two replicas run three steps together. Then replica 0 applies step 4 and replica 1 does
    // not, as when a peer dies after only replica 0 received the step's last collective. In the
    // next generation both continue from replica 0's step 4.
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let dp2 = ParallelLayout::new(1, 1, 2);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, mut cfg) = (coord.clone(), cfg.clone());
            cfg.parallel.dp = 2;
            std::thread::spawn(move || {
                let mut t =
                    Trainer::with_groups(cfg, groups(&coord, 0, dp2, rank)).expect("trainer");
                let mut losses = Vec::new();
                steps(&mut t, SWITCH, &mut losses);
                t.regroup(Groups::default()).expect("alone");
                if rank == 0 {
                    steps(&mut t, SWITCH + 1, &mut losses);
                }
                t.regroup(groups(&coord, 2, dp2, rank)).expect("regroup");
                assert_eq!(t.reconcile().expect("reconcile"), SWITCH + 1, "rank {rank}");
                steps(&mut t, STEPS, &mut losses);
                (losses, t.model.params)
            })
        })
        .collect();
    let runs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    let reference = one_process(&cfg);
    for (rank, (losses, params)) in runs.iter().enumerate() {
        assert_losses(&format!("rank {rank}"), losses, &reference);
        assert!(
            params
                .iter()
                .zip(&runs[0].1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {rank}"
        );
    }
    // Exactly once: replica 1 never ran step 4, and each step ran once per replica otherwise.
    let ran: Vec<u64> = runs[1].0.iter().map(|l| l.0).collect();
    assert_eq!(ran, [1, 2, 3, 5, 6, 7, 8]);
}

#[test]
fn shards_left_at_different_steps_are_refused_on_every_rank() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let tp2 = ParallelLayout::new(2, 1, 1);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, mut cfg) = (coord.clone(), cfg.clone());
            cfg.parallel.tp = 2;
            std::thread::spawn(move || {
                let mut t =
                    Trainer::with_groups(cfg, groups(&coord, 0, tp2, rank)).expect("trainer");
                t.train_step().expect("step");
                // One tensor-parallel rank claims a step the other never took.
                t.step += rank as u64;
                t.reconcile()
                    .map(|_| ())
                    .expect_err("shards at steps 1 and 2")
                    .to_string()
            })
        })
        .collect();
    for h in handles {
        let err = h.join().expect("rank");
        assert!(
            err.contains("stopped at different steps") && err.contains("[1, 2]"),
            "{err}"
        );
    }
}

/// Regression: a generation whose workers had all just started (their plan said their blocks
/// kept state, but the processes holding it were gone) reconciled at step 0 and trained the
/// job again from the initial weights. Every rank must refuse instead, so the job resumes from
/// its newest checkpoint.
#[test]
fn a_generation_in_which_no_replica_holds_state_is_refused_on_every_rank() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let tp2dp2 = ParallelLayout::new(2, 1, 2);
    let handles: Vec<_> = (0..4)
        .map(|rank| {
            let (coord, mut cfg) = (coord.clone(), cfg.clone());
            (cfg.parallel.tp, cfg.parallel.dp) = (2, 2);
            std::thread::spawn(move || {
                // Replica 0 (ranks 0 and 1) holds the job's state; replica 1 joins. The
                // tensor-parallel pair of replica 1 alone, with no holder, must fail too.
                let first = groups(&coord, 0, tp2dp2, rank);
                let mut t = if rank < 2 {
                    Trainer::with_groups(cfg, first)
                } else {
                    Trainer::joining(cfg, first)
                }
                .expect("trainer");
                t.reconcile()
                    .expect("a holder in every data-parallel group");
                // Now every rank of a tensor-parallel x data-parallel job joined.
                let second = groups(&coord, 1, tp2dp2, rank);
                let mut fresh = Trainer::joining(t.cfg.clone(), second).expect("trainer");
                fresh
                    .reconcile()
                    .map(|_| ())
                    .expect_err("nobody holds state")
                    .to_string()
            })
        })
        .collect();
    for h in handles {
        let err = h.join().expect("rank");
        assert!(
            err.contains("4 ranks hold shards of which no replica holds state"),
            "{err}"
        );
    }
}

/// The distributed optimizer through a resize: dp 3 loses replica 1 and continues as dp 2 from
/// memory (its moment chunk lived on as replica 0's mirror), then a new replica joins and
/// receives its chunks from peers. Nothing comes from storage: the job has none. The losses
/// are one process's, and the replicas end with the same parameters.
#[test]
fn the_distributed_optimizer_shrinks_and_grows_from_memory() {
    const GROW: u64 = 5;
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    assert!(cfg.checkpoint.is_none(), "nothing to read from storage");
    let coord = Arc::new(InProcessCoordinator::new());
    let (dp3, dp2) = (ParallelLayout::new(1, 1, 3), ParallelLayout::new(1, 1, 2));
    let zero = |dp: usize| {
        let mut c = cfg.clone();
        c.parallel.dp = dp;
        c.parallel.distributed_optimizer = true;
        c
    };
    let handles: Vec<_> = (0..4)
        .map(|rank| {
            let (coord, first, joiner) = (coord.clone(), zero(3), zero(3));
            std::thread::spawn(move || {
                let mut losses = Vec::new();
                if rank == 3 {
                    // Joins the third generation as replica 2.
                    let mut t =
                        Trainer::joining(joiner, groups(&coord, 2, dp3, 2)).expect("joiner");
                    t.mirror_moments().expect("mirror");
                    assert_eq!(t.reconcile().expect("reconcile"), GROW);
                    steps(&mut t, STEPS, &mut losses);
                    return (losses, t.model.params);
                }
                let mut t =
                    Trainer::with_groups(first, groups(&coord, 0, dp3, rank)).expect("trainer");
                t.mirror_moments().expect("mirror");
                assert_eq!(t.reconcile().expect("reconcile"), 0);
                steps(&mut t, SWITCH, &mut losses);
                if rank == 1 {
                    // Lost: its moment chunk survives only as replica 0's mirror.
                    return (losses, Vec::new());
                }
                t.regroup(groups(&coord, 1, dp2, rank / 2))
                    .expect("regroup to dp 2");
                assert_eq!(t.reconcile().expect("reconcile"), SWITCH, "rank {rank}");
                steps(&mut t, GROW, &mut losses);
                t.regroup(groups(&coord, 2, dp3, rank / 2))
                    .expect("regroup to dp 3");
                assert_eq!(t.reconcile().expect("reconcile"), GROW, "rank {rank}");
                steps(&mut t, STEPS, &mut losses);
                (losses, t.model.params)
            })
        })
        .collect();
    let runs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    let reference = one_process(&cfg);
    for (rank, (losses, params)) in runs.iter().enumerate() {
        assert_losses(&format!("rank {rank}"), losses, &reference);
        if rank != 1 {
            assert_eq!(losses.last().map(|l| l.0), Some(STEPS), "rank {rank}");
            assert!(
                params
                    .iter()
                    .zip(&runs[0].1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {rank} disagrees with rank 0"
            );
        }
    }
}

/// Without mirrors, a lost replica's moment chunk has no live copy: every rank refuses to
/// continue, so the job resumes from its newest checkpoint rather than from half its moments.
#[test]
fn a_lost_chunk_without_a_mirror_is_refused_on_every_rank() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let (dp2, alone) = (ParallelLayout::new(1, 1, 2), ParallelLayout::new(1, 1, 1));
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, mut cfg) = (coord.clone(), cfg.clone());
            (cfg.parallel.dp, cfg.parallel.distributed_optimizer) = (2, true);
            std::thread::spawn(move || {
                let mut t =
                    Trainer::with_groups(cfg, groups(&coord, 0, dp2, rank)).expect("trainer");
                t.train_step().expect("step");
                if rank == 1 {
                    return None;
                }
                t.regroup(groups(&coord, 1, alone, 0)).expect("regroup");
                Some(
                    t.reconcile()
                        .map(|_| ())
                        .expect_err("chunk 1 is lost")
                        .to_string(),
                )
            })
        })
        .collect();
    let err = handles
        .into_iter()
        .filter_map(|h| h.join().expect("rank"))
        .next()
        .expect("the survivor's error");
    assert!(
        err.contains("some chunk has no live copy") && err.contains("newest checkpoint"),
        "{err}"
    );
}

/// A replica that missed a reload holds an older history, even a more advanced one: reconcile
/// takes the state of the newest lineage. Here replica 1 trained three steps in generation 1,
/// away from the job, while the job started again from its initial weights in generation 2
/// (as after a reload that found no checkpoint); both continue from step 0 with the initial
/// weights, not from replica 1's step 3.
#[test]
fn a_replica_that_missed_a_reload_does_not_win_with_its_older_history() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let dp2 = ParallelLayout::new(1, 1, 2);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, mut cfg) = (coord.clone(), cfg.clone());
            cfg.parallel.dp = 2;
            std::thread::spawn(move || {
                let mut alone = cfg.clone();
                alone.parallel.dp = 1;
                let mut t = if rank == 1 {
                    let mut t = Trainer::with_groups(alone, Groups::default()).expect("trainer");
                    t.set_generation(1);
                    let mut losses = Vec::new();
                    steps(&mut t, SWITCH, &mut losses);
                    t.regroup(groups(&coord, 2, dp2, rank)).expect("regroup");
                    t
                } else {
                    let mut t =
                        Trainer::with_groups(cfg, groups(&coord, 2, dp2, rank)).expect("trainer");
                    t.set_generation(2);
                    t
                };
                let step = t.reconcile().expect("reconcile");
                (step, t.model.params.clone())
            })
        })
        .collect();
    let runs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    let initial = Trainer::new(cfg).expect("single process").model.params;
    for (rank, (step, params)) in runs.iter().enumerate() {
        assert_eq!(*step, 0, "rank {rank}");
        assert!(
            params
                .iter()
                .zip(&initial)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {rank} does not hold the initial weights"
        );
    }
}

/// A generation whose metrics writer is new (here a joining replica, whose file is on its own
/// host) logs the step it continues from, taken from a replica that applied it: the step the
/// old writer logged on a host that is gone, or never logged because the step's last
/// collective failed under it. The record is the one the replicas made.
#[test]
fn a_new_metrics_writer_logs_the_step_its_generation_continues_from() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = config(dir.path());
    let coord = Arc::new(InProcessCoordinator::new());
    let (dp2, dp3) = (ParallelLayout::new(1, 1, 2), ParallelLayout::new(1, 1, 3));
    let zero = |dp: usize, metrics: &str| {
        let mut c = cfg.clone();
        c.parallel.dp = dp;
        c.parallel.distributed_optimizer = true;
        c.train.metrics = Some(dir.path().join(metrics));
        c
    };
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            let (coord, old, joiner) = (coord.clone(), zero(2, "gone.jsonl"), zero(3, "new.jsonl"));
            std::thread::spawn(move || {
                let mut losses = Vec::new();
                let mut t = if rank == 2 {
                    // Joins the second generation as replica 0, the writer of the metrics.
                    Trainer::joining(joiner, groups(&coord, 1, dp3, 0)).expect("joiner")
                } else {
                    let mut t =
                        Trainer::with_groups(old, groups(&coord, 0, dp2, rank)).expect("trainer");
                    t.mirror_moments().expect("mirror");
                    assert_eq!(t.reconcile().expect("reconcile"), 0);
                    steps(&mut t, SWITCH, &mut losses);
                    t.regroup(groups(&coord, 1, dp3, rank + 1))
                        .expect("regroup to dp 3");
                    t
                };
                t.mirror_moments().expect("mirror");
                assert_eq!(t.reconcile().expect("reconcile"), SWITCH, "rank {rank}");
                steps(&mut t, STEPS, &mut losses);
                losses
            })
        })
        .collect();
    for h in handles {
        h.join().expect("rank");
    }
    let reference = one_process(&cfg);
    let text = std::fs::read_to_string(dir.path().join("new.jsonl")).expect("new writer's file");
    let logged: Vec<(u64, f32)> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "step")
        .map(|v| {
            let d = &v["data"];
            (
                d["step"].as_u64().expect("step"),
                d["loss"].as_f64().expect("loss") as f32,
            )
        })
        .collect();
    let steps: Vec<u64> = logged.iter().map(|l| l.0).collect();
    assert_eq!(steps, (SWITCH..=STEPS).collect::<Vec<_>>(), "{text}");
    assert_losses("the new writer", &logged, &reference);
}
