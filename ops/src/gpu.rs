//! `marathon bench gpu`: every GPU check and the GPU bench in one run, ending with a short
//! table (`scripts/gpu-check.sh` builds marathon and runs it).
//!
//! Checks, each failing the run when it misses:
//! - every kernel against the CPU kernel it mirrors, on random inputs (never zeros), its
//!   outputs poisoned with NaN first so an unwritten element fails: bf16 results within 1e-2
//!   relative (‖gpu − cpu‖ / ‖cpu‖), fp32 results within 1e-5;
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
//! Bench: GPT-2 124M at the given batch and sequence: ms/step, tokens/s, model FLOP utilisation,
//! and a checkpoint snapshot's stall beside a pinned device-to-host copy of the same bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use half::bf16 as Bf16;
use marathon_model::cuda::{self, DeviceBuffer, Gpu, PinnedBuffer, Stream};
use marathon_model::rng::Rng;
use marathon_model::{kernels as k, AdamW, AdamWConfig, GptConfig, ParamLayout};
use marathon_runtime::device::Device;
use marathon_runtime::{TrainConfig, Trainer};

#[derive(Debug, Args)]
pub struct GpuArgs {
    /// The model to time.
    #[arg(long, default_value = "configs/gpt2-124m.toml")]
    config: PathBuf,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Timed steps (after three untimed ones).
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Text to train the equivalence check on (files or folders of .md/.txt).
    #[arg(long = "corpus", default_values = ["README.md", "ARCHITECTURE.md", "docs"])]
    corpus: Vec<PathBuf>,
    /// Skip the bench, run the checks only.
    #[arg(long)]
    checks_only: bool,
    /// Write every figure here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
struct Check {
    name: String,
    precision: &'static str,
    error: f64,
    tolerance: f64,
}

impl Check {
    fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

const BF16_TOL: f64 = 1e-2;
const F32_TOL: f64 = 1e-5;

pub fn run(args: GpuArgs) -> Result<()> {
    let gpu = Gpu::new(0).context("opening GPU 0")?;
    eprintln!("device: {}", gpu.name());
    // Each phase runs even when an earlier one failed, so one run shows everything.
    let failed = |phase: &str, e: anyhow::Error| Check {
        name: format!("{phase}: {e:#}"),
        precision: "-",
        error: f64::NAN,
        tolerance: 0.0,
    };
    let mut checks = kernel_checks(gpu).unwrap_or_else(|e| vec![failed("kernel checks", e)]);
    for c in &checks {
        eprintln!(
            "  {:<34} {:<5} error {:.2e} (tolerance {:.0e}) {}",
            c.name,
            c.precision,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "FAILED" }
        );
    }
    let dir = tempfile::tempdir()?;
    let data = prepare_corpus(&args.corpus, dir.path())?;
    checks
        .extend(training_check(&data, dir.path()).unwrap_or_else(|e| vec![failed("training", e)]));
    checks.extend(layout_checks(&data, dir.path()).unwrap_or_else(|e| vec![failed("layouts", e)]));
    checks.push(
        tp2_checkpoint_check(&data, dir.path()).unwrap_or_else(|e| failed("tp2 checkpoint", e)),
    );
    let gpt2 = TrainConfig::load(&args.config)
        .map(|c| c.model)
        .context("reading the bench's model")?;
    checks.extend(
        recompute_checks(&data, dir.path(), &gpt2).unwrap_or_else(|e| vec![failed("recompute", e)]),
    );
    let bench = if args.checks_only {
        None
    } else {
        match bench(&args, &data) {
            Ok(b) => Some(b),
            Err(e) => {
                checks.push(failed("bench", e));
                None
            }
        }
    };
    // Last: the abort checks leave an aborted communicator's work behind on the device.
    checks.extend(nccl_check().unwrap_or_else(|e| vec![failed("nccl", e)]));
    if let Some(path) = &args.json {
        let v = serde_json::json!({ "checks": &checks, "bench": &bench });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    println!();
    println!("| check | precision | error | tolerance | result |");
    println!("|---|---|---|---|---|");
    for c in &checks {
        println!(
            "| {} | {} | {:.2e} | {:.0e} | {} |",
            c.name,
            c.precision,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "FAILED" }
        );
    }
    if let Some(b) = &bench {
        println!();
        b.print();
    }
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| &c.name)
        .collect();
    if !failed.is_empty() {
        bail!("{} GPU checks failed: {failed:?}", failed.len());
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Kernel checks

struct Rand(Rng);

impl Rand {
    fn f32s(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.0.normal() * scale) as f32).collect()
    }
    fn bf16s(&mut self, n: usize, scale: f64) -> Vec<Bf16> {
        (0..n)
            .map(|_| Bf16::from_f64(self.0.normal() * scale))
            .collect()
    }
    fn tokens(&mut self, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| self.0.below(v as u64) as u32).collect()
    }
}

fn wide_bf(x: &[Bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives NaN.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        d += (x - y) * (x - y);
        n += y * y;
    }
    if a.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    (d / n.max(1e-300)).sqrt()
}

fn check(name: &str, bf16: bool, gpu: &[f64], cpu: &[f64]) -> Check {
    Check {
        name: name.into(),
        precision: if bf16 { "bf16" } else { "fp32" },
        error: rel(gpu, cpu),
        tolerance: if bf16 { BF16_TOL } else { F32_TOL },
    }
}

/// A device buffer filled with NaN, so an element the kernel leaves unwritten fails the check.
fn poisoned_bf(gpu: &Gpu, n: usize) -> Result<DeviceBuffer<Bf16>> {
    Ok(DeviceBuffer::from_host(gpu, &vec![Bf16::NAN; n])?)
}

fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<DeviceBuffer<f32>> {
    Ok(DeviceBuffer::from_host(gpu, &vec![f32::NAN; n])?)
}

