//! The report of a set of scenarios: a table to read, the same as JSON to compare runs, and
//! as an HTML page with plots (the page of a run report, linking each kept scenario's own).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use marathon_runtime::report::{Chart, Page, Series, Style};
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

    /// The report as a page: the totals, a row per scenario, the time each lost per cause, the
    /// faults by kind, every violation, and links to the run reports of the scenarios kept
    /// (relative to `base`, the page's directory, for those under it).
    pub fn page(&self, base: Option<&Path>) -> Result<Page, String> {
        let mut page = Page::new("marathon chaos report");
        page.heading("Summary").table(
            &[],
            &[
                vec!["scenarios".into(), self.scenarios.len().to_string()],
                vec![
                    "failed".into(),
                    format!("{} {:?}", self.failed.len(), self.failed),
                ],
                vec!["wall time".into(), format!("{:.0} s", self.wall_s)],
                vec![
                    "faults injected".into(),
                    self.faults_by_kind.values().sum::<usize>().to_string(),
                ],
            ],
        );
        let rows: Vec<Vec<String>> = self
            .scenarios
            .iter()
            .map(|o| {
                vec![
                    o.seed.to_string(),
                    o.scenario.clone(),
                    o.injected.len().to_string(),
                    o.recoveries.to_string(),
                    format!("{:.2}", o.lost.detection_s),
                    format!("{:.2}", o.lost.reform_s),
                    format!("{:.2}", o.lost.transfer_s),
                    format!("{:.2}", o.lost.recomputed_s),
                    format!("{:.0}", o.wall_s),
                    if o.ok { "ok" } else { "FAILED" }.into(),
                ]
            })
            .collect();
        page.heading("Scenarios").table(
            &[
                "seed",
                "scenario",
                "faults",
                "recoveries",
                "detection s",
                "re-forming s",
                "transfer s",
                "recomputed s",
                "wall s",
                "verdict",
            ],
            &rows,
        );
        page.heading("Time lost to faults");
        let per = |name: &str, f: fn(&Outcome) -> f64| {
            Series::new(
                name,
                Style::Points,
                self.scenarios
                    .iter()
                    .map(|o| (o.seed as f64, f(o)))
                    .collect(),
            )
        };
        page.chart(
            &Chart::new("Time lost per scenario, by cause", "seed", "seconds")
                .series(per("failure detection", |o| o.lost.detection_s))
                .series(per("re-forming", |o| o.lost.reform_s))
                .series(per("state transfer", |o| o.lost.transfer_s))
                .series(per("steps recomputed", |o| o.lost.recomputed_s)),
            "no scenario ran",
        )?;
        page.chart(
            &Chart::new("Faults injected, by kind", "faults", "").bars(
                self.faults_by_kind
                    .iter()
                    .map(|(k, n)| (k.clone(), *n as f64))
                    .collect(),
            ),
            "no fault was injected",
        )?;
        let failed: Vec<&Outcome> = self.scenarios.iter().filter(|o| !o.ok).collect();
        if !failed.is_empty() {
            page.heading("Violations");
            for o in failed {
                page.paragraph(&format!(
                    "seed {} (replay: marathon chaos run --seed {} --keep DIR): {}",
                    o.seed,
                    o.seed,
                    o.violations.join("; ")
                ));
            }
        }
        let kept: Vec<(String, String)> = self
            .scenarios
            .iter()
            .filter_map(|o| {
                let report = Path::new(o.dir.as_deref()?).join("report.html");
                let at = report.canonicalize().ok()?;
                let base = base.and_then(|b| b.canonicalize().ok());
                let href = match base.as_deref().and_then(|b| at.strip_prefix(b).ok()) {
                    Some(rel) => rel.display().to_string(),
                    None => format!("file://{}", at.display()),
                };
                Some((format!("seed {}: the job's run report", o.seed), href))
            })
            .collect();
        if !kept.is_empty() {
            page.heading("Run reports of the scenarios kept")
                .links(&kept);
        }
        Ok(page)
    }

    /// Writes [`Report::page`] to `path`.
    pub fn write_html(&self, path: &Path) -> anyhow::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let page = self.page(Some(dir)).map_err(anyhow::Error::msg)?;
        std::fs::write(path, page.html())
            .map_err(|e| anyhow::anyhow!("write the report to {}: {e}", path.display()))
    }
}
