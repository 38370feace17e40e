//! Live metrics for Prometheus: what a rank's training does ([`RankMetrics`]), what an agent's
//! node does ([`AgentMetrics`]) and where the whole job stands ([`JobMetrics`]), served in the
//! OpenMetrics text format by [`Endpoint`] on `--metrics-addr`.
//!
//! Names follow Prometheus's conventions: the unit in the name, `_total` on counters (added by
//! the encoder), seconds and bytes. Every process serves its own endpoint: `marathon train`'s
//! ranks, each agent, and each agent's workers on the ports after the agent's
//! ([`worker_addr`]), which the agent lists at `/targets` for Prometheus's HTTP service
//! discovery.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::checkpoint::{CheckpointRecord, Persisted};
use crate::error::{Result, RuntimeError};
use crate::records::{unix_ms, Goodput, StepRecord};
use crate::status::JobStatus;

type Labels = Vec<(String, String)>;
type Seconds = Counter<f64, AtomicU64>;
type Value = Gauge<f64, AtomicU64>;

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

/// Step-time buckets from 10 ms to about 3 minutes.
fn step_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// The phases a step's time is split into.
const PHASES: [&str; 4] = [
    "compute",
    "tensor_parallel",
    "pipeline_wait",
    "data_parallel_wait",
];

/// What one rank's training does, updated as it steps.
#[derive(Debug, Default)]
pub struct RankMetrics {
    step: Gauge,
    loss: Value,
    validation_loss: Value,
    tokens_per_second: Value,
    tokens: Counter,
    step_seconds: Option<Histogram>,
    phase_seconds: Family<Labels, Seconds>,
    /// The family's four counters, taken once: the step loop allocates no label sets.
    phases: Vec<(&'static str, Seconds)>,
    checkpoint_stall_seconds: Option<Histogram>,
    checkpoint_persist_seconds: Option<Histogram>,
    persisted_bytes: Counter,
    generation: Gauge,
    rank: Gauge,
}

impl RankMetrics {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let mut m = RankMetrics {
            step_seconds: Some(step_buckets()),
            checkpoint_stall_seconds: Some(step_buckets()),
            checkpoint_persist_seconds: Some(Histogram::new(exponential_buckets(0.05, 2.0, 16))),
            ..RankMetrics::default()
        };
        // Not a number until the first validation.
        m.validation_loss.set(f64::NAN);
        m.phases = PHASES
            .iter()
            .map(|&p| (p, m.phase_seconds.get_or_create_owned(&label("phase", p))))
            .collect();
        let r = registry;
        r.register("marathon_step", "Steps completed", m.step.clone());
        r.register(
            "marathon_loss",
            "The last step's training loss",
            m.loss.clone(),
        );
        r.register(
            "marathon_validation_loss",
            "The last validation loss",
            m.validation_loss.clone(),
        );
        r.register(
            "marathon_tokens_per_second",
            "Tokens per second of the last step, over the whole job",
            m.tokens_per_second.clone(),
        );
        r.register(
            "marathon_tokens",
            "Tokens trained on by this rank's job since this process started",
            m.tokens.clone(),
        );
        r.register(
            "marathon_step_duration_seconds",
            "Wall time of each step",
            m.step_seconds.clone().expect("set above"),
        );
        r.register(
            "marathon_step_phase_seconds",
            "Step time by phase: compute, tensor_parallel (collectives inside forward and \
             backward), pipeline_wait (the bubble and stage transfers), data_parallel_wait \
             (gradient sums not hidden behind backward)",
            m.phase_seconds.clone(),
        );
        r.register(
            "marathon_checkpoint_stall_duration_seconds",
            "Training stalled by each checkpoint: the staging copy and any wait for the \
             previous persist",
            m.checkpoint_stall_seconds.clone().expect("set above"),
        );
        r.register(
            "marathon_checkpoint_persist_duration_seconds",
            "From a snapshot to this rank's shard being durable, per checkpoint",
            m.checkpoint_persist_seconds.clone().expect("set above"),
        );
        r.register(
            "marathon_checkpoint_persisted_bytes",
            "Bytes this rank stored in checkpoints",
            m.persisted_bytes.clone(),
        );
        r.register(
            "marathon_generation",
            "The elastic generation this rank runs in (0 outside an elastic job)",
            m.generation.clone(),
        );
        r.register(
            "marathon_rank",
            "This process's global rank in its generation",
            m.rank.clone(),
        );
        Arc::new(m)
    }