fn back_bf(gpu: &Gpu, b: &DeviceBuffer<Bf16>) -> Result<Vec<f64>> {
    Ok(wide_bf(&b.to_vec(gpu)?))
}

fn back_f32(gpu: &Gpu, b: &DeviceBuffer<f32>) -> Result<Vec<f64>> {
    Ok(wide(&b.to_vec(gpu)?))
}

fn up_bf(gpu: &Gpu, x: &[Bf16]) -> Result<DeviceBuffer<Bf16>> {
    Ok(DeviceBuffer::from_host(gpu, x)?)
}

fn up_f32(gpu: &Gpu, x: &[f32]) -> Result<DeviceBuffer<f32>> {
    Ok(DeviceBuffer::from_host(gpu, x)?)
}

fn kernel_checks(mut g: Gpu) -> Result<Vec<Check>> {
    let mut r = Rand(Rng::new(20261126));
    let mut out = Vec::new();
    let (b, t, c, nh) = (2usize, 64usize, 128usize, 4usize);
    let rows = b * t;

    // LayerNorm forward and backward.
    let inp = r.f32s(rows * c, 1.0);
    let (w, bb) = (r.bf16s(c, 1.0), r.bf16s(c, 0.5));
    let (d_out, d_mean, d_rstd) = (
        poisoned_bf(&g, rows * c)?,
        poisoned_f32(&g, rows)?,
        poisoned_f32(&g, rows)?,
    );
    let (d_inp, d_w, d_b) = (up_f32(&g, &inp)?, up_bf(&g, &w)?, up_bf(&g, &bb)?);
    g.layernorm_forward(
        d_out.all(),
        d_mean.all(),
        d_rstd.all(),
        d_inp.all(),
        d_w.all(),
        d_b.all(),
    )?;
    let (mut o, mut m, mut s) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
    k::layernorm_forward(
        &mut o,
        &mut m,
        &mut s,
        &wide(&inp),
        &wide_bf(&w),
        &wide_bf(&bb),
        c,
    );
    out.push(check("layernorm forward", true, &back_bf(&g, &d_out)?, &o));
    out.push(check(
        "layernorm forward: mean, rstd",
        false,
        &[back_f32(&g, &d_mean)?, back_f32(&g, &d_rstd)?].concat(),
        &[m.clone(), s.clone()].concat(),
    ));
    let dout = r.bf16s(rows * c, 1.0);
    let dinp0 = r.f32s(rows * c, 1.0);
    let (dw0, db0) = (r.f32s(c, 1.0), r.f32s(c, 1.0));
    let (g_dinp, g_dw, g_db, g_dout) = (
        up_f32(&g, &dinp0)?,
        up_f32(&g, &dw0)?,
        up_f32(&g, &db0)?,
        up_bf(&g, &dout)?,
    );
    let mean32: Vec<f32> = m.iter().map(|&x| x as f32).collect();
    let rstd32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
    let (g_mean, g_rstd) = (up_f32(&g, &mean32)?, up_f32(&g, &rstd32)?);
    g.layernorm_backward(
        g_dinp.all(),
        g_dw.all(),
        g_db.all(),
        g_dout.all(),
        d_inp.all(),
        g_mean.all(),
        g_rstd.all(),
        d_w.all(),
    )?;
    let (mut di, mut dw, mut db) = (wide(&dinp0), wide(&dw0), wide(&db0));
    k::layernorm_backward(
        &mut di,
        &mut dw,
        &mut db,
        &wide_bf(&dout),
        &wide(&inp),
        &wide(&mean32),
        &wide(&rstd32),
        &wide_bf(&w),
        c,
    );
    out.push(check(
        "layernorm backward: dinp",
        false,
        &back_f32(&g, &g_dinp)?,
        &di,
    ));
    out.push(check(
        "layernorm backward: dw, db",
        false,
        &[back_f32(&g, &g_dw)?, back_f32(&g, &g_db)?].concat(),
        &[dw, db].concat(),
    ));

    // Linear layers.
    let (ic, oc) = (c, 3 * c);
    let x = r.bf16s(rows * ic, 1.0);
    let wt = r.bf16s(oc * ic, 0.05);
    let bias = r.bf16s(oc, 0.5);
    let (g_x, g_wt, g_bias) = (up_bf(&g, &x)?, up_bf(&g, &wt)?, up_bf(&g, &bias)?);
    let g_y = poisoned_bf(&g, rows * oc)?;
    g.matmul_forward(
        bytes_bf(&g_y),
        cuda::Out::Bf16,
        g_x.all(),
        g_wt.all(),
        Some(g_bias.all()),
        ic,
        oc,
    )?;
    let mut y = vec![0.0; rows * oc];
    k::matmul_forward(
        &mut y,
        &wide_bf(&x),
        &wide_bf(&wt),
        Some(&wide_bf(&bias)),
        ic,
        oc,
        false,
    );
    out.push(check(
        "matmul forward + bias (cuBLASLt)",
        true,
        &back_bf(&g, &g_y)?,
        &y,
    ));
    let g_y32 = poisoned_f32(&g, rows * oc)?;
    g.matmul_forward(
        bytes_f32(&g_y32),
        cuda::Out::F32,
        g_x.all(),
        g_wt.all(),
        None,
        ic,
        oc,
    )?;
    let mut y32 = vec![0.0; rows * oc];
    k::matmul_forward(&mut y32, &wide_bf(&x), &wide_bf(&wt), None, ic, oc, false);
    out.push(check(
        "matmul forward, fp32 out (cuBLASLt)",
        false,
        &back_f32(&g, &g_y32)?,
        &y32,
    ));
    let dy = r.bf16s(rows * oc, 1.0);
    let dw0 = r.f32s(oc * ic, 1.0);
    let (g_dy, g_dwt, g_dx) = (
        up_bf(&g, &dy)?,
        up_f32(&g, &dw0)?,
        poisoned_bf(&g, rows * ic)?,
    );
    g.matmul_backward(
        g_dx.all(),
        g_dwt.all(),
        g_dy.all(),
        g_x.all(),
        g_wt.all(),
        ic,
        oc,
    )?;
    let g_dbias = up_f32(&g, &vec![0.25; oc])?;
    g.bias_backward(g_dbias.all(), g_dy.all())?;
    let (mut dx, mut dwt, mut dbias) = (vec![0.0; rows * ic], wide(&dw0), vec![0.25; oc]);
    k::matmul_backward(
        &mut dx,
        &mut dwt,
        Some(&mut dbias),
        &wide_bf(&dy),
        &wide_bf(&x),
        &wide_bf(&wt),
        ic,
        oc,
        false,
    );
    out.push(check(
        "matmul backward: dinp",
        true,
        &back_bf(&g, &g_dx)?,
        &dx,
    ));
    out.push(check(
        "matmul backward: dw",
        false,
        &back_f32(&g, &g_dwt)?,
        &dwt,
    ));
    out.push(check(
        "bias backward",
        false,
        &back_f32(&g, &g_dbias)?,
        &dbias,
    ));

    // GELU.
    let h = r.bf16s(rows * 4 * c, 1.5);
    let (g_h, g_gh) = (up_bf(&g, &h)?, poisoned_bf(&g, rows * 4 * c)?);
    g.gelu_forward(g_gh.all(), g_h.all())?;
    let mut gh = vec![0.0; h.len()];
    k::gelu_forward(&mut gh, &wide_bf(&h));
    out.push(check("gelu forward", true, &back_bf(&g, &g_gh)?, &gh));
    let dh = r.bf16s(h.len(), 1.0);
    let g_dh = up_bf(&g, &dh)?;
    g.gelu_backward(g_dh.all(), g_h.all())?;
    let mut dhc = wide_bf(&dh);
    k::gelu_backward_inplace(&mut dhc, &wide_bf(&h));
    out.push(check("gelu backward", true, &back_bf(&g, &g_dh)?, &dhc));

    // A linear layer with GELU (cuBLASLt's epilogue where offered) and its backward.
    let (gi, go) = (c, 4 * c);
    let gx = r.bf16s(rows * gi, 1.0);
    let (gw, gb) = (r.bf16s(go * gi, 0.1), r.bf16s(go, 0.5));
    let (g_gx, g_gw, g_gb) = (up_bf(&g, &gx)?, up_bf(&g, &gw)?, up_bf(&g, &gb)?);
    let (g_pre, g_act) = (poisoned_bf(&g, rows * go)?, poisoned_bf(&g, rows * go)?);
    g.matmul_forward_gelu(
        g_act.all(),
        g_pre.all(),
        g_gx.all(),
        g_gw.all(),
        g_gb.all(),
        gi,
        go,
    )?;
    let how = if g.gelu_fused() == Some(true) {
        "epilogue"
    } else {
        "two passes"
    };
    let mut pre = vec![0.0; rows * go];
    k::matmul_forward(
        &mut pre,
        &wide_bf(&gx),
        &wide_bf(&gw),
        Some(&wide_bf(&gb)),
        gi,
        go,
        false,
    );
    // The CPU's GELU takes the bf16 pre-activation the GPU keeps.
    let pre_bf: Vec<f64> = pre.iter().map(|&x| Bf16::from_f64(x).to_f64()).collect();
    let mut act = vec![0.0; pre.len()];
    k::gelu_forward(&mut act, &pre_bf);
    out.push(check(
        &format!("matmul + bias + gelu ({how})"),
        true,
        &[back_bf(&g, &g_pre)?, back_bf(&g, &g_act)?].concat(),
        &[pre, act].concat(),
    ));
    // Backward through the next layer into the GELU: (dout @ w2) * gelu'(pre).
    let w2 = r.bf16s(gi * go, 0.1);
    let dy2 = r.bf16s(rows * gi, 1.0);
    let dw2_0 = r.f32s(gi * go, 1.0);
    let (g_w2, g_dy2, g_dw2, g_dact) = (
        up_bf(&g, &w2)?,
        up_bf(&g, &dy2)?,
        up_f32(&g, &dw2_0)?,
        poisoned_bf(&g, rows * go)?,
    );
    g.matmul_backward_gelu(
        g_dact.all(),
        g_dw2.all(),
        g_dy2.all(),
        g_act.all(),
        g_w2.all(),
        g_pre.all(),
        go,
        gi,
    )?;
    let act_gpu = back_bf(&g, &g_act)?;
    let pre_gpu = back_bf(&g, &g_pre)?;
    let (mut dact, mut dw2) = (vec![0.0; rows * go], wide(&dw2_0));
    k::matmul_backward(
        &mut dact,
        &mut dw2,
        None,
        &wide_bf(&dy2),
        &act_gpu,
        &wide_bf(&w2),
        go,
        gi,
        false,
    );
    k::gelu_backward_inplace(&mut dact, &pre_gpu);
    out.push(check(
        &format!("matmul backward * gelu' ({how})"),
        true,
        &back_bf(&g, &g_dact)?,
        &dact,
    ));
    out.push(check(
        "matmul backward * gelu': dw",
        false,
        &back_f32(&g, &g_dw2)?,
        &dw2,
    ));

    // Attention.
    let qkv = r.bf16s(rows * 3 * c, 1.0);
    let g_qkv = up_bf(&g, &qkv)?;
    let (g_att, g_atty) = (poisoned_bf(&g, b * nh * t * t)?, poisoned_bf(&g, rows * c)?);
    let heads: Vec<DeviceBuffer<Bf16>> = (0..8)
        .map(|_| poisoned_bf(&g, rows * c))
        .collect::<Result<_>>()?;
    let hv: Vec<_> = heads.iter().map(|h| h.all()).collect();
    g.attention_forward(
        g_atty.all(),
        g_att.all(),
        g_qkv.all(),
        [hv[0], hv[1], hv[2], hv[3]],
        b,
        t,
        nh,
    )?;
    let (mut atty, mut att) = (vec![0.0; rows * c], vec![0.0; b * nh * t * t]);
    k::attention_forward(&mut atty, &mut att, &wide_bf(&qkv), b, t, c, nh);
    out.push(check(
        "attention forward",
        true,
        &back_bf(&g, &g_atty)?,
        &atty,
    ));
    out.push(check(
        "attention forward: probabilities",
        true,
        &back_bf(&g, &g_att)?,
        &att,
    ));
    let datty = r.bf16s(rows * c, 1.0);
    let (g_datty, g_dqkv, g_datt) = (
        up_bf(&g, &datty)?,
        poisoned_bf(&g, rows * 3 * c)?,
        poisoned_bf(&g, b * nh * t * t)?,
    );
    let hv8: [_; 8] = hv
        .clone()
        .try_into()
        .map_err(|_| anyhow::anyhow!("eight heads"))?;
    g.attention_backward(
        g_dqkv.all(),
        g_datt.all(),
        g_datty.all(),
        g_qkv.all(),
        g_att.all(),
        hv8,
        b,
        t,
        nh,
    )?;
    let (mut dqkv, mut datt) = (vec![0.0; rows * 3 * c], vec![0.0; b * nh * t * t]);
    k::attention_backward(
        &mut dqkv,
        &mut datt,
        &wide_bf(&datty),
        &wide_bf(&qkv),
        &att,
        b,
        t,
        c,
        nh,
    );
    out.push(check(
        "attention backward",
        true,
        &back_bf(&g, &g_dqkv)?,
        &dqkv,
    ));

    // Fused attention (heads of 64), at a length that is not a multiple of its 64-row blocks.
    let (fb, ft, fnh) = (2usize, 200usize, 4usize);
    let fc = fnh * cuda::ops::FLASH_HEAD;
    let qkv = r.bf16s(fb * ft * 3 * fc, 1.0);
    let g_qkv = up_bf(&g, &qkv)?;
    let (g_out, g_lse) = (
        poisoned_bf(&g, fb * ft * fc)?,
        poisoned_f32(&g, fb * fnh * ft)?,
    );
    g.flash_attention_forward(g_out.all(), g_lse.all(), g_qkv.all(), fb, ft, fnh)?;
    let (mut fout, mut fatt) = (vec![0.0; fb * ft * fc], vec![0.0; fb * fnh * ft * ft]);
    k::attention_forward(&mut fout, &mut fatt, &wide_bf(&qkv), fb, ft, fc, fnh);
    out.push(check(
        "fused attention forward (mma.sync)",
        true,
        &back_bf(&g, &g_out)?,
        &fout,
    ));
    let dfo = r.bf16s(fb * ft * fc, 1.0);
    let (g_dfo, g_dqkv, g_dd) = (
        up_bf(&g, &dfo)?,
        poisoned_bf(&g, fb * ft * 3 * fc)?,
        poisoned_f32(&g, fb * fnh * ft)?,
    );
    g.flash_attention_backward(
        g_dqkv.all(),
        g_dd.all(),
        g_dfo.all(),
        g_out.all(),
        g_qkv.all(),
        g_lse.all(),
        fb,
        ft,
        fnh,
    )?;
    let (mut fdqkv, mut fdatt) = (vec![0.0; fb * ft * 3 * fc], vec![0.0; fb * fnh * ft * ft]);
    k::attention_backward(
        &mut fdqkv,
        &mut fdatt,
        &wide_bf(&dfo),
        &wide_bf(&qkv),
        &fatt,
        fb,
        ft,
        fc,
        fnh,
    );
    out.push(check(
        "fused attention backward (mma.sync)",
        true,
        &back_bf(&g, &g_dqkv)?,
        &fdqkv,
    ));

    // Cross-entropy over a padded vocabulary.
    let (v, vp) = (1000usize, 1024usize);
    let logits = r.bf16s(rows * vp, 2.0);
    let targets = r.tokens(rows, v);
    let (g_logits, g_targets) = (up_bf(&g, &logits)?, DeviceBuffer::from_host(&g, &targets)?);
    let g_losses = up_f32(&g, &vec![0.5; rows])?;
    let dloss = 1.0 / rows as f32;
    g.crossentropy(g_losses.all(), g_logits.all(), g_targets.all(), v, dloss)?;
    let mut lg = wide_bf(&logits);
    let (mut maxes, mut sums, mut tl, mut losses) = (
        vec![0.0; rows],
        vec![0.0; rows],
        vec![0.0; rows],
        vec![0.0; rows],
    );
    k::crossentropy_max(&mut maxes, &lg, 0, v);
    k::crossentropy_exp(&mut sums, &mut tl, &mut lg, &maxes, &targets, 0, v);
    k::crossentropy_finish(&mut losses, &mut lg, &sums, &tl);
    k::crossentropy_backward_inplace(&mut lg, &targets, dloss as f64, 0);
    let losses: Vec<f64> = losses.iter().map(|l| l + 0.5).collect();
    out.push(check(
        "cross-entropy: losses",
        false,
        &back_f32(&g, &g_losses)?,
        &losses,
    ));
    out.push(check(
        "cross-entropy: dlogits",
        true,
        &back_bf(&g, &g_logits)?,
        &lg,
    ));

    // Embeddings.
    let vv = 512usize;
    let tokens = r.tokens(rows, vv);
    let (wte, wpe) = (r.bf16s(vv * c, 1.0), r.bf16s(t * c, 1.0));
    let (g_tok, g_wte, g_wpe) = (
        DeviceBuffer::from_host(&g, &tokens)?,
        up_bf(&g, &wte)?,
        up_bf(&g, &wpe)?,
    );
    let g_enc = poisoned_f32(&g, rows * c)?;
    g.embedding_forward(
        g_enc.all(),
        g_tok.all(),
        g_wte.all(),
        Some(g_wpe.all()),
        t,
        0,
    )?;
    let mut enc = vec![0.0; rows * c];
    k::embedding_forward(&mut enc, &tokens, &wide_bf(&wte), 0, c);
    k::position_forward(&mut enc, &wide_bf(&wpe), t, c);
    out.push(check(
        "embedding forward",
        false,
        &back_f32(&g, &g_enc)?,
        &enc,
    ));
    let dres = r.f32s(rows * c, 1.0);
    let (dwte0, dwpe0) = (r.f32s(vv * c, 1.0), r.f32s(t * c, 1.0));
    let (g_dres, g_dwte, g_dwpe) = (up_f32(&g, &dres)?, up_f32(&g, &dwte0)?, up_f32(&g, &dwpe0)?);
    g.embedding_backward(g_dwte.all(), g_dwpe.all(), g_dres.all(), g_tok.all(), t, 0)?;
    let (mut dwte, mut dwpe) = (wide(&dwte0), wide(&dwpe0));
    k::embedding_backward(&mut dwte, &wide(&dres), &tokens, 0, c);
    k::position_backward(&mut dwpe, &wide(&dres), t, c);
    out.push(check(
        "embedding backward",
        false,
        &[back_f32(&g, &g_dwte)?, back_f32(&g, &g_dwpe)?].concat(),
        &[dwte, dwpe].concat(),
    ));

    // Residual with bias.
    let (acc, res) = (r.f32s(rows * c, 1.0), r.f32s(rows * c, 1.0));
    let (g_acc, g_res) = (up_f32(&g, &acc)?, up_f32(&g, &res)?);
    g.residual_bias_add(g_acc.all(), g_res.all(), d_b.all())?;
    let mut accc = wide(&acc);
    k::residual_bias_add(&mut accc, &wide(&res), &wide_bf(&bb));
    out.push(check(
        "residual + bias",
        false,
        &back_f32(&g, &g_acc)?,
        &accc,
    ));

    // Gradient norm and AdamW with clipping, against the CPU optimizer on a small model's
    // layout (so the decay mask is the real one).
    let cfg = GptConfig {
        vocab_size: 300,
        seq_len: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
    };
    let layout = ParamLayout::new(&cfg);
    let n = layout.numel();
    let (p0, g0) = (r.f32s(n, 0.1), r.f32s(n, 1.0));
    let (m0, v0): (Vec<f32>, Vec<f32>) = (
        r.f32s(n, 0.01),
        r.f32s(n, 0.01).iter().map(|x| x * x).collect(),
    );
    let opt_cfg = AdamWConfig::default();
    let mut cpu_opt = AdamW::<f64>::new(opt_cfg, &layout);
    cpu_opt.m = wide(&m0);
    cpu_opt.v = wide(&v0);
    cpu_opt.step = 4;
    let (mut cp, mut cg) = (wide(&p0), wide(&g0));
    let norm_sq = marathon_model::optim::sum_squares(&g0);
    // Two ranges, as a rank's share of a sharded model's norm.
    let ranges = [0..n / 3, n / 2..n];
    let part_sq: f64 = ranges
        .iter()
        .map(|r| marathon_model::optim::sum_squares(&g0[r.clone()]))
        .sum();
    marathon_model::optim::clip_grads(&mut cg, norm_sq.sqrt(), 1.0);
    cpu_opt.update(&mut cp, &cg, 3e-4);
    let mut decay = vec![0u8; n];
    for (rg, d) in layout.decay_ranges() {
        decay[rg].fill(d as u8);
    }
    let (g_master, g_params, g_grads, g_m, g_v) = (
        up_f32(&g, &p0)?,
        poisoned_bf(&g, n)?,
        up_f32(&g, &g0)?,
        up_f32(&g, &m0)?,
        up_f32(&g, &v0)?,
    );
    let g_decay = DeviceBuffer::from_host(&g, &decay)?;
    let (g_norm, g_parts) = (
        DeviceBuffer::<f64>::zeros(&g, 1)?,
        DeviceBuffer::<f64>::zeros(&g, 1024)?,
    );
    let flat: Vec<i64> = ranges
        .iter()
        .flat_map(|r| [r.start as i64, r.end as i64])
        .collect();
    let g_ranges = DeviceBuffer::from_host(&g, &flat)?;
    g.sum_squares(g_norm.all(), g_parts.all(), g_grads.all(), g_ranges.all())?;
    let part = g_norm.to_vec(&g)?[0];
    let g_whole = DeviceBuffer::from_host(&g, &[0i64, n as i64])?;
    g.sum_squares(g_norm.all(), g_parts.all(), g_grads.all(), g_whole.all())?;
    let gn = g_norm.to_vec(&g)?;
    out.push(Check {
        name: "gradient norm (whole, and two ranges)".into(),
        precision: "fp64",
        error: ((gn[0] - norm_sq) / norm_sq)
            .abs()
            .max(((part - part_sq) / part_sq).abs()),
        tolerance: 1e-12,
    });
    let step = cuda::ops::AdamWStep::new(&opt_cfg, 5, 3e-4, 1.0);
    g.adamw(
        g_master.all(),
        g_params.all(),
        g_grads.all(),
        g_m.all(),
        g_v.all(),
        g_decay.all(),
        &step,
        g_norm.all(),
    )?;
    out.push(check(
        "adamw: master weights",
        false,
        &back_f32(&g, &g_master)?,
        &cp,
    ));
    out.push(check(
        "adamw: moments",
        false,
        &[back_f32(&g, &g_m)?, back_f32(&g, &g_v)?].concat(),
        &[cpu_opt.m.clone(), cpu_opt.v.clone()].concat(),
    ));
    let cp_bf: Vec<f64> = cp.iter().map(|&x| Bf16::from_f64(x).to_f64()).collect();
    out.push(check(
        "adamw: bf16 weights",
        true,
        &back_bf(&g, &g_params)?,
        &cp_bf,
    ));
    Ok(out)
}

