//! `marathon ckpt`: list, inspect, verify and garbage-collect the checkpoints under a root;
//! reshard, export, import and diff them through `marathon_runtime` (`reshard`, `hf`, `diff`),
//! printing what those report.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use marathon_runtime::diff::{Pair, Tolerance};
use marathon_runtime::hf;
use marathon_storage::format::Manifest;
use marathon_storage::retention::{collect, Retention};
use marathon_storage::{Reader, Store};

use crate::flags::LayoutFlags;
use std::path::PathBuf;

/// Element type of an export (`hf::Dtype`, which knows nothing of flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

impl From<Dtype> for hf::Dtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => hf::Dtype::F32,
            Dtype::Bf16 => hf::Dtype::Bf16,
        }
    }
}

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
    /// Writes a committed checkpoint, from any layout, as a Hugging Face GPT-2 model
    /// (model.safetensors and config.json), one tensor in memory at a time.
    Export {
        #[command(flatten)]
        root: RootArgs,
        /// The directory to write (created; must not hold a model already).
        dir: PathBuf,
        #[arg(long, value_parser = ["hf"], default_value = "hf")]
        format: String,
        #[arg(long)]
        step: Option<u64>,
        /// Element type of the exported weights.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
    },
    /// Turns a Hugging Face GPT-2 safetensors model into the checkpoint of step 0 under a root,
    /// with fresh optimizer state, for fine-tuning. Every tensor is checked before anything is
    /// written.
    #[command(mut_arg("tp", |a| a.default_value("1")), mut_arg("pp", |a| a.default_value("1")),
              mut_arg("dp", |a| a.default_value("1")))]
    Import {
        /// A directory with model.safetensors and config.json.
        dir: PathBuf,
        #[command(flatten)]
        root: RootArgs,
        /// The layout the checkpoint is recorded for (any layout can load it).
        #[command(flatten)]
        layout: LayoutFlags,
        /// Nothing else writes under the destination root: needed on a store that does not
        /// refuse a second create-only write (Garage), where marathon cannot tell a concurrent
        /// writer's commit from its own.
        #[arg(long)]
        single_writer: bool,
    },
    /// Writes a committed checkpoint as a new one stored for another layout (tensor, pipeline
    /// and data-parallel degrees, the distributed optimizer on or off), streaming with about
    /// two of the largest tensor box in memory; the source and destination may be different
    /// stores. Prints the throughput and peak memory at the end.
    #[command(mut_arg("tp", |a| a.default_value("1")), mut_arg("pp", |a| a.default_value("1")),
              mut_arg("dp", |a| a.default_value("1")))]
    Reshard {
        #[command(flatten)]
        src: RootArgs,
        /// The destination root (a directory or URL; it must not hold this step committed).
        dst: String,
        /// The step (default: the newest committed).
        #[arg(long)]
        step: Option<u64>,
        /// The target layout (1 x 1 x 1 unless given).
        #[command(flatten)]
        layout: LayoutFlags,
        /// Store the moments as the distributed optimizer's per-replica shards.
        #[arg(long)]
        zero: bool,
        /// How the new checkpoint's chunks are stored.
        #[arg(long, value_parser = ["none", "zstd", "zstd-shuffle"], default_value = "zstd-shuffle")]
        compression: String,
        /// Nothing else writes under the destination root: needed on a store that does not
        /// refuse a second create-only write (Garage), where marathon cannot tell a concurrent
        /// writer's commit from its own.
        #[arg(long)]
        single_writer: bool,
    },
    /// Compares two checkpoints of one model, from any two layouts, tensor by tensor
    /// (parameters and both Adam moments); exits non-zero where an element differs by more
    /// than atol + rtol * |b| (bitwise by default).
    Diff {
        /// The first checkpoint's root.
        a: String,
        /// The second checkpoint's root (may be the same root, with other steps).
        b: String,
        #[arg(long)]
        step_a: Option<u64>,
        #[arg(long)]
        step_b: Option<u64>,
        #[arg(long, default_value_t = 0.0)]
        atol: f64,
        #[arg(long, default_value_t = 0.0)]
        rtol: f64,
        /// Compare the parameters only (an imported checkpoint has fresh moments).
        #[arg(long)]
        params_only: bool,
        /// Instead of elementwise, pass when each family's ‖a − b‖ / ‖b‖ is at most this: the
        /// measure for one run continued in two layouts.
        #[arg(long, conflicts_with_all = ["atol", "rtol"])]
        l2_rtol: Option<f64>,
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
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
        reader(&self.root, &self.options)
    }
}

fn parse_options(options: &[String]) -> Result<Vec<(String, String)>> {
    options
        .iter()
        .map(|o| {
            o.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--option {o}: write it as key=value"))
        })
        .collect()
}

