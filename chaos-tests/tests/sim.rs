//! The coordination protocol under simulation, over many seeds. A failure prints the seed, and
//! `MARATHON_SIM_SEED=<seed>` replays that one run.

use marathon_chaos::sim::{run, SimConfig, Sweep};

/// Seeds run by the test suite.
const SEEDS: u64 = 2000;

#[test]
fn every_seed_keeps_the_protocols_invariants_and_settles() {
    let cfg = SimConfig::default();
    let sweep = Sweep::run(seeds(), |seed| run(seed, &cfg));
    eprintln!("{sweep}");
    if let Some((seed, broke)) = sweep.failed.first() {
        panic!(
            "seed {seed} (replay with MARATHON_SIM_SEED={seed}):\n  {}",
            broke.join("\n  ")
        );
    }
    // The runs are shaken, not idle: failures and re-plans happen.
    assert_eq!(sweep.too_quiet(), None);
}

/// The suite's seeds, or the one `MARATHON_SIM_SEED` names.
fn seeds() -> Vec<u64> {
    match std::env::var("MARATHON_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MARATHON_SIM_SEED is a number")],
        Err(_) => (1..=SEEDS).collect(),
    }
}

#[test]
fn a_seed_replays_the_same_run() {
    let cfg = SimConfig::default();
    let (a, b) = (run(7, &cfg), run(7, &cfg));
    assert_eq!(
        (a.generations, a.node_deaths, a.worker_deaths, a.dropped),
        (b.generations, b.node_deaths, b.worker_deaths, b.dropped)
    );
}

mod weeks {
    use marathon_chaos::weeks::{run, WeeksConfig, PRESETS};
    use marathon_model::goodput::{estimate, Assumptions};
    use marathon_model::GptConfig;
    use marathon_model::ParallelLayout;

    /// A job of 8 nodes of 4 GPUs (tp 2 x pp 2 x dp 8) failing about once an hour, for days.
    fn config(seed: u64, spare_nodes: usize, repair_hours: f64) -> WeeksConfig {
        let model = GptConfig {
            vocab_size: 50257,
            seq_len: 1024,
            n_layer: 24,
            n_head: 16,
            n_embd: 1024,
        };
        let layout = ParallelLayout {
            tp: 2,
            pp: 2,
            dp: 8,
            distributed_optimizer: true,
        };
        let assumptions = Assumptions {
            job_mtbf_s: 3600.0,
            hardware_fraction: 0.7,
            step_s: 2.0,
            d2h_gbps: 25.0,
            store_gbps: 10.0,
            rank_store_gbps: 1.0,
            restart_s: 300.0,
            detect_s: 5.0,
            reform_s: 5.0,
            link_gbps: 25.0,
            gpus_per_node: 4,
            spare_nodes,
            repair_s: repair_hours * 3600.0,
        };
        let goodput = estimate(&model, &layout, &assumptions);
        WeeksConfig {
            tp: 2,
            pp: 2,
            dp: 8,
            distributed_optimizer: true,
            microbatches: 64,
            days: 5.0,
            seed,
            // One failure an hour over the job's 32 GPUs.
            gpu_mtbf_hours: 32.0,
            cooldown_s: 30.0,
            lease_ttl_ms: 5000,
            assumptions,
            goodput,
        }
    }

    #[test]
    fn a_weeks_long_run_keeps_the_invariants_and_loses_less_than_checkpoint_restart() {
        for seed in 1..=3 {
            let r = run(&config(seed, 2, 4.0));
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            // About 120 failures in 5 days, most of them in hardware.
            let failures = r.hardware_failures + r.worker_failures;
            assert!((60..240).contains(&failures), "seed {seed}: {failures}");
            assert!(r.hardware_failures > r.worker_failures, "{r:?}");
            assert!(r.repairs > 0 && r.generations > failures / 2, "{r:?}");
            for (way, l) in [("marathon", &r.marathon), ("restart", &r.restart)] {
                assert!(
                    l.lost_s.values().all(|s| *s > 0.0) && l.ettr > 0.0 && l.ettr < 1.0,
                    "seed {seed} {way}: {l:?}"
                );
            }
            // Each failure costs checkpoint-restart a restart and a load; marathon never.
            assert!(r.restart.lost_s["restart"] >= 300.0 * 30.0, "{r:?}");
            assert!(!r.marathon.lost_s.contains_key("restart"), "{r:?}");
            assert!(r.marathon.ettr > r.restart.ettr, "seed {seed}: {r:?}");
        }
    }

    #[test]
    fn without_spares_the_job_shrinks_while_nodes_are_repaired_and_grows_back() {
        let r = run(&config(7, 0, 12.0));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(r.dp_min < 8 && r.dp_mean < 8.0, "{r:?}");
        assert!(r.dp_over_time.iter().any(|&(_, dp)| dp == 8) && r.dp_over_time.len() > 2);
        // Missing replicas cost marathon capacity; checkpoint-restart waits for whole nodes.
        assert!(r.marathon.lost_s["waiting for capacity"] > 0.0, "{r:?}");
        assert!(r.restart.lost_s["waiting for capacity"] > 0.0, "{r:?}");
    }

    #[test]
    fn a_seed_replays_the_same_weeks() {
        let (a, b) = (run(&config(11, 1, 4.0)), run(&config(11, 1, 4.0)));
        assert_eq!(a.dp_over_time, b.dp_over_time);
        assert_eq!(a.marathon.lost_s, b.marathon.lost_s);
        assert_eq!(a.restart.lost_s, b.restart.lost_s);
        assert_eq!(a.generations, b.generations);
        let c = run(&config(12, 1, 4.0));
        assert_ne!(a.marathon.lost_s, c.marathon.lost_s);
        assert_eq!(PRESETS[0].name, "llama3");
    }
}
