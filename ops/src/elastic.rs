//! Elastic jobs on etcd: `marathon agent` (one per node), the hidden `elastic-worker` each
//! agent starts per slot, and `marathon train --etcd`, which runs a job through local agents
//! and reports it.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use marathon_elastic::membership::Timing;
use marathon_elastic::{
    retrying, Change, Coordinator, EtcdAccess, EtcdCoordinator, JobKey, JobKeys,
};
use marathon_runtime::agent::{self, AgentOptions};
use marathon_runtime::metrics::RankEndpoint;
use marathon_runtime::records::{StepCommit, Summary};
use marathon_runtime::trainer::preflight;
use marathon_runtime::worker::{self, WorkerOptions};
use marathon_runtime::TrainConfig;

use crate::flags::TrainFlags;

/// How long the launcher keeps retrying etcd before it gives up on the job.
const OUTAGE_MAX: Duration = Duration::from_secs(30);

/// How an elastic job detects failures and re-forms.
#[derive(Debug, Clone, Args)]
pub struct ElasticFlags {
    /// Time to live of each node's lease: a node that stops renewing it (a lost machine, a
    /// partition) is declared dead this long after. etcd grants whole seconds, and no less than
    /// its minimum (2 s with its defaults).
    #[arg(long, default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// How long the leader waits after a change before planning, to gather failures that
    /// come together.
    #[arg(long, default_value_t = 50)]
    settle_ms: u64,
    /// A worker process silent for this long (no heartbeat: stopped, or wedged whole) is
    /// declared hung and evicted. A worker blocked in a collective still beats; the
    /// collective's deadline (--group-timeout-ms) fails its step instead.
    #[arg(long, default_value_t = 10_000)]
    hang_ms: u64,
    /// How long the slot of a worker that died is not offered (0: it is used again at once).
    /// The node's other slots stay in the job.
    #[arg(long, default_value_t = 30_000)]
    cooldown_ms: u64,
    /// Worker deaths on one node within one cooldown that withdraw the whole node for the
    /// cooldown, its other workers stopped with it (0: never).
    #[arg(long, default_value_t = 2)]
    withdraw_after: u64,
    /// Deadline of each collective and of each generation's rendezvous.
    #[arg(long, default_value_t = 60_000)]
    group_timeout_ms: u64,
}

impl ElasticFlags {
    fn args(&self) -> Vec<String> {
        [
            ("--lease-ttl-ms", self.lease_ttl_ms),
            ("--settle-ms", self.settle_ms),
            ("--hang-ms", self.hang_ms),
            ("--cooldown-ms", self.cooldown_ms),
            ("--withdraw-after", self.withdraw_after),
            ("--group-timeout-ms", self.group_timeout_ms),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v.to_string()])
        .collect()
    }
}

/// The environment variable an etcd user's password may come from.
pub const ETCD_PASSWORD_ENV: &str = "MARATHON_ETCD_PASSWORD";

