//! `marathon plan`: a configuration's size, memory and FLOPs per rank, what its checkpoints
//! weigh and cost, and the goodput it can expect at a failure rate under checkpoint-restart and
//! under marathon's in-place recovery ([`marathon_model::goodput`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use marathon_model::cost::{cost, Cost};
use marathon_model::goodput::{
    estimate, Assumptions, Goodput, LLAMA3_GPU_MTBF_HOURS, LLAMA3_HARDWARE_FRACTION,
};
use marathon_runtime::TrainConfig;

/// Achieved TFLOP/s per GPU when neither --step-s nor --tflops-per-gpu is given: MT-NLG
/// reported 113 to 126 per A100.
const TFLOPS_PER_GPU: f64 = 120.0;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    flags: GoodputFlags,
}

/// What a goodput estimate assumes, as flags; each has a documented default.
#[derive(Debug, Args)]
pub struct GoodputFlags {
    /// Mean time between failures of the whole job, in hours [default: from --gpu-mtbf-hours].
    #[arg(long, conflicts_with = "gpu_mtbf_hours")]
    mtbf_hours: Option<f64>,
    /// Mean time between failures of one GPU, in hours; the job's is this over its GPUs
    /// [default: 50675, Llama 3's 419 interruptions in 54 days on 16,384 GPUs].
    #[arg(long)]
    gpu_mtbf_hours: Option<f64>,
    /// The share of failures that take their node away for repair [default: 0.78, Llama 3's].
    #[arg(long)]
    hardware_fraction: Option<f64>,
    /// One training step, in seconds [default: the step's FLOPs at --tflops-per-gpu].
    #[arg(long, conflicts_with = "tflops_per_gpu")]
    step_s: Option<f64>,
    /// Achieved TFLOP/s per GPU, which sets the step time [default: 120; MT-NLG reported 113
    /// to 126 on A100s].
    #[arg(long)]
    tflops_per_gpu: Option<f64>,
    /// Copy of a rank's checkpoint to host memory, GB/s: the stall [default: 25, pinned
    /// memory over PCIe 4.0 x16].
    #[arg(long)]
    d2h_gbps: Option<f64>,
    /// The store's write and read bandwidth for all ranks together, GB/s [default: 100].
    #[arg(long)]
    store_gbps: Option<f64>,
    /// One rank's stream to and from the store, GB/s [default: 2].
    #[arg(long)]
    rank_store_gbps: Option<f64>,
    /// Checkpoint-restart: seconds from a failure's detection to every process started again
    /// with its communicators formed, before the checkpoint loads [default: 600].
    #[arg(long)]
    restart_s: Option<f64>,
    /// Seconds from a failure to its detection [default: 5, the lease a lost node stops
    /// renewing].
    #[arg(long)]
    detect_s: Option<f64>,
    /// marathon: seconds from detection to the next generation's groups formed [default: 10].
    #[arg(long)]
    reform_s: Option<f64>,
    /// A rank's link to its peers for state transfer, GB/s [default: 25, 200 Gb/s].
    #[arg(long)]
    link_gbps: Option<f64>,
    /// GPUs per node [default: 8].
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Nodes beside the job's own, ready to take a failed node's place [default: 8].
    #[arg(long)]
    spare_nodes: Option<usize>,
    /// Hours a node that failed in hardware is away [default: 24].
    #[arg(long)]
    repair_hours: Option<f64>,
    /// Output of `marathon bench recovery` and `marathon bench ckpt` (their JSON lines, in one
    /// file or several): their detection and re-forming times, staging copy and per-rank store
    /// rates replace the defaults (flags still win).
    #[arg(long)]
    measured: Vec<PathBuf>,
}

/// The cost of one step of `cfg` under its own layout.
pub(crate) fn step_cost(cfg: &TrainConfig) -> Cost {
    cost(
        &cfg.model,
        &cfg.parallel,
        cfg.batch.seq_len,
        cfg.batch.global_batch,
        cfg.batch.micro_batch,
        cfg.train.recompute,
    )
}

/// Figures measured on this machine by the benches, each with the file it came from.
#[derive(Debug, Default)]
struct Measured {
    detect_s: Option<(f64, String)>,
    reform_s: Option<(f64, String)>,
    d2h_gbps: Option<(f64, String)>,
    rank_store_gbps: Option<(f64, String)>,
}