    /// Where this rank now sits.
    pub fn placed(&self, generation: u64, rank: usize) {
        self.generation.set(generation as i64);
        self.rank.set(rank as i64);
    }

    pub fn on_step(&self, rec: &StepRecord, tokens: u64) {
        self.step.set(rec.step as i64);
        self.loss.set(rec.loss as f64);
        self.tokens_per_second.set(rec.tokens_per_s);
        self.tokens.inc_by(tokens);
        let seconds = rec.step_ms / 1e3;
        if let Some(h) = &self.step_seconds {
            h.observe(seconds);
        }
        let waits = [rec.tp_comm_ms, rec.pipeline_wait_ms, rec.comm_wait_ms].map(|ms| ms / 1e3);
        let compute = seconds - waits.iter().sum::<f64>();
        // In PHASES' order.
        for ((_, counter), s) in self.phases.iter().zip([compute].into_iter().chain(waits)) {
            counter.inc_by(s.max(0.0));
        }
    }

    pub fn on_eval(&self, val_loss: f32) {
        self.validation_loss.set(val_loss as f64);
    }

    pub fn on_checkpoint(&self, rec: &CheckpointRecord) {
        if let Some(h) = &self.checkpoint_stall_seconds {
            h.observe(rec.stall_ms / 1e3);
        }
    }

    /// A persist this rank finished.
    pub fn on_persisted(&self, p: &Persisted) {
        if let Some(h) = &self.checkpoint_persist_seconds {
            h.observe(p.seconds);
        }
        self.persisted_bytes.inc_by(p.bytes);
    }
}

/// What an agent's node does.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    slots_offered: Gauge,
    workers_running: Gauge,
    lease_held: Gauge,
    leader: Gauge,
    coordinator_errors: Counter,
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = AgentMetrics::default();
        let r = registry;
        r.register(
            "marathon_agent_slots_offered",
            "Slots this node offers the job now (those cooling down after a worker died left out)",
            m.slots_offered.clone(),
        );
        r.register(
            "marathon_agent_workers_running",
            "Worker processes this agent runs",
            m.workers_running.clone(),
        );
        r.register(
            "marathon_agent_lease_held",
            "1 while this node holds its lease in the coordinator",
            m.lease_held.clone(),
        );
        r.register(
            "marathon_agent_leader",
            "1 while this agent leads the job (plans its generations)",
            m.leader.clone(),
        );
        r.register(
            "marathon_agent_coordinator_errors",
            "Coordinator (etcd) requests that failed, retries included",
            m.coordinator_errors.clone(),
        );
        Arc::new(m)
    }

    pub fn set(&self, offered: usize, running: usize, lease_held: bool, leader: bool) {
        self.slots_offered.set(offered as i64);
        self.workers_running.set(running as i64);
        self.lease_held.set(i64::from(lease_held));
        self.leader.set(i64::from(leader));
    }

    /// Brings the error counter up to `total`, the coordinator's own count.
    pub fn coordinator_errors(&self, total: u64) {
        let seen = self.coordinator_errors.get();
        self.coordinator_errors.inc_by(total.saturating_sub(seen));
    }
}

/// Where the job stands, as one process sees it: the leading agent of an elastic job
/// (refreshed from the coordinator at each scrape), or rank 0 of a job without one. Shown only
/// while that process has a view, so Prometheus finds the job's series on one target at a
/// time: the leader's.
#[derive(Debug, Default)]
pub struct JobMetrics {
    view: Mutex<Option<JobView>>,
}

/// The job's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobView {
    pub generation: u64,
    pub dp: usize,
    /// Generations begun after a failure, by cause.
    pub recoveries: BTreeMap<String, u64>,
    /// Seconds not spent training, by cause.
    pub lost_seconds: Vec<(&'static str, f64)>,
    pub goodput: f64,
    /// The newest committed checkpoint's step and when it was taken (Unix milliseconds).
    pub checkpoint: Option<(u64, u64)>,
}