fn bytes_bf(b: &DeviceBuffer<Bf16>) -> cuda::Slice<'_, u8> {
    cuda::bytes(b.all())
}

fn bytes_f32(b: &DeviceBuffer<f32>) -> cuda::Slice<'_, u8> {
    cuda::bytes(b.all())
}

// ------------------------------------------------------------------------------------------
// NCCL

fn nccl_check() -> Result<Vec<Check>> {
    use marathon_elastic::InProcessCoordinator;
    use marathon_runtime::nccl::NcclGroup;
    use std::time::Duration;
    let gpu = Gpu::new(0)?;
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
    let mut r = Rand(Rng::new(7));
    let x = r.f32s(1 << 20, 1.0);
    let a = up_f32(&gpu, &x)?;
    let bbuf = poisoned_f32(&gpu, x.len())?;
    group.all_reduce(&gpu, a.all())?;
    group.all_gather(&gpu, a.all(), bbuf.all())?;
    let after_gather = back_f32(&gpu, &bbuf)?;
    let cbuf = poisoned_f32(&gpu, x.len())?;
    group.reduce_scatter(&gpu, bbuf.all(), cbuf.all())?;
    group.broadcast(&gpu, cbuf.all(), 0)?;
    let dbuf = poisoned_f32(&gpu, x.len())?;
    group.send_recv(&gpu, cbuf.all(), 0, dbuf.all(), 0)?;
    let got = back_f32(&gpu, &dbuf)?;
    let xb = r.bf16s(1 << 16, 1.0);
    let hb = up_bf(&gpu, &xb)?;
    group.all_reduce_bf16(&gpu, hb.all())?;
    let got_bf = back_bf(&gpu, &hb)?;
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
    let flag = DeviceBuffer::<u32>::zeros(&gpu, 1)?;
    let pending = |group: &NcclGroup| -> Result<(Result<(), marathon_runtime::RuntimeError>, f64)> {
        gpu.hold(Stream::Training, &flag, 1)?;
        let t0 = Instant::now();
        let done = group.all_reduce(&gpu, a.all());
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        gpu.release(&flag, 1)?;
        gpu.sync()?;
        gpu.release(&flag, 0)?;
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
    let aborted_at = aborter
        .join()
        .map_err(|_| anyhow::anyhow!("the aborting thread panicked"))?;
    let late_ms = aborted_at.elapsed().as_secs_f64() * 1e3;
    let aborted = matches!(done, Err(marathon_runtime::RuntimeError::Aborted { .. }));
    let later = matches!(
        group.all_reduce(&gpu, a.all()),
        Err(marathon_runtime::RuntimeError::Aborted { .. })
    );
    eprintln!(
        "  nccl abort: the pending all-reduce returned after {ms:.0} ms ({}), the abort call \
         itself ended {late_ms:.0} ms ago; the next call {}",
        if aborted { "Aborted" } else { "NOT aborted" },
        if later { "fails too" } else { "DID NOT fail" }
    );
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
    let timed_out = matches!(
        done,
        Err(marathon_runtime::RuntimeError::CommTimeout { .. })
    );
    eprintln!(
        "  nccl deadline of 400 ms: the pending all-reduce returned after {ms:.0} ms ({})",
        if timed_out {
            "CommTimeout"
        } else {
            "NOT timed out"
        }
    );
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
    let report = marathon_runtime::data::prepare(&marathon_runtime::data::PrepareOptions {
        inputs: inputs.to_vec(),
        out_dir: dir.join("data"),
        val_fraction: 0.1,
    })?;
    Ok(report.train_path)
}

fn small_config(
    data: &Path,
    steps: u64,
    ckpt: Option<&Path>,
    device: Device,
) -> Result<TrainConfig> {
    let path = data.with_file_name(format!("check-{}.toml", std::process::id()));
    std::fs::write(&path, small_toml(data, steps, ckpt, device, 4, ""))?;
    Ok(TrainConfig::load(&path)?)
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
    let toml = format!(
        r#"
[model]
vocab_size = 50257
seq_len = 128
n_layer = 2
n_head = 2
n_embd = 128
[data]
train = "{train}"
seed = 7
[batch]
micro_batch = {micro}
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
steps = {steps}
seed = 3
device = "{dev}"
{ckpt}{extra}"#,
        train = data.display(),
        dev = if device == Device::Cuda {
            "cuda"
        } else {
            "cpu"
        },
    );
    toml
}

fn training_check(data: &Path, dir: &Path) -> Result<Vec<Check>> {
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
    eprintln!(
        "  training, 20 steps: CPU losses {:.4} .. {:.4}, GPU {:.4} .. {:.4}",
        losses[0][0], losses[0][19], losses[1][0], losses[1][19]
    );
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
    anyhow::ensure!(
        cpu_run.resumed_from() == Some(3),
        "the CPU run did not resume from the GPU's checkpoint of step 3"
    );
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
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the metrics {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["kind"] == "step" {
            out.push(
                v["data"]["loss"]
                    .as_f64()
                    .context("a step record without a loss")?,
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
fn layout_checks(data: &Path, dir: &Path) -> Result<Vec<Check>> {
    let steps = 20;
    let exe = std::env::current_exe().context("finding the marathon binary")?;
    let reference = {
        let path = dir.join("layout-1.toml");
        std::fs::write(&path, small_toml(data, steps, None, Device::Cuda, 2, ""))?;
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
        std::fs::write(
            &path,
            small_toml(data, steps, None, Device::Cuda, 2, &extra),
        )?;
        let t0 = Instant::now();
        let run = std::process::Command::new(&exe)
            .args(["train", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .output()
            .context("starting marathon train")?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        for line in stderr.lines().filter(|l| l.starts_with("group ")) {
            eprintln!("    {line}");
        }
        let error = if run.status.success() {
            let got = metric_losses(&metrics)?;
            eprintln!(
                "  {name}: {} processes, {:.1} s, losses {:.4} .. {:.4} (one GPU: {:.4} .. {:.4})",
                tp * pp * dp,
                t0.elapsed().as_secs_f64(),
                got.first().copied().unwrap_or(f64::NAN),
                got.last().copied().unwrap_or(f64::NAN),
                reference[0],
                reference[steps as usize - 1],
            );
            worst_rel(&got, &reference)
        } else {
            let tail: Vec<_> = stderr.lines().rev().take(12).collect();
            eprintln!("  {name}: marathon train failed ({}):", run.status);
            for l in tail.iter().rev() {
                eprintln!("    {l}");
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
fn recompute_checks(data: &Path, dir: &Path, gpt2: &GptConfig) -> Result<Vec<Check>> {
    use marathon_model::cuda::CudaGpt;
    use marathon_model::{Recompute, Shard};
    let steps = 20;
    let run = |mode: &str| -> Result<Vec<f64>> {
        let path = dir.join(format!("recompute-{mode}.toml"));
        let extra = format!("recompute = \"{mode}\"\n");
        std::fs::write(
            &path,
            small_toml(data, steps, None, Device::Cuda, 4, &extra),
        )?;
        let mut t = Trainer::new(TrainConfig::load(&path)?)?;
        (0..steps)
            .map(|_| Ok(t.train_step()?.loss as f64))
            .collect()
    };
    let none = run("none")?;
    let gib = |r| CudaGpt::shard_memory_bytes(gpt2, Shard::WHOLE, 16, 1024, 1, 1, r) / 1e9;
    eprintln!(
        "  recomputation, GPT-2 124M at 16 x 1024 on the device: none {:.1} GB, selective {:.1} \
         GB, full {:.1} GB",
        gib(Recompute::None),
        gib(Recompute::Selective),
        gib(Recompute::Full)
    );
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
    use marathon_elastic::{InProcessCoordinator, Topology};
    use marathon_runtime::comm::GroupSpec;
    use marathon_runtime::Groups;
    let root = dir.join("ckpt-tp2");
    let steps = 3;
    let extra = "[parallel]\ntp = 2\n";
    let gpu_path = dir.join("tp2-gpu.toml");
    std::fs::write(
        &gpu_path,
        small_toml(data, steps, Some(&root), Device::Cuda, 4, extra),
    )?;
    let coord = std::sync::Arc::new(InProcessCoordinator::new());
    let topology = Topology::new(2, 1, 1);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (coord, path) = (coord.clone(), gpu_path.clone());
            std::thread::spawn(move || -> Result<(ParamLayout, [Vec<f32>; 3])> {
                let template =
                    GroupSpec::loopback("gpu-check", "", 0, 1, std::time::Duration::from_secs(120));
                let groups = Groups::connect(&*coord, topology, rank, &template)?;
                let mut t = Trainer::with_groups(TrainConfig::load(&path)?, groups)?;
                t.run(&mut Quiet)?;
                let [p, m, v] = t.state();
                Ok((t.model.layout.clone(), [p.to_vec(), m.to_vec(), v.to_vec()]))
            })
        })
        .collect();
    let shards = ranks
        .into_iter()
        .map(|r| {
            r.join()
                .map_err(|_| anyhow::anyhow!("a tp2 rank panicked"))?
        })
        .collect::<Result<Vec<_>>>()?;
    let cpu_path = dir.join("tp2-cpu.toml");
    std::fs::write(
        &cpu_path,
        small_toml(data, steps, Some(&root), Device::Cpu, 4, ""),
    )?;
    let cpu = Trainer::new(TrainConfig::load(&cpu_path)?)?;
    anyhow::ensure!(
        cpu.resumed_from() == Some(steps),
        "the CPU run did not resume from the tp2 GPU checkpoint of step {steps}"
    );
    let whole = &cpu.model.layout;
    let cpu_state = cpu.state();
    let mut same = true;
    for (layout, state) in &shards {
        for spec in layout.tensors() {
            let g = whole
                .get(&spec.name)
                .context("a shard's tensor the model lacks")?;
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

struct Quiet;

impl marathon_runtime::Observer for Quiet {}

/// The host-staged transport's all-reduce beside the bus it crosses.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Staged {
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
/// device-to-host copy of the same bytes, in the same run.
pub(crate) fn staged_allreduce(ranks: usize, bytes: usize) -> Result<Staged> {
    use marathon_runtime::comm::{GroupSpec, ProcessGroup};
    let n = bytes / 4;
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let members: Vec<_> = (0..ranks)
        .map(|rank| {
            let coord = coord.clone();
            std::thread::spawn(move || -> Result<f64> {
                let gpu = Gpu::new(0)?;
                let spec = GroupSpec::loopback(
                    "bench",
                    "staged",
                    rank,
                    ranks,
                    std::time::Duration::from_secs(600),
                );
                let mut g = ProcessGroup::connect(&*coord, spec)?;
                let dev = DeviceBuffer::<f32>::zeros(&gpu, n)?;
                let mut host = PinnedBuffer::<f32>::new(&gpu, n)?;
                let mut times = Vec::new();
                for i in 0..6 {
                    let t0 = Instant::now();
                    gpu.download_slice(dev.all(), host.as_mut_slice())?;
                    g.all_reduce(host.as_mut_slice())?;
                    gpu.upload_slice(dev.all(), host.as_slice())?;
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
            .map_err(|_| anyhow::anyhow!("a staged all-reduce rank panicked"))??;
        seconds = seconds.max(s);
    }
    let gpu = Gpu::new(0)?;
    let dev = DeviceBuffer::<f32>::zeros(&gpu, n)?;
    let mut host = PinnedBuffer::<f32>::new(&gpu, n)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        gpu.download_slice(dev.all(), host.as_mut_slice())?;
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

#[derive(Debug, serde::Serialize)]
struct Bench {
    device: String,
    batch: usize,
    seq: usize,
    ms_per_step: f64,
    tokens_per_s: f64,
    tflops: f64,
    mfu: f64,
    snapshot_bytes: u64,
    snapshot_stall_ms: f64,
    step_after_snapshot_ms: f64,
    pinned_d2h_ms: f64,
    pinned_d2h_gbs: f64,
    profile: Vec<(String, f64, usize)>,
}

impl Bench {
    fn print(&self) {
        println!(
            "| GPT-2 124M on {}, batch {} x {} | value |",
            self.device, self.batch, self.seq
        );
        println!("|---|---|");
        println!("| ms/step (median) | {:.1} |", self.ms_per_step);
        println!("| tokens/s | {:.0} |", self.tokens_per_s);
        println!("| TFLOP/s (6 N + attention) | {:.0} |", self.tflops);
        println!(
            "| model FLOP utilisation (of 989 TFLOP/s dense bf16) | {:.1}% |",
            100.0 * self.mfu
        );
        println!(
            "| snapshot: {:.2} GB, training stalled | {:.2} ms |",
            self.snapshot_bytes as f64 / 1e9,
            self.snapshot_stall_ms
        );
        println!(
            "| step running beside the snapshot copy | {:.1} ms |",
            self.step_after_snapshot_ms
        );
        println!(
            "| pinned device-to-host copy of the same bytes | {:.1} ms ({:.1} GB/s) |",
            self.pinned_d2h_ms, self.pinned_d2h_gbs
        );
    }
}

fn bench(args: &GpuArgs, data: &Path) -> Result<Bench> {
    let mut cfg = TrainConfig::load(&args.config)?;
    // Timing needs no meaningful text: enough random tokens for a few hundred steps.
    let tokens = Rand(Rng::new(5)).tokens(64 * args.batch * args.seq + 1, cfg.model.vocab_size);
    let random = data.with_file_name("random.bin");
    marathon_runtime::data::tokens::write_token_file(
        &random,
        &tokens,
        cfg.model.vocab_size as u32,
        1,
    )?;
    cfg.data.train = random;
    cfg.data.val = None;
    cfg.batch.micro_batch = args.batch;
    cfg.batch.global_batch = args.batch;
    cfg.batch.seq_len = args.seq;
    cfg.batch.rampup = None;
    cfg.train.steps = 1000;
    cfg.train.eval_every_steps = 0;
    cfg.train.metrics = None;
    cfg.train.device = Device::Cuda;
    let root = data.with_file_name("bench-ckpt");
    cfg.checkpoint = Some(toml::from_str(&format!(
        "root = \"{}\"\nevery_steps = 1000\ncompression = \"none\"",
        root.display()
    ))?);
    cfg.validate().map_err(|e| cfg.error(e))?;
    let mut t = Trainer::new(cfg.clone())?;
    let device = t.device_name().unwrap_or("?").to_string();
    for _ in 0..3 {
        t.train_step()?;
    }
    let mut ms: Vec<f64> = (0..args.steps)
        .map(|_| t.train_step().map(|r| r.step_ms))
        .collect::<std::result::Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    // Where a step's time goes: every launch and product timed with events over two steps.
    let gpu = t.gpu().context("the bench trains on the GPU")?;
    gpu.set_profiling(true);
    t.train_step()?;
    t.train_step()?;
    let gpu = t.gpu().context("the bench trains on the GPU")?;
    let profile = gpu.profile_report()?;
    gpu.set_profiling(false);
    let total: f64 = profile.iter().map(|p| p.1).sum();
    eprintln!("  where a step's time goes (two steps, timed per launch):");
    for (name, ms, n) in profile.iter().take(24) {
        eprintln!(
            "    {:>7.2} ms/step {:>5.1}%  {:>4} launches  {name}",
            ms / 2.0,
            100.0 * ms / total,
            n / 2
        );
    }
    let tokens = (args.batch * args.seq) as f64;
    let flops = marathon_model::cost::flops_per_token(&cfg.model, args.seq) * tokens;
    // A first snapshot page-locks the writer's staging buffer; the second is the one timed.
    t.checkpoint()?;
    t.train_step()?;
    t.finish_checkpoints()?;
    // The snapshot: the stall is the call itself; the next step runs beside the copy.
    let t0 = Instant::now();
    let rec = t
        .checkpoint()?
        .context("the bench configures checkpoints")?;
    let stall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after = t.train_step()?.step_ms;
    t.finish_checkpoints()?;
    // A pinned device-to-host copy of the same bytes, timed with events.
    let gpu = Gpu::new(0)?;
    let n = (rec.staged_bytes / 4) as usize;
    let src = DeviceBuffer::<f32>::zeros(&gpu, n)?;
    let mut host = PinnedBuffer::<f32>::new(&gpu, n)?;
    let (e0, e1) = (gpu.event(true)?, gpu.event(true)?);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        gpu.record(&e0, Stream::Training)?;
        // SAFETY: `host` outlives the copy, which `elapsed_ms` waits for.
        unsafe { src.download_async(&gpu, host.as_mut_slice())? };
        gpu.record(&e1, Stream::Training)?;
        best = best.min(e1.elapsed_ms(&e0)? as f64);
    }
    let tflops = flops / (median / 1e3) / 1e12;
    Ok(Bench {
        device,
        batch: args.batch,
        seq: args.seq,
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