fn median(mut x: Vec<f64>) -> Option<f64> {
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied()
}

/// Reads the benches' JSON lines in `files`; each figure is the median over the runs found in
/// all of them, said to come from the files that held it.
fn measured(files: &[PathBuf]) -> Result<Measured> {
    let mut out = Measured::default();
    // Each figure's values, and the files they came from.
    let mut found: [(Vec<f64>, Vec<String>); 4] = Default::default();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--measured {}: cannot read", file.display()))?;
        let (mut detect, mut reform, mut d2h, mut store) = (vec![], vec![], vec![], vec![]);
        for (i, line) in text.lines().enumerate() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
                continue;
            };
            let at = || format!("--measured {} line {}", file.display(), i + 1);
            if let Some(e) = v.get("elastic") {
                let ms = |k: &str| {
                    e[k].as_f64().with_context(|| {
                        format!("{}: bench recovery's elastic.{k} is missing", at())
                    })
                };
                let (detected, first_step) = (ms("detected_ms")?, ms("first_step_ms")?);
                detect.push(detected / 1e3);
                reform.push((first_step - detected) / 1e3);
            }
            if let (Some(bytes), Some(none)) = (v["state_bytes"].as_f64(), v["codecs"].get("none"))
            {
                let f = |k: &str| {
                    none[k].as_f64().filter(|x| *x > 0.0).with_context(|| {
                        format!("{}: bench ckpt's codecs.none.{k} is missing", at())
                    })
                };
                d2h.push(bytes / (f("stall_ms")? / 1e3) / 1e9);
                store.push(f("persist_gbs")?.min(f("load_gbs")?));
            }
        }
        let name = file.display().to_string();
        let any = [&detect, &reform, &d2h, &store]
            .iter()
            .any(|v| !v.is_empty());
        ensure!(
            any,
            "--measured {name}: holds no output of `marathon bench recovery` or `marathon bench \
             ckpt` (their last line, a JSON object, is what is read)"
        );
        for (slot, values) in found.iter_mut().zip([detect, reform, d2h, store]) {
            if !values.is_empty() {
                slot.0.extend(values);
                slot.1.push(name.clone());
            }
        }
    }
    let [detect, reform, d2h, store] = found;
    let keep =
        |(values, files): (Vec<f64>, Vec<String>)| median(values).map(|m| (m, files.join(" and ")));
    out.detect_s = keep(detect);
    out.reform_s = keep(reform);
    out.d2h_gbps = keep(d2h);
    out.rank_store_gbps = keep(store);
    Ok(out)
}

/// The failures a job sees when no flag says otherwise: a GPU's mean time between failures in
/// hours, and the share of failures in hardware.
pub(crate) const LLAMA3: (f64, f64) = (LLAMA3_GPU_MTBF_HOURS, LLAMA3_HARDWARE_FRACTION);

