//! `marathon bench elastic`: the real agent at scale. Each of many agents runs the agent's own
//! code (`runtime::agent`: its lease, its watch of the job's keys, the leader election and the
//! membership core) as threads of this process against a real etcd, sharing a few connections,
//! with workers that are not processes (`agent::Hollow`). It times registration, the leader's
//! plan and every agent holding it; then one node crashes (its lease is not revoked but runs
//! out), and it times the lease's expiry and every survivor holding the next plan.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use marathon_elastic::membership::Timing;
use marathon_elastic::{Coordinator, EtcdCoordinator, JobKeys};
use marathon_runtime::agent::{self, AgentOptions, Hollow, Starts};
use marathon_runtime::records::{unix_ms, PlannedRecord};

use crate::flags::LayoutFlags;

#[derive(Debug, Args)]
#[command(mut_arg("tp", |a| a.default_value("8")), mut_arg("pp", |a| a.default_value("35")))]
pub struct ElasticArgs {
    /// etcd endpoints, comma-separated (http://127.0.0.1:2379).
    #[arg(long)]
    etcd: String,
    /// Agents, each a node of the job running the agent's code on threads of this process.
    #[arg(long, default_value_t = 560)]
    agents: usize,
    /// Slots of each agent's node.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// The job's tensor and pipeline degrees; its data-parallel degree is what the agents'
    /// slots hold (--dp, if given, must be that).
    #[command(flatten)]
    layout: LayoutFlags,
    /// Microbatches of the global batch.
    #[arg(long, default_value_t = 1920)]
    microbatches: usize,
    /// etcd connections the agents share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Time to live of each node's lease (etcd grants whole seconds, 2 s at least).
    #[arg(long, default_value_t = 2000)]
    lease_ttl_ms: u64,
    /// How long the leader waits after a change before planning.
    #[arg(long, default_value_t = 50)]
    settle_ms: u64,
    /// Runs, each a new job; the figures are printed for each and their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What one run measured, in milliseconds from its start (or from the event named).
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    dp: usize,
    dp_after_loss: usize,
    /// Every agent registered under its lease.
    all_registered_ms: f64,
    /// The leader committed generation 1 (its planning record).
    planned_ms: f64,
    /// The last agent started generation 1.
    all_hold_plan_ms: f64,
    /// The last agent held the plan this long after the last registration.
    hold_after_registration_ms: f64,
    /// The crashed node's key went this long after the crash (its lease's time to live).
    expired_after_crash_ms: f64,
    /// After the expiry: the next generation committed, and every survivor holding it.
    replanned_after_expiry_ms: f64,
    hold_after_expiry_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls `probe` every 10 ms until it gives a value, for at most `limit`.
fn until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// When every node of `nodes` started `generation`, the last of them; `None` until they all did.
fn all_started(starts: &Starts, nodes: &[String], generation: u64) -> Option<Instant> {
    let starts = starts.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = BTreeMap::new();
    for (node, g, at) in starts.iter() {
        if *g == generation {
            last.insert(node.as_str(), *at);
        }
    }
    nodes
        .iter()
        .map(|n| last.get(n.as_str()).copied())
        .collect::<Option<Vec<Instant>>>()
        .and_then(|at| at.into_iter().max())
}

/// The planning record of `generation`: when it committed (Unix ms) and its degree.
fn planned(
    coord: &EtcdCoordinator,
    keys: &JobKeys,
    generation: u64,
) -> Result<Option<PlannedRecord>> {
    Ok(coord
        .get(&keys.planned(generation))?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

/// One thread per node running the agent's own code with a hollow host, sharing `conns`
/// round-robin; node `i` crashes when `crash[i]` is set.
fn start_agents(
    args: &ElasticArgs,
    conns: &[Arc<EtcdCoordinator>],
    endpoints: &[String],
    job: &str,
    nodes: &[String],
    starts: &Starts,
    crash: &[Arc<AtomicBool>],
) -> Result<Vec<std::thread::JoinHandle<marathon_runtime::Result<()>>>> {
    let layout = args.layout();
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let opts = AgentOptions {
                endpoints: endpoints.to_vec(),
                access: Default::default(),
                job: job.to_string(),
                node: node.clone(),
                slots: args.slots,
                tp: layout.tp,
                pp: layout.pp,
                microbatches: args.microbatches,
                lease_ttl: Duration::from_millis(args.lease_ttl_ms),
                timing: Timing {
                    settle: Duration::from_millis(args.settle_ms),
                    // No worker reports progress: none may count as hung.
                    hang: Duration::from_secs(86_400),
                },
                cooldown: Duration::from_secs(30),
                withdraw_after: 0,
                wait_slots: args.agents * args.slots,
                evict_stragglers: false,
                quiet: true,
                metrics_addr: None,
            };
            let (coord, host) = (
                conns[i % conns.len()].clone(),
                Hollow::new(node, starts.clone()),
            );
            let crash = crash[i].clone();
            std::thread::Builder::new()
                .name(format!("agent {node}"))
                .stack_size(1 << 20)
                .spawn(move || agent::run_with(coord, opts, Box::new(host), Some(crash)))
                .context("start an agent's thread")
        })
        .collect()
}

fn one_run(
    args: &ElasticArgs,
    conns: &[Arc<EtcdCoordinator>],
    endpoints: &[String],
) -> Result<Run> {
    let job = format!("bench-{}", unix_ms());
    let keys = JobKeys::new(&job);
    let nodes: Vec<String> = (0..args.agents).map(|i| format!("node-{i:04}")).collect();
    let starts: Starts = Arc::new(Mutex::new(Vec::new()));
    let crash: Vec<Arc<AtomicBool>> = nodes.iter().map(|_| Arc::default()).collect();
    let (t0, t0_unix) = (Instant::now(), unix_ms());
    let since = |unix: u64| unix.saturating_sub(t0_unix) as f64;
    let agents = start_agents(args, conns, endpoints, &job, &nodes, &starts, &crash)?;
    let leader = &conns[0];
    let limit = Duration::from_secs(120);
    // Generation 0 is each agent's registration.
    let registered = until("every agent's registration", limit, || {
        Ok(all_started(&starts, &nodes, 0))
    })?;
    let held = until("every agent holding generation 1", limit, || {
        Ok(all_started(&starts, &nodes, 1))
    })?;
    let first = planned(leader, &keys, 1)?.context("generation 1 has no planning record")?;
    // An agent notes its registration once the call returns, which can be after the leader,
    // having seen them all, committed: the registrations were done by the commit.
    let committed = t0 + Duration::from_millis(first.at_ms.saturating_sub(t0_unix));
    let registered = registered.min(committed);

    // One node crashes; not the leader's, whose loss would add an election.
    let leads = leader.get(&keys.leader())?.unwrap_or_default();
    let victim = nodes
        .iter()
        .rposition(|n| n.as_bytes() != leads.as_slice())
        .context("a node other than the leader's")?;
    let crashed = Instant::now();
    crash[victim].store(true, Ordering::SeqCst);
    let node_key = keys.node(&nodes[victim]);
    until("the crashed node's lease running out", limit, || {
        Ok(leader.get(&node_key)?.is_none().then_some(()))
    })?;
    let (expired, expired_unix) = (Instant::now(), unix_ms());
    let survivors: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n.clone())
        .collect();
    let held_again = until("every survivor holding generation 2", limit, || {
        Ok(all_started(&starts, &survivors, 2))
    })?;
    let second = planned(leader, &keys, 2)?.context("generation 2 has no planning record")?;

