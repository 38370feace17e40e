//! The invariants a job must keep under faults, checked from what it leaves behind: its logs
//! beside the fault-free reference's, and the history of its keys in etcd. Each returns the
//! violations it found, saying what and where.

use std::collections::BTreeMap;
use std::path::Path;

use marathon_elastic::{JobKey, JobKeys};
use marathon_runtime::worker::StepCommit;
use serde_json::Value;

use crate::cluster::Seen;

fn jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot be read: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Each step's loss: the last record of the step (a step run again after a reload replaces
/// the first).
fn losses(rows: &[Value]) -> BTreeMap<u64, f64> {
    rows.iter()
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| Some((v["data"]["step"].as_u64()?, v["data"]["loss"].as_f64()?)))
        .collect()
}

/// The job in `dir` against its fault-free reference of the same seed:
/// - every step's loss within 1e-4 relative of the reference's (`metrics.jsonl` beside
///   `ref-metrics.jsonl`), so the final parameters agree;
/// - the samples each step's last generation fed, over all replicas, are exactly the
///   reference's: every sample of the global order consumed once (`samples.jsonl` beside
///   `ref-samples.jsonl`).
pub fn against_reference(dir: &Path, steps: u64) -> Vec<String> {
    let read = |name: &str| jsonl(&dir.join(name));
    let (metrics, reference, samples, ref_samples) = match (
        read("metrics.jsonl"),
        read("ref-metrics.jsonl"),
        read("samples.jsonl"),
        read("ref-samples.jsonl"),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        (a, b, c, d) => {
            return [a.err(), b.err(), c.err(), d.err()]
                .into_iter()
                .flatten()
                .collect()
        }
    };
    let mut v = Vec::new();
    let (got, want) = (losses(&metrics), losses(&reference));
    if got.len() as u64 != steps {
        v.push(format!("{} of {steps} steps logged a loss", got.len()));
    }
    for (step, w) in &want {
        match got.get(step) {
            Some(g) if (g - w).abs() <= 1e-4 * w.abs() => {}
            Some(g) => v.push(format!(
                "step {step}: loss {g}, fault-free {w} (more than 1e-4 relative apart)"
            )),
            None => v.push(format!("step {step}: no loss logged")),
        }
    }
    // The generation whose record of a step counts: the last that ran it.
    let mut last_gen: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &samples {
        if let (Some(s), Some(g)) = (r["step"].as_u64(), r["generation"].as_u64()) {
            let e = last_gen.entry(s).or_insert(g);
            *e = (*e).max(g);
        }
    }
    let per_step = |rows: &[Value], counted: &dyn Fn(&Value) -> bool| {
        let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for r in rows.iter().filter(|r| counted(r)) {
            let ids = r["samples"].as_array().into_iter().flatten();
            m.entry(r["step"].as_u64().unwrap_or(u64::MAX))
                .or_default()
                .extend(ids.filter_map(Value::as_u64));
        }
        m.values_mut().for_each(|ids| ids.sort_unstable());
        m
    };
    let consumed = per_step(&samples, &|r| {
        r["step"]
            .as_u64()
            .is_some_and(|s| r["generation"].as_u64() == last_gen.get(&s).copied())
    });
    let fed = per_step(&ref_samples, &|_| true);
    for (step, ids) in &fed {
        match consumed.get(step) {
            Some(got) if got == ids => {}
            Some(got) => {
                let lines: Vec<String> = samples
                    .iter()
                    .filter(|r| r["step"].as_u64() == Some(*step))
                    .map(|r| {
                        format!(
                            "generation {} replica {}: {} samples",
                            r["generation"],
                            r["replica"],
                            r["samples"].as_array().map_or(0, Vec::len)
                        )
                    })
                    .collect();
                v.push(format!(
                    "step {step}: {} samples consumed, not the fault-free {} (or not the same \
                     ones); its records: {}",
                    got.len(),
                    ids.len(),
                    lines.join("; ")
                ));
            }
            None => v.push(format!("step {step}: no samples consumed")),
        }
    }
    for step in consumed.keys().filter(|s| !fed.contains_key(s)) {
        v.push(format!(
            "step {step}: samples consumed beyond the job's steps"
        ));
    }
    v
}

/// From the history of the job's keys in etcd's order:
/// - generations are planned in increasing order, each once;
/// - no step commit of a generation lands after a newer generation was planned (a fenced
///   generation never commits);
/// - the steps committed within a generation only increase.
pub fn fencing(keys: &JobKeys, seen: &[Seen]) -> Vec<String> {
    let mut v = Vec::new();
    let mut planned = 0u64;
    let mut last_step: BTreeMap<u64, u64> = BTreeMap::new();
    for (at, key, value) in seen {
        let Some(value) = value else { continue };
        match keys.parse(key) {
            JobKey::Plan(g) => {
                if g <= planned {
                    v.push(format!(
                        "generation {g} planned at {at} ms after generation {planned}"
                    ));
                }
                planned = planned.max(g);
            }
            JobKey::Committed(g) => {
                if g < planned {
                    v.push(format!(
                        "a commit of generation {g} landed at {at} ms, after generation \
                         {planned} was planned: a fenced generation committed"
                    ));
                }
                if let Ok(c) = serde_json::from_slice::<StepCommit>(value) {
                    let last = last_step.entry(g).or_insert(c.step);
                    if c.step < *last {
                        v.push(format!(
                            "generation {g} committed step {} after step {last}",
                            c.step
                        ));
                    }
                    *last = (*last).max(c.step);
                }
            }
            _ => {}
        }
    }
    v
}