/// The assumptions of `args` for a job of `cost` on `world` GPUs, each with where it came from;
/// `failures` gives the failure rate and hardware share when no flag does.
pub(crate) fn assumptions(
    args: &GoodputFlags,
    k: &Cost,
    world: usize,
    failures: (f64, f64),
) -> Result<(Assumptions, Vec<String>)> {
    let m = measured(&args.measured)?;
    let mut sources = Vec::new();
    let mut pick =
        |name: &str, flag: Option<f64>, measured: &Option<(f64, String)>, default: f64| {
            let (v, from) = match (flag, measured) {
                (Some(v), _) => (v, "flag".to_string()),
                (None, Some((v, file))) => (*v, format!("measured in {file}")),
                (None, None) => (default, "default".to_string()),
            };
            sources.push(format!("{name}: {from}"));
            v
        };
    let job_mtbf_s = match (args.mtbf_hours, args.gpu_mtbf_hours) {
        (Some(h), _) => pick("job MTBF", Some(h), &None, 0.0) * 3600.0,
        (None, g) => pick("GPU MTBF", g, &None, failures.0) * 3600.0 / world as f64,
    };
    let step_s = match args.step_s {
        Some(s) => pick("step", Some(s), &None, 0.0),
        None => {
            let tflops = pick(
                "TFLOP/s per GPU",
                args.tflops_per_gpu,
                &None,
                TFLOPS_PER_GPU,
            );
            k.flops_per_step_per_rank / (tflops * 1e12)
        }
    };
    let a = Assumptions {
        job_mtbf_s,
        hardware_fraction: pick(
            "hardware fraction",
            args.hardware_fraction,
            &None,
            failures.1,
        ),
        step_s,
        d2h_gbps: pick("d2h", args.d2h_gbps, &m.d2h_gbps, 25.0),
        store_gbps: pick("store", args.store_gbps, &None, 100.0),
        rank_store_gbps: pick("rank store", args.rank_store_gbps, &m.rank_store_gbps, 2.0),
        restart_s: pick("restart", args.restart_s, &None, 600.0),
        detect_s: pick("detection", args.detect_s, &m.detect_s, 5.0),
        reform_s: pick("re-forming", args.reform_s, &m.reform_s, 10.0),
        link_gbps: pick("link", args.link_gbps, &None, 25.0),
        gpus_per_node: args.gpus_per_node.unwrap_or(8),
        spare_nodes: args.spare_nodes.unwrap_or(8),
        repair_s: pick("repair", args.repair_hours, &None, 24.0) * 3600.0,
    };
    for (field, v) in [
        ("--mtbf-hours / --gpu-mtbf-hours", a.job_mtbf_s),
        ("--step-s / --tflops-per-gpu", a.step_s),
        ("--d2h-gbps", a.d2h_gbps),
        ("--store-gbps", a.store_gbps),
        ("--rank-store-gbps", a.rank_store_gbps),
        ("--link-gbps", a.link_gbps),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{field}: must be a positive number (it is {v})");
        }
    }
    for (field, v) in [
        ("--restart-s", a.restart_s),
        ("--detect-s", a.detect_s),
        ("--reform-s", a.reform_s),
        ("--repair-hours", a.repair_s),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{field}: must be zero or more (it is {v})");
        }
    }
    if !(0.0..=1.0).contains(&a.hardware_fraction) {
        bail!(
            "--hardware-fraction: must be between 0 and 1 (it is {})",
            a.hardware_fraction
        );
    }
    ensure!(a.gpus_per_node > 0, "--gpus-per-node: must be at least 1");
    Ok((a, sources))
}

pub fn run(args: PlanArgs) -> Result<()> {
    let cfg = TrainConfig::load(&args.config)?;
    let layout = cfg.parallel;
    let k = step_cost(&cfg);
    print_size(&args.config, &cfg, &k)?;
    let (a, sources) = assumptions(&args.flags, &k, layout.world_size(), LLAMA3)?;
    let g = estimate(&cfg.model, &layout, &a);
    print_goodput(&a, &g, &sources, layout.dp);
    println!(
        "{}",
        serde_json::json!({ "cost": k, "assumptions": a, "sources": sources, "goodput": g })
    );
    Ok(())
}

fn print_size(config: &Path, cfg: &TrainConfig, k: &Cost) -> Result<()> {
    let layout = cfg.parallel;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!("configuration      {}", config.display());
    println!(
        "model              {} layers, hidden {}, {} heads, sequence {}, vocabulary {} (padded {})",
        cfg.model.n_layer,
        cfg.model.n_embd,
        cfg.model.n_head,
        cfg.batch.seq_len,
        cfg.model.vocab_size,
        cfg.model.padded_vocab_size()
    );
    println!(
        "layout             tp {} x pp {} x dp {} = {} ranks ({} layers per stage)",
        layout.tp,
        layout.pp,
        layout.dp,
        layout.world_size(),
        cfg.model.n_layer / layout.pp
    );
    println!(
        "parameters         {} ({:.1}B)",
        k.params,
        k.params as f64 / 1e9
    );
    println!(
        "parameters/rank    {} at most ({:.2}B)",
        k.params_per_rank_max,
        k.params_per_rank_max as f64 / 1e9
    );
    let sharding = if layout.distributed_optimizer {
        "optimizer sharded over dp"
    } else {
        "optimizer replicated"
    };
    println!(
        "memory/rank        {:.1} GiB: {:.1} GiB weights, gradients and optimizer state (bf16 + fp32, {sharding}), {:.1} GiB activations (micro batch {}, recompute {})",
        gib(k.memory_bytes_per_rank()),
        gib(k.state_bytes_per_rank),
        gib(k.activation_bytes_per_rank),
        cfg.batch.micro_batch,
        serde_json::to_value(k.recompute)?.as_str().unwrap_or("?"),
    );
    println!(
        "FLOPs/step         {:.3e} for a global batch of {} x {} tokens ({:.3e} per rank)",
        k.flops_per_step, cfg.batch.global_batch, cfg.batch.seq_len, k.flops_per_step_per_rank
    );
    println!("FLOPs/token        {:.3e}", k.flops_per_token);
    Ok(())
}

