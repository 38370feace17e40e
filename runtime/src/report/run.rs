//! The report of one run, from its metrics file: the losses against steps and tokens, the
//! throughput, where each step's time went, the goodput breakdown, the checkpoints, and for an
//! elastic job the timeline of its generations and faults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::page::{Chart, Page, Series, Style};
use crate::checkpoint::{CheckpointRecord, Persisted};
use crate::error::{Result, RuntimeError};
use crate::records::{Goodput, LossCause, Records, StepRecord};

/// An elastic job's generations and faults, written to the metrics at its end by the rank
/// that writes them, from the job's records in the coordinator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub generations: Vec<GenerationSpan>,
    pub faults: Vec<Fault>,
}

/// One generation: its degree and the steps it ran, from its ranks' readiness to its last
/// committed step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationSpan {
    pub generation: u64,
    pub dp: usize,
    pub first_step: u64,
    pub last_step: u64,
    pub ready_at_ms: u64,
    pub last_at_ms: u64,
    /// The step reloaded from storage, when the generation reloaded.
    pub reloaded: Option<u64>,
}

/// A worker lost: when its agent saw it, why, and the generation it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub generation: u64,
    pub detected_at_ms: u64,
    pub cause: LossCause,
    pub reason: String,
}

impl Timeline {
    pub fn from_records(records: &Records) -> Timeline {
        let mut generations: Vec<GenerationSpan> = records
            .commits
            .iter()
            .map(|c| GenerationSpan {
                generation: c.generation,
                dp: c.dp,
                first_step: c.first_step,
                last_step: c.step,
                ready_at_ms: c.ready_at_ms,
                last_at_ms: c.at_ms,
                reloaded: c.reloaded,
            })
            .collect();
        generations.sort_by_key(|g| g.generation);
        let mut faults: Vec<Fault> = records
            .lost
            .iter()
            .map(|(generation, l)| Fault {
                generation: *generation,
                detected_at_ms: l.detected_at_ms,
                cause: l.cause,
                reason: l.reason.clone(),
            })
            .collect();
        faults.sort_by_key(|f| f.detected_at_ms);
        Timeline {
            generations,
            faults,
        }
    }
}

/// What a metrics file holds, each step's last record kept (a step run again after a reload
/// replaces the first).
#[derive(Debug, Default)]
pub struct RunMetrics {
    pub steps: BTreeMap<u64, StepRecord>,
    pub evals: BTreeMap<u64, f64>,
    pub checkpoints: Vec<CheckpointRecord>,
    pub persists: Vec<Persisted>,
    pub goodput: Option<Goodput>,
    pub timeline: Option<Timeline>,
}

impl RunMetrics {
    /// Reads a metrics file. Errors: the file cannot be read, or a line is not a record of
    /// its kind (named by line number).
    pub fn read(path: &Path) -> Result<RunMetrics> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RuntimeError::io("read metrics", path, e))?;
        let mut m = RunMetrics::default();
        // A run that is still going may be writing its last line.
        let whole = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (i, line) in whole.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |e: serde_json::Error| RuntimeError::Data {
                path: path.into(),
                reason: format!(
                    "line {}: {e}; a metrics file holds one JSON record per line, as \
                     `marathon train` writes it",
                    i + 1
                ),
            };
            #[derive(Deserialize)]
            struct Line {
                kind: String,
                data: serde_json::Value,
            }
            let l: Line = serde_json::from_str(line).map_err(bad)?;
            match l.kind.as_str() {
                "step" => {
                    let s: StepRecord = serde_json::from_value(l.data).map_err(bad)?;
                    m.steps.insert(s.step, s);
                }
                "eval" => {
                    #[derive(Deserialize)]
                    struct Eval {
                        step: u64,
                        val_loss: f64,
                    }
                    let e: Eval = serde_json::from_value(l.data).map_err(bad)?;
                    m.evals.insert(e.step, e.val_loss);
                }
                "checkpoint" => m
                    .checkpoints
                    .push(serde_json::from_value(l.data).map_err(bad)?),
                "persist" => m
                    .persists
                    .push(serde_json::from_value(l.data).map_err(bad)?),
                "goodput" => m.goodput = Some(serde_json::from_value(l.data).map_err(bad)?),
                "timeline" => m.timeline = Some(serde_json::from_value(l.data).map_err(bad)?),
                // Kinds this build does not draw.
                _ => {}
            }
        }
        Ok(m)
    }
}

