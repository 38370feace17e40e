//! Elastic jobs end to end, against a real etcd: real worker processes and agents killed,
//! stopped and resumed, and an etcd member lost. Each job is checked against the fault-free
//! run of the same configuration in one process: every step's loss within 1e-4 relative, and
//! every sample of the global order consumed exactly once (from the samples log).

// The helpers unwrap as the tests do: an unexpected error is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::{json_lines, line_with, repo, running};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marathon_elastic::plan::Plan;
use marathon_elastic::{Coordinator, EtcdCoordinator, JobKey, JobKeys};
use marathon_runtime::records::{unix_ms, LostRecord, PlannedRecord, StepCommit};

use marathon_testkit::etcd::{self, Certs};

const MARATHON: &str = env!("CARGO_BIN_EXE_marathon");

/// A corpus and a tiny configuration in `dir`: `global_batch` sequences of 32 tokens per
/// step in microbatches of 2, and `extra` appended to `[train]`-level sections; and the
/// fault-free reference run of the same job in one process.
fn job_dir(steps: u64, global_batch: u64, extra: &str) -> tempfile::TempDir {
    let dir = job_config(steps, global_batch, extra);
    reference_run(dir.path(), steps);
    dir
}

/// Runs the fault-free reference of the job in `dir` for its first `steps` steps. The
/// learning-rate schedule is set in tokens and the data order does not depend on the step
/// count, so a shorter run is the start of a longer one: a job stopped at a step it did not
/// plan for has a reference all the same.
fn reference_run(dir: &Path, steps: u64) {
    let path = dir.join("ref.toml");
    let text: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| match l.starts_with("steps = ") {
            true => format!("steps = {steps}\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    let out = Command::new(MARATHON)
        .args(["train", "--config", "ref.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// As [`job_dir`], without the reference run.
fn job_config(steps: u64, global_batch: u64, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let [readme, arch] = marathon_testkit::docs_corpus();
    let out = Command::new(MARATHON)
        .args(["data", "prepare", "--input"])
        .args([&readme, &arch])
        .args(["--out", "corpus", "--val-fraction", "0.2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = marathon_runtime::small_job::SmallJob {
        global_batch: global_batch as usize,
        decay_tokens: 40960,
        steps,
        train_lines: format!(
            "metrics = \"metrics.jsonl\"\nsamples_log = \"samples.jsonl\"\n{extra}"
        ),
        ..Default::default()
    }
    .toml();
    std::fs::write(dir.path().join("c.toml"), &config).unwrap();
    // The fault-free reference: the same job in one process, with its own logs.
    let reference = config
        .replace("metrics.jsonl", "ref-metrics.jsonl")
        .replace("samples.jsonl", "ref-samples.jsonl")
        .replace("root = \"ckpt\"", "root = \"ref-ckpt\"");
    std::fs::write(dir.path().join("ref.toml"), reference).unwrap();
    dir
}

/// A process whose stderr lines are collected as they come, with the time each arrived.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    name: String,
}

impl Proc {
    fn start(name: &str, dir: &Path, args: &[&str]) -> Proc {
        let mut cmd = Command::new(MARATHON);
        cmd.args(args).current_dir(dir);
        Proc::spawn(name, cmd)
    }

    /// Runs `cmd` (its program, arguments, directory and environment set), stdin closed and
    /// its output captured.
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        // The tests read human info lines, whatever the environment they run in says; a test
        // that wants JSON gives --log-format.
        let mut child = cmd
            .env_remove("MARATHON_LOG_FORMAT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        Proc {
            child,
            lines,
            name: name.into(),
        }
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first line containing `what`, waiting at most `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, l)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(what))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no line with {what:?} within {timeout:?}:\n{}",
                self.name,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit, at most `timeout`; returns its status and stdout.
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(50));
                return (status, out, self.text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not finish within {timeout:?}:\n{}",
                    self.name,
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} said:\n{}", self.name, self.text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` of the worker an agent line names: "agent <node>: slot <i>: worker pid <pid>".
fn worker_pid(p: &Proc, node: &str, slot: usize) -> u32 {
    let line = p.wait_for(
        &format!("agent {node}: slot {slot}: worker pid"),
        Duration::from_secs(60),
    );
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Sends `sig` (`-9`, `-STOP`, `-CONT`) to process `pid`, through a pidfd: a pid that has
/// become a thread's is refused, never signalled (see `marathon_chaos::process`).
fn signal(sig: &str, pid: u32) {
    let number = marathon_chaos::process::signal_number(sig).unwrap();
    let p = marathon_chaos::process::Process::open(pid);
    assert!(
        p.is_some_and(|p| p.signal(number)),
        "kill {sig} {pid}: no such process"
    );
}

/// A change seen: when (Unix milliseconds), the key, and its new value (`None`: deleted).
type Seen = (u64, String, Option<Vec<u8>>);

/// Every change of a job's keys in etcd, with the Unix millisecond it was seen.
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start(c: &EtcdCoordinator, keys: &JobKeys) -> Recorder {
        let watch = c.watch_prefix(keys.root()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            while let Ok(next) = watch.next(Duration::from_secs(1)) {
                if let Some(ch) = next {
                    s.lock().unwrap().push((unix_ms(), ch.key, ch.value));
                }
            }
        });
        Recorder { seen }
    }

    /// Waits until generation `g` has completed and committed step `step` or a later one.
    fn wait_step(&self, keys: &JobKeys, g: u64, step: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let done = |c: &StepCommit| c.generation == g && c.step >= step && c.loss.is_some();
        while !self.commits(keys).iter().any(|(_, c)| done(c)) {
            assert!(
                Instant::now() < deadline,
                "generation {g} never reached step {step}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first step completed in a generation after `g`, with when its commit was seen,
    /// waiting at most `timeout`.
    fn first_step_after(&self, keys: &JobKeys, g: u64, timeout: Duration) -> (u64, StepCommit) {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .commits(keys)
                .into_iter()
                .find(|(_, c)| c.generation > g && c.loss.is_some());
            if let Some(f) = found {
                return f;
            }
            assert!(Instant::now() < deadline, "no step after generation {g}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every step commit seen, in order, with when it was seen.
    fn commits(&self, keys: &JobKeys) -> Vec<(u64, StepCommit)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(_, k, _)| matches!(keys.parse(k), JobKey::Committed(_)))
            .filter_map(|(t, _, v)| Some((*t, serde_json::from_slice(v.as_ref()?).ok()?)))
            .collect()
    }
}

/// A private etcd, a client of it, a job directory, the keys of a job, and a recorder of their
/// changes.
type Fixture = (
    etcd::Etcd,
    EtcdCoordinator,
    tempfile::TempDir,
    JobKeys,
    Recorder,
);

/// The [`Fixture`] of job `job` in `dir`.
fn fixture_in(job: &str, dir: tempfile::TempDir) -> Fixture {
    let server = etcd::Etcd::start();
    let c = server.connect();
    let keys = JobKeys::new(job);
    let rec = Recorder::start(&c, &keys);
    (server, c, dir, keys, rec)
}

/// The [`Fixture`] of job `job`, its directory with the fault-free reference run (see
/// [`job_dir`]).
fn fixture(job: &str, steps: u64, global_batch: u64, extra: &str) -> Fixture {
    fixture_in(job, job_dir(steps, global_batch, extra))
}

/// Steps for a job the test stops itself ([`stop_after`]): more than it will ever run.
const UNTIL_STOPPED: u64 = 1_000_000;

/// As [`fixture`] for a job of [`UNTIL_STOPPED`] steps, without the reference run: the test
/// runs that with [`reference_run`] once it knows where the job stopped.
fn fixture_until_stopped(job: &str, global_batch: u64, extra: &str) -> Fixture {
    fixture_in(job, job_config(UNTIL_STOPPED, global_batch, extra))
}

/// Waits until the job's plans, by generation, have data-parallel degrees that `grown` accepts,
/// and the newest of them has run `steps` steps; then stops job `name` with `marathon job stop`
/// and returns the step it stopped at. A job that must outlast a fault and the recovery after
/// it (a cooldown, a slot or a node offered again) then runs until that is done, however fast
/// its steps are. `log` gives the job's output for a failure's message.
#[allow(clippy::too_many_arguments)]
fn stop_after(
    rec: &Recorder,
    c: &EtcdCoordinator,
    keys: &JobKeys,
    server: &etcd::Etcd,
    name: &str,
    grown: impl Fn(&[usize]) -> bool,
    steps: u64,
    log: impl Fn() -> String,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let g = loop {
        let plans = plans(c, keys);
        let dps: Vec<usize> = plans.values().map(|p| p.dp).collect();
        if grown(&dps) {
            break *plans.keys().last().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the plans never took the expected shape: dp {dps:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let (_, first) = rec.first_step_after(keys, g - 1, Duration::from_secs(60));
    assert_eq!(first.generation, g, "{}", log());
    rec.wait_step(keys, g, first.step + steps, Duration::from_secs(60));
    let stop = Command::new(MARATHON)
        .args(["job", "stop", "--etcd", &server.url, "--job", name])
        .args(["--timeout-s", "120"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&stop.stdout).into_owned();
    assert!(stop.status.success(), "{stop:?}\n{}", log());
    // "stopped at step N; checkpoint of step N"
    said.split("stopped at step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("job stop said {said:?}"))
}

/// The losses recorded in generation `g`.
fn lost(c: &EtcdCoordinator, keys: &JobKeys, g: u64) -> Vec<LostRecord> {
    c.list(keys.root())
        .unwrap()
        .into_iter()
        .filter(
            |(k, _)| matches!(keys.parse(k), JobKey::Lost { generation, .. } if generation == g),
        )
        .map(|(_, v)| serde_json::from_slice(&v).unwrap())
        .collect()
}

/// Each generation's plan in etcd.
fn plans(c: &EtcdCoordinator, keys: &JobKeys) -> BTreeMap<u64, Plan> {
    c.list(keys.root())
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| match keys.parse(&k) {
            JobKey::Plan(g) => Some((g, serde_json::from_slice(&v).unwrap())),
            _ => None,
        })
        .collect()
}

/// Checks the job in `dir` against its fault-free reference, as the chaos scenarios do: every
/// step's loss (a step run again after a reload counts its last record) within 1e-4 relative,
/// and the samples each step's last generation fed, over every replica, exactly the
/// reference's.
fn check_against_reference(dir: &Path, steps: u64) {
    let violations = marathon_chaos::check::against_reference(dir, steps);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// Parses the agent's "generation <g> as rank ..." lines: (generation, tensor rank, replica,
/// digest, node).
fn digests(text: &str) -> Vec<(u64, usize, usize, String, String)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("agent ")?;
            let (node, rest) = rest.split_once(": slot ")?;
            let (_, rest) = rest.split_once("generation ")?;
            let (g, rest) = rest.split_once(" as rank ")?;
            let (_, rest) = rest.split_once("(replica ")?;
            let (replica, rest) = rest.split_once(", stage ")?;
            let (_, rest) = rest.split_once("tensor rank ")?;
            let (t, rest) = rest.split_once(')')?;
            let (_, rest) = rest.split_once("digest ")?;
            let digest = rest.split(',').next()?;
            Some((
                g.parse().ok()?,
                t.parse().ok()?,
                replica.parse().ok()?,
                digest.to_string(),
                node.to_string(),
            ))
        })
        .collect()
}

fn ms_between(a: u64, b: u64) -> i64 {
    b as i64 - a as i64
}

/// Two nodes of four slots run tp 2 x dp 4, with a checkpoint root. One worker is SIGKILLed:
/// only its slot cools down, so its block leaves and the job shrinks to dp 3; its tensor
/// partner stays as an idle process, and the node's other block stays in the job. When the
/// slot is offered again, one process starts afresh on that node and the job grows back.
#[test]
fn a_killed_worker_costs_its_slot_not_its_node_and_nobody_else_restarts() {
    let (server, c, dir, keys, rec) = fixture_until_stopped(
        "kill",
        16,
        "[checkpoint]\nroot = \"ckpt\"\nevery_steps = 10\nkeep_last = 10\n",
    );
    let args = [
        "train",
        "--config",
        "c.toml",
        "--tp",
        "2",
        "--dp",
        "4",
        "--nodes",
        "2",
        "--slots",
        "4",
        "--etcd",
        &server.url,
        "--job",
        "kill",
        "--cooldown-ms",
        "2500",
        "--lease-ttl-ms",
        "3000",
        "--hang-ms",
        "30000",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let victim = worker_pid(&job, "node-1", 1);
    let partner = worker_pid(&job, "node-1", 0);
    rec.wait_step(&keys, 1, 8, Duration::from_secs(60));
    let killed_at = unix_ms();
    signal("-9", victim);
    // Shrunk to dp 3 around the loss, then grew back to dp 4 when the slot was offered again:
    // a few steps of that, then the job is stopped.
    let grown = |d: &[usize]| d == [4, 3, 4];
    let steps = stop_after(&rec, &c, &keys, &server, "kill", grown, 4, || job.text());
    let (status, stdout, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    let plans = plans(&c, &keys);
    let dps: Vec<usize> = plans.values().map(|p| p.dp).collect();
    assert_eq!(dps, [4, 3, 4], "{text}");
    // Only the killed slot's block left generation 2; node-1's other block stayed.
    let node1 = |g: u64| -> Vec<usize> {
        plans[&g]
            .blocks
            .iter()
            .flat_map(|b| &b.slots)
            .filter(|s| s.node == "node-1")
            .map(|s| s.index)
            .collect()
    };
    assert_eq!(node1(2), [2, 3], "{:?}", plans[&2]);
    // At most one process started afresh on that node: the eight first workers, then the
    // killed slot's replacement; its partner kept its pid through both changes.
    let starts: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": worker pid "))
        .collect();
    assert_eq!(starts.len(), 9, "{starts:?}");
    assert!(starts[8].starts_with("agent node-1: slot 1:"), "{starts:?}");
    assert!(
        text.contains(&format!("slot 0 (pid {partner}): generation 3 as rank")),
        "slot 0 of node-1 did not carry on as pid {partner}:\n{text}"
    );
    // The new replica's state equals a healthy replica's, bitwise, before its first step.
    let d = digests(&text);
    for t in 0..2 {
        let gen3: Vec<_> = d.iter().filter(|x| x.0 == 3 && x.1 == t).collect();
        assert_eq!(gen3.len(), 4, "{d:?}");
        assert!(
            gen3.iter().all(|x| x.3 == gen3[0].3),
            "tensor rank {t}: {gen3:?}"
        );
    }
    // The job has a checkpoint root, yet no worker read any state from it after the start.
    let reads = storage_reads(&text);
    let later: Vec<_> = reads.iter().filter(|r| r.0 > 1).collect();
    assert!(later.len() >= 6 + 8, "{reads:?}");
    assert!(later.iter().all(|r| r.2 == 0), "{later:?}");
    reference_run(dir.path(), steps);
    check_against_reference(dir.path(), steps);
    let s = summary(&stdout);
    assert_eq!(s["steps"], steps, "{s}");
    assert_eq!(s["goodput"]["recomputed_steps"], 0, "{s}");
    // The figures: from the kill to its detection, to the plan of generation 2, to its first
    // completed step.
    let lost = lost(&c, &keys, 1);
    assert_eq!(lost.len(), 1, "{lost:?}");
    let planned: PlannedRecord =
        serde_json::from_slice(&c.get(&keys.planned(2)).unwrap().unwrap()).unwrap();
    let commits = rec.commits(&keys);
    let last_before = commits
        .iter()
        .filter(|(_, c)| c.generation == 1 && c.loss.is_some())
        .map(|(_, c)| c.step)
        .max()
        .unwrap();
    let (first_at, first) = commits
        .iter()
        .find(|(_, c)| c.generation == 2 && c.loss.is_some())
        .unwrap();
    eprintln!(
        "kill -9 of one worker of dp4 x tp2: detected {} ms after the kill, generation 2 planned \
         at {} ms, its first step ({}) committed at {} ms; last step of generation 1: {}, so {} \
         steps recomputed",
        ms_between(killed_at, lost[0].detected_at_ms),
        ms_between(killed_at, planned.at_ms),
        first.step,
        ms_between(killed_at, *first_at),
        last_before,
        (last_before + 1).saturating_sub(first.step)
    );
    // At most the step in flight is lost: generation 2 goes on from the last committed step
    // of generation 1 (or the one after it, when every replica applied it).
    assert!(
        first.step > last_before,
        "{last_before} then {}",
        first.step
    );
    // `marathon job status` tells the same story from etcd.
    let status = |job: &str| {
        Command::new(MARATHON)
            .args(["job", "status", "--etcd", &server.url, "--job", job])
            .arg("--json")
            .output()
            .unwrap()
    };
    let out = status("kill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["done"], true, "{st}");
    // One recovery (the killed worker), then one resize (its slot offered again).
    assert_eq!(
        (
            st["generation"].as_u64(),
            st["recoveries"].as_u64(),
            st["resizes"].as_u64()
        ),
        (Some(3), Some(1), Some(1)),
        "{st}"
    );
    assert_eq!(
        st["recoveries_by_cause"],
        serde_json::json!({"worker_died": 1}),
        "{st}"
    );
    assert!(st["checkpoint_at_ms"].as_u64() > Some(killed_at), "{st}");
    assert_eq!(
        (st["tp"].as_u64(), st["dp"].as_u64()),
        (Some(2), Some(4)),
        "{st}"
    );
    assert_eq!(st["members"].as_array().unwrap().len(), 4, "{st}");
    assert_eq!(
        (st["step"].as_u64(), st["checkpoint"].as_u64()),
        (Some(steps), Some(steps)),
        "{st}"
    );
    let losses = st["losses"].as_array().unwrap();
    assert!(
        losses.len() == 1 && losses[0]["node"] == "node-1" && losses[0]["slot"] == 1,
        "{st}"
    );
    // Every agent left with the job, and took its lease with it.
    assert!(st["nodes"].as_object().unwrap().is_empty(), "{st}");
    let out = status("kil");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no job kil in the coordinator"),
        "{err}"
    );
}

/// A real Prometheus scrapes an elastic job through its agents' HTTP service discovery: every
/// agent and worker is up (its exposition parses), the job's step advances, the job's series
/// come from its leader alone, and a killed worker is counted as a recovery by its cause, with
/// the time re-forming took. `marathon job stop` then ends the job at a step boundary, on a
/// checkpoint of that step.
#[test]
fn prometheus_scrapes_an_elastic_job_and_job_stop_ends_it_on_a_checkpoint() {
    let server = etcd::Etcd::start();
    let dir = job_config(
        1_000_000,
        8,
        "[checkpoint]\nroot = \"ckpt\"\nevery_steps = 1000000\n",
    );
    // Two agents of two slots: each takes three ports, its own and one per worker.
    let base = marathon_chaos::garage::free_ports(6).unwrap();
    let addr = format!("127.0.0.1:{base}");
    let args = [
        "train",
        "--config",
        "c.toml",
        "--nodes",
        "2",
        "--slots",
        "2",
        "--etcd",
        &server.url,
        "--job",
        "prom",
        "--metrics-addr",
        &addr,
        "--cooldown-ms",
        "2500",
        "--lease-ttl-ms",
        "3000",
        "--hang-ms",
        "30000",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let sd = [base, base + 3].map(|p| format!("http://127.0.0.1:{p}/targets"));
    let prom =
        marathon_chaos::prometheus::Prometheus::start(&dir.path().join("prom"), &sd).unwrap();
    let wait = |q: &str, ok: &dyn Fn(&[marathon_chaos::prometheus::Sample]) -> bool| {
        prom.wait_for(q, Duration::from_secs(90), ok)
            .unwrap_or_else(|e| panic!("{e}\n{}\njob:\n{}", prom.log_text(), job.text()))
    };
    // Both agents and all four workers, found through /targets and scraped.
    let up = wait("up", &|s| s.len() == 6 && s.iter().all(|x| x.1 == 1.0));
    let roles: Vec<&str> = up.iter().map(|x| x.0["role"].as_str()).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "worker").count(),
        4,
        "{up:?}"
    );
    // The step advances, on every worker.
    let first = wait("min(marathon_step)", &|s| {
        s.first().is_some_and(|x| x.1 > 0.0)
    })[0]
        .1;
    wait("min(marathon_step)", &|s| {
        s.first().is_some_and(|x| x.1 >= first + 5.0)
    });
    // The job's series come from one target, the leading agent's.
    let generation = wait("marathon_job_generation", &|s| {
        s.len() == 1 && s[0].1 == 1.0
    });
    assert_eq!(generation[0].0["role"], "agent", "{generation:?}");
    wait("marathon_job_data_parallel_degree", &|s| {
        s.len() == 1 && s[0].1 == 4.0
    });
    wait("marathon_agent_leader", &|s| {
        s.len() == 2 && s.iter().map(|x| x.1).sum::<f64>() == 1.0
    });
    // A worker SIGKILLed: counted as a recovery, with its cause, and the job re-forms.
    let victim = worker_pid(&job, "node-1", 1);
    signal("-9", victim);
    wait(
        "marathon_job_recoveries_total{cause=\"worker_died\"}",
        &|s| s.len() == 1 && s[0].1 == 1.0,
    );
    wait("marathon_job_generation", &|s| {
        s.len() == 1 && s[0].1 >= 2.0
    });
    wait("marathon_job_lost_seconds_total{cause=\"reform\"}", &|s| {
        s.len() == 1 && s[0].1 > 0.0
    });
    // No other cause was counted.
    let others = prom
        .query("marathon_job_recoveries_total{cause!=\"worker_died\"} > 0")
        .unwrap();
    assert!(others.is_empty(), "{others:?}");
    // `job stop`: every worker ends at one step, the job on a checkpoint of it.
    let stop = Command::new(MARATHON)
        .args(["job", "stop", "--etcd", &server.url, "--job", "prom"])
        .args(["--timeout-s", "120"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&stop.stdout).into_owned();
    assert!(
        stop.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let (status, stdout, text) = job.finish(Duration::from_secs(60));
    assert!(status.success(), "{text}");
    let steps = summary(&stdout)["steps"].as_u64().unwrap();
    assert!(steps > first as u64 && steps < 1_000_000, "{stdout}");
    assert!(
        said.contains(&format!(
            "stopped at step {steps}; checkpoint of step {steps}"
        )),
        "{said}"
    );
    // Every worker of the last generation (dp 3 or, once the killed slot is back, 4) ended
    // at that step.
    let last_plan = plans(&server.connect(), &JobKeys::new("prom"))
        .pop_last()
        .unwrap()
        .1;
    let ends: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("asked to stop; it ends at step"))
        .collect();
    assert!(
        ends.len() == last_plan.dp
            && ends
                .iter()
                .all(|l| l.ends_with(&format!("step {steps} on a checkpoint"))),
        "{ends:?}"
    );
    let ls = Command::new(MARATHON)
        .args(["ckpt", "ls", "ckpt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.status.success() && listed.contains(&steps.to_string()),
        "{listed}"
    );
    // The job's report, written by its last generation's first rank: the kill is on its
    // timeline, and a real browser draws every plot.
    let report = dir.path().join("report.html");
    let html = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{e}: {text}"));
    for part in [
        "Generations, faults and recoveries",
        "lost: worker_died",
        "Data-parallel degree",
        "Checkpoint stall and persist",
    ] {
        assert!(html.contains(part), "the report lacks {part:?}");
    }
    let loaded = marathon_chaos::browser::load(&report).unwrap();
    let wrong = marathon_chaos::browser::check_report(&loaded, 8);
    assert!(wrong.is_empty(), "{wrong:#?}");
    // A second request finds the job ended.
    let again = Command::new(MARATHON)
        .args(["job", "stop", "--etcd", &server.url, "--job", "prom"])
        .output()
        .unwrap();
    assert!(
        again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("had ended already"),
        "{again:?}"
    );
}

/// `--withdraw-after 2`: the second worker death on one node within a cooldown withdraws the
/// whole node for the cooldown (a bad host, not a bad GPU); it then offers its slots again and
/// the job grows back. The second worker dies two steps into the generation that the first
/// death formed, well inside the cooldown however slow the machine's steps are (waiting for a
/// fixed step there raced the cooldown's end on a busy machine).
#[test]
fn a_second_death_within_the_cooldown_withdraws_the_whole_node() {
    let (server, c, dir, keys, rec) = fixture_until_stopped("withdraw", 16, "");
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "4",
        "--nodes",
        "2",
        "--slots",
        "2",
        "--etcd",
        &server.url,
        "--job",
        "withdraw",
        "--cooldown-ms",
        "6000",
        "--withdraw-after",
        "2",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let first = worker_pid(&job, "node-1", 0);
    let second = worker_pid(&job, "node-1", 1);
    rec.wait_step(&keys, 1, 6, Duration::from_secs(60));
    signal("-9", first);
    rec.wait_step(&keys, 2, 8, Duration::from_secs(60));
    signal("-9", second);
    // Grown back after the node's cooldown: a few steps of that, then the job is stopped.
    let grown = |d: &[usize]| d == [4, 3, 2, 4];
    let steps = stop_after(&rec, &c, &keys, &server, "withdraw", grown, 4, || {
        job.text()
    });
    let (status, _, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    assert!(
        text.contains("agent node-1: offers no slots for 6000 ms: 2 of its workers died"),
        "{text}"
    );
    let dps: Vec<usize> = plans(&c, &keys).values().map(|p| p.dp).collect();
    assert_eq!(dps, [4, 3, 2, 4], "{text}");
    reference_run(dir.path(), steps);
    check_against_reference(dir.path(), steps);
}

/// The straggler rule both tests use: flagged at 2x its peers' median for 6 steps.
const STRAGGLERS: &str =
    "[elastic]\nstraggler_factor = 2.0\nstraggler_steps = 6\nevict_stragglers = true\n";

/// dp 3 on three nodes of one slot; one worker throttled to a tenth of its speed by the
/// slow-worker fault. Rank 0 flags it within the rule's steps, the leader logs it with its node
/// and slot, its agent evicts it, and the job re-forms without it; it grows back when the slot
/// is offered again. The losses and samples are the fault-free run's.
#[test]
fn a_throttled_worker_is_flagged_as_a_straggler_and_evicted() {
    let (server, c, dir, keys, rec) = fixture_until_stopped("straggler", 12, STRAGGLERS);
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "3",
        "--etcd",
        &server.url,
        "--job",
        "straggler",
        "--cooldown-ms",
        "2000",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let victim = worker_pid(&job, "node-1", 0);
    let victim = std::sync::Arc::new(marathon_chaos::process::Process::open(victim).unwrap());
    rec.wait_step(&keys, 1, 8, Duration::from_secs(60));
    // The step committed when the throttle starts, read from etcd itself: the recorder's watch
    // can be steps behind on a crowded machine.
    let committed = c
        .get(&keys.committed(1))
        .unwrap()
        .expect("generation 1 commits");
    let before = serde_json::from_slice::<StepCommit>(&committed)
        .unwrap()
        .step;
    // A tenth of its speed: slower than twice its peers' median in every step, even when the
    // machine's other work slows the peers too.
    let throttle = marathon_chaos::throttle::Throttle::start(victim, 10.0);
    let line = job.wait_for(
        "straggler in generation 1: node node-1 slot 0",
        Duration::from_secs(60),
    );
    drop(throttle);
    // Evicted, then grown back: a few steps of that, then the job is stopped.
    let grown = |d: &[usize]| d == [3, 2, 3];
    let steps = stop_after(&rec, &c, &keys, &server, "straggler", grown, 4, || {
        job.text()
    });
    let (status, stdout, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    assert!(line.contains("its agent evicts it"), "{line}");
    let flagged = rec
        .commits(&keys)
        .into_iter()
        .flat_map(|(_, c)| c.stragglers)
        .next()
        .unwrap_or_else(|| panic!("no commit carries the flag:\n{text}"));
    assert_eq!(
        (flagged.slot.node.as_str(), flagged.slot.index),
        ("node-1", 0)
    );
    let delay = flagged.step - before;
    eprintln!(
        "straggler flagged {delay} steps after the throttle began (rule: 6 consecutive steps \
         at 2x), at {:.1}x its peers' median",
        flagged.ratio
    );
    // Flagged after the throttle began and within the rule's steps of it, and a step or two
    // more: the step under way when it began, and the commit read a moment before. It can come
    // sooner than the rule's 6 steps: on a crowded machine the victim's step just before the
    // throttle can be slow already, and then it starts the streak. That the flag comes at
    // exactly the rule's count of slow steps is pace.rs's test.
    assert!(
        (1..=8).contains(&delay),
        "flagged {delay} steps after the throttle began"
    );
    let lost = lost(&c, &keys, 1);
    assert!(
        lost.len() == 1 && lost[0].reason.contains("straggler"),
        "{lost:?}"
    );
    let dps: Vec<usize> = plans(&c, &keys).values().map(|p| p.dp).collect();
    assert_eq!(dps, [3, 2, 3], "{text}");
    reference_run(dir.path(), steps);
    check_against_reference(dir.path(), steps);
    let s = summary(&stdout);
    assert_eq!(s["goodput"]["stragglers"], 1, "{s}");
}

/// The same rule over 200 steps of a job with no straggler flags nothing.
#[test]
fn a_job_with_no_straggler_flags_nothing_over_200_steps() {
    let (server, c, dir, keys, rec) = fixture("steady", 200, 12, STRAGGLERS);
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "3",
        "--etcd",
        &server.url,
        "--job",
        "steady",
        "--group-timeout-ms",
        "20000",
        "--log-format",
        "json",
    ];
    let (status, stdout, text) =
        Proc::start("train --etcd", dir.path(), &args).finish(Duration::from_secs(180));
    assert!(status.success(), "{text}");
    assert!(!text.contains("straggler in generation"), "{text}");
    // Every process (launcher, agents, workers) logs JSON lines: the agents' carry their node,
    // the workers' their generation, slot and rank, all the job's name.
    let lines = json_lines(&text);
    assert!(lines
        .iter()
        .all(|l| l["ts"].is_string() && l["message"].is_string()));
    let agent = line_with(&lines, "span", |s| s == "agent", &text);
    assert_eq!(agent["job"], "steady", "{agent}");
    assert!(agent["node"].is_string(), "{agent}");
    let worker = line_with(
        &lines,
        "span",
        |s| s.starts_with("worker>generation"),
        &text,
    );
    assert_eq!(worker["job"], "steady", "{worker}");
    assert!(
        worker["generation"].is_u64() && worker["rank"].is_u64() && worker["slot"].is_string(),
        "{worker}"
    );
    let flags: Vec<_> = rec
        .commits(&keys)
        .into_iter()
        .flat_map(|(_, c)| c.stragglers)
        .collect();
    assert!(flags.is_empty(), "{flags:?}");
    assert_eq!(plans(&c, &keys).len(), 1, "the job never re-formed");
    assert_eq!(summary(&stdout)["goodput"]["stragglers"], 0);
    check_against_reference(dir.path(), 200);
}

/// `--slots auto` counts GPUs: refused for a CPU job, and for a GPU job that sees none, each
/// with what to give instead.
#[test]
fn slots_auto_counts_gpus_and_says_when_there_are_none() {
    let dir = job_config(4, 4, "");
    let cuda = std::fs::read_to_string(dir.path().join("c.toml"))
        .unwrap()
        .replace("[train]\n", "[train]\ndevice = \"cuda\"\n");
    std::fs::write(dir.path().join("gpu.toml"), cuda).unwrap();
    let agent = |config: &str| {
        Command::new(MARATHON)
            .args(["agent", "--etcd", "http://127.0.0.1:9", "--job", "j"])
            .args(["--slots", "auto", "--config", config])
            .env("CUDA_VISIBLE_DEVICES", "")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = agent("c.toml");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--slots auto counts GPUs") && err.contains("give --slots N"),
        "{err}"
    );
    let out = agent("gpu.toml");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no GPU is visible"), "{err}");
}

/// The bytes each worker had read from storage when it started a generation after the first,
/// from the agents' "generation <g> as rank" lines: (generation, node, bytes).
fn storage_reads(text: &str) -> Vec<(u64, String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (node, rest) = l.strip_prefix("agent ")?.split_once(": slot ")?;
            let (_, rest) = rest.split_once("generation ")?;
            let (g, rest) = rest.split_once(" as rank ")?;
            let (rest, _) = rest.split_once(" bytes read from storage so far")?;
            let bytes = rest.rsplit(' ').next()?;
            Some((g.parse().ok()?, node.to_string(), bytes.parse().ok()?))
        })
        .collect()
}

/// An elastic job with the distributed optimizer, dp `dp` on as many nodes of one slot, with a
/// checkpoint root: a worker is killed, the job shrinks to dp - 1 and re-partitions the moment
/// chunks from memory (the lost replica's chunk lived on as its neighbour's mirror), then the
/// node offers its slot again and the job grows back. Its losses and samples are the
/// fault-free run's, and no worker read a byte from storage after the job's start.
fn distributed_optimizer_resizes_from_memory(dp: usize) {
    let name = format!("zero-dp{dp}");
    let (server, c, dir, keys, rec) = fixture_until_stopped(
        &name,
        12,
        "[parallel]\ndistributed_optimizer = true\n\
         [checkpoint]\nroot = \"ckpt\"\nevery_steps = 10\nkeep_last = 10\n",
    );
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        &dp.to_string(),
        "--etcd",
        &server.url,
        "--job",
        &name,
        "--cooldown-ms",
        "2000",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let victim = worker_pid(&job, "node-1", 0);
    rec.wait_step(&keys, 1, 12, Duration::from_secs(60));
    signal("-9", victim);
    // Shrunk, then grown back: a few steps of that, then the job is stopped.
    let grown = |d: &[usize]| d == [dp, dp - 1, dp];
    let steps = stop_after(&rec, &c, &keys, &server, &name, grown, 4, || job.text());
    let (status, stdout, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    let dps: Vec<usize> = plans(&c, &keys).values().map(|p| p.dp).collect();
    assert_eq!(dps, [dp, dp - 1, dp], "{text}");
    reference_run(dir.path(), steps);
    check_against_reference(dir.path(), steps);
    let s = summary(&stdout);
    assert_eq!(s["goodput"]["recomputed_steps"], 0, "{s}");
    // Measured, not inferred: every worker of every later generation had read nothing.
    let reads = storage_reads(&text);
    let later: Vec<_> = reads.iter().filter(|r| r.0 > 1).collect();
    assert!(later.len() > 2 * (dp - 1), "{reads:?}\n{text}");
    assert!(later.iter().all(|r| r.2 == 0), "{later:?}");
    assert!(
        !text.contains("from the checkpoint of step"),
        "a generation reloaded:\n{text}"
    );
}

#[test]
fn the_distributed_optimizer_of_dp2_shrinks_to_one_replica_and_grows_back_from_memory() {
    distributed_optimizer_resizes_from_memory(2);
}

#[test]
fn the_distributed_optimizer_of_dp3_shrinks_and_grows_back_from_memory() {
    distributed_optimizer_resizes_from_memory(3);
}

#[test]
fn a_stage_with_no_live_copy_resumes_from_the_newest_checkpoint() {
    let (server, _, dir, keys, rec) = fixture(
        "last-resort",
        24,
        8,
        "[checkpoint]\nroot = \"ckpt\"\nevery_steps = 4\nkeep_last = 10\n",
    );
    let args = [
        "train",
        "--config",
        "c.toml",
        "--tp",
        "2",
        "--etcd",
        &server.url,
        "--job",
        "last-resort",
        "--cooldown-ms",
        "500",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let victim = worker_pid(&job, "node-0", 1);
    rec.wait_step(&keys, 1, 10, Duration::from_secs(60));
    signal("-9", victim);
    let (status, stdout, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    // dp 1 lost its only copy of the shard: generation 2 reloads the newest checkpoint and
    // says so.
    let line = text
        .lines()
        .find(|l| l.contains("generation 2 started"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("from the checkpoint of step"), "{line}");
    let commits = rec.commits(&keys);
    let reached = commits
        .iter()
        .filter(|(_, c)| c.generation == 1)
        .map(|(_, c)| c.step)
        .max()
        .unwrap();
    let restart = commits
        .iter()
        .find(|(_, c)| c.generation == 2)
        .map(|(_, c)| c.step)
        .unwrap();
    assert_eq!(restart % 4, 0, "resumed at step {restart}");
    assert!(
        restart <= reached && reached - restart < 8,
        "{restart} after {reached}"
    );
    let s = summary(&stdout);
    assert_eq!(s["goodput"]["recomputed_steps"], reached - restart, "{s}");
    check_against_reference(dir.path(), 24);
    let verify = Command::new(MARATHON)
        .args(["ckpt", "verify", "ckpt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

/// Starts agent `node` of a job of `slots` slots per node, waiting for `wait` slots.
/// The flags of a job's agents of one slot each: `nodes` of them, waited for before the
/// first plan, with these timings.
fn agent_flags(nodes: usize, lease_ttl_ms: u64, hang_ms: u64, cooldown_ms: u64) -> Vec<String> {
    [
        ("--slots", 1),
        ("--wait-slots", nodes as u64),
        ("--lease-ttl-ms", lease_ttl_ms),
        ("--hang-ms", hang_ms),
        ("--cooldown-ms", cooldown_ms),
        ("--group-timeout-ms", 20_000),
    ]
    .into_iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect()
}

fn agent(dir: &Path, urls: &str, job: &str, node: &str, flags: &[String]) -> Proc {
    let mut args = vec![
        "agent", "--etcd", urls, "--job", job, "--node", node, "--config", "c.toml",
    ];
    args.extend(flags.iter().map(String::as_str));
    let p = Proc::start(&format!("agent {node}"), dir, &args);
    p.wait_for("registered", Duration::from_secs(30));
    p
}

#[test]
fn losing_the_leaders_node_elects_another_and_the_node_rejoins_with_a_peers_state() {
    let (server, c, dir, keys, rec) = fixture_until_stopped("leader", 12, "");
    let common = agent_flags(3, 1000, 30_000, 0);
    let nodes: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|n| agent(dir.path(), &server.url, "leader", n, &common))
        .collect();
    rec.wait_step(&keys, 1, 6, Duration::from_secs(60));
    let leader = String::from_utf8(c.get(&keys.leader()).unwrap().unwrap()).unwrap();
    let (mut gone, mut rest): (Vec<Proc>, Vec<Proc>) = nodes
        .into_iter()
        .partition(|p| p.name == format!("agent {leader}"));
    let gone = gone.pop().unwrap();
    let worker = worker_pid(&gone, &leader, 0);
    // The whole node goes: its agent is killed, and its worker follows when its pipe closes.
    let killed_at = unix_ms();
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(worker) {
        assert!(Instant::now() < deadline, "the worker outlived its agent");
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = rec.first_step_after(&keys, 1, Duration::from_secs(60));
    let new_leader = String::from_utf8(c.get(&keys.leader()).unwrap().unwrap()).unwrap();
    assert_ne!(new_leader, leader);
    assert_eq!(first.1.dp, 2, "{first:?}");
    eprintln!(
        "a whole node lost (lease TTL asked 1 s, granted etcd's minimum of 2 s): the first step \
         after it committed {} ms after the kill",
        ms_between(killed_at, first.0)
    );
    // The node comes back under its old name: the job grows back at a step boundary.
    let back = agent(dir.path(), &server.url, "leader", &leader, &common);
    rest.push(back);
    // Grown back to dp 3: a few steps of that, then the job is stopped.
    let log = || rest.iter().map(Proc::text).collect::<Vec<_>>().join("\n");
    let grown = |d: &[usize]| d.len() > 1 && d.last() == Some(&3);
    let steps = stop_after(&rec, &c, &keys, &server, "leader", grown, 4, log);
    for p in rest {
        let (status, _, text) = p.finish(Duration::from_secs(120));
        assert!(status.success(), "{text}");
    }
    let dps: Vec<usize> = plans(&c, &keys).values().map(|p| p.dp).collect();
    assert_eq!(dps.first(), Some(&3));
    assert_eq!(dps.last(), Some(&3), "{dps:?}");
    assert!(dps.contains(&2), "{dps:?}");
    assert!(c.get(&keys.done()).unwrap().is_some());
    reference_run(dir.path(), steps);
    check_against_reference(dir.path(), steps);
}

#[test]
fn a_hung_worker_is_evicted_and_a_stopped_node_cannot_commit_when_it_wakes() {
    let (server, c, dir, keys, rec) = fixture("hang", 60, 12, "");
    let common = agent_flags(3, 1000, 3000, 600_000);
    let mut nodes: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|n| agent(dir.path(), &server.url, "hang", n, &common))
        .collect();
    rec.wait_step(&keys, 1, 5, Duration::from_secs(60));
    // A worker stops making progress: its agent declares it hung and evicts it.
    let hung = worker_pid(&nodes[2], "c", 0);
    signal("-STOP", hung);
    nodes[2].wait_for("declared hung", Duration::from_secs(20));
    let g2 = rec
        .first_step_after(&keys, 1, Duration::from_secs(30))
        .1
        .generation;
    // It was killed: waking it finds nothing to wake.
    assert!(!running(hung), "the evicted worker is gone");
    // The node running rank 0 stops whole, agent and worker: its lease expires, the others
    // re-form, and when it wakes it commits nothing and its agent exits.
    let plan2 = &plans(&c, &keys)[&g2];
    let node0 = plan2.block(0, 0).slots[0].node.clone();
    let i = nodes
        .iter()
        .position(|p| p.name == format!("agent {node0}"))
        .unwrap();
    let (agent_pid, worker) = (nodes[i].child.id(), worker_pid(&nodes[i], &node0, 0));
    signal("-STOP", worker);
    signal("-STOP", agent_pid);
    let g3 = rec
        .first_step_after(&keys, g2, Duration::from_secs(30))
        .1
        .generation;
    let g3_planned: PlannedRecord =
        serde_json::from_slice(&c.get(&keys.planned(g3)).unwrap().unwrap()).unwrap();
    signal("-CONT", worker);
    signal("-CONT", agent_pid);
    let zombie = nodes.remove(i);
    let (status, _, text) = zombie.finish(Duration::from_secs(30));
    assert!(!status.success(), "{text}");
    assert!(text.contains("lost its lease"), "{text}");
    for p in nodes {
        let (status, _, text) = p.finish(Duration::from_secs(120));
        assert!(status.success(), "{text}");
    }
    // Fencing: nothing of an older generation was committed once the newer one was planned.
    let late: Vec<_> = rec
        .commits(&keys)
        .into_iter()
        .filter(|(_, c)| c.generation < g3 && c.at_ms > g3_planned.at_ms)
        .collect();
    assert!(late.is_empty(), "{late:?}");
    check_against_reference(dir.path(), 60);
}

#[test]
fn losing_one_member_of_a_three_member_etcd_cluster_does_not_stop_the_job() {
    let mut cluster = etcd::EtcdCluster::start(3);
    let c = cluster.connect();
    let dir = job_dir(40, 8, "");
    let keys = JobKeys::new("cluster");
    let rec = Recorder::start(&c, &keys);
    let urls = cluster.urls.join(",");
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "2",
        "--etcd",
        &urls,
        "--job",
        "cluster",
        "--lease-ttl-ms",
        "5000",
        "--group-timeout-ms",
        "20000",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    rec.wait_step(&keys, 1, 8, Duration::from_secs(60));
    cluster.kill(0);
    let (status, _, text) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    // One generation from start to end: nobody was declared dead.
    assert_eq!(plans(&c, &keys).len(), 1, "{text}");
    check_against_reference(dir.path(), 40);
}

#[test]
fn killing_the_launcher_of_an_elastic_job_leaves_no_process_behind() {
    let server = etcd::Etcd::start();
    let dir = job_config(1_000_000, 8, "");
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "2",
        "--etcd",
        &server.url,
        "--job",
        "orphans",
    ];
    let job = Proc::start("train --etcd", dir.path(), &args);
    let workers = [worker_pid(&job, "node-0", 0), worker_pid(&job, "node-1", 0)];
    job.wait_for("generation 1 started", Duration::from_secs(60));
    let agents: Vec<u32> = job
        .text()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("agent node-")?
                .split_once(": pid ")?
                .1
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(agents.len(), 2, "{}", job.text());
    drop(job);
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in agents.iter().chain(&workers) {
        while running(*pid) {
            assert!(Instant::now() < deadline, "pid {pid} outlived the launcher");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn an_agent_restarted_under_its_name_has_its_old_workers_recorded_lost() {
    let (server, c, dir, keys, rec) = fixture("restart", 30, 8, "");
    let common = agent_flags(2, 30_000, 10_000, 0);
    let a = agent(dir.path(), &server.url, "restart", "a", &common);
    let b = agent(dir.path(), &server.url, "restart", "b", &common);
    rec.wait_step(&keys, 1, 4, Duration::from_secs(60));
    // b dies and comes straight back, long before its old lease (30 s) would expire.
    drop(b);
    let b = agent(dir.path(), &server.url, "restart", "b", &common);
    let first = rec.first_step_after(&keys, 1, Duration::from_secs(20));
    let lost = lost(&c, &keys, 1);
    assert!(
        lost.iter().any(|l| l.reason == "its agent restarted"),
        "{lost:?}"
    );
    assert!(first.1.generation >= 2);
    for p in [a, b] {
        let (status, _, text) = p.finish(Duration::from_secs(120));
        assert!(status.success(), "{text}");
    }
    check_against_reference(dir.path(), 30);
}

/// A job against an etcd that serves only TLS, asks every client for a certificate of its CA,
/// and has authentication on: the job's user, whose role covers only the job's keys, trains it
/// to the end as the fault-free reference does; the same launch with a wrong password stops at
/// once, naming the user and the endpoint, having written nothing.
#[test]
fn a_job_trains_against_etcd_over_tls_with_authentication() {
    let certs = Certs::new(&["root", "trainer"]);
    let server = etcd::Etcd::start_secure(&certs, &["trainer"], &[], "/marathon/secure/");
    let dir = job_dir(20, 8, "");
    std::fs::write(dir.path().join("password"), "trainer-password\n").expect("write");
    std::fs::write(dir.path().join("guess"), "guess\n").expect("write");
    let path = |n: &str| certs.path(n).display().to_string();
    let (ca, cert, key) = (path("ca"), path("trainer"), path("trainer-key"));
    let launch = |password: &str| {
        let args = [
            "train",
            "--config",
            "c.toml",
            "--dp",
            "2",
            "--etcd",
            &server.url,
            "--job",
            "secure",
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--etcd-user",
            "trainer",
            "--etcd-password-file",
            password,
        ];
        Proc::start("train --etcd over TLS", dir.path(), &args)
    };
    let (status, _, text) = launch("guess").finish(Duration::from_secs(60));
    assert!(
        !status.success()
            && text.contains("\"trainer\"")
            && text.contains(&server.url)
            && text.contains("refused"),
        "{text}"
    );
    assert!(!dir.path().join("metrics.jsonl").exists(), "{text}");
    let (status, _, text) = launch("password").finish(Duration::from_secs(120));
    assert!(status.success(), "{text}");
    check_against_reference(dir.path(), 20);
}

/// The deployment examples under deploy/, run here as their nodes would run them: the
/// Kubernetes manifest passes the API's schema (and fails it with a field misspelt), and the
/// agent command of each example, the cluster's addresses and sizes replaced by this machine's,
/// trains a job of two nodes to its end and writes its report.
#[test]
fn the_deployment_examples_are_valid_and_their_agents_train_a_job() {
    let server = etcd::Etcd::start();
    let manifest = repo().join("deploy/kubernetes/marathon.yaml");
    let python = |args: &[&str]| {
        let out = Command::new("python3").args(args).output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !said.contains("No module named"),
            "{said}\nthe deploy test needs kubernetes-validate and PyYAML: run \
             scripts/setup.sh --test-servers and put its python folder on PYTHONPATH, as \
             scripts/test.sh does"
        );
        (out.status.success(), said)
    };
    let m = manifest.to_str().unwrap();
    let (valid, said) = python(&["-m", "kubernetes_validate", "--strict", "--quiet", m]);
    assert!(valid, "{said}");
    let scratch = tempfile::tempdir().unwrap();
    let typo = scratch.path().join("typo.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&typo, text.replace("completionMode:", "completionModes:")).unwrap();
    let (valid, said) = python(&[
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        typo.to_str().unwrap(),
    ]);
    assert!(!valid && said.contains("completionModes"), "{said}");

    // The manifest's agent command, as two pods would run it.
    let (ok, json) = python(&[
        "-c",
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        m,
    ]);
    assert!(ok, "{json}");
    let job: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["marathon"]));
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let dir = job_config(12, 4, "");
    let ports = marathon_chaos::garage::free_ports(6).unwrap();
    let pods: Vec<Proc> = (0..2u16)
        .map(|i| {
            // The pod's environment, as the manifest's fieldRefs give it.
            let env = [
                ("JOB_UID", "3f0c2a9e".to_string()),
                ("JOB_INDEX", i.to_string()),
                ("POD_IP", "127.0.0.1".to_string()),
            ];
            let defined: Vec<&str> = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            let names: Vec<&str> = env.iter().map(|e| e.0).collect();
            assert_eq!(defined, names, "the manifest's environment");
            let mut args: Vec<String> = args
                .iter()
                .map(|a| {
                    env.iter()
                        .fold(a.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v))
                })
                .collect();
            assert!(args.iter().all(|a| !a.contains("$(")), "{args:?}");
            // What differs from the cluster: etcd, slots, the configuration's path, ports.
            let local = [
                ("--etcd", server.url.clone()),
                ("--slots", "1".into()),
                ("--wait-slots", "2".into()),
                ("--config", "c.toml".into()),
                ("--metrics-addr", format!("127.0.0.1:{}", ports + 3 * i)),
            ];
            for (flag, value) in &local {
                let at = args
                    .iter()
                    .position(|a| a == flag)
                    .unwrap_or_else(|| panic!("the manifest's agent has no {flag}"));
                args[at + 1] = value.clone();
            }
            let mut cmd = Command::new(MARATHON);
            cmd.args(&args).current_dir(dir.path());
            Proc::spawn(&format!("pod {i}"), cmd)
        })
        .collect();
    for (i, p) in pods.into_iter().enumerate() {
        let (status, _, text) = p.finish(Duration::from_secs(120));
        assert!(status.success(), "{text}");
        // The job named after the Job's uid, the agent after its index.
        let line = format!("\"job\":\"marathon-3f0c2a9e\",\"node\":\"node-{i}\"");
        assert!(text.contains(&line), "{text}");
    }
    assert!(dir.path().join("report.html").is_file());

    // The Slurm script's agent, as srun runs it on two nodes.
    let sbatch = repo().join("deploy/slurm/marathon.sbatch");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&sbatch)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dir = job_config(12, 4, "");
    let nodes: Vec<Proc> = (0..2u16)
        .map(|i| {
            let mut cmd = Command::new(repo().join("deploy/slurm/agent.sh"));
            cmd.current_dir(dir.path())
                .env("ETCD_ENDPOINTS", &server.url)
                .env("MARATHON_CONFIG", "c.toml")
                .env("SLURM_JOB_ID", "77")
                .env("MARATHON_BIN", MARATHON)
                .env("MARATHON_NODE", format!("n{i}"))
                .env("MARATHON_HOST", "127.0.0.1")
                .env("MARATHON_SLOTS", "1")
                .env("MARATHON_WAIT_SLOTS", "2")
                .env(
                    "MARATHON_METRICS_ADDR",
                    format!("127.0.0.1:{}", ports + 3 * i),
                );
            Proc::spawn(&format!("node {i}"), cmd)
        })
        .collect();
    for p in nodes {
        let (status, _, text) = p.finish(Duration::from_secs(120));
        assert!(status.success(), "{text}");
        // JSON lines, the job named after the allocation.
        assert!(text.contains("\"job\":\"marathon-77\""), "{text}");
    }
    assert!(dir.path().join("report.html").is_file());
}
