//! The GPU's self-test (`marathon bench gpu`): every check that the GPU path computes what the
//! CPU path does, and the GPU bench, in one run.
//!
//! Checks, each a [`Check`] that fails the run when it misses:
//! - every kernel against the CPU kernel it mirrors
//!   ([`marathon_model::cuda::selftest::kernel_checks`]);
//! - a small model trained 20 steps on the GPU and on the CPU from the same weights and data:
//!   the losses agree within bf16 tolerance;
//! - a one-rank NCCL group (non-blocking): every collective; an operation held pending on the
//!   GPU fails at once when another thread aborts the group, and at its deadline;
//! - a checkpoint written from the GPU and resumed by a CPU run: the same fp32 master weights
//!   and moments, bitwise; the same for a tp2 checkpoint resumed in one CPU process;
//! - tp2, pp2 (4 microbatches), dp2 with the distributed optimizer, tp2 x pp2 x dp2 and tp2 x
//!   pp2 with full recomputation as worker processes sharing this GPU through the host-staged
//!   transport: 20 steps' losses within bf16 tolerance of the one-GPU run;
//! - selective and full recomputation on the GPU against keeping everything, 20 steps.
//!
//! Bench ([`Bench`]): GPT-2 124M at the given batch and sequence: ms/step, tokens/s, model FLOP
//! utilisation, and a checkpoint snapshot's stall beside a pinned device-to-host copy of the same
//! bytes. [`staged_allreduce`] times the host-staged transport's all-reduce on this GPU.
//!
//! Draws nothing: [`run`] returns a [`Report`] and tells its caller what it sees on the way
//! through [`Progress`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marathon_model::cuda::selftest::{
    back_bf, back_f32, kernel_checks, poisoned_f32, rel, up_bf, up_f32, wide, wide_bf, Rand,
    BF16_TOL,
};
use marathon_model::cuda::{CudaError, DeviceBuffer, Gpu, PinnedBuffer, Stream};
use marathon_model::{GptConfig, ParamLayout};

use crate::device::Device;
use crate::small_job::SmallJob;
use crate::{Result, RuntimeError, TrainConfig, Trainer};

pub use marathon_model::cuda::selftest::Check;

/// What [`run`] checks and times.
#[derive(Debug, Clone)]
pub struct Options {
    /// The model to time (GPT-2 124M); recomputation's device memory is reported for it too.
    pub config: PathBuf,
    /// Sequences per step of the bench.
    pub batch: usize,
    /// Tokens per sequence of the bench.
    pub seq: usize,
    /// The bench's timed steps (after three untimed ones).
    pub steps: u64,
    /// Text to train the equivalence checks on (files or folders of .md/.txt).
    pub corpus: Vec<PathBuf>,
    /// Skip the bench, run the checks only.
    pub checks_only: bool,
}

/// What [`run`] found: every check, in the order run, and the bench unless skipped or failed
/// (a failed bench is a failed check).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub bench: Option<Bench>,
}