/// Where the report of a metrics file goes by default: beside it, named after it with
/// "report" for "metrics" (`metrics.jsonl` gives `report.html`, `ref-metrics.jsonl` gives
/// `ref-report.html`), or with `-report.html` added.
pub fn report_path(metrics: &Path) -> PathBuf {
    let stem = metrics
        .file_stem()
        .map_or("run".into(), |s| s.to_string_lossy().into_owned());
    let name = if stem.contains("metrics") {
        format!("{}.html", stem.replacen("metrics", "report", 1))
    } else {
        format!("{stem}-report.html")
    };
    metrics.with_file_name(name)
}

/// Writes the report of the run whose metrics are `metrics` to `out`, through a temporary file
/// renamed into place (a reader never sees half a page). Returns the number of plots.
pub fn write_run_report(metrics: &Path, out: &Path) -> Result<usize> {
    let m = RunMetrics::read(metrics)?;
    let title = format!("marathon run report: {}", metrics.display());
    let page = run_page(&title, &m).map_err(|reason| RuntimeError::Data {
        path: metrics.into(),
        reason,
    })?;
    let tmp = out.with_extension("html.tmp");
    std::fs::write(&tmp, page.html()).map_err(|e| RuntimeError::io("write report", &tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| RuntimeError::io("write report", out, e))?;
    Ok(page.plots())
}

fn fmt_s(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.2} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.2} s")
    }
}

