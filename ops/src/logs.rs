//! Logs: every process of a job (launcher, agent, worker) writes its diagnostics as `tracing`
//! events to stderr, one whole line each (a node's workers share its stderr).
//!
//! - Human lines by default: the enclosing spans, then the message, as in
//!   `agent node-1: slot 0: worker pid 4121` or
//!   `worker: generation 3 node-1/0 rank 2: step 17: warning: ...`. A span shows its
//!   name and its fields (a string by its value, a number as `key value`, the field named as
//!   the span by its value alone); the job's name, the same on every line, is left to JSON.
//! - JSON lines with `--log-format json` (or `MARATHON_LOG_FORMAT=json`, which children
//!   inherit): `ts`, `level`, `target`, `span` (the enclosing spans' names), every span's fields
//!   (job, node, slot, generation, rank, step) flattened, the event's fields and `message`.
//! - `RUST_LOG` filters, as `tracing-subscriber`'s `EnvFilter` reads it; `info` by default.
//!
//! While a progress bar is drawn on a terminal ([`set_bar`]), lines are written above it.

use std::io::Write;
use std::sync::Mutex;

use indicatif::ProgressBar;
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable that carries the format to child processes.
pub const FORMAT_ENV: &str = "MARATHON_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines to read: spans, then the message.
    Human,
    /// One JSON object per line, for log tools.
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// The progress bar lines are written above, while one is drawn.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Writes log lines above `bar` from now on (`None`: straight to stderr).
pub fn set_bar(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// Installs the logger: `format` if given, else the one the parent passed down, else human.
/// Passes the format on to child processes. Errors: `MARATHON_LOG_FORMAT` names no format.
pub fn init(format: Option<LogFormat>) -> anyhow::Result<()> {
    let format = match format {
        Some(f) => f,
        None => match std::env::var(FORMAT_ENV) {
            Ok(v) if v == "json" => LogFormat::Json,
            Ok(v) if v == "human" || v.is_empty() => LogFormat::Human,
            Ok(v) => anyhow::bail!("{FORMAT_ENV}={v}: the log format is human or json"),
            Err(_) => LogFormat::Human,
        },
    };
    // Set before any thread starts: the workers and agents this process spawns inherit it.
    std::env::set_var(FORMAT_ENV, format.name());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(Lines { format })
        .try_init()
        .map_err(|e| anyhow::anyhow!("install the logger: {e}"))
}

/// The fields of a span or an event, in order.
#[derive(Debug, Default)]
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn set(&mut self, name: &'static str, v: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = v,
            None => self.0.push((name, v)),
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field.name(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field.name(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), value.into());
    }
}

/// The layer that writes each event as one line.
struct Lines {
    format: LogFormat,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Lines {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<Fields>() {
                values.record(f);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Fields::default();
        event.record(&mut own);
        let mut spans: Vec<(&'static str, Vec<(&'static str, Value)>)> = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                let fields = span
                    .extensions()
                    .get::<Fields>()
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                spans.push((span.name(), fields));
            }
        }
        let meta = event.metadata();
        let line = match self.format {
            LogFormat::Human => human(*meta.level(), &spans, own),
            LogFormat::Json => json(meta.level(), meta.target(), &spans, own),
        };
        write_line(&line);
    }
}

fn write_line(line: &str) {
    let write = || {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    };
    match &*BAR.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(bar) if !bar.is_finished() => bar.suspend(write),
        _ => write(),
    }
}