/// How to reach an etcd behind TLS and authentication. The password comes from
/// `MARATHON_ETCD_PASSWORD` or a file, never from a flag (a command line is visible to every
/// user of the machine).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdSecurity {
    /// The CA certificate (PEM) that etcd's server certificate must chain to: TLS, with
    /// https:// endpoints.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// The client certificate (PEM) to present to etcd (its --client-cert-auth), with
    /// --etcd-key.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The etcd user to authenticate as; its password is MARATHON_ETCD_PASSWORD, or the first
    /// line of --etcd-password-file.
    #[arg(long)]
    etcd_user: Option<String>,
    /// A file holding the etcd user's password (readable only by the job's user).
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurity {
    /// The flags again, for the agents and workers this process starts (the password stays in
    /// its file or the environment, which they inherit).
    fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, path) in [
            ("--etcd-ca", &self.etcd_ca),
            ("--etcd-cert", &self.etcd_cert),
            ("--etcd-key", &self.etcd_key),
            ("--etcd-password-file", &self.etcd_password_file),
        ] {
            if let Some(p) = path {
                out.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        if let Some(u) = &self.etcd_user {
            out.extend(["--etcd-user".to_string(), u.clone()]);
        }
        out
    }

    /// The files read and the password found, as the etcd client takes them.
    pub fn access(&self) -> Result<EtcdAccess> {
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).with_context(|| format!("{flag}: read {}", p.display()))
        };
        let ca_pem = self
            .etcd_ca
            .as_deref()
            .map(|p| read("--etcd-ca", p))
            .transpose()?;
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
            _ => None,
        };
        let user = match &self.etcd_user {
            None => None,
            Some(u) => {
                let password = match &self.etcd_password_file {
                    Some(p) => String::from_utf8_lossy(&read("--etcd-password-file", p)?)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    None => std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
                        anyhow::anyhow!(
                            "--etcd-user {u}: no password: set {ETCD_PASSWORD_ENV}, or give \
                             --etcd-password-file"
                        )
                    })?,
                };
                Some((u.clone(), password))
            }
        };
        Ok(EtcdAccess {
            ca_pem,
            identity,
            user,
        })
    }

    /// Connects to the etcd at `urls` as these flags say.
    pub fn connect(&self, urls: &str, timeout: Duration) -> Result<EtcdCoordinator> {
        Ok(EtcdCoordinator::connect_with(
            &endpoints(urls),
            timeout,
            &self.access()?,
        )?)
    }
}

/// `marathon agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// etcd endpoints, comma-separated (http://10.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long)]
    etcd: String,
    /// The job's name: every agent of one job gives the same.
    #[arg(long)]
    job: String,
    /// Worker processes this node runs, or `auto`: one per visible GPU (`CUDA_VISIBLE_DEVICES`,
    /// else every GPU of the machine). On a GPU job each worker is pinned to one device, slots
    /// beyond the GPUs' count sharing them round-robin.
    #[arg(long, value_parser = parse_slots)]
    slots: Slots,
    /// This node's name, unique in the job (default: the host name and the agent's pid).
    #[arg(long)]
    node: Option<String>,
    /// The job's configuration, the same on every node; the data-parallel degree is the
    /// plan's, from the live slots.
    #[arg(long)]
    config: PathBuf,
    /// Live slots to wait for before the first generation (default: plan with what is there).
    #[arg(long, default_value_t = 0)]
    wait_slots: usize,
    /// This node's address that the other nodes reach its workers on (their process groups
    /// listen there).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Serve this agent's metrics for Prometheus at HOST:PORT (`/metrics`), and while it
    /// leads the job's; its workers serve theirs on PORT + 1 + slot, and `/targets` lists
    /// them all for Prometheus's HTTP service discovery.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Exit when stdin closes: the agent belongs to the process that started it
    /// (`marathon train --etcd`), and goes with it; its workers follow.
    #[arg(long, hide = true)]
    tied: bool,
    #[command(flatten)]
    layout: TrainFlags,
    #[command(flatten)]
    elastic: ElasticFlags,
    #[command(flatten)]
    security: EtcdSecurity,
}

/// The hidden `marathon elastic-worker`: one slot of an agent.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long)]
    etcd: String,
    #[arg(long)]
    job: String,
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 60_000)]
    group_timeout_ms: u64,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[command(flatten)]
    layout: TrainFlags,
    #[command(flatten)]
    security: EtcdSecurity,
}

/// `--slots`: a count, or one per visible GPU.
#[derive(Debug, Clone, Copy)]
enum Slots {
    Count(usize),
    Auto,
}

/// Where an agent's worker serves its metrics, as the agent tells it.
const METRICS_ENV: &str = "MARATHON_METRICS_ADDR";

/// How many workers of the machine share each GPU, as `train --etcd` tells its agents.
const SHARING_ENV: &str = "MARATHON_DEVICE_SHARING";

fn parse_slots(s: &str) -> Result<Slots, String> {
    match s {
        "auto" => Ok(Slots::Auto),
        n => n.parse().map(Slots::Count).map_err(|_| {
            format!("{n:?} is neither a number of slots nor `auto` (one per visible GPU)")
        }),
    }
}