/// The median of `v` (sorted in place); NaN when empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A part of a step's time: its name, and its milliseconds in a step's record.
type Part = (&'static str, fn(&StepRecord) -> f64);

/// The page of a run's metrics.
pub fn run_page(title: &str, m: &RunMetrics) -> std::result::Result<Page, String> {
    let mut page = Page::new(title);
    let steps: Vec<&StepRecord> = m.steps.values().collect();
    let last = steps.last();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    row("steps logged", steps.len().to_string());
    if let Some(l) = last {
        row("last step", l.step.to_string());
        row("tokens consumed", l.tokens_consumed.to_string());
        row("last training loss", format!("{:.4}", l.loss));
    }
    if let Some((s, v)) = m.evals.iter().next_back() {
        row("last validation loss", format!("{v:.4} (step {s})"));
    }
    let mut tps: Vec<f64> = steps.iter().map(|s| s.tokens_per_s).collect();
    let mut ms: Vec<f64> = steps.iter().map(|s| s.step_ms).collect();
    if !steps.is_empty() {
        row("median tokens/s", format!("{:.0}", median(&mut tps)));
        row("median step time", format!("{:.1} ms", median(&mut ms)));
    }
    row(
        "checkpoints",
        format!(
            "{} taken, {} persisted and committed",
            m.checkpoints.len(),
            m.persists.iter().filter(|p| p.committed).count()
        ),
    );
    if let Some(g) = &m.goodput {
        row("goodput", format!("{:.1}%", 100.0 * g.effective_fraction));
    }
    if let Some(t) = &m.timeline {
        row(
            "generations",
            format!("{} ({} workers lost)", t.generations.len(), t.faults.len()),
        );
    }
    page.heading("Summary").table(&[], &rows);

    let tokens_at: BTreeMap<u64, f64> = steps
        .iter()
        .map(|s| (s.step, s.tokens_consumed as f64))
        .collect();
    let train = |x: &dyn Fn(&StepRecord) -> f64| {
        Series::new(
            "training",
            Style::Line,
            steps.iter().map(|s| (x(s), s.loss as f64)).collect(),
        )
    };
    let val = |by_tokens: bool| {
        let points = m
            .evals
            .iter()
            .filter_map(|(s, v)| {
                let x = if by_tokens {
                    *tokens_at.get(s)?
                } else {
                    *s as f64
                };
                Some((x, *v))
            })
            .collect();
        Series::new("validation", Style::Points, points)
    };
    let none = "no step was logged";
    page.heading("Loss");
    page.chart(
        &Chart::new("Loss against step", "step", "loss")
            .series(train(&|s| s.step as f64))
            .series(val(false)),
        none,
    )?;
    page.chart(
        &Chart::new("Loss against tokens", "tokens", "loss")
            .series(train(&|s| s.tokens_consumed as f64))
            .series(val(true)),
        none,
    )?;

    page.heading("Throughput and step time");
    let per_step = |name: &str, f: &dyn Fn(&StepRecord) -> f64| {
        Series::new(
            name,
            Style::Line,
            steps.iter().map(|s| (s.step as f64, f(s))).collect(),
        )
    };
    page.chart(
        &Chart::new("Tokens per second", "step", "tokens/s")
            .series(per_step("tokens/s", &|s| s.tokens_per_s)),
        none,
    )?;
    let waits = |s: &StepRecord| s.comm_wait_ms + s.tp_comm_ms + s.pipeline_wait_ms;
    let mut time =
        Chart::new("Step time, broken down", "step", "ms").series(per_step("step", &|s| s.step_ms));
    // Only the parts this layout has: a single process's step is all compute.
    let parts: [Part; 3] = [
        ("data-parallel wait", |s| s.comm_wait_ms),
        ("tensor-parallel communication", |s| s.tp_comm_ms),
        ("pipeline wait", |s| s.pipeline_wait_ms),
    ];
    if steps.iter().any(|s| waits(s) > 0.0) {
        time = time.series(per_step("compute", &|s| (s.step_ms - waits(s)).max(0.0)));
    }
    for (name, f) in parts {
        if steps.iter().any(|s| f(s) > 0.0) {
            time = time.series(per_step(name, &f));
        }
    }
    page.chart(&time, none)?;

    page.heading("Goodput");
    match &m.goodput {
        Some(g) => {
            let wall = if g.effective_fraction > 0.0 {
                g.training_s / g.effective_fraction
            } else {
                f64::NAN
            };
            let mut bars = vec![
                ("training".to_string(), g.training_s),
                ("validation".to_string(), g.eval_s),
                ("checkpoint stall".to_string(), g.checkpoint_stall_s),
                ("final checkpoint".to_string(), g.final_checkpoint_s),
                ("startup".to_string(), g.startup_s),
                ("failure detection".to_string(), g.detection_s),
                ("re-forming".to_string(), g.reform_s),
                ("state transfer".to_string(), g.transfer_s),
                ("steps recomputed".to_string(), g.recomputed_s),
            ];
            let accounted: f64 = bars.iter().map(|b| b.1).sum();
            if wall.is_finite() && wall > accounted {
                bars.push(("other".to_string(), wall - accounted));
            }
            bars.retain(|b| b.1 > 0.0);
            page.paragraph(&format!(
                "{:.1}% of the run's {} went to training steps.",
                100.0 * g.effective_fraction,
                fmt_s(wall)
            ));
            page.chart(
                &Chart::new("Where the run's time went", "seconds", "").bars(bars),
                "no time accounted",
            )?;
        }
        None => {
            page.paragraph("The run did not end: its metrics hold no goodput record.");
        }
    }

    page.heading("Checkpoints");
    let stalls = Series::new(
        "stall",
        Style::Points,
        m.checkpoints
            .iter()
            .map(|c| (c.step as f64, c.stall_ms))
            .collect(),
    );
    let persists = Series::new(
        "persist",
        Style::Points,
        m.persists
            .iter()
            .map(|p| (p.step as f64, p.seconds * 1e3))
            .collect(),
    );
    let no_ckpt = "the run took no checkpoint";
    page.chart(
        &Chart::new("Checkpoint stall and persist", "step", "ms")
            .series(stalls)
            .series(persists),
        no_ckpt,
    )?;
    if !m.persists.is_empty() {
        let rows: Vec<Vec<String>> = m
            .persists
            .iter()
            .map(|p| {
                vec![
                    p.step.to_string(),
                    format!("{:.3} s", p.seconds),
                    format!("{:.1} MB", p.bytes as f64 / 1e6),
                    if p.committed { "committed" } else { "" }.to_string(),
                ]
            })
            .collect();
        page.table(&["step", "persist", "bytes (this rank)", ""], &rows);
    }

    if let Some(t) = &m.timeline {
        timeline(&mut page, t, &steps)?;
    }
    Ok(page)
}

/// An elastic job's timeline: progress and degree over time, the faults marked.
fn timeline(
    page: &mut Page,
    t: &Timeline,
    steps: &[&StepRecord],
) -> std::result::Result<(), String> {
    page.heading("Generations, faults and recoveries");
    let start = t
        .generations
        .iter()
        .map(|g| g.ready_at_ms)
        .chain(steps.iter().filter(|s| s.at_ms > 0).map(|s| s.at_ms))
        .min()
        .unwrap_or(0);
    let at = |ms: u64| (ms as f64 - start as f64) / 1e3;
    let mark = |mut c: Chart| {
        for f in &t.faults {
            c = c.mark(at(f.detected_at_ms), format!("lost: {}", f.cause.name()));
        }
        c
    };
    let progress = Series::new(
        "step",
        Style::Line,
        steps
            .iter()
            .filter(|s| s.at_ms >= start && s.at_ms > 0)
            .map(|s| (at(s.at_ms), s.step as f64))
            .collect(),
    );
    page.chart(
        &mark(Chart::new("Progress", "seconds since the job started", "step").series(progress)),
        "no step carries its time",
    )?;
    // The degree holds from each generation's start, the last one's to the job's last step.
    let end = steps
        .iter()
        .map(|s| s.at_ms)
        .chain(t.generations.iter().map(|g| g.last_at_ms))
        .max()
        .unwrap_or(start);
    let mut held: Vec<(f64, f64)> = t
        .generations
        .iter()
        .map(|g| (at(g.ready_at_ms), g.dp as f64))
        .collect();
    if let Some(&(_, dp)) = held.last() {
        held.push((at(end), dp));
    }
    let degree = Series::new("data-parallel degree", Style::Steps, held);
    page.chart(
        &mark(
            Chart::new(
                "Data-parallel degree",
                "seconds since the job started",
                "replicas",
            )
            .series(degree),
        ),
        "no generation committed a step",
    )?;
    let rows: Vec<Vec<String>> = t
        .generations
        .iter()
        .map(|g| {
            vec![
                g.generation.to_string(),
                g.dp.to_string(),
                format!("{}-{}", g.first_step, g.last_step),
                format!("{:.1}", at(g.ready_at_ms)),
                g.reloaded.map_or("from memory".into(), |s| match s {
                    0 => "initial weights".into(),
                    s => format!("reloaded step {s}"),
                }),
            ]
        })
        .collect();
    page.table(
        &["generation", "dp", "steps", "ready at (s)", "state"],
        &rows,
    );
    if !t.faults.is_empty() {
        let rows: Vec<Vec<String>> = t
            .faults
            .iter()
            .map(|f| {
                vec![
                    format!("{:.1}", at(f.detected_at_ms)),
                    f.generation.to_string(),
                    f.cause.name().to_string(),
                    f.reason.clone(),
                ]
            })
            .collect();
        page.table(&["seen at (s)", "generation", "cause", "what"], &rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f32, at_ms: u64) -> String {
        format!(
            "{{\"kind\":\"step\",\"data\":{{\"step\":{step},\"loss\":{loss},\"lr\":0.001,\
             \"grad_norm\":1.0,\"batch\":8,\"tokens_consumed\":{},\"step_ms\":100.0,\
             \"tokens_per_s\":10240.0,\"comm_wait_ms\":20.0,\"at_ms\":{at_ms}}}}}",
            step * 1024
        )
    }

    #[test]
    fn a_run_page_draws_every_part_and_keeps_a_steps_last_record() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("metrics.jsonl");
        let lines = [
            step(1, 5.0, 1_000),
            step(2, 4.0, 1_100),
            // Step 2 again, after a reload: this record counts.
            step(2, 3.9, 1_500),
            step(3, 3.5, 1_600),
            "{\"kind\":\"eval\",\"data\":{\"step\":3,\"val_loss\":3.6}}".into(),
            "{\"kind\":\"checkpoint\",\"data\":{\"step\":3,\"stall_ms\":4.0,\"waited_ms\":0.0,\
             \"staged_bytes\":100,\"previous_failed\":null}}"
                .into(),
            "{\"kind\":\"persist\",\"data\":{\"step\":3,\"seconds\":0.2,\"bytes\":100,\
             \"committed\":true}}"
                .into(),
            "{\"kind\":\"goodput\",\"data\":{\"training_s\":0.3,\"eval_s\":0.1,\
             \"checkpoint_stall_s\":0.004,\"final_checkpoint_s\":0.2,\"effective_fraction\":0.5,\
             \"reform_s\":0.1}}"
                .into(),
            "{\"kind\":\"timeline\",\"data\":{\"generations\":[{\"generation\":1,\"dp\":2,\
             \"first_step\":0,\"last_step\":2,\"ready_at_ms\":900,\"last_at_ms\":1100,\
             \"reloaded\":0},{\"generation\":2,\"dp\":1,\"first_step\":1,\"last_step\":3,\
             \"ready_at_ms\":1400,\"last_at_ms\":1600,\"reloaded\":1}],\"faults\":[{\
             \"generation\":1,\"detected_at_ms\":1200,\"cause\":\"worker_died\",\
             \"reason\":\"exited\"}]}}"
                .into(),
            "{\"kind\":\"later\",\"data\":{}}".into(),
        ];
        std::fs::write(&path, lines.join("\n")).expect("write");
        let m = RunMetrics::read(&path).expect("read");
        assert_eq!(m.steps.len(), 3);
        assert_eq!(m.steps[&2].loss, 3.9);
        let out = dir.path().join("r.html");
        assert_eq!(write_run_report(&path, &out).expect("report"), 8);
        let html = std::fs::read_to_string(&out).expect("page");
        for part in [
            "data-parallel wait",
            "lost: worker_died",
            "reloaded step 1",
            "re-forming",
            "50.0% of the run",
        ] {
            assert!(html.contains(part), "{part}");
        }
    }

    #[test]
    fn a_run_still_writing_its_last_line_is_read_up_to_it_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("metrics.jsonl");
        let half = step(2, 4.0, 1_100);
        std::fs::write(&path, format!("{}\n{}", step(1, 5.0, 1_000), &half[..20])).expect("write");
        assert_eq!(RunMetrics::read(&path).expect("read").steps.len(), 1);
        std::fs::write(
            &path,
            format!("{}\n{{\"kind\":\"step\"}}\n", step(1, 5.0, 1_000)),
        )
        .expect("write");
        let err = RunMetrics::read(&path)
            .expect_err("a record without data")
            .to_string();
        assert!(err.contains("line 2: missing field `data`"), "{err}");
    }

    #[test]
    fn report_paths_follow_the_metrics_name() {
        let p = |m: &str| report_path(Path::new(m)).display().to_string();
        assert_eq!(p("runs/x/metrics.jsonl"), "runs/x/report.html");
        assert_eq!(p("ref-metrics.jsonl"), "ref-report.html");
        assert_eq!(p("runs/log.jsonl"), "runs/log-report.html");
    }
}
