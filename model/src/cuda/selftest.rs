//! The GPU's self-test: every kernel of [`super::ops`] against the CPU kernel of
//! [`crate::kernels`] it mirrors, on random inputs (never zeros), its outputs poisoned with NaN
//! first so an element the kernel leaves unwritten fails: bf16 results within [`BF16_TOL`]
//! relative (‖gpu − cpu‖ / ‖cpu‖), fp32 results within [`F32_TOL`].
//!
//! [`kernel_checks`] runs them all and returns one [`Check`] per output compared. The inputs
//! come from fixed seeds, so every run computes the same comparisons. [`Check`] and the helpers
//! ([`Rand`], [`rel`], [`check`], the buffer uploads and downloads) are public for checks of
//! whole training runs built on this one.

use half::bf16 as Bf16;

use super::{CudaError, DeviceBuffer, Gpu, Out, Slice};
use crate::rng::Rng;
use crate::{kernels as k, AdamW, AdamWConfig, GptConfig, ParamLayout};

/// One check's outcome: `error` against `tolerance` (NaN when the check could not compare).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was compared, as the table shows it.
    pub name: String,
    /// The precision compared at: "bf16", "fp32", "fp64", or "-" where it is no number's.
    pub precision: &'static str,
    /// The error found: relative, or in the unit the name states.
    pub error: f64,
    /// The largest error that passes.
    pub tolerance: f64,
}

impl Check {
    /// Whether the error is a number within the tolerance (NaN never passes).
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

/// The relative error a bf16 result may have.
pub const BF16_TOL: f64 = 1e-2;
/// The relative error an fp32 result may have.
pub const F32_TOL: f64 = 1e-5;

/// Random inputs from a fixed seed: normal values at a scale, or tokens below a vocabulary.
#[derive(Debug)]
pub struct Rand(pub Rng);

impl Rand {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rand(Rng::new(seed))
    }
    /// `n` normal values times `scale`.
    pub fn f32s(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.0.normal() * scale) as f32).collect()
    }
    /// `n` normal values times `scale`, rounded to bf16.
    pub fn bf16s(&mut self, n: usize, scale: f64) -> Vec<Bf16> {
        (0..n)
            .map(|_| Bf16::from_f64(self.0.normal() * scale))
            .collect()
    }
    /// `n` tokens uniform below `v`.
    pub fn tokens(&mut self, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| self.0.below(v as u64) as u32).collect()
    }
}

/// bf16 values widened to f64.
pub fn wide_bf(x: &[Bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// f32 values widened to f64.
pub fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives NaN.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
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

/// `gpu` against `cpu` by [`rel`], at bf16's tolerance or fp32's.
pub fn check(name: &str, bf16: bool, gpu: &[f64], cpu: &[f64]) -> Check {
    Check {
        name: name.into(),
        precision: if bf16 { "bf16" } else { "fp32" },
        error: rel(gpu, cpu),
        tolerance: if bf16 { BF16_TOL } else { F32_TOL },
    }
}

/// A device buffer filled with NaN, so an element the kernel leaves unwritten fails the check.
pub fn poisoned_bf(gpu: &Gpu, n: usize) -> Result<DeviceBuffer<Bf16>, CudaError> {
    DeviceBuffer::from_host(gpu, &vec![Bf16::NAN; n])
}

/// [`poisoned_bf`] in fp32.
pub fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<DeviceBuffer<f32>, CudaError> {
    DeviceBuffer::from_host(gpu, &vec![f32::NAN; n])
}

/// A device buffer's bf16 values, widened.
pub fn back_bf(gpu: &Gpu, b: &DeviceBuffer<Bf16>) -> Result<Vec<f64>, CudaError> {
    Ok(wide_bf(&b.to_vec(gpu)?))
}

/// A device buffer's fp32 values, widened.
pub fn back_f32(gpu: &Gpu, b: &DeviceBuffer<f32>) -> Result<Vec<f64>, CudaError> {
    Ok(wide(&b.to_vec(gpu)?))
}

/// `x` copied to a new device buffer.
pub fn up_bf(gpu: &Gpu, x: &[Bf16]) -> Result<DeviceBuffer<Bf16>, CudaError> {
    DeviceBuffer::from_host(gpu, x)
}

/// `x` copied to a new device buffer.
pub fn up_f32(gpu: &Gpu, x: &[f32]) -> Result<DeviceBuffer<f32>, CudaError> {
    DeviceBuffer::from_host(gpu, x)
}

/// Every kernel against the CPU kernel it mirrors, one [`Check`] per output compared, in a fixed
/// order. Errors: a CUDA call failed (allocation, copy or launch); a result out of tolerance is
/// a failed check, not an error.
pub fn kernel_checks(mut g: Gpu) -> Result<Vec<Check>, CudaError> {
    let mut r = Rand::new(20261126);
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
        Out::Bf16,
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
        Out::F32,
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
        .collect::<Result<_, _>>()?;
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
        .expect("the heads' scratch is eight buffers, made just above");
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
    let fc = fnh * super::ops::FLASH_HEAD;
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
    let (mut maxes, mut sums, mut tl, mut losses, mut inv) = (
        vec![0.0; rows],
        vec![0.0; rows],
        vec![0.0; rows],
        vec![0.0; rows],
        vec![0.0; rows],
    );
    k::crossentropy_max(&mut maxes, &lg, 0, v);
    k::crossentropy_exp(&mut sums, &mut tl, &mut lg, &maxes, &targets, 0, v);
    k::crossentropy_finish(&mut losses, &mut inv, &sums, &tl);
    k::crossentropy_backward_inplace(&mut lg, &inv, &targets, dloss as f64, 0);
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
    let norm_sq = crate::optim::sum_squares(&g0);
    // Two ranges, as a rank's share of a sharded model's norm.
    let ranges = [0..n / 3, n / 2..n];
    let part_sq: f64 = ranges
        .iter()
        .map(|r| crate::optim::sum_squares(&g0[r.clone()]))
        .sum();
    crate::optim::clip_grads(&mut cg, norm_sq.sqrt(), 1.0);
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
    let step = super::ops::AdamWStep::new(&opt_cfg, 5, 3e-4, 1.0);
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

/// A bf16 buffer as the bytes a matrix product writes.
fn bytes_bf(b: &DeviceBuffer<Bf16>) -> Slice<'_, u8> {
    super::bytes(b.all())
}

/// An fp32 buffer as the bytes a matrix product writes.
fn bytes_f32(b: &DeviceBuffer<f32>) -> Slice<'_, u8> {
    super::bytes(b.all())
}