/// The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them: its entries when it
/// is set, else every GPU the NVIDIA driver lists (`/proc/driver/nvidia/gpus`).
fn visible_gpus() -> Vec<String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect();
    }
    let n = std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count());
    (0..n).map(|i| i.to_string()).collect()
}

/// Each slot's environment on a GPU job: its device, and how many workers share it: the
/// node's slots on it, or `machine_sharing` when agents of the same machine share its GPUs
/// (`marathon train --etcd` says so).
fn slot_devices(
    slots: usize,
    gpus: &[String],
    machine_sharing: Option<usize>,
) -> Vec<Vec<(String, String)>> {
    (0..slots)
        .map(|i| {
            let mine = (0..slots)
                .filter(|j| j % gpus.len() == i % gpus.len())
                .count();
            let sharing = machine_sharing.unwrap_or(0).max(mine);
            vec![
                ("CUDA_VISIBLE_DEVICES".into(), gpus[i % gpus.len()].clone()),
                (SHARING_ENV.into(), sharing.to_string()),
            ]
        })
        .collect()
}

fn endpoints(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// Loads the configuration an elastic job runs, refusing what it cannot run yet.
fn elastic_config(config: &Path, layout: &TrainFlags) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::load(config)?;
    layout.apply(&mut cfg)?;
    if cfg.train.device != marathon_runtime::device::Device::Cpu
        && cfg.parallel.distributed_optimizer
    {
        bail!(
            "{}: parallel.distributed_optimizer: an elastic job mirrors each replica's optimizer \
             chunk on a neighbour, which runs on the CPU so far; on a GPU set \
             distributed_optimizer = false, or train without --etcd",
            config.display()
        );
    }
    Ok(cfg)
}

fn microbatches(cfg: &TrainConfig) -> usize {
    cfg.batch.global_batch / cfg.batch.micro_batch
}

/// `marathon agent`.
pub fn agent(args: AgentArgs) -> Result<()> {
    if args.tied {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            tracing::info!("agent: the process that started it is gone; stopping");
            // The workers read this process's pipe as their stdin, and exit when it closes.
            std::process::exit(crate::launch::EXIT_LAUNCHER_GONE);
        });
    }
    let cfg = elastic_config(&args.config, &args.layout)?;
    preflight(&cfg).with_context(|| format!("start an agent for {}", args.config.display()))?;
    let on_gpu = cfg.train.device != marathon_runtime::device::Device::Cpu;
    let gpus = if on_gpu { visible_gpus() } else { Vec::new() };
    let slots = match args.slots {
        Slots::Count(0) => bail!("--slots: a node runs at least one worker"),
        Slots::Count(n) => n,
        Slots::Auto if on_gpu && gpus.is_empty() => bail!(
            "--slots auto: no GPU is visible to this agent (CUDA_VISIBLE_DEVICES is empty, or \
             the NVIDIA driver lists none under /proc/driver/nvidia/gpus); give --slots N"
        ),
        Slots::Auto if on_gpu => gpus.len(),
        Slots::Auto => bail!(
            "--slots auto counts GPUs, and {} trains on the CPU; give --slots N",
            args.config.display()
        ),
    };
    if on_gpu && gpus.is_empty() {
        bail!(
            "{}: train.device = \"cuda\", but no GPU is visible to this agent \
             (CUDA_VISIBLE_DEVICES is empty, or the NVIDIA driver lists none)",
            args.config.display()
        );
    }
    let node = args.node.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let mut worker_args: Vec<String> = vec![
        "elastic-worker".into(),
        "--etcd".into(),
        args.etcd.clone(),
        "--job".into(),
        args.job.clone(),
        "--config".into(),
        args.config.display().to_string(),
        "--group-timeout-ms".into(),
        args.elastic.group_timeout_ms.to_string(),
        "--heartbeat-ms".into(),
        (args.elastic.hang_ms / 5).clamp(20, 1000).to_string(),
        "--host".into(),
        args.host.to_string(),
    ];
    worker_args.extend(args.layout.args());
    worker_args.extend(args.security.args());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("MARATHON_WORKER_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or((cores / slots).max(1));
    let mut slot_env = if on_gpu {
        let machine = std::env::var(SHARING_ENV).ok().and_then(|v| v.parse().ok());
        slot_devices(slots, &gpus, machine)
    } else {
        vec![Vec::new(); slots]
    };
    if let Some(addr) = args.metrics_addr {
        if usize::from(addr.port()) + slots > usize::from(u16::MAX) || addr.port() == 0 {
            bail!(
                "--metrics-addr {addr}: the agent's workers serve on the {slots} ports after it; \
                 give a fixed port of at most {}",
                usize::from(u16::MAX) - slots
            );
        }
        for (slot, env) in slot_env.iter_mut().enumerate() {
            let worker = marathon_runtime::metrics::worker_addr(addr, slot);
            env.push((METRICS_ENV.into(), worker.to_string()));
        }
    }
    let processes = agent::Processes::new(
        exe,
        worker_args,
        vec![("RAYON_NUM_THREADS".into(), threads.to_string())],
        slot_env,
    );
    let e = &args.elastic;
    agent::run(
        AgentOptions {
            endpoints: endpoints(&args.etcd),
            access: args.security.access()?,
            job: args.job,
            node,
            slots,
            tp: cfg.parallel.tp,
            pp: cfg.parallel.pp,
            microbatches: microbatches(&cfg),
            lease_ttl: Duration::from_millis(e.lease_ttl_ms),
            timing: Timing {
                settle: Duration::from_millis(e.settle_ms),
                hang: Duration::from_millis(e.hang_ms),
            },
            cooldown: Duration::from_millis(e.cooldown_ms),
            withdraw_after: e.withdraw_after as usize,
            wait_slots: args.wait_slots,
            evict_stragglers: cfg.elastic.evict_stragglers,
            quiet: false,
            metrics_addr: args.metrics_addr,
        },
        processes,
    )?;
    Ok(())
}