/// What [`run`] reports on the way, for the caller to show; none of it is in the [`Report`].
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// The GPU the checks run on, before any check.
    Device(&'a str),
    /// One kernel check's outcome; the kernel checks run first and are reported together.
    Kernel(&'a Check),
    /// What a check saw, one line: losses, timings, memory, a worker process that failed.
    Note(&'a str),
    /// A line of detail beside the notes: a worker process's own output, one kernel's share of
    /// a step.
    Detail(&'a str),
}

/// Runs every check and, unless `options.checks_only`, the bench, on GPU 0. `marathon` is the
/// binary whose `train` subcommand runs the parallel layouts as worker processes; `scratch` is
/// an empty directory for the corpus, configurations, metrics and checkpoints.
///
/// Each phase runs even when an earlier one failed, so one run shows everything: a phase that
/// fails becomes a failed [`Check`] named after it. Errors: GPU 0 cannot be opened, the corpus
/// cannot be prepared, or `options.config` cannot be read.
pub fn run(
    options: &Options,
    marathon: &Path,
    scratch: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Report> {
    let gpu = Gpu::new(0).map_err(|e| RuntimeError::Device(format!("opening GPU 0: {e}")))?;
    progress(Progress::Device(gpu.name()));
    let failed_phase = |phase: &str, e: RuntimeError| failed(format!("{phase}: {e}"));
    let mut checks =
        kernel_checks(gpu).unwrap_or_else(|e| vec![failed(format!("kernel checks: {e}"))]);
    for c in &checks {
        progress(Progress::Kernel(c));
    }
    let data = prepare_corpus(&options.corpus, scratch)?;
    checks.extend(
        training_check(&data, scratch, progress)
            .unwrap_or_else(|e| vec![failed_phase("training", e)]),
    );
    checks.extend(
        layout_checks(&data, scratch, marathon, progress)
            .unwrap_or_else(|e| vec![failed_phase("layouts", e)]),
    );
    checks.push(
        tp2_checkpoint_check(&data, scratch).unwrap_or_else(|e| failed_phase("tp2 checkpoint", e)),
    );
    let gpt2 = TrainConfig::load(&options.config)
        .map(|c| c.model)
        .map_err(|e| RuntimeError::Argument {
            name: "config",
            reason: format!("reading the bench's model: {e}"),
        })?;
    checks.extend(
        recompute_checks(&data, scratch, &gpt2, progress)
            .unwrap_or_else(|e| vec![failed_phase("recompute", e)]),
    );
    let bench = if options.checks_only {
        None
    } else {
        match bench(options, &data, progress) {
            Ok(b) => Some(b),
            Err(e) => {
                checks.push(failed_phase("bench", e));
                None
            }
        }
    };
    // Last: the abort checks leave an aborted communicator's work behind on the device.
    checks.extend(nccl_check(progress).unwrap_or_else(|e| vec![failed_phase("nccl", e)]));
    Ok(Report { checks, bench })
}

/// A check that could not compare: `name` says what failed.
fn failed(name: String) -> Check {
    Check {
        name,
        precision: "-",
        error: f64::NAN,
        tolerance: 0.0,
    }
}

fn device(e: CudaError) -> RuntimeError {
    RuntimeError::Device(e.to_string())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| RuntimeError::io("write", path, e))
}

// ------------------------------------------------------------------------------------------
// NCCL

/// A one-rank NCCL group: every collective round-trips the data; an operation held pending on
/// the GPU fails at once when another thread aborts the group, and at its deadline.
fn nccl_check(progress: &mut dyn FnMut(Progress<'_>)) -> Result<Vec<Check>> {
    use crate::nccl::NcclGroup;
    use marathon_elastic::InProcessCoordinator;
    let gpu = Gpu::new(0).map_err(device)?;
    let coord = InProcessCoordinator::new();
    let connect = |name: &str, op_timeout: Duration| {
        let deadline = Instant::now() + Duration::from_secs(30);
        NcclGroup::connect(
            &gpu,
            &coord,
            "/marathon/gpu-check/gen/1",
            name,
            0,
            1,
            deadline,
            op_timeout,
        )
    };
    let group = connect("dp", Duration::from_secs(30))?;
    let mut r = Rand::new(7);
    let x = r.f32s(1 << 20, 1.0);
    let a = up_f32(&gpu, &x).map_err(device)?;
    let bbuf = poisoned_f32(&gpu, x.len()).map_err(device)?;
    group.all_reduce(&gpu, a.all())?;
    group.all_gather(&gpu, a.all(), bbuf.all())?;
    let after_gather = back_f32(&gpu, &bbuf).map_err(device)?;
    let cbuf = poisoned_f32(&gpu, x.len()).map_err(device)?;
    group.reduce_scatter(&gpu, bbuf.all(), cbuf.all())?;
    group.broadcast(&gpu, cbuf.all(), 0)?;
    let dbuf = poisoned_f32(&gpu, x.len()).map_err(device)?;
    group.send_recv(&gpu, cbuf.all(), 0, dbuf.all(), 0)?;
    let got = back_f32(&gpu, &dbuf).map_err(device)?;
    let xb = r.bf16s(1 << 16, 1.0);
    let hb = up_bf(&gpu, &xb).map_err(device)?;
    group.all_reduce_bf16(&gpu, hb.all())?;
    let got_bf = back_bf(&gpu, &hb).map_err(device)?;
    let want = wide(&x);
    let error = rel(&got, &want)
        .max(rel(&after_gather, &want))
        .max(rel(&got_bf, &wide_bf(&xb)));
    drop(group);
    let mut out = vec![Check {
        name: "nccl one rank (non-blocking): all-reduce (fp32, bf16), all-gather, \
               reduce-scatter, broadcast, send/recv"
            .into(),
        precision: "fp32",
        error,
        tolerance: 0.0,
    }];
    // A pending operation: the stream is held on a device flag, so the all-reduce enqueued
    // behind it cannot run until the flag is written.
    let flag = DeviceBuffer::<u32>::zeros(&gpu, 1).map_err(device)?;
    let pending = |group: &NcclGroup| -> Result<(Result<()>, f64)> {
        gpu.hold(Stream::Training, &flag, 1).map_err(device)?;
        let t0 = Instant::now();
        let done = group.all_reduce(&gpu, a.all());
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        gpu.release(&flag, 1).map_err(device)?;
        gpu.sync().map_err(device)?;
        gpu.release(&flag, 0).map_err(device)?;
        Ok((done, ms))
    };
    // Aborted from another thread 300 ms into the wait: the operation fails at once.
    let group = connect("abort", Duration::from_secs(30))?;
    let handle = group.abort_handle();
    let aborter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        handle.abort();
        t0
    });
    let (done, ms) = pending(&group)?;
    let Ok(aborted_at) = aborter.join() else {
        out.push(failed("nccl: the aborting thread panicked".into()));
        return Ok(out);
    };
    let late_ms = aborted_at.elapsed().as_secs_f64() * 1e3;
    let aborted = matches!(done, Err(RuntimeError::Aborted { .. }));
    let later = matches!(
        group.all_reduce(&gpu, a.all()),
        Err(RuntimeError::Aborted { .. })
    );
    progress(Progress::Note(&format!(
        "nccl abort: the pending all-reduce returned after {ms:.0} ms ({}), the abort call \
         itself ended {late_ms:.0} ms ago; the next call {}",
        if aborted { "Aborted" } else { "NOT aborted" },
        if later { "fails too" } else { "DID NOT fail" }
    )));
    out.push(Check {
        name: "nccl: an abort from another thread fails the pending operation at once, and the \
               next (ms after the abort)"
            .into(),
        precision: "-",
        error: if aborted && later {
            (ms - 300.0).max(0.0)
        } else {
            f64::NAN
        },
        tolerance: 100.0,
    });
    // The operation's deadline: the pending operation fails once it passes, and aborts the group.
    let group = connect("deadline", Duration::from_millis(400))?;
    let (done, ms) = pending(&group)?;
    let timed_out = matches!(done, Err(RuntimeError::CommTimeout { .. }));
    progress(Progress::Note(&format!(
        "nccl deadline of 400 ms: the pending all-reduce returned after {ms:.0} ms ({})",
        if timed_out {
            "CommTimeout"
        } else {
            "NOT timed out"
        }
    )));
    out.push(Check {
        name: "nccl: a pending operation fails at its 400 ms deadline (ms past it)".into(),
        precision: "-",
        error: if timed_out {
            (ms - 400.0).abs()
        } else {
            f64::NAN
        },
        tolerance: 100.0,
    });
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Training: GPU against CPU, and a GPU checkpoint resumed on the CPU

/// Tokenizes the corpus into `dir`; returns the train.bin path.
fn prepare_corpus(inputs: &[PathBuf], dir: &Path) -> Result<PathBuf> {
    let report = crate::data::prepare(&crate::data::PrepareOptions {
        inputs: inputs.to_vec(),
        out_dir: dir.join("data"),
        val_fraction: 0.1,
    })?;
    Ok(report.train_path)
}

/// The small model's configuration ([`small_toml`], microbatches of 4), written beside `data`.
fn small_config(
    data: &Path,
    steps: u64,
    ckpt: Option<&Path>,
    device: Device,
) -> Result<TrainConfig> {
    let path = data.with_file_name(format!("check-{}.toml", std::process::id()));
    write(&path, &small_toml(data, steps, ckpt, device, 4, ""))?;
    TrainConfig::load(&path)
}

/// The small model's configuration as TOML: microbatches of `micro` sequences in a global
/// batch of 8, with `extra` appended (sections of its own).
fn small_toml(
    data: &Path,
    steps: u64,
    ckpt: Option<&Path>,
    device: Device,
    micro: usize,
    extra: &str,
) -> String {
    let ckpt = ckpt.map_or(String::new(), |p| {
        format!(
            "[checkpoint]\nroot = \"{}\"\nevery_steps = {steps}\nkeep_last = 2\n",
            p.display()
        )
    });
    let device = if device == Device::Cuda {
        "cuda"
    } else {
        "cpu"
    };
    SmallJob {
        context: 128,
        n_embd: 128,
        train: data.display().to_string(),
        data_seed: Some(7),
        micro_batch: micro,
        global_batch: 8,
        seq_len: 128,
        warmup_tokens: 2048,
        decay_tokens: 40960,
        min_lr_ratio: Some(0.1),
        steps,
        seed: Some(3),
        train_lines: format!("device = \"{device}\"\n"),
        sections: format!("{ckpt}{extra}"),
        ..SmallJob::default()
    }
    .toml()
}

/// The small model trained 20 steps on the CPU and on the GPU from the same weights and data,
/// losses compared at every step; and a checkpoint written from the GPU, resumed by a CPU run.
fn training_check(
    data: &Path,
    dir: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<Check>> {
    let steps = 20;
    let mut losses = Vec::new();
    for device in [Device::Cpu, Device::Cuda] {
        let mut t = Trainer::new(small_config(data, steps, None, device)?)?;
        let mut l = Vec::new();
        for _ in 0..steps {
            l.push(t.train_step()?.loss as f64);
        }
        losses.push(l);
    }
    let worst = losses[0]
        .iter()
        .zip(&losses[1])
        .map(|(c, g)| ((g - c) / c).abs())
        .fold(0.0, f64::max);
    progress(Progress::Note(&format!(
        "training, 20 steps: CPU losses {:.4} .. {:.4}, GPU {:.4} .. {:.4}",
        losses[0][0], losses[0][19], losses[1][0], losses[1][19]
    )));
    let mut out = vec![Check {
        name: "training: 20 steps, GPU losses vs CPU (worst step)".into(),
        precision: "bf16",
        error: if losses[1].iter().all(|l| l.is_finite()) {
            worst
        } else {
            f64::NAN
        },
        tolerance: BF16_TOL,
    }];
    // A checkpoint written from the GPU, resumed by a CPU run.
    let root = dir.join("ckpt");
    let mut gpu_run = Trainer::new(small_config(data, 3, Some(&root), Device::Cuda)?)?;
    gpu_run.run(&mut Quiet)?;
    let cpu_run = Trainer::new(small_config(data, 3, Some(&root), Device::Cpu)?)?;
    if cpu_run.resumed_from() != Some(3) {
        out.push(failed(
            "training: the CPU run did not resume from the GPU's checkpoint of step 3".into(),
        ));
        return Ok(out);
    }
    let same = gpu_run
        .state()
        .iter()
        .zip(cpu_run.state())
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    out.push(Check {
        name: "checkpoint from the GPU resumed on the CPU: master weights and moments bitwise"
            .into(),
        precision: "fp32",
        error: if same { 0.0 } else { f64::NAN },
        tolerance: 0.0,
    });
    Ok(out)
}

/// The losses of the `step` records in a metrics file, in order.
fn metric_losses(path: &Path) -> Result<Vec<f64>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| RuntimeError::io("read the metrics", path, e))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| RuntimeError::data(path, e.to_string()))?;
        if v["kind"] == "step" {
            out.push(
                v["data"]["loss"]
                    .as_f64()
                    .ok_or_else(|| RuntimeError::data(path, "a step record without a loss"))?,
            );
        }
    }
    Ok(out)
}