/// A reader of the checkpoints under `root`, which must exist.
pub(crate) fn reader(root: &str, options: &[String]) -> Result<Reader> {
    let (scheme, rest) = root.split_once("://").unwrap_or(("file", root));
    if scheme == "file" && !std::path::Path::new(rest).is_dir() {
        bail!(
            "checkpoint root {root}: no such directory; name the directory given as \
             checkpoint.root in the job's configuration"
        );
    }
    Ok(Reader::new(Store::open_with(
        root,
        parse_options(options)?,
    )?))
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
        CkptCommand::Export {
            root,
            dir,
            format: _,
            step,
            dtype,
        } => {
            let reader = root.reader()?;
            let step = pick(&reader, step)?;
            let report = hf::export(&reader, step, &dir, dtype.into())?;
            eprintln!(
                "exported step {step} of {} ({} tensors, {:.1} MB) to {} in {:.2} s",
                report.url,
                report.tensors,
                report.bytes as f64 / 1e6,
                dir.display(),
                report.seconds
            );
            Ok(())
        }
        CkptCommand::Reshard {
            src,
            dst,
            step,
            layout,
            zero,
            compression,
            single_writer,
        } => {
            let reader = src.reader()?;
            let codec = match compression.as_str() {
                "none" => marathon_storage::codec::Codec::Raw,
                "zstd" => marathon_storage::codec::Codec::Zstd,
                _ => marathon_storage::codec::Codec::ZstdShuffle4,
            };
            let step = pick(&reader, step)?;
            let target = marathon_model::ParallelLayout {
                distributed_optimizer: zero,
                ..layout.layout()
            };
            let (tp, pp, dp) = (target.tp, target.pp, target.dp);
            let options = parse_options(&src.options)?;
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let bar = if tty {
                indicatif::ProgressBar::new(0)
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "reshard {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template"),
            );
            let report = marathon_runtime::reshard::reshard(
                &reader,
                step,
                || Ok(Store::open_with(&dst, options)?),
                target,
                codec,
                single_writer,
                &mut |read, total| {
                    bar.set_length(total);
                    bar.set_position(read);
                },
            )
            .with_context(|| format!("reshard step {step} to --tp {tp} --pp {pp} --dp {dp}"))?;
            bar.finish_and_clear();
            eprintln!(
                "resharded step {step} to tp {tp} pp {pp} dp {dp}{}: {:.1} MB in {:.2} s ({:.2} \
                 GB/s) as {} objects of at most {:.1} MB; peak memory {}",
                if zero { " (distributed optimizer)" } else { "" },
                report.bytes as f64 / 1e6,
                report.seconds,
                report.gb_per_s,
                report.writers,
                report.bound_bytes as f64 / 1e6,
                report
                    .peak_rss_bytes
                    .map_or("unknown".into(), |b| format!("{:.1} MB", b as f64 / 1e6))
            );
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        CkptCommand::Import {
            dir,
            root,
            layout,
            single_writer,
        } => {
            let layout = layout.layout();
            let (tp, pp, dp) = (layout.tp, layout.pp, layout.dp);
            // The root need not exist yet: it is opened once the model has been checked.
            let options = parse_options(&root.options)?;
            let report = hf::import(
                &dir,
                || Ok(Store::open_with(&root.root, options)?),
                layout,
                single_writer,
            )
            .with_context(|| {
                format!("import {} for --tp {tp} --pp {pp} --dp {dp}", dir.display())
            })?;
            eprintln!(
                "imported {} ({} parameters) as step 0 under {} in {:.2} s; fine-tune with \
                 checkpoint.root pointing there",
                dir.display(),
                report.parameters,
                report.url,
                report.seconds
            );
            Ok(())
        }
        CkptCommand::Diff {
            a,
            b,
            step_a,
            step_b,
            atol,
            rtol,
            params_only,
            l2_rtol,
            options,
        } => {
            let (ra, rb) = (reader(&a, &options)?, reader(&b, &options)?);
            let (sa, sb) = (pick(&ra, step_a)?, pick(&rb, step_b)?);
            let families: &[&str] = if params_only {
                &["params"]
            } else {
                &["params", "adam_m", "adam_v"]
            };
            let tol = match l2_rtol {
                Some(x) => Tolerance::L2(x),
                None => Tolerance::Elementwise { atol, rtol },
            };
            if diff(&Pair::open((&ra, sa), (&rb, sb))?, families, tol)? {
                Ok(())
            } else {
                bail!("the checkpoints differ beyond {tol:?} (see DIFFERS above)")
            }
        }
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
            if !done.orphans.is_empty() {
                println!(
                    "{verb} {} shard objects no manifest names: {:?}",
                    done.orphans.len(),
                    done.orphans
                );
            }
            Ok(())
        }
    }
}

/// Prints the comparison of `pair` over `families` as a table, each family's rows as soon as it
/// is compared. Returns whether every family agrees within `tol`.
fn diff(pair: &Pair, families: &[&str], tol: Tolerance) -> Result<bool> {
    let (a, b) = (&pair.a, &pair.b);
    println!(
        "a: step {} of {} (tp {} pp {} dp {}); b: step {} of {} (tp {} pp {} dp {})",
        a.step,
        a.url,
        a.layout.tp,
        a.layout.pp,
        a.layout.dp,
        b.step,
        b.url,
        b.layout.tp,
        b.layout.pp,
        b.layout.dp
    );
    println!(
        "{:<40} {:>11} {:>11} {:>11} {:>11}",
        "tensor", "elements", "bitwise eq", "max abs", "max rel"
    );
    let mut all_ok = true;
    for family in families {
        let f = pair.compare(family, tol)?;
        for t in &f.tensors {
            println!(
                "{:<40} {:>11} {:>11} {:>11.3e} {:>11.3e}{}",
                t.name,
                t.elements,
                t.bitwise_equal,
                t.max_abs,
                t.max_rel,
                if t.within { "" } else { "  DIFFERS" }
            );
        }
        println!(
            "{family}: relative L2 difference {:.3e}{}",
            f.l2,
            if f.l2_within { "" } else { "  DIFFERS" }
        );
        all_ok &= f.agrees();
    }
    Ok(all_ok)
}

/// `step`, or the newest committed one.
pub(crate) fn pick(reader: &Reader, step: Option<u64>) -> Result<u64> {
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