/// `marathon elastic-worker`.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let cfg = elastic_config(&args.config, &args.layout)?;
    let coord = args.security.connect(&args.etcd, Duration::from_secs(10))?;
    let live = match std::env::var(METRICS_ENV) {
        Ok(addr) => {
            let addr = addr
                .parse()
                .with_context(|| format!("{METRICS_ENV}={addr}: not a HOST:PORT"))?;
            Some(RankEndpoint::serve(addr)?)
        }
        Err(_) => None,
    };
    worker::run(
        cfg,
        Arc::new(coord),
        WorkerOptions {
            job: args.job,
            group_timeout: Duration::from_millis(args.group_timeout_ms),
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            host: args.host,
            metrics: live.as_ref().map(|l| l.rank.clone()),
        },
        BufReader::new(std::io::stdin()),
        std::io::stdout(),
    )?;
    Ok(())
}

/// `marathon train --etcd`: the job's flags.
#[derive(Debug, Clone, Args)]
pub struct TrainEtcdFlags {
    /// Run the job elastically through agents coordinated by the etcd at these endpoints
    /// (comma-separated); the agents run on this machine.
    #[arg(long)]
    etcd: Option<String>,
    /// The job's name in etcd (default: the configuration's name and the time).
    #[arg(long, requires = "etcd")]
    job: Option<String>,
    /// Local agents to start, each a node (default: parallel.dp).
    #[arg(long, requires = "etcd")]
    nodes: Option<usize>,
    /// Slots of each node (default: parallel.tp x parallel.pp).
    #[arg(long, requires = "etcd")]
    slots: Option<usize>,
    #[command(flatten)]
    elastic: ElasticFlags,
    #[command(flatten)]
    security: EtcdSecurity,
}

impl TrainEtcdFlags {
    pub fn enabled(&self) -> bool {
        self.etcd.is_some()
    }
}

/// The agents of a local job, killed however the launcher ends; if the launcher is killed
/// itself, each agent sees its stdin close and exits.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.0 {
            let _ = a.kill();
        }
        for a in &mut self.0 {
            let _ = a.wait();
        }
    }
}