/// The worst relative difference of `got` from `want` over their steps; NaN when a step is
/// missing or not finite.
fn worst_rel(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || !got.iter().all(|l| l.is_finite()) {
        return f64::NAN;
    }
    got.iter()
        .zip(want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0.0, f64::max)
}

/// Every parallel layout on this one GPU against the one-GPU run: `marathon train` starts one
/// worker process per rank, all on GPU 0, whose groups therefore run host-staged. 20 steps of
/// microbatches of 2 in a global batch of 8 (4 microbatches), losses compared at every step.
/// `marathon` is the binary that runs `train`.
fn layout_checks(
    data: &Path,
    dir: &Path,
    marathon: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<Check>> {
    let steps = 20;
    let reference = {
        let path = dir.join("layout-1.toml");
        write(&path, &small_toml(data, steps, None, Device::Cuda, 2, ""))?;
        let mut t = Trainer::new(TrainConfig::load(&path)?)?;
        (0..steps)
            .map(|_| Ok(t.train_step()?.loss as f64))
            .collect::<Result<Vec<_>>>()?
    };
    let layouts = [
        ("tp2", 2, 1, 1, false, "none"),
        ("pp2, 4 microbatches", 1, 2, 1, false, "none"),
        ("dp2 with the distributed optimizer", 1, 1, 2, true, "none"),
        ("tp2 x pp2 x dp2", 2, 2, 2, false, "none"),
        ("tp2 x pp2, full recomputation", 2, 2, 1, false, "full"),
    ];
    let mut out = Vec::new();
    for (i, (name, tp, pp, dp, zero, recompute)) in layouts.into_iter().enumerate() {
        let metrics = dir.join(format!("layout-{i}.jsonl"));
        let extra = format!(
            "metrics = \"{}\"\nrecompute = \"{recompute}\"\n[parallel]\ntp = {tp}\npp = {pp}\n\
             dp = {dp}\ndistributed_optimizer = {zero}\n",
            metrics.display()
        );
        let path = dir.join(format!("layout-{i}.toml"));
        write(
            &path,
            &small_toml(data, steps, None, Device::Cuda, 2, &extra),
        )?;
        let t0 = Instant::now();
        let run = std::process::Command::new(marathon)
            .args(["train", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .output()
            .map_err(|e| RuntimeError::io("start marathon train from", marathon, e))?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        for line in stderr.lines().filter(|l| l.starts_with("group ")) {
            progress(Progress::Detail(line));
        }
        let error = if run.status.success() {
            let got = metric_losses(&metrics)?;
            progress(Progress::Note(&format!(
                "{name}: {} processes, {:.1} s, losses {:.4} .. {:.4} (one GPU: {:.4} .. {:.4})",
                tp * pp * dp,
                t0.elapsed().as_secs_f64(),
                got.first().copied().unwrap_or(f64::NAN),
                got.last().copied().unwrap_or(f64::NAN),
                reference[0],
                reference[steps as usize - 1],
            )));
            worst_rel(&got, &reference)
        } else {
            let tail: Vec<_> = stderr.lines().rev().take(12).collect();
            progress(Progress::Note(&format!(
                "{name}: marathon train failed ({}):",
                run.status
            )));
            for l in tail.iter().rev() {
                progress(Progress::Detail(l));
            }
            f64::NAN
        };
        out.push(Check {
            name: format!(
                "{name}: {} worker processes sharing GPU 0 (host-staged), 20 steps' losses vs \
                 one GPU (worst step)",
                tp * pp * dp
            ),
            precision: "bf16",
            error,
            tolerance: BF16_TOL,
        });
    }
    Ok(out)
}

/// Recomputation on the GPU: 20 steps with selective and with full recomputation against
/// keeping everything, from the same weights on the same data; and the device memory each
/// needs for GPT-2 124M at 16 x 1024, as the model allocates it.
fn recompute_checks(
    data: &Path,
    dir: &Path,
    gpt2: &GptConfig,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<Check>> {
    use marathon_model::cuda::CudaGpt;
    use marathon_model::{Recompute, Shard};
    let steps = 20;
    let run = |mode: &str| -> Result<Vec<f64>> {
        let path = dir.join(format!("recompute-{mode}.toml"));
        let extra = format!("recompute = \"{mode}\"\n");
        write(
            &path,
            &small_toml(data, steps, None, Device::Cuda, 4, &extra),
        )?;
        let mut t = Trainer::new(TrainConfig::load(&path)?)?;
        (0..steps)
            .map(|_| Ok(t.train_step()?.loss as f64))
            .collect()
    };
    let none = run("none")?;
    let gib = |r| CudaGpt::shard_memory_bytes(gpt2, Shard::WHOLE, 16, 1024, 1, 1, r) / 1e9;
    progress(Progress::Note(&format!(
        "recomputation, GPT-2 124M at 16 x 1024 on the device: none {:.1} GB, selective {:.1} \
         GB, full {:.1} GB",
        gib(Recompute::None),
        gib(Recompute::Selective),
        gib(Recompute::Full)
    )));
    let mut out = Vec::new();
    for mode in ["selective", "full"] {
        let got = run(mode)?;
        out.push(Check {
            name: format!("{mode} recomputation on the GPU: 20 steps' losses vs none (worst step)"),
            precision: "bf16",
            error: worst_rel(&got, &none),
            tolerance: BF16_TOL,
        });
    }
    Ok(out)
}

/// A tp2 checkpoint written from the GPU, resumed on the CPU in one process: each tensor-
/// parallel rank's fp32 master weights and moments are the CPU's, box for box, bitwise. The two
/// ranks run as threads of this process sharing GPU 0.
fn tp2_checkpoint_check(data: &Path, dir: &Path) -> Result<Check> {
    use crate::comm::GroupSpec;
    use crate::Groups;
    use marathon_elastic::InProcessCoordinator;
    use marathon_model::ParallelLayout;
    let root = dir.join("ckpt-tp2");
    let steps = 3;
    let extra = "[parallel]\ntp = 2\n";
    let gpu_path = dir.join("tp2-gpu.toml");
    write(
        &gpu_path,
        &small_toml(data, steps, Some(&root), Device::Cuda, 4, extra),
    )?;
    let coord = std::sync::Arc::new(InProcessCoordinator::new());
    let layout = ParallelLayout::new(2, 1, 1);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, path) = (coord.clone(), gpu_path.clone());
            std::thread::spawn(move || -> Result<(ParamLayout, [Vec<f32>; 3])> {
                let template = GroupSpec::loopback("gpu-check", "", 0, 1, Duration::from_secs(120));
                let groups = Groups::connect(&*coord, layout.place(rank), &template)?;
                let mut t = Trainer::with_groups(TrainConfig::load(&path)?, groups)?;
                t.run(&mut Quiet)?;
                let [p, m, v] = t.state();
                Ok((t.model.layout.clone(), [p.to_vec(), m.to_vec(), v.to_vec()]))
            })
        })
        .collect();
    let mut shards = Vec::new();
    for r in ranks {
        let Ok(shard) = r.join() else {
            return Ok(failed("tp2 checkpoint: a tp2 rank panicked".into()));
        };
        shards.push(shard?);
    }
    let cpu_path = dir.join("tp2-cpu.toml");
    write(
        &cpu_path,
        &small_toml(data, steps, Some(&root), Device::Cpu, 4, ""),
    )?;
    let cpu = Trainer::new(TrainConfig::load(&cpu_path)?)?;
    if cpu.resumed_from() != Some(steps) {
        return Ok(failed(format!(
            "tp2 checkpoint: the CPU run did not resume from the tp2 GPU checkpoint of step \
             {steps}"
        )));
    }
    let whole = &cpu.model.layout;
    let cpu_state = cpu.state();
    let mut same = true;
    for (layout, state) in &shards {
        for spec in layout.tensors() {
            let Some(g) = whole.get(&spec.name) else {
                return Ok(failed(
                    "tp2 checkpoint: a shard's tensor the model lacks".into(),
                ));
            };
            for (host, dev) in cpu_state.iter().zip(state) {
                let mut want = vec![0f32; spec.numel()];
                marathon_model::layout::copy_box(
                    &host[g.range()],
                    &spec.global_shape,
                    &spec.box_offset,
                    &mut want,
                    &spec.shape,
                );
                same &= dev[spec.range()]
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            }
        }
    }
    Ok(Check {
        name: "tp2 checkpoint from the GPU resumed on the CPU in one process: master weights and \
               moments bitwise"
            .into(),
        precision: "fp32",
        error: if same { 0.0 } else { f64::NAN },
        tolerance: 0.0,
    })
}

/// An observer that shows nothing: the checks' trainers run silently.
#[derive(Debug)]
struct Quiet;

impl crate::Observer for Quiet {}

/// The host-staged transport's all-reduce beside the bus it crosses.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Staged {
    pub bytes: usize,
    pub ranks: usize,
    /// Seconds per all-reduce (device to host, the TCP ring, host to device), median of five.
    pub seconds: f64,
    /// Bus bandwidth, 2 (p - 1) / p x bytes / time, as NCCL's tests report it.
    pub bus_gbs: f64,
    /// A pinned device-to-host copy of the same bytes, best of five.
    pub d2h_gbs: f64,
}

