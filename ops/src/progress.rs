//! The training progress display: a bar on a terminal, with log lines written above it;
//! periodic log lines otherwise (a log file, CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use marathon_runtime::checkpoint::CheckpointRecord;
use marathon_runtime::records::StepRecord;
use marathon_runtime::trainer::Observer;
use marathon_runtime::TrainConfig;

/// How often plain-line mode prints when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    last_line: Option<Instant>,
    last_val: Option<f32>,
    /// The step a resumed run started from; the ETA counts from there.
    first_step: u64,
}

impl Progress {
    pub fn new(cfg: &TrainConfig) -> Self {
        let total = cfg.train.steps;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
                .expect("static template");
            bar.set_style(style);
            crate::logs::set_bar(Some(bar.clone()));
            bar
        });
        Progress {
            bar,
            total,
            started: Instant::now(),
            last_line: None,
            last_val: None,
            first_step: 0,
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
            crate::logs::set_bar(None);
        }
    }

    /// Says where a resumed run continues from.
    pub fn on_resumed(&mut self, step: u64, cfg: &TrainConfig) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.reset_eta();
        }
        self.first_step = step;
        let root = cfg.checkpoint.as_ref().map_or("", |c| c.root.as_str());
        tracing::info!("resumed from the checkpoint of step {step} under {root}");
    }

    fn message(&self, r: &StepRecord) -> String {
        let val = self
            .last_val
            .map(|v| format!(" val {v:.4}"))
            .unwrap_or_default();
        format!(
            "loss {:.4}{val} lr {:.2e} {:.0} tok/s",
            r.loss, r.lr, r.tokens_per_s
        )
    }
}

impl Drop for Progress {
    // A run that fails leaves no bar for log lines to wait on.
    fn drop(&mut self) {
        if self.bar.is_some() {
            crate::logs::set_bar(None);
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, r: &StepRecord) {
        let msg = self.message(r);
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
            bar.set_position(r.step);
            return;
        }
        let due =
            self.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL) || r.step == self.total;
        if due {
            let elapsed = self.started.elapsed().as_secs_f64();
            let done = r.step.saturating_sub(self.first_step).max(1);
            let eta = elapsed / done as f64 * self.total.saturating_sub(r.step) as f64;
            let left = self.total.saturating_sub(r.step);
            in_step(r.step, || {
                tracing::info!("{msg}, {left} steps and {eta:.0} s to go");
            });
            self.last_line = Some(Instant::now());
        }
    }

    fn on_eval(&mut self, step: u64, val_loss: f32) {
        self.last_val = Some(val_loss);
        in_step(step, || tracing::info!("validation loss {val_loss:.4}"));
    }

    fn on_checkpoint(&mut self, r: &CheckpointRecord) {
        if let Some(e) = &r.previous_failed {
            in_step(r.step, || {
                tracing::warn!("the previous checkpoint was not committed: {e}")
            });
        }
        in_step(r.step, || {
            tracing::info!(
                "checkpoint staged ({:.1} MB in {:.0} ms, {:.0} ms of it waiting for the \
                 previous one); persisting in the background",
                r.staged_bytes as f64 / 1e6,
                r.stall_ms,
                r.waited_ms
            )
        });
    }
}

/// Runs `f` in the span of step `step`: the trainer's, when this process runs the step, else one
/// of its own (a launcher reporting its workers' steps).
fn in_step(step: u64, f: impl FnOnce()) {
    let current = tracing::Span::current();
    if current.metadata().is_some_and(|m| m.name() == "step") {
        f()
    } else {
        tracing::info_span!("step", step).in_scope(f)
    }
}
