//! `marathon job status`: where a running elastic job stands, from its keys in etcd
//! ([`marathon_runtime::status`]).

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use marathon_runtime::status::JobStatus;
use marathon_runtime::worker::unix_ms;

use crate::elastic::EtcdSecurity;

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The generation and its plan, the nodes holding their leases, the last committed step and
    /// checkpoint, the recoveries so far and where the time went.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// etcd endpoints, comma-separated (http://10.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long)]
    etcd: String,
    /// The job's name.
    #[arg(long)]
    job: String,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    security: EtcdSecurity,
}

pub fn run(command: JobCommand) -> Result<()> {
    match command {
        JobCommand::Status(args) => status(args),
    }
}

fn status(args: StatusArgs) -> Result<()> {
    let coord = args.security.connect(&args.etcd, Duration::from_secs(10))?;
    let s = JobStatus::read(&coord, &args.job)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let state = if s.done {
        "done"
    } else if s.generation == 0 {
        "waiting for its first plan"
    } else {
        "running"
    };
    println!("job                {} ({state})", s.job);
    let causes: Vec<String> = s
        .recoveries_by_cause
        .iter()
        .map(|(cause, n)| format!("{n} {cause}"))
        .collect();
    println!(
        "generation         {} ({} recoveries{}, {} resizes); leader {}",
        s.generation,
        s.recoveries,
        if causes.is_empty() {
            String::new()
        } else {
            format!(": {}", causes.join(", "))
        },
        s.resizes,
        s.leader.as_deref().unwrap_or("none")
    );
    if let (Some(tp), Some(pp), Some(dp)) = (s.tp, s.pp, s.dp) {
        println!("plan               tp {tp} x pp {pp} x dp {dp}");
        for m in &s.members {
            println!(
                "  replica {} stage {}: node {} slots {:?} ({})",
                m.replica, m.stage, m.node, m.slots, m.state
            );
        }
        for (stage, node, slots) in &s.standby {
            println!("  standby for stage {stage}: node {node} slots {slots:?}");
        }
    }
    println!("nodes with leases  {}", s.nodes.len());
    for (node, slots) in &s.nodes {
        println!("  {node}: slots {slots:?} offered");
    }
    match s.step {
        Some(step) => println!(
            "step               {step} committed (loss {}, {} samples consumed)",
            s.loss.map_or("-".into(), |l| format!("{l:.4}")),
            s.consumed_samples.unwrap_or(0)
        ),
        None => println!("step               none committed yet"),
    }
    let age = |at: u64| format!(", {:.0} s ago", unix_ms().saturating_sub(at) as f64 / 1e3);
    println!(
        "checkpoint         {}",
        s.checkpoint.map_or("none committed".into(), |c| format!(
            "step {c}{}",
            s.checkpoint_at_ms.map(age).unwrap_or_default()
        ))
    );
    for l in &s.losses {
        println!(
            "lost               generation {}: node {} slot {}: {}",
            l.generation, l.node, l.slot, l.reason
        );
    }
    let g = &s.goodput;
    println!(
        "time               {:.1} s since the first plan: training {:.1} s, start-up {:.1} s, \
         detection {:.1} s, re-forming {:.1} s, transfer {:.1} s, checkpoint stalls {:.1} s, \
         {} steps recomputed",
        s.elapsed_s,
        g.training_s,
        g.startup_s,
        g.detection_s,
        g.reform_s,
        g.transfer_s,
        g.checkpoint_stall_s,
        g.recomputed_steps
    );
    Ok(())
}