/// Times the host-staged all-reduce of `bytes` across `ranks` threads that share GPU 0, each
/// with its own context's buffers and page-locked staging, over loopback TCP; and a pinned
/// device-to-host copy of the same bytes, in the same run. Errors: GPU 0 cannot be used, or the
/// group cannot form or fails.
pub fn staged_allreduce(ranks: usize, bytes: usize) -> Result<Staged> {
    use crate::comm::{GroupSpec, ProcessGroup};
    let n = bytes / 4;
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let members: Vec<_> = (0..ranks)
        .map(|rank| {
            let coord = coord.clone();
            std::thread::spawn(move || -> Result<f64> {
                let gpu = Gpu::new(0).map_err(device)?;
                let spec =
                    GroupSpec::loopback("bench", "staged", rank, ranks, Duration::from_secs(600));
                let mut g = ProcessGroup::connect(&*coord, spec)?;
                let dev = DeviceBuffer::<f32>::zeros(&gpu, n).map_err(device)?;
                let mut host = PinnedBuffer::<f32>::new(&gpu, n).map_err(device)?;
                let mut times = Vec::new();
                for i in 0..6 {
                    let t0 = Instant::now();
                    gpu.download_slice(dev.all(), host.as_mut_slice())
                        .map_err(device)?;
                    g.all_reduce(host.as_mut_slice())?;
                    gpu.upload_slice(dev.all(), host.as_slice())
                        .map_err(device)?;
                    if i > 0 {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                Ok(times[times.len() / 2])
            })
        })
        .collect();
    let mut seconds = 0f64;
    for m in members {
        let s = m
            .join()
            .map_err(|_| RuntimeError::Device("a staged all-reduce rank panicked".into()))??;
        seconds = seconds.max(s);
    }
    let gpu = Gpu::new(0).map_err(device)?;
    let dev = DeviceBuffer::<f32>::zeros(&gpu, n).map_err(device)?;
    let mut host = PinnedBuffer::<f32>::new(&gpu, n).map_err(device)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        gpu.download_slice(dev.all(), host.as_mut_slice())
            .map_err(device)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let p = ranks as f64;
    Ok(Staged {
        bytes,
        ranks,
        seconds,
        bus_gbs: 2.0 * (p - 1.0) / p * bytes as f64 / seconds / 1e9,
        d2h_gbs: bytes as f64 / best / 1e9,
    })
}

// ------------------------------------------------------------------------------------------
// Bench

/// GPT-2 124M's step on this GPU, and a checkpoint snapshot's cost beside the copy it makes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bench {
    /// The GPU's name.
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    /// The median of the timed steps.
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    /// Model FLOP/s (6 N + attention per token), in TFLOP/s.
    pub tflops: f64,
    /// Model FLOP utilisation, of 989 TFLOP/s dense bf16.
    pub mfu: f64,
    /// The bytes a snapshot copies off the device.
    pub snapshot_bytes: u64,
    /// How long the snapshot call held training.
    pub snapshot_stall_ms: f64,
    /// The step that ran beside the snapshot's copy.
    pub step_after_snapshot_ms: f64,
    /// A pinned device-to-host copy of the snapshot's bytes, best of three.
    pub pinned_d2h_ms: f64,
    pub pinned_d2h_gbs: f64,
    /// Milliseconds and launches per operation over two steps, largest first.
    pub profile: Vec<(String, f64, usize)>,
}

/// GPT-2 124M (`options.config`) at `options.batch` x `options.seq` on random tokens: the
/// median of `options.steps` steps, where a step's time goes, and a checkpoint snapshot's stall.
fn bench(options: &Options, data: &Path, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Bench> {
    let mut cfg = TrainConfig::load(&options.config)?;
    // Timing needs no meaningful text: enough random tokens for a few hundred steps.
    let tokens = Rand::new(5).tokens(64 * options.batch * options.seq + 1, cfg.model.vocab_size);
    let random = data.with_file_name("random.bin");
    crate::data::tokens::write_token_file(&random, &tokens, cfg.model.vocab_size as u32, 1)?;
    cfg.data.train = random;
    cfg.data.val = None;
    cfg.batch.micro_batch = options.batch;
    cfg.batch.global_batch = options.batch;
    cfg.batch.seq_len = options.seq;
    cfg.batch.rampup = None;
    cfg.train.steps = 1000;
    cfg.train.eval_every_steps = 0;
    cfg.train.metrics = None;
    cfg.train.device = Device::Cuda;
    let root = data.with_file_name("bench-ckpt");
    cfg.checkpoint = Some(
        toml::from_str(&format!(
            "root = \"{}\"\nevery_steps = 1000\ncompression = \"none\"",
            root.display()
        ))
        .map_err(|e| RuntimeError::ConfigSyntax {
            path: options.config.clone(),
            message: format!("the bench's [checkpoint] under {}: {e}", root.display()),
        })?,
    );
    cfg.validate().map_err(|e| cfg.error(e))?;
    let mut t = Trainer::new(cfg.clone())?;
    let device_name = t.device_name().unwrap_or("?").to_string();
    for _ in 0..3 {
        t.train_step()?;
    }
    let mut ms: Vec<f64> = (0..options.steps)
        .map(|_| t.train_step().map(|r| r.step_ms))
        .collect::<std::result::Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    // Where a step's time goes: every launch and product timed with events over two steps.
    let gpu = t.gpu().expect("the bench trains on the GPU");
    gpu.set_profiling(true);
    t.train_step()?;
    t.train_step()?;
    let gpu = t.gpu().expect("the bench trains on the GPU");
    let profile = gpu.profile_report()?;
    gpu.set_profiling(false);
    let total: f64 = profile.iter().map(|p| p.1).sum();
    progress(Progress::Note(
        "where a step's time goes (two steps, timed per launch):",
    ));
    for (name, ms, n) in profile.iter().take(24) {
        progress(Progress::Detail(&format!(
            "{:>7.2} ms/step {:>5.1}%  {:>4} launches  {name}",
            ms / 2.0,
            100.0 * ms / total,
            n / 2
        )));
    }
    let tokens = (options.batch * options.seq) as f64;
    let flops = marathon_model::cost::flops_per_token(&cfg.model, options.seq) * tokens;
    // A first snapshot page-locks the writer's staging buffer; the second is the one timed.
    t.checkpoint()?;
    t.train_step()?;
    t.finish_checkpoints()?;
    // The snapshot: the stall is the call itself; the next step runs beside the copy.
    let t0 = Instant::now();
    let rec = t.checkpoint()?.expect("the bench configures checkpoints");
    let stall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after = t.train_step()?.step_ms;
    t.finish_checkpoints()?;
    // A pinned device-to-host copy of the same bytes, timed with events.
    let gpu = Gpu::new(0).map_err(device)?;
    let n = (rec.staged_bytes / 4) as usize;
    let src = DeviceBuffer::<f32>::zeros(&gpu, n).map_err(device)?;
    let mut host = PinnedBuffer::<f32>::new(&gpu, n).map_err(device)?;
    let (e0, e1) = (
        gpu.event(true).map_err(device)?,
        gpu.event(true).map_err(device)?,
    );
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        gpu.record(&e0, Stream::Training).map_err(device)?;
        // SAFETY: `host` outlives the copy, which `elapsed_ms` waits for.
        unsafe { src.download_async(&gpu, host.as_mut_slice()) }.map_err(device)?;
        gpu.record(&e1, Stream::Training).map_err(device)?;
        best = best.min(e1.elapsed_ms(&e0).map_err(device)? as f64);
    }
    let tflops = flops / (median / 1e3) / 1e12;
    Ok(Bench {
        device: device_name,
        batch: options.batch,
        seq: options.seq,
        ms_per_step: median,
        tokens_per_s: tokens / (median / 1e3),
        tflops,
        mfu: tflops / 989.0,
        snapshot_bytes: rec.staged_bytes,
        snapshot_stall_ms: stall_ms,
        step_after_snapshot_ms: after,
        pinned_d2h_ms: best,
        pinned_d2h_gbs: rec.staged_bytes as f64 / (best / 1e3) / 1e9,
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks' small model as it was written out before it became a [`SmallJob`]: the
    /// configuration must stay the same, field for field.
    #[test]
    fn the_checks_small_job_is_the_one_they_always_trained() {
        let (data, ckpt) = (Path::new("/d/train.bin"), Path::new("/c"));
        let extra = "metrics = \"m.jsonl\"\n";
        let want = format!(
            r#"
[model]
vocab_size = 50257
seq_len = 128
n_layer = 2
n_head = 2
n_embd = 128
[data]
train = "/d/train.bin"
seed = 7
[batch]
micro_batch = 2
global_batch = 8
seq_len = 128
[optim]
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
grad_clip = 1.0
init_std = 0.02
[optim.lr]
peak_lr = 1e-3
warmup_tokens = 2048
decay_tokens = 40960
min_lr_ratio = 0.1
[train]
steps = 20
seed = 3
device = "cuda"
[checkpoint]
root = "/c"
every_steps = 20
keep_last = 2
{extra}"#
        );
        let got = small_toml(data, 20, Some(ckpt), Device::Cuda, 2, extra);
        let parse = |t: &str| t.parse::<toml::Table>().expect("TOML");
        assert_eq!(parse(&got), parse(&want), "{got}");
        let bare = small_toml(data, 3, None, Device::Cpu, 4, "");
        let bare = parse(&bare);
        assert_eq!(bare["train"]["device"].as_str(), Some("cpu"));
        assert!(!bare.contains_key("checkpoint"));
    }
}
