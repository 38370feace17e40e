//! The invariants a job must keep under faults, checked from what it leaves behind: its logs
//! beside the fault-free reference's, and the history of its keys in etcd. Each returns the
//! violations it found, saying what and where.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use marathon_elastic::{JobKey, JobKeys};
use marathon_runtime::records::StepCommit;
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
///   generation never commits), nor any checkpoint's commit record (its `epoch`, the
///   generation of its writer: a committer stalled across a change of generation cannot
///   commit);
/// - each checkpoint's commit record is written once;
/// - the steps committed within a generation only increase.
pub fn fencing(keys: &JobKeys, seen: &[Seen]) -> Vec<String> {
    let mut v = Vec::new();
    let mut planned = 0u64;
    let mut last_step: BTreeMap<u64, u64> = BTreeMap::new();
    let mut recorded = BTreeSet::new();
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
            JobKey::Checkpoint(step) => {
                let epoch = serde_json::from_slice::<serde_json::Value>(value)
                    .ok()
                    .and_then(|r| r["epoch"].as_u64());
                match epoch {
                    Some(g) if g < planned => v.push(format!(
                        "the checkpoint of step {step} was committed at {at} ms by generation \
                         {g}, after generation {planned} was planned: a fenced writer committed"
                    )),
                    _ => {}
                }
                if !recorded.insert(step) {
                    v.push(format!(
                        "the checkpoint of step {step} was committed a second time at {at} ms"
                    ));
                }
            }
            _ => {}
        }
    }
    v
}

/// From the generations' start records in etcd (`StepCommit::reloaded`, rank 0's):
/// - no generation loaded the checkpoint of step `torn` (its manifest was torn: never
///   committed);
/// - no generation that began forming after a bit was flipped in the checkpoint of a step
///   (`flipped`: the step and when) loaded that checkpoint: the load must find the damage and
///   take the one before.
pub fn checkpoint_loads(
    keys: &JobKeys,
    seen: &[Seen],
    torn: Option<u64>,
    flipped: &[(u64, u64)],
) -> Vec<String> {
    let mut v = Vec::new();
    for (_, key, value) in seen {
        let (JobKey::Committed(g), Some(value)) = (keys.parse(key), value) else {
            continue;
        };
        let Ok(c) = serde_json::from_slice::<StepCommit>(value) else {
            continue;
        };
        let Some(step) = c.reloaded.filter(|&s| s > 0) else {
            continue;
        };
        if c.loss.is_some() {
            // Only a generation's start record says what it loaded first.
            continue;
        }
        if Some(step) == torn {
            v.push(format!(
                "generation {g} loaded the uncommitted checkpoint of step {step} (its manifest \
                 was torn)"
            ));
        }
        if let Some(&(_, at)) = flipped
            .iter()
            .find(|&&(f, at)| f == step && c.told_at_ms >= at)
        {
            v.push(format!(
                "generation {g}, told to start at {} ms, loaded the checkpoint of step {step}, \
                 damaged at {at} ms",
                c.told_at_ms
            ));
        }
    }
    v
}

/// From the agents' and workers' log lines: no rendezvous ran out its deadline. A member
/// missing from a generation is found dead and the generation superseded, which aborts its
/// rendezvous long before.
pub fn rendezvous_deadlines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let deadline = [
        "did not connect within",
        "did not appear within",
        "timed out",
    ];
    lines
        .into_iter()
        // A connection refused at rendezvous (an impostor's greeting that timed out) is not
        // the rendezvous waiting out its deadline.
        .filter(|l| {
            l.contains("rendezvous of group")
                && !l.contains("refused a connection")
                && deadline.iter().any(|d| l.contains(d))
        })
        .map(|l| format!("a rendezvous waited out its deadline instead of being aborted: {l}"))
        .collect()
}