impl JobView {
    /// The view `marathon job status` reads.
    pub fn of(s: &JobStatus) -> JobView {
        let g = &s.goodput;
        JobView {
            generation: s.generation,
            dp: s.dp.unwrap_or(0),
            recoveries: s.recoveries_by_cause.clone(),
            lost_seconds: lost_seconds(g),
            goodput: g.effective_fraction,
            checkpoint: s.checkpoint.zip(s.checkpoint_at_ms),
        }
    }
}

/// Every cause of a recovery, each shown (at 0 until one happens) so that rates and alerts
/// on them work from the start.
const CAUSES: [&str; 5] = ["worker_died", "hung", "straggler", "node_lost", "restarted"];

/// A goodput account's time not spent training, by cause.
pub fn lost_seconds(g: &Goodput) -> Vec<(&'static str, f64)> {
    vec![
        ("startup", g.startup_s),
        ("detection", g.detection_s),
        ("reform", g.reform_s),
        ("transfer", g.transfer_s),
        ("recompute", g.recomputed_s),
        ("checkpoint_stall", g.checkpoint_stall_s),
        ("eval", g.eval_s),
    ]
}

impl JobMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(JobMetrics::default());
        registry.register_collector(Box::new(m.clone()));
        m
    }

    /// Shows `view` from now on; `None` hides the job's series.
    pub fn set(&self, view: Option<JobView>) {
        *self.view.lock().expect("the view's lock is never poisoned") = view;
    }

    /// Changes the shown view in place (a default one if none is shown).
    pub fn update(&self, f: impl FnOnce(&mut JobView)) {
        let mut view = self.view.lock().expect("the view's lock is never poisoned");
        f(view.get_or_insert_with(JobView::default));
    }
}

impl Collector for JobMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(v) = self
            .view
            .lock()
            .expect("the view's lock is never poisoned")
            .clone()
        else {
            return Ok(());
        };
        let mut gauge = |name: &str, help: &str, value: f64| -> std::fmt::Result {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            m.encode_gauge(&value)
        };
        gauge(
            "marathon_job_generation",
            "The job's running generation (a new one at every re-forming).",
            v.generation as f64,
        )?;
        gauge(
            "marathon_job_data_parallel_degree",
            "Replicas in the running plan.",
            v.dp as f64,
        )?;
        gauge(
            "marathon_job_goodput_ratio",
            "Share of the job's wall time spent in training steps.",
            v.goodput,
        )?;
        if let Some((step, at_ms)) = v.checkpoint {
            gauge(
                "marathon_job_checkpoint_step",
                "The newest step with a committed checkpoint.",
                step as f64,
            )?;
            gauge(
                "marathon_job_checkpoint_timestamp_seconds",
                "When the newest checkpoint was committed, in Unix seconds.",
                at_ms as f64 / 1e3,
            )?;
            gauge(
                "marathon_job_checkpoint_age_seconds",
                "Seconds since the newest checkpoint was committed.",
                unix_ms().saturating_sub(at_ms) as f64 / 1e3,
            )?;
        }
        let mut m = encoder.encode_descriptor(
            "marathon_job_recoveries",
            "Generations begun after a failure, by cause: worker_died, hung, straggler, \
             node_lost, restarted (the same members, after a worker's own error).",
            None,
            MetricType::Counter,
        )?;
        let none = CAUSES.iter().map(|c| (c.to_string(), 0));
        let counts: BTreeMap<String, u64> = none.chain(v.recoveries.clone()).collect();
        for (cause, n) in &counts {
            let labels = label("cause", cause);
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        let mut m = encoder.encode_descriptor(
            "marathon_job_lost_seconds",
            "Time not spent training, by cause: startup, detection, reform, transfer, \
             recompute, checkpoint_stall, eval.",
            None,
            MetricType::Counter,
        )?;
        for (cause, seconds) in &v.lost_seconds {
            let labels = label("cause", cause);
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, f64>(seconds, None)?;
        }
        Ok(())
    }
}

