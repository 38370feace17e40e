//! The coordination protocol under simulation, over many seeds. A failure prints the seed, and
//! `MARATHON_SIM_SEED=<seed>` replays that one run.

use std::time::Instant;

use marathon_chaos::sim::{run, SimConfig};

/// Seeds run by the test suite.
const SEEDS: u64 = 2000;

#[test]
fn every_seed_keeps_the_protocols_invariants_and_settles() {
    let cfg = SimConfig::default();
    let seeds: Vec<u64> = match std::env::var("MARATHON_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MARATHON_SIM_SEED is a number")],
        Err(_) => (1..=SEEDS).collect(),
    };
    let started = Instant::now();
    let (mut generations, mut faults, mut fenced, mut ended) = (0, 0, 0, 0);
    for &seed in &seeds {
        let r = run(seed, &cfg);
        assert!(
            r.violations.is_empty(),
            "seed {seed} (replay with MARATHON_SIM_SEED={seed}):\n  {}",
            r.violations.join("\n  ")
        );
        generations += r.generations;
        faults += r.node_deaths + r.worker_deaths + r.revivals + r.dropped;
        fenced += r.fenced_proposals;
        ended += u64::from(r.done_at_ms.is_some());
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} seeds in {secs:.1} s ({:.0} seeds/s): {generations} generations, {faults} faults, \
         {fenced} fenced proposals, {ended} runs in which the job ended amid the faults",
        seeds.len(),
        seeds.len() as f64 / secs
    );
    // The runs are shaken, not idle: failures and re-plans happen.
    assert!(
        generations > seeds.len() as u64 * 2,
        "{generations} generations"
    );
    if seeds.len() > 100 {
        assert!(
            ended > seeds.len() as u64 / 5,
            "{ended} runs ended amid faults"
        );
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