/// The GPUs local agent `node` of `slots` slots gets, the machine's taken round-robin over
/// every node's slots: as `CUDA_VISIBLE_DEVICES`, none on a CPU job.
fn node_gpus(gpus: &[String], node: usize, slots: usize) -> Option<(String, String)> {
    if gpus.is_empty() {
        return None;
    }
    let mut mine: Vec<&str> = Vec::new();
    for j in 0..slots {
        let d = gpus[(node * slots + j) % gpus.len()].as_str();
        if !mine.contains(&d) {
            mine.push(d);
        }
    }
    Some(("CUDA_VISIBLE_DEVICES".into(), mine.join(",")))
}

/// `marathon train --etcd`: starts one agent per node on this machine, follows the job's
/// commits in etcd, and prints its summary and where its time went.
pub fn train(
    config: &Path,
    layout: &TrainFlags,
    flags: &TrainEtcdFlags,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<()> {
    let urls = flags.etcd.clone().expect("train --etcd");
    let cfg = elastic_config(config, layout)?;
    preflight(&cfg).with_context(|| format!("start training from {}", config.display()))?;
    let p = cfg.parallel;
    let nodes = flags.nodes.unwrap_or(p.dp);
    let slots = flags.slots.unwrap_or(p.tp * p.pp);
    let stem = config
        .file_stem()
        .map_or("job".into(), |s| s.to_string_lossy().into_owned());
    let job = flags
        .job
        .clone()
        .unwrap_or_else(|| format!("{stem}-{}", marathon_runtime::records::unix_ms()));
    let coord = flags
        .security
        .connect(&urls, Duration::from_secs(10))
        .with_context(|| format!("connect to etcd at {urls}"))?;
    let keys = JobKeys::new(&job);
    if coord.get(&keys.done())?.is_some() {
        bail!("job {job} already finished in etcd at {urls}; give another --job");
    }
    let mut watch = coord.watch_prefix(keys.root())?;
    let exe = std::env::current_exe().context("find the marathon executable")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / (nodes * slots)).max(1);
    let on_gpu = cfg.train.device != marathon_runtime::device::Device::Cpu;
    let gpus = if on_gpu { visible_gpus() } else { Vec::new() };
    if on_gpu && gpus.is_empty() {
        bail!(
            "{}: train.device = \"cuda\", but no GPU is visible (CUDA_VISIBLE_DEVICES is \
             empty, or the NVIDIA driver lists none)",
            config.display()
        );
    }
    tracing::info!(
        "job {job}: {nodes} agents of {slots} slots (tp {} x pp {}; dp up to {}), coordinated by {urls}",
        p.tp,
        p.pp,
        nodes * slots / (p.tp * p.pp)
    );
    if let Some(a) = metrics_addr {
        crate::launch::check_ports(a, nodes * (slots + 1))?;
    }
    let mut agents = Agents(Vec::with_capacity(nodes));
    for i in 0..nodes {
        let child = Command::new(&exe)
            .args(["agent", "--etcd", &urls, "--job", &job])
            .args([
                "--node",
                &format!("node-{i}"),
                "--slots",
                &slots.to_string(),
            ])
            .arg("--config")
            .arg(config)
            .args(["--wait-slots", &(nodes * slots).to_string(), "--tied"])
            .args(metrics_addr.into_iter().flat_map(|a| {
                let port = usize::from(a.port()) + i * (slots + 1);
                let a = std::net::SocketAddr::new(a.ip(), port as u16);
                ["--metrics-addr".to_string(), a.to_string()]
            }))
            .args(layout.args())
            .args(flags.elastic.args())
            .args(flags.security.args())
            .env("MARATHON_WORKER_THREADS", threads.to_string())
            .envs(node_gpus(&gpus, i, slots))
            .envs((!gpus.is_empty()).then(|| {
                let sharing = (nodes * slots).div_ceil(gpus.len());
                (SHARING_ENV, sharing.to_string())
            }))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start agent node-{i} from {}", exe.display()))?;
        tracing::info!("agent node-{i}: pid {}", child.id());
        agents.0.push(child);
    }
    let steps = cfg.train.steps;
    let mut shown = (0u64, 0u64);
    let mut last_shown = Instant::now();
    let summary = loop {
        let change = match watch.next(Duration::from_millis(200)) {
            Ok(c) => c,
            Err(e) => {
                // An etcd member went away: watch again through the others, and look for the
                // end of the job in case it came meanwhile.
                tracing::info!("the watch of job {job} ended ({e}); watching again");
                watch = retrying(OUTAGE_MAX, || coord.watch_prefix(keys.root()))?;
                retrying(OUTAGE_MAX, || coord.get(&keys.done()))?.map(|v| Change {
                    key: keys.done(),
                    value: Some(v),
                })
            }
        };
        if let Some(change) = change {
            match (keys.parse(&change.key), change.value) {
                (JobKey::Committed(_), Some(v)) => {
                    let Ok(c) = serde_json::from_slice::<StepCommit>(&v) else {
                        continue;
                    };
                    let fresh = (c.generation, c.step) != shown;
                    if fresh
                        && (c.generation != shown.0
                            || last_shown.elapsed() >= Duration::from_secs(1)
                            || c.step == steps)
                    {
                        let loss = c.loss.map_or("-".into(), |l| format!("{l:.4}"));
                        tracing::info!(
                            "step {}/{steps} loss {loss} (generation {}, dp {})",
                            c.step,
                            c.generation,
                            c.dp
                        );
                        shown = (c.generation, c.step);
                        last_shown = Instant::now();
                    }
                }
                (JobKey::Done, Some(v)) => {
                    break serde_json::from_slice::<Summary>(&v)
                        .context("the job's summary in etcd does not parse")?;
                }
                _ => {}
            }
        }
        if agents
            .0
            .iter_mut()
            .all(|a| matches!(a.try_wait(), Ok(Some(_))))
        {
            bail!(
                "every agent of job {job} exited before the job finished; their messages are \
                 above"
            );
        }
    };
    // The agents stop their workers and exit once they see the job done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while agents
        .0
        .iter_mut()
        .any(|a| matches!(a.try_wait(), Ok(None)))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    crate::launch::report_goodput(&summary);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_a_count_or_auto() {
        assert!(matches!(parse_slots("4"), Ok(Slots::Count(4))));
        assert!(matches!(parse_slots("auto"), Ok(Slots::Auto)));
        let err = parse_slots("all").expect_err("not a count");
        assert!(err.contains("\"all\"") && err.contains("auto"), "{err}");
    }

    #[test]
    fn each_slot_gets_its_own_gpu_and_extra_slots_share_them() {
        let gpus: Vec<String> = ["2", "5"].map(String::from).into();
        let env = slot_devices(3, &gpus, None);
        let device = |i: usize| env[i][0].1.as_str();
        let sharing = |i: usize| env[i][1].1.as_str();
        assert_eq!([device(0), device(1), device(2)], ["2", "5", "2"]);
        assert_eq!([sharing(0), sharing(1), sharing(2)], ["2", "1", "2"]);
        // A GPU of its own for each slot: none shared.
        assert!(slot_devices(2, &gpus, None).iter().all(|e| e[1].1 == "1"));
        // Agents of one machine sharing its GPUs: the machine's count.
        assert!(slot_devices(1, &gpus, Some(2))
            .iter()
            .all(|e| e[1].1 == "2"));
    }

    #[test]
    fn local_agents_take_the_machines_gpus_in_turn() {
        let gpus: Vec<String> = (0..8).map(|i| i.to_string()).collect();
        let of = |node| node_gpus(&gpus, node, 4).map(|(_, v)| v);
        assert_eq!(of(0).as_deref(), Some("0,1,2,3"));
        assert_eq!(of(1).as_deref(), Some("4,5,6,7"));
        // One GPU for two nodes of one slot: both share it.
        let one = ["0".to_string()];
        assert_eq!(node_gpus(&one, 1, 1).map(|(_, v)| v).as_deref(), Some("0"));
        assert_eq!(node_gpus(&[], 0, 4), None);
    }
}