/// A training process's endpoint: its rank's metrics, and the job's where it reports them.
#[derive(Debug)]
pub struct RankEndpoint {
    pub endpoint: Endpoint,
    pub rank: Arc<RankMetrics>,
    pub job: Arc<JobMetrics>,
}

impl RankEndpoint {
    /// Serves a rank's and a job's metrics on `addr`.
    pub fn serve(addr: SocketAddr) -> Result<RankEndpoint> {
        let mut registry = Registry::default();
        let rank = RankMetrics::register(&mut registry);
        let job = JobMetrics::register(&mut registry);
        let endpoint = Endpoint::serve(addr, registry, None, BTreeMap::new())?;
        Ok(RankEndpoint {
            endpoint,
            rank,
            job,
        })
    }
}

/// What an endpoint serves besides `/metrics`: a path and the JSON it answers with.
pub type Page = Box<dyn Fn() -> String + Send + Sync>;

/// Called before each scrape is encoded, to bring metrics read from elsewhere up to date.
pub type Refresh = Box<dyn Fn() + Send + Sync>;

/// An HTTP endpoint serving a registry at `/metrics`, in the OpenMetrics text format. It stops
/// when dropped.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint({})", self.addr)
    }
}

/// What an endpoint's thread serves.
struct Served {
    registry: Registry,
    refresh: Option<Refresh>,
    pages: BTreeMap<&'static str, Page>,
}