/// Every forged rendezvous connection that a listener answered (`forged`: its local address,
/// and whether the listener then closed it) was refused: closed without a byte more, never
/// kept as a member. Also returns how many of them the logs show refused, by address.
pub fn forged_refused<'a>(
    forged: &[(String, bool)],
    lines: impl IntoIterator<Item = &'a str>,
) -> (Vec<String>, usize) {
    let refusals: Vec<&str> = lines
        .into_iter()
        .filter(|l| l.contains("refused a connection from"))
        .collect();
    let logged = forged
        .iter()
        .filter(|(addr, _)| {
            let from = format!("refused a connection from {addr}:");
            refusals.iter().any(|l| l.contains(&from))
        })
        .count();
    let v = forged
        .iter()
        .filter(|(_, closed)| !closed)
        .map(|(addr, _)| {
            format!(
                "a forged rendezvous connection from {addr}, without the group secret, was \
                 answered and then kept open by its listener instead of refused"
            )
        })
        .collect();
    (v, logged)
}

/// From `marathon ckpt verify` of the store at the end (its stdout and stderr) and the job's
/// history: every checkpoint in the store verifies, except one whose bit was flipped (at the
/// time given) and that was not written again since, or a torn manifest's; of the checkpoints
/// ever committed (`ever`, as the harness saw them while the job ran), the newest `keep_last`
/// are all there (retention lost none it should keep), and the last step's is one of them.
pub fn checkpoints_in_store(
    (out, err): (&str, &str),
    keys: &JobKeys,
    seen: &[Seen],
    flipped: &[(u64, u64)],
    torn: Option<u64>,
    mut ever: BTreeSet<u64>,
    keep_last: usize,
    last_step: u64,
) -> Vec<String> {
    let mut v = Vec::new();
    let mut present = BTreeMap::new();
    for line in out.lines() {
        let Some((step, rest)) = line.strip_prefix("step ").and_then(|l| l.split_once(": ")) else {
            continue;
        };
        if let Ok(step) = step.parse::<u64>() {
            present.insert(step, rest.starts_with("ok"));
        }
    }
    let rewritten = |step: u64, after: u64| {
        seen.iter()
            .any(|(t, k, _)| *t > after && keys.parse(k) == JobKey::Checkpoint(step))
    };
    for (&step, &ok) in &present {
        let damaged = flipped
            .iter()
            .any(|&(f, at)| f == step && !rewritten(step, at));
        if !ok && !damaged && Some(step) != torn {
            v.push(format!(
                "the committed checkpoint of step {step} fails `marathon ckpt verify`:\n{out}{err}"
            ));
        }
    }
    ever.extend(present.keys());
    // A torn manifest is not a commit, though its object exists for a while; unless the
    // writer's retry put it whole, and then it verifies.
    let ever: Vec<u64> = ever
        .into_iter()
        .filter(|&step| Some(step) != torn || present.get(&step) == Some(&true))
        .collect();
    let newest = &ever[ever.len().saturating_sub(keep_last)..];
    for step in newest {
        if !present.contains_key(step) {
            v.push(format!(
                "the committed checkpoint of step {step} is gone: retention keeps the newest \
                 {keep_last} of those committed ({ever:?}), {newest:?}; the store holds {:?}",
                present.keys().collect::<Vec<_>>()
            ));
        }
    }
    if !present.contains_key(&last_step) {
        v.push(format!(
            "the job's last step, {last_step}, has no committed checkpoint; the store holds {:?}",
            present.keys().collect::<Vec<_>>()
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    //! Every invariant fed a doctored history fires, and the same history untouched passes.

    use super::*;
    use serde_json::json;

    fn commit(generation: u64, step: u64, loss: Option<f32>, reloaded: Option<u64>) -> Vec<u8> {
        serde_json::to_vec(&StepCommit {
            generation,
            step,
            consumed_samples: step * 4,
            loss,
            dp: 2,
            first_step: step,
            told_at_ms: 1000 * generation,
            groups_at_ms: 1000 * generation + 10,
            ready_at_ms: 1000 * generation + 20,
            at_ms: 1000 * generation + 30,
            reloaded,
            training_s: 0.0,
            eval_s: 0.0,
            checkpoint_stall_s: 0.0,
            recomputed_steps: 0,
            recomputed_s: 0.0,
            stragglers: Vec::new(),
        })
        .expect("serialises")
    }

    fn write(dir: &Path, name: &str, rows: &[Value]) {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(dir.join(name), text).expect("write");
    }

    fn step(step: u64, loss: f64) -> Value {
        json!({ "kind": "step", "data": { "step": step, "loss": loss } })
    }

    fn fed(generation: u64, step: u64, replica: u64, samples: &[u64]) -> Value {
        json!({ "generation": generation, "step": step, "replica": replica, "samples": samples })
    }

    /// A two-step job and its reference; `doctor` changes the job's logs.
    fn job(doctor: impl FnOnce(&mut Vec<Value>, &mut Vec<Value>)) -> Vec<String> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let reference = vec![step(1, 10.0), step(2, 9.0)];
        let ref_samples = vec![fed(0, 1, 0, &[3, 1]), fed(0, 2, 0, &[0, 2])];
        let (mut metrics, mut samples) = (
            reference.clone(),
            vec![
                fed(1, 1, 0, &[3]),
                fed(1, 1, 1, &[1]),
                // Step 2 ran twice: the last generation's record counts.
                fed(1, 2, 0, &[0, 0]),
                fed(2, 2, 0, &[0, 2]),
            ],
        );
        doctor(&mut metrics, &mut samples);
        write(dir.path(), "metrics.jsonl", &metrics);
        write(dir.path(), "ref-metrics.jsonl", &reference);
        write(dir.path(), "samples.jsonl", &samples);
        write(dir.path(), "ref-samples.jsonl", &ref_samples);
        against_reference(dir.path(), 2)
    }

    #[test]
    fn the_reference_check_fires_on_a_loss_a_sample_or_a_step_out_of_place() {
        assert_eq!(job(|_, _| {}), Vec::<String>::new());
        let v = job(|m, _| m[1] = step(2, 9.01));
        assert!(v.len() == 1 && v[0].contains("step 2: loss"), "{v:?}");
        let v = job(|m, _| {
            m.pop();
        });
        assert!(v.iter().any(|e| e.contains("1 of 2 steps")), "{v:?}");
        // A sample fed twice and another never.
        let v = job(|_, s| s[3] = fed(2, 2, 0, &[0, 0]));
        assert!(
            v.len() == 1 && v[0].contains("step 2: 2 samples consumed"),
            "{v:?}"
        );
        let v = job(|_, s| s.push(fed(2, 3, 0, &[5])));
        assert!(
            v.len() == 1 && v[0].contains("beyond the job's steps"),
            "{v:?}"
        );
    }

    #[test]
    fn the_fencing_check_fires_on_a_fenced_commit_a_replan_or_a_step_back() {
        let keys = JobKeys::new("j");
        let plan = |g: u64| (g * 1000, keys.plan(g), Some(b"{}".to_vec()));
        let done = |g: u64, s: u64| {
            (
                g * 1000 + s,
                keys.committed(g),
                Some(commit(g, s, Some(1.0), None)),
            )
        };
        let good = vec![plan(1), done(1, 1), done(1, 2), plan(2), done(2, 2)];
        assert_eq!(fencing(&keys, &good), Vec::<String>::new());
        let mut late = good.clone();
        late.push(done(1, 3));
        let v = fencing(&keys, &late);
        assert!(
            v.len() == 1 && v[0].contains("a fenced generation committed"),
            "{v:?}"
        );
        let mut again = good.clone();
        again.push(plan(2));
        assert!(fencing(&keys, &again)[0].contains("generation 2 planned"));
        let mut back = good.clone();
        back.push(done(2, 1));
        assert!(fencing(&keys, &back)[0].contains("committed step 1 after step 2"));
        // Checkpoint commit records: one per step, from the running generation only.
        let record = |t: u64, step: u64, g: u64| {
            let value = serde_json::json!({ "step": step, "epoch": g }).to_string();
            (t, keys.checkpoint(step), Some(value.into_bytes()))
        };
        let mut ckpt = good.clone();
        ckpt.push(record(2100, 4, 2));
        assert_eq!(fencing(&keys, &ckpt), Vec::<String>::new());
        let mut stalled = good.clone();
        stalled.push(record(2100, 4, 1));
        let v = fencing(&keys, &stalled);
        assert!(
            v.len() == 1 && v[0].contains("a fenced writer committed"),
            "{v:?}"
        );
        ckpt.push(record(2200, 4, 2));
        let v = fencing(&keys, &ckpt);
        assert!(v.len() == 1 && v[0].contains("a second time"), "{v:?}");
    }

    #[test]
    fn the_load_check_fires_on_a_torn_or_a_damaged_checkpoint_loaded() {
        let keys = JobKeys::new("j");
        let start = |g: u64, reloaded: u64| {
            (
                g * 1000,
                keys.committed(g),
                Some(commit(g, reloaded, None, Some(reloaded))),
            )
        };
        let history = vec![start(1, 8), start(3, 12)];
        // Step 12 was damaged at 2500 ms, after generation 1 loaded step 8 and before
        // generation 3 (told at 3000 ms) loaded it.
        let v = checkpoint_loads(&keys, &history, None, &[(12, 2500)]);
        assert!(v.len() == 1 && v[0].contains("damaged at 2500 ms"), "{v:?}");
        // Damaged after the load: the load was of a sound checkpoint.
        assert!(checkpoint_loads(&keys, &history, None, &[(12, 3500)]).is_empty());
        let v = checkpoint_loads(&keys, &history, Some(8), &[]);
        assert!(v.len() == 1 && v[0].contains("manifest was torn"), "{v:?}");
        assert!(checkpoint_loads(&keys, &history, Some(4), &[(4, 0)]).is_empty());
    }

    #[test]
    fn the_store_check_fires_on_a_failed_verify_or_a_checkpoint_lost() {
        let keys = JobKeys::new("j");
        let out = "step 10: ok\nstep 15: ok\nstep 20: ok (3 chunks)\n";
        let ever: BTreeSet<u64> = [5, 10, 15, 20].into();
        let check = |out: &str, flipped: &[(u64, u64)], seen: &[Seen]| {
            checkpoints_in_store((out, ""), &keys, seen, flipped, None, ever.clone(), 3, 20)
        };
        assert_eq!(check(out, &[], &[]), Vec::<String>::new());
        // A damaged checkpoint nobody flipped, or flipped and written again since.
        let bad = out.replace("step 15: ok", "step 15: checksum mismatch in chunk 2");
        let v = check(&bad, &[], &[]);
        assert!(v.len() == 1 && v[0].contains("step 15 fails"), "{v:?}");
        assert!(check(&bad, &[(15, 100)], &[]).is_empty());
        let rewritten = [(200, keys.checkpoint(15), Some(b"{}".to_vec()))];
        assert_eq!(check(&bad, &[(15, 100)], &rewritten).len(), 1);
        // Retention lost one of the newest three, and the last step's is gone.
        let v = check("step 10: ok\nstep 15: ok\n", &[], &[]);
        assert!(v.iter().any(|e| e.contains("step 20 is gone")), "{v:?}");
        assert!(v.iter().any(|e| e.contains("last step, 20")), "{v:?}");
    }

    #[test]
    fn the_rendezvous_check_fires_on_a_deadline_waited_out() {
        let lines = [
            "worker: rendezvous of group dp-pp0-tp0 (rank 1): rank 0 did not connect within 20000 ms",
            "worker: rendezvous of group dp-pp0-tp0 (rank 1): aborted",
            "agent a: step 3",
        ];
        let v = rendezvous_deadlines(lines);
        assert!(v.len() == 1 && v[0].contains("did not connect"), "{v:?}");
        let refused = "rendezvous of group dp-0 (rank 0, generation 3): refused a connection \
                       from 10.0.0.9:5000: no greeting: timed out";
        assert!(rendezvous_deadlines([refused]).is_empty());
    }

    #[test]
    fn the_forgery_check_fires_on_a_forged_connection_kept_open() {
        let forged = [
            ("10.0.0.9:5000".to_string(), true),
            ("10.0.0.9:5001".to_string(), false),
        ];
        let lines = [
            "rendezvous of group dp-0 (rank 0, generation 3): refused a connection from \
             10.0.0.9:5000: it claims rank 1 but did not prove that it holds this generation's \
             group secret",
            "agent a: step 3",
        ];
        let (v, logged) = forged_refused(&forged, lines);
        assert!(v.len() == 1 && v[0].contains("10.0.0.9:5001"), "{v:?}");
        assert_eq!(logged, 1);
        assert!(forged_refused(&forged[..1], lines).0.is_empty());
    }
}