/// A duration in the unit a reader takes in at a glance.
pub(crate) fn secs(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

fn print_goodput(a: &Assumptions, g: &Goodput, sources: &[String], dp: usize) {
    let gb = |b: f64| format!("{:.1} GB", b / 1e9);
    let pct = |f: f64| format!("{:.2}%", f * 100.0);
    let c = &g.checkpoint;
    println!();
    println!(
        "checkpoint         {}: fp32 master weights {}, Adam m {}, Adam v {} (the bf16 weights, {}, are rebuilt from the masters)",
        gb(c.total_bytes),
        gb(c.master_bytes),
        gb(c.adam_m_bytes),
        gb(c.adam_v_bytes),
        gb(c.weights_bf16_bytes),
    );
    println!(
        "checkpoint/rank    {} staged and written by the most loaded rank, with or without the distributed optimizer (its {dp} replicas split the writing); a joining rank receives {}",
        gb(c.per_rank_bytes),
        gb(c.join_bytes),
    );
    println!(
        "stall              {} ({} at {} GB/s to host memory)",
        secs(g.stall_s),
        gb(c.per_rank_bytes),
        a.d2h_gbps
    );
    println!(
        "persist, load      {} each ({} at {} GB/s for the store, {} GB/s per rank)",
        secs(g.persist_s),
        gb(c.total_bytes),
        a.store_gbps,
        a.rank_store_gbps
    );
    println!(
        "interval           every {} steps ({}): Young {}, Daly {}, and at least one persist; the stall takes {} of training time",
        g.interval_steps,
        secs(g.interval_s),
        secs(g.young_interval_s),
        secs(g.daly_interval_s),
        pct(g.checkpoint_fraction),
    );
    println!();
    println!(
        "failures           one per {} for the job, {:.0}% of them in hardware (a node away {}, {} spare nodes); a step takes {}",
        secs(a.job_mtbf_s),
        a.hardware_fraction * 100.0,
        secs(a.repair_s),
        a.spare_nodes,
        secs(a.step_s),
    );
    let (r, p) = (&g.restart, &g.in_place);
    let row = |what: &str, x: String, y: String| println!("  {what:<32} {x:>20} {y:>20}");
    let dash = || "-".to_string();
    let opt = |v: f64| if v > 0.0 { secs(v) } else { dash() };
    row(
        "per failure",
        "checkpoint-restart".into(),
        "marathon in place".into(),
    );
    row("detection", secs(r.detect_s), secs(p.detect_s));
    row("restart / re-forming", secs(r.restart_s), secs(p.reform_s));
    row("checkpoint load", secs(r.load_s), opt(p.reload_s));
    row("training done again", secs(r.rework_s), opt(p.recompute_s));
    row("moments moved to survivors", dash(), opt(p.transfer_s));
    row("rejoining later", dash(), opt(p.rejoin_s));
    row(
        "total",
        secs(r.lost_per_failure_s),
        secs(p.lost_per_failure_s),
    );
    row(
        "time lost to failures",
        pct(r.failures_fraction),
        pct(p.failures_fraction),
    );
    row(
        "time short of nodes",
        pct(r.capacity_fraction),
        pct(p.capacity_fraction),
    );
    row(
        "checkpoint stalls",
        pct(g.checkpoint_fraction),
        pct(g.checkpoint_fraction),
    );
    row("ETTR", pct(r.ettr), pct(p.ettr));
    println!("assumed            {}", sources.join(", "));
}