/// A value as a human reads it: a string without quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A human line: `span: span: [warning: ]message key=value`.
fn human(
    level: Level,
    spans: &[(&'static str, Vec<(&'static str, Value)>)],
    own: Fields,
) -> String {
    let mut line = String::new();
    for (name, fields) in spans {
        let mut words = vec![name.to_string()];
        for (k, v) in fields {
            match (*k, v) {
                ("job", _) => {}
                (k, v) if k == *name => words[0] = format!("{name} {}", plain(v)),
                (_, Value::String(s)) => words.push(s.clone()),
                (k, v) => words.push(format!("{k} {v}")),
            }
        }
        line.push_str(&words.join(" "));
        line.push_str(": ");
    }
    match level {
        Level::ERROR => line.push_str("error: "),
        Level::WARN => line.push_str("warning: "),
        _ => {}
    }
    let mut rest = Vec::new();
    for (k, v) in own.0 {
        if k == "message" {
            line.push_str(&plain(&v));
        } else {
            rest.push(format!("{k}={}", plain(&v)));
        }
    }
    for r in rest {
        line.push(' ');
        line.push_str(&r);
    }
    line.push('\n');
    line
}

/// A JSON line: the time, level, target, the spans' names, then every field, flattened (an
/// event's field over a span's, an inner span's over an outer one's), the message last.
fn json(
    level: &Level,
    target: &str,
    spans: &[(&'static str, Vec<(&'static str, Value)>)],
    own: Fields,
) -> String {
    let mut all = Fields::default();
    all.set("ts", rfc3339_now().into());
    all.set("level", level.as_str().to_ascii_lowercase().into());
    all.set("target", target.into());
    if !spans.is_empty() {
        let names: Vec<&str> = spans.iter().map(|s| s.0).collect();
        all.set("span", names.join(">").into());
    }
    for (k, v) in spans.iter().flat_map(|s| s.1.iter()) {
        all.set(k, v.clone());
    }
    let mut message = None;
    for (k, v) in own.0 {
        match k {
            "message" => message = Some(v),
            k => all.set(k, v),
        }
    }
    all.0.extend(message.map(|m| ("message", m)));
    // Written by hand to keep this order; each key and value is serialised by serde_json.
    let mut line = String::from("{");
    for (i, (k, v)) in all.0.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::from(*k).to_string());
        line.push(':');
        line.push_str(&v.to_string());
    }
    line.push_str("}\n");
    line
}

/// The current time as RFC 3339 in UTC, to the millisecond.
fn rfc3339_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    rfc3339(ms)
}

/// `ms` after the Unix epoch as RFC 3339 in UTC (the civil date from days, after Howard
/// Hinnant's algorithm).
fn rfc3339(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, min, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(f: &[(&'static str, Value)]) -> Vec<(&'static str, Value)> {
        f.to_vec()
    }

    #[test]
    fn human_lines_name_their_spans_as_the_logs_always_did() {
        let spans = [
            (
                "agent",
                fields(&[("job", "j".into()), ("node", "node-1".into())]),
            ),
            ("slot", fields(&[("slot", 0.into())])),
        ];
        let own = Fields(vec![("message", "worker pid 12".into())]);
        assert_eq!(
            human(Level::INFO, &spans, own),
            "agent node-1: slot 0: worker pid 12\n"
        );
        let spans = [(
            "generation",
            fields(&[("generation", 3.into()), ("rank", 2.into())]),
        )];
        let own = Fields(vec![("message", "slow".into()), ("ratio", 2.5.into())]);
        assert_eq!(
            human(Level::WARN, &spans, own),
            "generation 3 rank 2: warning: slow ratio=2.5\n"
        );
    }

    #[test]
    fn json_lines_flatten_every_field() {
        let spans = [
            (
                "worker",
                fields(&[("job", "j".into()), ("node", "node-1".into())]),
            ),
            ("step", fields(&[("step", 17.into())])),
        ];
        let own = Fields(vec![("message", "hello".into())]);
        let line = json(&Level::INFO, "marathon_runtime::worker", &spans, own);
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["job"], "j");
        assert_eq!(v["node"], "node-1");
        assert_eq!(v["step"], 17);
        assert_eq!(v["span"], "worker>step");
        assert_eq!(v["level"], "info");
        assert_eq!(v["message"], "hello");
        assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
        assert!(line.starts_with("{\"ts\":") && line.ends_with("\"message\":\"hello\"}\n"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_440_000_000), "2026-12-05T03:06:40.000Z");
    }
}