    leader.put(&keys.done(), b"bench")?;
    for (a, node) in agents.into_iter().zip(&nodes) {
        a.join()
            .map_err(|_| anyhow::anyhow!("the agent of {node} panicked"))?
            .with_context(|| format!("the agent of {node}"))?;
    }
    for (key, _) in leader.list(keys.root())? {
        leader.delete(&key)?;
    }
    ensure!(
        second.dp < first.dp,
        "losing a node left dp {}; the bench needs a layout that uses every node",
        second.dp
    );
    Ok(Run {
        dp: first.dp,
        dp_after_loss: second.dp,
        all_registered_ms: ms(registered - t0),
        planned_ms: since(first.at_ms),
        all_hold_plan_ms: ms(held - t0),
        hold_after_registration_ms: ms(held - registered),
        expired_after_crash_ms: ms(expired - crashed),
        replanned_after_expiry_ms: second.at_ms.saturating_sub(expired_unix) as f64,
        hold_after_expiry_ms: ms(held_again.saturating_duration_since(expired)),
    })
}

impl ElasticArgs {
    fn layout(&self) -> marathon_model::ParallelLayout {
        self.layout.layout()
    }
}

pub fn run(args: ElasticArgs) -> Result<()> {
    ensure!(
        args.agents > 0 && args.connections > 0 && args.runs > 0,
        "--agents, --connections and --runs: at least 1"
    );
    let p = args.layout();
    let replicas = args.agents * args.slots / (p.tp * p.pp).max(1);
    if let Some(dp) = args.layout.dp {
        ensure!(
            dp == replicas,
            "--dp {dp}: the job's replicas are what its agents' slots hold, --agents {} x --slots \
             {} / (tp {} x pp {}) = {replicas}; leave --dp out or change --agents",
            args.agents,
            args.slots,
            p.tp,
            p.pp
        );
    }
    let endpoints: Vec<String> = args.etcd.split(',').map(str::to_owned).collect();
    let conns: Vec<Arc<EtcdCoordinator>> = (0..args.connections)
        .map(|_| EtcdCoordinator::connect(&endpoints, Duration::from_secs(5)).map(Arc::new))
        .collect::<Result<_, _>>()?;
    println!(
        "bench elastic: {} agents x {} slots (the agent's own code, on threads, workers hollow) \
         against {}, {} connections, leases of {} ms",
        args.agents, args.slots, args.etcd, args.connections, args.lease_ttl_ms
    );
    let mut runs = Vec::new();
    for k in 0..args.runs {
        let r = one_run(&args, &conns, &endpoints)?;
        println!(
            "  run {}: all registered {:.0} ms, generation 1 (tp {} x pp {} x dp {}) committed at \
             {:.0} ms, every agent holding it at {:.0} ms ({:.0} ms after the last \
             registration); a node crashed, its lease ran out {:.0} ms later, generation 2 (dp \
             {}) committed {:.0} ms and held by every survivor {:.0} ms after the expiry",
            k + 1,
            r.all_registered_ms,
            args.layout().tp,
            args.layout().pp,
            r.dp,
            r.planned_ms,
            r.all_hold_plan_ms,
            r.hold_after_registration_ms,
            r.expired_after_crash_ms,
            r.dp_after_loss,
            r.replanned_after_expiry_ms,
            r.hold_after_expiry_ms,
        );
        runs.push(r);
    }
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let report = serde_json::json!({
        "agents": args.agents,
        "slots": args.slots,
        "tp": args.layout().tp,
        "pp": args.layout().pp,
        "dp": runs[0].dp,
        "connections": args.connections,
        "lease_ttl_ms": args.lease_ttl_ms,
        "runs": runs,
        "median": {
            "all_registered_ms": median(|r| r.all_registered_ms),
            "planned_ms": median(|r| r.planned_ms),
            "all_hold_plan_ms": median(|r| r.all_hold_plan_ms),
            "hold_after_registration_ms": median(|r| r.hold_after_registration_ms),
            "expired_after_crash_ms": median(|r| r.expired_after_crash_ms),
            "replanned_after_expiry_ms": median(|r| r.replanned_after_expiry_ms),
            "hold_after_expiry_ms": median(|r| r.hold_after_expiry_ms),
        },
    });
    let m = &report["median"];
    println!(
        "  median of {}: every agent held the first plan {:.0} ms after the last registration, \
         and the plan after a node's loss {:.0} ms after its lease ran out",
        args.runs,
        m["hold_after_registration_ms"].as_f64().unwrap_or(f64::NAN),
        m["hold_after_expiry_ms"].as_f64().unwrap_or(f64::NAN),
    );
    println!("{report}");
    Ok(())
}
