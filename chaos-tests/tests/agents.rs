//! The node agent's own code under simulation, over many seeds. A failure prints the seed, and
//! `MARATHON_SIM_SEED=<seed>` replays that one run.

use std::time::Instant;

use marathon_chaos::agents::{run, AgentsConfig};
use marathon_chaos::sim::{SimConfig, Sweep};

/// Seeds run by the test suite.
const SEEDS: u64 = 1000;

#[test]
fn every_seed_of_real_agents_keeps_the_invariants_and_settles() {
    let cfg = AgentsConfig::default();
    let seeds: Vec<u64> = match std::env::var("MARATHON_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MARATHON_SIM_SEED is a number")],
        Err(_) => (1..=SEEDS).collect(),
    };
    let many = seeds.len() > 100;
    let mut leases_lost = 0;
    let sweep = Sweep::run(seeds, |seed| {
        let r = run(seed, &cfg);
        leases_lost += r.leases_lost;
        r.report
    });
    eprintln!("{sweep}; {leases_lost} agents stopped by a lost lease");
    if let Some((seed, broke)) = sweep.failed.first() {
        panic!(
            "seed {seed} (replay with MARATHON_SIM_SEED={seed}):\n  {}",
            broke.join("\n  ")
        );
    }
    assert_eq!(sweep.too_quiet(), None);
    if many {
        assert!(leases_lost > sweep.seeds, "{leases_lost} leases lost");
        // Leaders that lost their lease and had not yet learned it proposed, and were fenced.
        assert!(sweep.fenced > 0, "no proposal was fenced");
    }
}

/// Seed 69: the leader's watch broke as the job ended and a node's lease ran out. Reading the
/// job's keys again, it took the lost node before the end, re-planned at once (an older change
/// had settled), and committed a generation after the job was done. It now reads the end first.
#[test]
fn seed_69_a_leader_reading_the_keys_again_as_the_job_ends_plans_nothing() {
    let r = run(69, &AgentsConfig::default());
    assert!(r.report.done_at_ms.is_some(), "the job ends in this seed");
    assert_eq!(r.report.violations, Vec::<String>::new());
}

#[test]
fn a_seed_of_real_agents_replays_the_same_run() {
    let cfg = AgentsConfig::default();
    assert_eq!(run(7, &cfg), run(7, &cfg));
}

/// 568 agents (560 nodes of 8 GPUs and 8 spares) of a tp 8 x pp 35 x dp 16 job, on 2 s leases,
/// with nodes and workers dying and returning: the agents' own code plans and re-plans at the
/// mission's scale within the invariants.
#[test]
fn the_agents_of_an_mtnlg_job_keep_the_invariants_at_full_scale() {
    let cfg = AgentsConfig {
        sim: SimConfig {
            nodes: 568,
            slots: 8,
            tp: 8,
            pp: 35,
            microbatches: 16,
            faults_ms: 4_000,
            quiet_ms: 3_000,
            p_node_death: 1e-5,
            p_revival: 0.01,
            p_worker_death: 1e-5,
            p_drop: 1e-4,
            lease_ttl_ms: 2_000,
            ..SimConfig::default()
        },
        p_lease_loss: 1e-5,
        ..AgentsConfig::default()
    };
    let started = Instant::now();
    let r = run(5, &cfg);
    eprintln!("{:?} in {:.1} s", r.report, started.elapsed().as_secs_f64());
    assert!(r.report.violations.is_empty(), "{:?}", r.report.violations);
    assert_eq!(
        r.commits[0].dp, 16,
        "the first plan is dp 16: {:?}",
        r.commits
    );
    let faults = r.report.node_deaths + r.report.worker_deaths + r.leases_lost;
    assert!(faults >= 2 && r.commits.len() >= 3, "{:?}", r);
}
