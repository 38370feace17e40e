//! `marathon job status`: where a running elastic job stands, from its keys in etcd
//! ([`marathon_runtime::status`]); `marathon job stop`: ends it cleanly.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, Subcommand};
use marathon_runtime::records::unix_ms;
use marathon_runtime::status::{request_stop, JobStatus, StopRequest};

use crate::elastic::EtcdSecurity;

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The generation and its plan, the nodes holding their leases, the last committed step and
    /// checkpoint, the recoveries so far and where the time went.
    Status(StatusArgs),
    /// End a running elastic job cleanly: its workers stop together at the next step boundary
    /// and the job ends on a checkpoint of that step. Waits for the end unless --no-wait.
    Stop(StopArgs),
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// etcd endpoints, comma-separated (http://10.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long)]
    etcd: String,
    /// The job's name.
    #[arg(long)]
    job: String,
    /// Return once the request is recorded, without waiting for the job to end.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the job to end, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    #[command(flatten)]
    security: EtcdSecurity,
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
        JobCommand::Stop(args) => stop(args),
    }
}

fn stop(args: StopArgs) -> Result<()> {
    let coord = args.security.connect(&args.etcd, Duration::from_secs(10))?;
    let by = format!(
        "marathon job stop on {} (pid {})",
        std::fs::read_to_string("/etc/hostname")
            .unwrap_or_default()
            .trim(),
        std::process::id()
    );
    let job = &args.job;
    match request_stop(&coord, job, &by)? {
        StopRequest::Done => {
            eprintln!("job {job} had ended already");
            return Ok(());
        }
        StopRequest::Pending => eprintln!("job {job} was asked to stop already; waiting for it"),
        StopRequest::Requested => eprintln!(
            "job {job} asked to stop: its workers end it at the next step boundary, on a \
             checkpoint"
        ),
    }
    if args.no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    loop {
        let s = JobStatus::read(&coord, job)?;
        if s.done {
            println!(
                "job {job} stopped at step {}; checkpoint {}",
                s.step.map_or("-".into(), |x| x.to_string()),
                s.checkpoint
                    .map_or("none (the job has no [checkpoint])".into(), |c| format!(
                        "of step {c}"
                    ))
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "job {job} did not end within {} s of the request (generation {}, step {}); \
                 its agents may be down: check `marathon job status --job {job}`",
                args.timeout_s,
                s.generation,
                s.step.map_or("-".into(), |x| x.to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
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
