//! `marathon ckpt`: list, inspect, verify and garbage-collect the checkpoints under a root.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use marathon_storage::format::Manifest;
use marathon_storage::retention::{collect, Retention};
use marathon_storage::{Reader, Store};

#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// Every checkpoint under a root: step, committed or not, size, the layout that wrote it.
    Ls(RootArgs),
    /// One checkpoint's manifest: run state, tensors, chunks and compression ratios.
    Inspect {
        #[command(flatten)]
        root: RootArgs,
        /// The step (default: the newest committed).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Reads every chunk of the committed checkpoints (or one) and checks every checksum; exits
    /// non-zero if any fails.
    Verify {
        #[command(flatten)]
        root: RootArgs,
        #[arg(long)]
        step: Option<u64>,
    },
    /// Applies retention: keeps the newest committed checkpoints, every K-th step and the
    /// newest one that verifies; removes checkpoints that never committed once they are old.
    Gc {
        #[command(flatten)]
        root: RootArgs,
        #[arg(long, default_value_t = 3)]
        keep_last: usize,
        /// Keep steps that are multiples of this for good (0: none).
        #[arg(long, default_value_t = 0)]
        keep_every: u64,
        /// Uncommitted checkpoints younger than this are left alone.
        #[arg(long, default_value_t = 3600)]
        abandoned_after_s: u64,
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct RootArgs {
    /// The job's checkpoint root: a directory or a URL (file://, s3://, az://, gs://).
    root: String,
    /// Object store options, as key=value (aws_endpoint=..., aws_region=...), on top of the
    /// environment's.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

impl RootArgs {
    fn reader(&self) -> Result<Reader> {
        let (scheme, rest) = self.root.split_once("://").unwrap_or(("file", &self.root));
        if scheme == "file" && !std::path::Path::new(rest).is_dir() {
            bail!(
                "checkpoint root {}: no such directory; name the directory given as \
                 checkpoint.root in the job's configuration",
                self.root
            );
        }
        let options = self
            .options
            .iter()
            .map(|o| {
                o.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--option {o}: write it as key=value"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Reader::new(Store::open_with(&self.root, options)?))
    }
}

pub fn run(command: CkptCommand) -> Result<()> {
    match command {
        CkptCommand::Ls(root) => ls(&root.reader()?),
        CkptCommand::Inspect { root, step } => {
            let reader = root.reader()?;
            let step = pick(&reader, step)?;
            inspect(&reader.manifest(step)?);
            Ok(())
        }
        CkptCommand::Verify { root, step } => verify(&root.reader()?, step),
        CkptCommand::Gc {
            root,
            keep_last,
            keep_every,
            abandoned_after_s,
            dry_run,
        } => {
            let reader = root.reader()?;
            let policy = Retention {
                keep_last: keep_last.max(1),
                keep_every,
                grace_ms: abandoned_after_s.saturating_mul(1000),
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let done = collect(&reader, policy, now, dry_run, |s| {
                reader.manifest(s).and_then(|m| reader.verify(&m)).is_ok()
            })?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} expired checkpoints {:?} and {} abandoned ones {:?}; newest verified: {}",
                done.expired.len(),
                done.expired,
                done.abandoned.len(),
                done.abandoned,
                done.newest_verified
                    .map_or("none".to_string(), |s| format!("step {s}"))
            );
            Ok(())
        }
    }
}

/// `step`, or the newest committed one.
fn pick(reader: &Reader, step: Option<u64>) -> Result<u64> {
    match step {
        Some(s) => Ok(s),
        None => reader
            .committed()?
            .last()
            .copied()
            .with_context(|| format!("no committed checkpoint under {}", reader.store.url)),
    }
}

fn ls(reader: &Reader) -> Result<()> {
    let steps = reader.list()?;
    if steps.is_empty() {
        println!("no checkpoints under {}", reader.store.url);
        return Ok(());
    }
    println!(
        "{:>12}  {:<11}  {:>7}  {:>12}  layout",
        "step", "state", "objects", "bytes"
    );
    for s in steps {
        let layout = if s.committed {
            match reader.manifest(s.step) {
                Ok(m) => {
                    let l = &m.run["layout"];
                    format!(
                        "tp {} x pp {} x dp {}{}",
                        l["tp"],
                        l["pp"],
                        l["dp"],
                        if l["distributed_optimizer"] == true {
                            ", distributed optimizer"
                        } else {
                            ""
                        }
                    )
                }
                Err(e) => format!("unreadable manifest: {e}"),
            }
        } else {
            String::new()
        };
        let state = if s.committed {
            "committed"
        } else {
            "uncommitted"
        };
        println!(
            "{:>12}  {state:<11}  {:>7}  {:>12}  {layout}",
            s.step, s.objects, s.bytes
        );
    }
    Ok(())
}

fn inspect(m: &Manifest) {
    let (stored, raw) = m.sizes();
    println!(
        "step {} written by {} ranks: {} tensors, {} chunks, {raw} bytes stored as {stored} ({:.2}x)",
        m.step,
        m.writers,
        m.tensors.len(),
        m.tensors.iter().map(|t| t.chunks.len()).sum::<usize>(),
        raw as f64 / stored.max(1) as f64
    );
    println!("run state: {}", m.run);
    // Compression by family: parameters and each Adam moment compress differently.
    let mut families: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for t in &m.tensors {
        let family = t.name.split('/').next().unwrap_or("");
        let e = families.entry(family).or_default();
        for c in &t.chunks {
            e.0 += c.raw_len;
            e.1 += c.byte_len;
        }
    }
    for (f, (raw, stored)) in families {
        println!(
            "  {f:<8} {raw:>12} bytes -> {stored:>12} ({:.2}x)",
            raw as f64 / stored.max(1) as f64
        );
    }
    println!(
        "{:<44} {:>16} {:>7} {:>8}",
        "tensor", "shape", "chunks", "ratio"
    );
    for t in &m.tensors {
        let (raw, stored) = t
            .chunks
            .iter()
            .fold((0, 0), |(r, s), c| (r + c.raw_len, s + c.byte_len));
        let codec = t
            .chunks
            .first()
            .map_or("-".into(), |c| format!("{:?}", c.codec));
        println!(
            "{:<44} {:>16} {:>7} {:>7.2}x {codec}",
            t.name,
            format!("{:?}", t.shape),
            t.chunks.len(),
            raw as f64 / stored.max(1) as f64
        );
    }
}

fn verify(reader: &Reader, step: Option<u64>) -> Result<()> {
    let steps = match step {
        Some(s) => vec![s],
        None => reader.committed()?,
    };
    if steps.is_empty() {
        bail!("no committed checkpoint under {}", reader.store.url);
    }
    let mut failed = Vec::new();
    for s in steps {
        match reader.manifest(s).and_then(|m| reader.verify(&m)) {
            Ok(chunks) => println!("step {s}: ok, {chunks} chunks verified"),
            Err(e) => {
                println!("step {s}: FAILED: {e}");
                failed.push(s);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "checkpoints of steps {failed:?} under {} failed verification",
            reader.store.url
        );
    }
    Ok(())
}
