//! The report of a set of scenarios: a table to read, and the same as JSON to compare runs.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::run::Outcome;

/// Every scenario's outcome, and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenarios: Vec<Outcome>,
    /// Faults injected, by kind, over all scenarios.
    pub faults_by_kind: BTreeMap<String, usize>,
    pub failed: Vec<u64>,
    pub wall_s: f64,
}

impl Report {
    pub fn new(scenarios: Vec<Outcome>, wall_s: f64) -> Report {
        let mut faults_by_kind = BTreeMap::new();
        for i in scenarios.iter().flat_map(|o| &o.injected) {
            if i.note
                .as_deref()
                .is_none_or(|n| !n.starts_with("not injected"))
            {
                *faults_by_kind
                    .entry(i.fault.kind().to_string())
                    .or_default() += 1;
            }
        }
        let failed = scenarios.iter().filter(|o| !o.ok).map(|o| o.seed).collect();
        Report {
            scenarios,
            faults_by_kind,
            failed,
            wall_s,
        }
    }

    /// The table: one row per scenario, then the faults by kind and every violation with the
    /// seed that replays it.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ =
            writeln!(
            t,
            "{:>6}  {:<58}  {:>6}  {:>5}  {:>5}  {:>8}  {:>8}  {:>8}  {:>8}  {:>6}  {:>6}  verdict",
            "seed", "scenario", "faults", "recov", "agent", "detect", "reform", "transfer",
            "recomp", "steps", "wall"
        );
        let _ = writeln!(
            t,
            "{:>6}  {:<58}  {:>6}  {:>5}  {:>5}  {:>8}  {:>8}  {:>8}  {:>8}  {:>6}  {:>6}",
            "", "", "", "", "rest.", "s", "s", "s", "s", "recomp", "s"
        );
        for o in &self.scenarios {
            let injected = o
                .injected
                .iter()
                .filter(|i| {
                    i.note
                        .as_deref()
                        .is_none_or(|n| !n.starts_with("not injected"))
                })
                .count();
            let mut scenario = o.scenario.clone();
            if scenario.len() > 58 {
                scenario.truncate(55);
                scenario += "...";
            }
            let _ = writeln!(
                t,
                "{:>6}  {:<58}  {:>6}  {:>5}  {:>5}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>6}  {:>6.0}  {}",
                o.seed,
                scenario,
                injected,
                o.recoveries,
                o.agent_restarts,
                o.lost.detection_s,
                o.lost.reform_s,
                o.lost.transfer_s,
                o.lost.recomputed_s,
                o.recomputed_steps,
                o.wall_s,
                if o.ok { "ok" } else { "FAILED" }
            );
        }
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            t,
            "{} scenarios in {:.0} s, {} failed; faults injected: {}",
            self.scenarios.len(),
            self.wall_s,
            self.failed.len(),
            if kinds.is_empty() {
                "none".into()
            } else {
                kinds.join(", ")
            }
        );
        for o in &self.scenarios {
            for i in &o.injected {
                let note = i
                    .note
                    .as_deref()
                    .map_or(String::new(), |n| format!(" ({n})"));
                let _ = writeln!(
                    t,
                    "  seed {}: step {}: {}{note}",
                    o.seed, i.landed_at_step, i.what
                );
            }
        }
        for o in self.scenarios.iter().filter(|o| !o.ok) {
            let _ = writeln!(
                t,
                "seed {} FAILED (replay: marathon chaos run --seed {}):",
                o.seed, o.seed
            );
            for v in &o.violations {
                let _ = writeln!(t, "  - {v}");
            }
        }
        t
    }
}
