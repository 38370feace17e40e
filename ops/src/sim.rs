//! `marathon sim`: a weeks-long run of a configuration's layout in simulation
//! ([`marathon_chaos::weeks`]): every agent's membership core and the planner against a
//! simulated etcd, failures drawn from a seed and a failure model, the time lost per cause
//! beside checkpoint-restart's on the same failures.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use marathon_chaos::weeks::{self, WeeksConfig, WeeksReport, PRESETS};
use marathon_model::goodput::estimate;
use marathon_runtime::TrainConfig;

use crate::plan::{assumptions, secs, step_cost, GoodputFlags};

#[derive(Debug, Args)]
pub struct SimArgs {
    /// The job: its model and layout (tp x pp x dp, the distributed optimizer).
    #[arg(long)]
    config: PathBuf,
    /// Simulated days.
    #[arg(long, default_value_t = 30.0)]
    days: f64,
    /// The seed the failures, repairs and the simulated etcd's delays are drawn from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The failure model: `llama3` (419 interruptions in 54 days on 16,384 GPUs, 78% of
    /// them hardware). --gpu-mtbf-hours, --mtbf-hours and --hardware-fraction override it.
    #[arg(long, default_value = "llama3")]
    preset: String,
    /// Seconds a slot whose worker died is not offered.
    #[arg(long, default_value_t = 30.0)]
    cooldown_s: f64,
    /// Time to live of each node's lease: a node that stops is declared dead this long after.
    #[arg(long, default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    flags: GoodputFlags,
}

pub fn run(args: SimArgs) -> Result<()> {
    let cfg = TrainConfig::load(&args.config)?;
    let layout = cfg.parallel;
    let Some(preset) = PRESETS.iter().find(|p| p.name == args.preset) else {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        bail!(
            "--preset {}: no such failure model; use one of {names:?}",
            args.preset
        );
    };
    if !(args.days.is_finite() && args.days > 0.0 && args.days <= 3650.0) {
        bail!(
            "--days: must be more than 0 and at most 3650 (it is {})",
            args.days
        );
    }
    if !(args.cooldown_s.is_finite() && args.cooldown_s >= 0.0) {
        bail!(
            "--cooldown-s: must be zero or more (it is {})",
            args.cooldown_s
        );
    }
    let k = step_cost(&cfg);
    let world = layout.world_size();
    let (a, sources) = assumptions(
        &args.flags,
        &k,
        world,
        (preset.gpu_mtbf_hours, preset.hardware_fraction),
    )?;
    if layout.tp > a.gpus_per_node || a.gpus_per_node % layout.tp != 0 {
        bail!(
            "parallel.tp {} does not fit a node of {} GPUs (--gpus-per-node): a tensor-parallel \
             group runs within one node",
            layout.tp,
            a.gpus_per_node
        );
    }
    let goodput = estimate(&cfg.model, &layout, &a);
    let microbatches = cfg.batch.global_batch / cfg.batch.micro_batch.max(1);
    let sim = WeeksConfig {
        tp: layout.tp,
        pp: layout.pp,
        dp: layout.dp,
        distributed_optimizer: layout.distributed_optimizer,
        microbatches,
        days: args.days,
        seed: args.seed,
        gpu_mtbf_hours: a.job_mtbf_s * world as f64 / 3600.0,
        cooldown_s: args.cooldown_s,
        lease_ttl_ms: args.lease_ttl_ms,
        assumptions: a.clone(),
        goodput: goodput.clone(),
    };
    eprintln!(
        "sim: {} for {} days, tp {} x pp {} x dp {} on {} nodes of {} GPUs and {} spare, one \
         failure per {} for the job ({}), seed {}",
        args.config.display(),
        args.days,
        layout.tp,
        layout.pp,
        layout.dp,
        world.div_ceil(a.gpus_per_node),
        a.gpus_per_node,
        a.spare_nodes,
        secs(a.job_mtbf_s),
        preset.name,
        args.seed
    );
    let r = weeks::run(&sim);
    print_report(&r, goodput.interval_steps);
    println!("assumed            {}", sources.join(", "));
    let json = serde_json::json!({ "config": args.config, "preset": preset, "assumptions": a,
        "sources": sources, "report": r });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("--json {}: cannot write", path.display()))?;
    }
    println!("{json}");
    if !r.violations.is_empty() {
        bail!(
            "the coordination protocol's invariants broke {} times; the first: {}",
            r.violations.len(),
            r.violations[0]
        );
    }
    Ok(())
}

fn print_report(r: &WeeksReport, interval_steps: u64) {
    let horizon = r.days * 86_400.0;
    println!(
        "{} days: {} hardware failures, {} worker failures, {} repairs; {} generations; {} \
         deliveries lost and resynchronised; simulated in {:.1} s",
        r.days,
        r.hardware_failures,
        r.worker_failures,
        r.repairs,
        r.generations,
        r.dropped,
        r.wall_s
    );
    println!(
        "data parallelism   mean {:.3}, least {}, {} changes",
        r.dp_mean,
        r.dp_min,
        r.dp_over_time.len() - 1
    );
    let row = |what: &str, x: String, y: String| println!("  {what:<26} {x:>22} {y:>22}");
    row(
        "time lost",
        "checkpoint-restart".into(),
        "marathon in place".into(),
    );
    let causes: std::collections::BTreeSet<&str> = r
        .restart
        .lost_s
        .keys()
        .chain(r.marathon.lost_s.keys())
        .copied()
        .collect();
    let cell = |l: &weeks::Ledger, c: &str| {
        l.lost_s.get(c).map_or("-".to_string(), |s| {
            format!("{} ({:.3}%)", secs(*s), s / horizon * 100.0)
        })
    };
    for c in causes {
        row(c, cell(&r.restart, c), cell(&r.marathon, c));
    }
    row(
        "ETTR",
        format!("{:.2}%", r.restart.ettr * 100.0),
        format!("{:.2}%", r.marathon.ettr * 100.0),
    );
    println!(
        "checkpoints        every {interval_steps} steps for both; invariants {}",
        if r.violations.is_empty() {
            "held throughout".to_string()
        } else {
            format!("BROKEN {} times", r.violations.len())
        }
    );
}