impl Endpoint {
    /// Serves `registry` on `addr` (`HOST:PORT`; port 0 takes a free one) from a thread of
    /// its own. `refresh` runs before each scrape; `pages` are further JSON paths.
    pub fn serve(
        addr: SocketAddr,
        registry: Registry,
        refresh: Option<Refresh>,
        pages: BTreeMap<&'static str, Page>,
    ) -> Result<Endpoint> {
        let listener = TcpListener::bind(addr).map_err(|e| RuntimeError::Argument {
            name: "--metrics-addr",
            reason: format!(
                "cannot listen on {addr} for metrics: {e}; give a free HOST:PORT of this machine"
            ),
        })?;
        let addr = listener.local_addr().map_err(|e| RuntimeError::Argument {
            name: "--metrics-addr",
            reason: format!("{addr}: {e}"),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Served {
            registry,
            refresh,
            pages,
        });
        let halt = stop.clone();
        std::thread::Builder::new()
            .name("marathon-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if halt.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let served = served.clone();
                    // A scrape that hangs must not hold up the next one.
                    std::thread::spawn(move || {
                        let _ = answer(conn, &served);
                    });
                }
            })
            .map_err(|e| RuntimeError::io("start the metrics thread for", "", e))?;
        Ok(Endpoint { addr, stop })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Answers one HTTP/1.x request: `GET /metrics`, a page, or 404.
fn answer(conn: TcpStream, served: &Served) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers, up to the blank line; nothing in them changes the answer.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => {
            if let Some(refresh) = &served.refresh {
                refresh();
            }
            let mut body = String::new();
            match encode(&mut body, &served.registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        ("GET", p) if served.pages.contains_key(p) => {
            ("200 OK", "application/json", (served.pages[p])())
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            format!(
                "marathon serves /metrics{}\n",
                served
                    .pages
                    .keys()
                    .map(|p| format!(" and {p}"))
                    .collect::<String>()
            ),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".into(),
        ),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// The address of the worker of `slot` under an agent serving on `agent`: the ports after the
/// agent's, one a slot.
pub fn worker_addr(agent: SocketAddr, slot: usize) -> SocketAddr {
    SocketAddr::new(agent.ip(), agent.port() + 1 + slot as u16)
}

/// Prometheus's HTTP service discovery answer: each target with its labels.
pub fn targets_json(targets: &[(SocketAddr, Vec<(&str, String)>)]) -> String {
    let groups: Vec<serde_json::Value> = targets
        .iter()
        .map(|(addr, labels)| {
            let labels: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str())))
                .collect();
            serde_json::json!({ "targets": [addr.to_string()], "labels": labels })
        })
        .collect();
    serde_json::Value::from(groups).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).expect("connects");
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("writes");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("reads");
        out
    }

    #[test]
    fn an_endpoint_serves_openmetrics_with_conventional_names() {
        let mut registry = Registry::default();
        let rank = RankMetrics::register(&mut registry);
        let job = JobMetrics::register(&mut registry);
        let rec = StepRecord {
            step: 7,
            loss: 2.5,
            lr: 1e-3,
            grad_norm: 1.0,
            batch: 4,
            tokens_consumed: 1024,
            step_ms: 100.0,
            tokens_per_s: 1000.0,
            comm_wait_ms: 10.0,
            comm_overlapped_ms: 0.0,
            tp_comm_ms: 20.0,
            pipeline_wait_ms: 30.0,
            at_ms: 0,
        };
        rank.on_step(&rec, 128);
        rank.on_persisted(&Persisted {
            step: 7,
            seconds: 1.5,
            bytes: 4096,
            committed: true,
        });
        job.update(|v| {
            v.lost_seconds = vec![("detection", 0.75)];
            v.recoveries.insert("hung".into(), 2);
            v.checkpoint = Some((7, unix_ms() - 2000));
        });
        let pages: BTreeMap<&'static str, Page> =
            [("/targets", Box::new(|| "[]".to_owned()) as Page)].into();
        let ep = Endpoint::serve(
            "127.0.0.1:0".parse().expect("an address"),
            registry,
            None,
            pages,
        )
        .expect("serves");
        let out = get(ep.addr(), "/metrics");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("application/openmetrics-text"), "{out}");
        for line in [
            "marathon_step 7",
            "marathon_loss 2.5",
            "marathon_tokens_total 128",
            "marathon_step_phase_seconds_total{phase=\"compute\"} 0.04",
            "marathon_step_phase_seconds_total{phase=\"pipeline_wait\"} 0.03",
            "marathon_step_duration_seconds_count 1",
            "marathon_checkpoint_persisted_bytes_total 4096",
            "marathon_job_lost_seconds_total{cause=\"detection\"} 0.75",
            "marathon_job_recoveries_total{cause=\"hung\"} 2",
            "marathon_job_checkpoint_step 7",
            "# EOF",
        ] {
            assert!(out.contains(line), "no {line:?} in:\n{out}");
        }
        let age = out
            .lines()
            .find_map(|l| l.strip_prefix("marathon_job_checkpoint_age_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("an age");
        assert!((2.0..60.0).contains(&age), "{age}");
        assert!(get(ep.addr(), "/targets").ends_with("\r\n\r\n[]"));
        // Hidden, the job's series go, and the rank's stay.
        job.set(None);
        let out = get(ep.addr(), "/metrics");
        assert!(
            !out.contains("marathon_job") && out.contains("marathon_step 7"),
            "{out}"
        );
        let missing = get(ep.addr(), "/nothing");
        assert!(
            missing.starts_with("HTTP/1.1 404") && missing.contains("/metrics and /targets"),
            "{missing}"
        );
        let addr = ep.addr();
        drop(ep);
        std::thread::sleep(Duration::from_millis(50));
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }

    #[test]
    fn a_busy_address_is_refused_by_name() {
        let held = TcpListener::bind("127.0.0.1:0").expect("binds");
        let err = Endpoint::serve(
            held.local_addr().expect("an address"),
            Registry::default(),
            None,
            BTreeMap::new(),
        )
        .expect_err("the port is taken");
        assert!(err.to_string().contains("--metrics-addr"), "{err}");
    }

    #[test]
    fn worker_ports_follow_the_agents_and_targets_carry_labels() {
        let agent: SocketAddr = "10.0.0.1:9400".parse().expect("an address");
        assert_eq!(worker_addr(agent, 2).to_string(), "10.0.0.1:9403");
        let json = targets_json(&[(agent, vec![("node", "n1".into())])]);
        assert_eq!(
            json,
            r#"[{"labels":{"node":"n1"},"targets":["10.0.0.1:9400"]}]"#
        );
    }
}
