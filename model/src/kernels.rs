//! The CPU kernels: one `forward`/`backward` pair per layer, on flat row-major buffers.
//!
//! Shapes are given as `(B, T, C)` comments; `rows` is B * T. Backward functions accumulate
//! (`+=`) into parameter gradients, so microbatches add up without a separate reduction, and say
//! in their name or doc whether they overwrite or accumulate activation gradients.
//!
//! Every kernel is deterministic: work is split so that each output element is written by one
//! task, and reductions run in a fixed order, so the same inputs give bitwise-identical outputs
//! whatever the thread count.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::float::{exp_sum, max_of};
use crate::Float;

/// Rows per rayon task for row-wise kernels: enough work per task to amortise scheduling.
const ROWS_PER_TASK: usize = 16;
/// Columns per task for column reductions (bias and LayerNorm parameter gradients).
const COLS_PER_TASK: usize = 64;
/// Rows of a wide layer's weight gradient per task ([`matmul_backward`]).
const DW_ROWS_PER_TASK: usize = 512;
/// The fewest such blocks worth splitting into: enough to keep up to 16 threads busy.
const DW_BLOCKS_MIN: usize = 16;

/// A raw pointer that rayon tasks share to write disjoint, strided parts of one buffer (a head's
/// columns of a `(B, T, 3C)` tensor), which safe slices cannot express.
#[derive(Clone, Copy)]
struct SharedMut<F>(*mut F);
// SAFETY: only used by tasks that write disjoint elements; see each use.
unsafe impl<F> Send for SharedMut<F> {}
unsafe impl<F> Sync for SharedMut<F> {}

thread_local! {
    /// How deep this thread is inside the GEMM library. The library takes its packing scratch
    /// from the heap on every call; tests use [`in_gemm`] to tell those allocations from ours.
    static GEMM_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether the current thread is inside a call to the GEMM library.
pub fn in_gemm() -> bool {
    GEMM_DEPTH.with(|d| d.get() > 0)
}

/// Marks the current thread as inside the GEMM library until dropped.
struct GemmScope;

impl GemmScope {
    fn enter() -> Self {
        GEMM_DEPTH.with(|d| d.set(d.get() + 1));
        GemmScope
    }
}

impl Drop for GemmScope {
    fn drop(&mut self) {
        GEMM_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// `dst (m, n) = [dst +] scale * lhs (m, k) @ rhs (k, n)` with explicit strides, through the GEMM
/// library. `(rs, cs)` are the row and column strides of each operand.
///
/// # Safety
/// Every operand must be valid for the elements its shape and strides reach, and `dst` must not
/// overlap `lhs` or `rhs`.
unsafe fn gemm_strided<F: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut F,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const F,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const F,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: F,
    parallel: bool,
) {
    let parallelism = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    let _inside = GemmScope::enter();
    // SAFETY: forwarded from the caller; gemm computes dst := alpha*dst + beta*lhs*rhs and reads
    // dst only when `read_dst` is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            F::ONE,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding (vocabulary-parallel)

/// `out (B, T, C) = wte[tokens]` for the tokens in this rank's vocabulary slice, which starts at
/// `v0`, and zero for the others: summed over the tensor-parallel ranks, every row is its
/// token's embedding.
pub fn embedding_forward<F: Float>(out: &mut [F], tokens: &[u32], wte: &[F], v0: usize, c: usize) {
    assert_eq!(out.len(), tokens.len() * c);
    let vl = wte.len() / c;
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        match (tokens[row] as usize).checked_sub(v0).filter(|&i| i < vl) {
            Some(i) => o.copy_from_slice(&wte[i * c..(i + 1) * c]),
            None => o.fill(F::ZERO),
        }
    });
}

/// `out (B, T, C) += wpe[t]`.
pub fn position_forward<F: Float>(out: &mut [F], wpe: &[F], t: usize, c: usize) {
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        let pos = row % t;
        add_into(o, &wpe[pos * c..(pos + 1) * c]);
    });
}

/// `dwte[tokens - v0] += dout` for the tokens in this rank's vocabulary slice. Sequential: rows
/// scatter into shared embedding rows, and a fixed order keeps the sums deterministic. It is
/// O(B * T * C), tiny beside GEMMs.
pub fn embedding_backward<F: Float>(
    dwte: &mut [F],
    dout: &[F],
    tokens: &[u32],
    v0: usize,
    c: usize,
) {
    let vl = dwte.len() / c;
    for (row, d) in dout.chunks_exact(c).enumerate() {
        if let Some(i) = (tokens[row] as usize).checked_sub(v0).filter(|&i| i < vl) {
            add_into(&mut dwte[i * c..(i + 1) * c], d);
        }
    }
}

/// `dwpe[t] += dout`, in a fixed order as [`embedding_backward`].
pub fn position_backward<F: Float>(dwpe: &mut [F], dout: &[F], t: usize, c: usize) {
    for (row, d) in dout.chunks_exact(c).enumerate() {
        let pos = row % t;
        add_into(&mut dwpe[pos * c..(pos + 1) * c], d);
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm's epsilon, as in GPT-2.
pub const LN_EPS: f64 = 1e-5;

/// `out (rows, C) = (inp - mean) * rstd * w + b`, saving `mean` and `rstd` (rows) for backward.
pub fn layernorm_forward<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    w: &[F],
    b: &[F],
    c: usize,
) {
    let rows = inp.len() / c;
    assert!(
        inp.len() == rows * c && out.len() == rows * c && mean.len() == rows && rstd.len() == rows
    );
    assert!(w.len() == c && b.len() == c);
    let eps = F::from_f64(LN_EPS);
    let n = F::from_f64(c as f64);
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .zip(inp.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, (m, r)), x)| {
            let mu = x.iter().copied().sum::<F>() / n;
            let var = x.iter().map(|&v| (v - mu) * (v - mu)).sum::<F>() / n;
            let rs = F::ONE / (var + eps).sqrt();
            for i in 0..c {
                o[i] = (x[i] - mu) * rs * w[i] + b[i];
            }
            *m = mu;
            *r = rs;
        });
}

/// Accumulates `dinp += dL/dinp`, `dw += dL/dw`, `db += dL/db` for a LayerNorm.
pub fn layernorm_backward<F: Float>(
    dinp: &mut [F],
    dw: &mut [F],
    db: &mut [F],
    dout: &[F],
    inp: &[F],
    mean: &[F],
    rstd: &[F],
    w: &[F],
    c: usize,
) {
    let rows = inp.len() / c;
    assert!(inp.len() == rows * c && dinp.len() == rows * c && dout.len() == rows * c);
    assert!(
        mean.len() == rows && rstd.len() == rows && w.len() == c && dw.len() == c && db.len() == c
    );
    let n = F::from_f64(c as f64);
    // Input gradient: rows are independent.
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c).zip(inp.par_chunks(c)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((di, (d, x)), (&mu, &rs))| {
            let mut dnorm_mean = F::ZERO;
            let mut dnorm_norm_mean = F::ZERO;
            for i in 0..c {
                let norm = (x[i] - mu) * rs;
                let dnorm = w[i] * d[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= n;
            dnorm_norm_mean /= n;
            for i in 0..c {
                let norm = (x[i] - mu) * rs;
                let dnorm = w[i] * d[i];
                di[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
            }
        });
    // Parameter gradients: a reduction over rows, split by columns so each sum has one owner.
    dw.par_chunks_mut(COLS_PER_TASK)
        .zip(db.par_chunks_mut(COLS_PER_TASK))
        .enumerate()
        .for_each(|(chunk, (dwc, dbc))| {
            let c0 = chunk * COLS_PER_TASK;
            for (row, (d, x)) in dout.chunks_exact(c).zip(inp.chunks_exact(c)).enumerate() {
                let (mu, rs) = (mean[row], rstd[row]);
                for j in 0..dwc.len() {
                    let i = c0 + j;
                    dbc[j] += d[i];
                    dwc[j] += (x[i] - mu) * rs * d[i];
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// `out (rows, OC) = [out +] inp (rows, IC) @ w (OC, IC)^T + bias (OC)`.
///
/// With `accumulate` the product and bias are added to what `out` holds, which is how the
/// attention and MLP projections add into the residual stream without a separate buffer.
pub fn matmul_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    w: &[F],
    bias: Option<&[F]>,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    let rows = inp.len() / ic;
    assert_eq!(inp.len(), rows * ic);
    assert_eq!(out.len(), rows * oc);
    assert_eq!(w.len(), oc * ic);
    match (bias, accumulate) {
        (Some(b), false) => out.par_chunks_mut(oc).for_each(|o| o.copy_from_slice(b)),
        (Some(b), true) => out.par_chunks_mut(oc).for_each(|o| add_into(o, b)),
        (None, _) => {}
    }
    // Without a bias to start from, the product overwrites `out` unless accumulating.
    let read_dst = bias.is_some() || accumulate;
    // SAFETY: shapes asserted above; out is a distinct &mut borrow.
    unsafe {
        gemm_strided(
            rows,
            oc,
            ic,
            out.as_mut_ptr(),
            oc,
            1,
            read_dst,
            inp.as_ptr(),
            ic,
            1,
            w.as_ptr(),
            1,
            ic,
            F::ONE,
            true,
        )
    }
}

/// Backward of [`matmul_forward`]: `dinp (rows, IC) [+]= dout @ w` (overwrites unless
/// `accumulate_dinp`), `dw (OC, IC) += dout^T @ inp`, `dbias (OC) += sum over rows of dout`.
pub fn matmul_backward<F: Float>(
    dinp: &mut [F],
    dw: &mut [F],
    dbias: Option<&mut [F]>,
    dout: &[F],
    inp: &[F],
    w: &[F],
    ic: usize,
    oc: usize,
    accumulate_dinp: bool,
) {
    let rows = inp.len() / ic;
    assert_eq!(inp.len(), rows * ic);
    assert_eq!(dinp.len(), rows * ic);
    assert_eq!(dout.len(), rows * oc);
    assert_eq!(w.len(), oc * ic);
    assert_eq!(dw.len(), oc * ic);
    // SAFETY: shapes asserted above; the destinations are distinct &mut borrows.
    unsafe {
        gemm_strided(
            rows,
            ic,
            oc,
            dinp.as_mut_ptr(),
            ic,
            1,
            accumulate_dinp,
            dout.as_ptr(),
            oc,
            1,
            w.as_ptr(),
            ic,
            1,
            F::ONE,
            true,
        );
    }
    // dw (OC, IC) += dout^T (OC, rows) @ inp (rows, IC), for the output rows from `o0` on
    // that `d` holds.
    let dw_rows = |d: &mut [F], o0: usize, parallel: bool| {
        // SAFETY: `d` is rows o0.. of dw, a distinct &mut borrow. dout's columns from o0 on
        // are in bounds when rows > 0 (o0 < oc); the furthest element read,
        // (rows - 1) * oc + o0 + d.len() / ic - 1, is below rows * oc.
        unsafe {
            gemm_strided(
                d.len() / ic,
                ic,
                rows,
                d.as_mut_ptr(),
                ic,
                1,
                true,
                dout.as_ptr().add(o0),
                1,
                oc,
                inp.as_ptr(),
                ic,
                1,
                F::ONE,
                parallel,
            )
        }
    };
    if oc >= DW_BLOCKS_MIN * DW_ROWS_PER_TASK && rows > 0 {
        // For a very wide layer (the tied head's 50304 rows) the library's own split of this
        // product ran 10-17% slower on a 2-core machine than blocks of output rows, each a
        // sequential product on one thread. The choice depends on the shape alone, so the
        // bits do not depend on the thread count.
        dw.par_chunks_mut(DW_ROWS_PER_TASK * ic)
            .enumerate()
            .for_each(|(blk, d)| dw_rows(d, blk * DW_ROWS_PER_TASK, false));
    } else {
        dw_rows(dw, 0, true);
    }
    if let Some(db) = dbias {
        assert_eq!(db.len(), oc);
        db.par_chunks_mut(COLS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, dbc)| {
                let c0 = chunk * COLS_PER_TASK;
                for d in dout.chunks_exact(oc) {
                    add_into(dbc, &d[c0..c0 + dbc.len()]);
                }
            });
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Causal multi-head self-attention.
///
/// `qkv (B, T, 3C)` holds `[q | k | v]`, head `h` in columns `h*hs..(h+1)*hs` of each part.
/// Writes `att (B, NH, T, T)`, the softmax probabilities (zero above the diagonal), which
/// backward needs, and `out (B, T, C)`, heads concatenated in order.
pub fn attention_forward<F: Float>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    assert_eq!(qkv.len(), b * t * 3 * c);
    assert_eq!(out.len(), b * t * c);
    assert_eq!(att.len(), b * nh * t * t);
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let out_ptr = SharedMut(out.as_mut_ptr());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, a)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c;
        let q = qkv[base + h * hs..].as_ptr();
        let k = qkv[base + c + h * hs..].as_ptr();
        let v = qkv[base + 2 * c + h * hs..].as_ptr();
        // SAFETY: q, k, v address (T, hs) blocks with row stride 3C inside qkv; `a` is this
        // task's own (T, T) block. The output block (batch bi, head h) is written by this task
        // alone: tasks differ in (bi, h), so their column ranges or row ranges are disjoint.
        unsafe {
            // scores (T, T) = scale * q (T, hs) @ k^T (hs, T)
            gemm_strided(
                t,
                t,
                hs,
                a.as_mut_ptr(),
                t,
                1,
                false,
                q,
                3 * c,
                1,
                k,
                1,
                3 * c,
                scale,
                false,
            );
        }
        for t1 in 0..t {
            let row = &mut a[t1 * t..(t1 + 1) * t];
            let max = max_of(&row[..=t1]);
            let sum = exp_sum(&mut row[..=t1], max);
            let inv = F::ONE / sum;
            row[..=t1].iter_mut().for_each(|x| *x *= inv);
            row[t1 + 1..].fill(F::ZERO);
        }
        let o = out_ptr;
        unsafe {
            // out (T, hs) = att (T, T) @ v (T, hs)
            let dst = o.0.add(bi * t * c + h * hs);
            gemm_strided(
                t,
                hs,
                t,
                dst,
                c,
                1,
                false,
                a.as_ptr(),
                t,
                1,
                v,
                3 * c,
                1,
                F::ONE,
                false,
            );
        }
    });
}

/// Backward of [`attention_forward`]: overwrites `dqkv (B, T, 3C)` from `dout (B, T, C)`.
/// `datt (B, NH, T, T)` is scratch.
pub fn attention_backward<F: Float>(
    dqkv: &mut [F],
    datt: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    assert_eq!(dqkv.len(), b * t * 3 * c);
    assert_eq!(qkv.len(), b * t * 3 * c);
    assert_eq!(dout.len(), b * t * c);
    assert_eq!(datt.len(), b * nh * t * t);
    assert_eq!(att.len(), b * nh * t * t);
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let dqkv_ptr = SharedMut(dqkv.as_mut_ptr());
    datt.par_chunks_mut(t * t).enumerate().for_each(|(bh, da)| {
        let (bi, h) = (bh / nh, bh % nh);
        let a = &att[bh * t * t..(bh + 1) * t * t];
        let base = bi * t * 3 * c;
        let q = qkv[base + h * hs..].as_ptr();
        let k = qkv[base + c + h * hs..].as_ptr();
        let v = qkv[base + 2 * c + h * hs..].as_ptr();
        let d_o = dout[bi * t * c + h * hs..].as_ptr();
        let d = dqkv_ptr;
        // SAFETY: as in the forward, each task writes only the (T, hs) blocks of its own
        // (batch, head) in dqkv, and its own (T, T) block of datt.
        unsafe {
            let dv = d.0.add(base + 2 * c + h * hs);
            // dv (T, hs) = att^T (T, T) @ dout (T, hs)
            gemm_strided(
                t,
                hs,
                t,
                dv,
                3 * c,
                1,
                false,
                a.as_ptr(),
                1,
                t,
                d_o,
                c,
                1,
                F::ONE,
                false,
            );
            // datt (T, T) = dout (T, hs) @ v^T (hs, T)
            gemm_strided(
                t,
                t,
                hs,
                da.as_mut_ptr(),
                t,
                1,
                false,
                d_o,
                c,
                1,
                v,
                1,
                3 * c,
                F::ONE,
                false,
            );
        }
        // Softmax backward, in place: dpre = att * (datt - sum(att * datt)) along each row.
        for t1 in 0..t {
            let (ar, dr) = (&a[t1 * t..(t1 + 1) * t], &mut da[t1 * t..(t1 + 1) * t]);
            let dot: F = ar[..=t1].iter().zip(&dr[..=t1]).map(|(&x, &y)| x * y).sum();
            for t2 in 0..=t1 {
                dr[t2] = ar[t2] * (dr[t2] - dot);
            }
            dr[t1 + 1..].fill(F::ZERO);
        }
        unsafe {
            let dq = d.0.add(base + h * hs);
            let dk = d.0.add(base + c + h * hs);
            // dq (T, hs) = scale * dpre (T, T) @ k (T, hs)
            gemm_strided(
                t,
                hs,
                t,
                dq,
                3 * c,
                1,
                false,
                da.as_ptr(),
                t,
                1,
                k,
                3 * c,
                1,
                scale,
                false,
            );
            // dk (T, hs) = scale * dpre^T (T, T) @ q (T, hs)
            gemm_strided(
                t,
                hs,
                t,
                dk,
                3 * c,
                1,
                false,
                da.as_ptr(),
                1,
                t,
                q,
                3 * c,
                1,
                scale,
                false,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation)

const GELU_SCALE: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

/// `out = gelu(inp)`, elementwise.
pub fn gelu_forward<F: Float>(out: &mut [F], inp: &[F]) {
    let s = F::from_f64(GELU_SCALE);
    let (half, k) = (F::from_f64(0.5), F::from_f64(0.044715));
    out.par_chunks_mut(4096)
        .zip(inp.par_chunks(4096))
        .for_each(|(o, x)| {
            for i in 0..o.len() {
                let v = x[i];
                o[i] = half * v * (F::ONE + (s * (v + k * v * v * v)).tanh_fast());
            }
        });
}

/// `d = d * gelu'(inp)` in place: `d` holds dL/d(gelu output) and leaves holding dL/d(inp).
pub fn gelu_backward_inplace<F: Float>(d: &mut [F], inp: &[F]) {
    let s = F::from_f64(GELU_SCALE);
    let (half, k, k3) = (
        F::from_f64(0.5),
        F::from_f64(0.044715),
        F::from_f64(3.0 * 0.044715),
    );
    d.par_chunks_mut(4096)
        .zip(inp.par_chunks(4096))
        .for_each(|(dd, x)| {
            for i in 0..dd.len() {
                let v = x[i];
                let th = (s * (v + k * v * v * v)).tanh_fast();
                let sech2 = F::ONE - th * th;
                let grad = half * (F::ONE + th) + half * v * sech2 * s * (F::ONE + k3 * v * v);
                dd[i] *= grad;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over the real vocabulary, vocabulary-parallel
//
// Each tensor-parallel rank holds the logits of its vocabulary slice, (rows, Vl) starting at
// vocabulary id `v0`; columns at or beyond the real vocabulary `v` are padding and never count.
// The softmax needs two sums over the whole vocabulary, which the caller forms between the
// steps: the maximum of each row (gathered from every rank), then the sum of exponentials and
// the target's logit (all-reduced). The full logits are never gathered.

/// The real columns of a slice of `vl` vocabulary ids starting at `v0`.
fn real_cols(v0: usize, vl: usize, v: usize) -> usize {
    v.saturating_sub(v0).min(vl)
}

/// Step 1: each row's largest real logit in this slice (`F::MIN` where the slice has none).
pub fn crossentropy_max<F: Float>(maxes: &mut [F], logits: &[F], v0: usize, v: usize) {
    let vl = logits.len() / maxes.len();
    let real = real_cols(v0, vl, v);
    maxes
        .par_iter_mut()
        .zip(logits.par_chunks(vl))
        .for_each(|(m, l)| *m = max_of(&l[..real]));
}

/// Step 2: replaces the real logits with `exp(logit - max)` (padding with zero), given each
/// row's maximum over the whole vocabulary, and writes this slice's part of each row's sum of
/// exponentials and of its target's logit minus the maximum (zero where the target is
/// elsewhere).
pub fn crossentropy_exp<F: Float>(
    sums: &mut [F],
    target_logits: &mut [F],
    logits: &mut [F],
    maxes: &[F],
    targets: &[u32],
    v0: usize,
    v: usize,
) {
    let rows = targets.len();
    let vl = logits.len() / rows;
    let real = real_cols(v0, vl, v);
    assert!(sums.len() == rows && target_logits.len() == rows && maxes.len() == rows);
    logits
        .par_chunks_mut(vl)
        .zip(sums.par_iter_mut().zip(target_logits.par_iter_mut()))
        .enumerate()
        .for_each(|(row, (l, (sum, tl)))| {
            let max = maxes[row];
            *tl = match (targets[row] as usize)
                .checked_sub(v0)
                .filter(|&i| i < real)
            {
                Some(i) => l[i] - max,
                None => F::ZERO,
            };
            *sum = exp_sum(&mut l[..real], max);
            l[real..].fill(F::ZERO);
        });
}

/// Step 3: given each row's sum of exponentials and target logit over the whole vocabulary,
/// writes each row's loss, `ln(sum) - (logit[target] - max)`, and `1 / sum`, which turns the
/// exponentials into probabilities. The exponentials stay as they are: backward scales them
/// in its own pass, so the (rows, Vl) logits are not read and written once more in between.
pub fn crossentropy_finish<F: Float>(
    losses: &mut [F],
    inv_sums: &mut [F],
    sums: &[F],
    target_logits: &[F],
) {
    assert!(inv_sums.len() == losses.len() && sums.len() == losses.len());
    for (row, (loss, inv)) in losses.iter_mut().zip(inv_sums.iter_mut()).enumerate() {
        *inv = F::ONE / sums[row];
        *loss = sums[row].ln() - target_logits[row];
    }
}

/// Turns the exponentials left by [`crossentropy_exp`] into `dL/dlogits` in place, where each
/// row's loss has weight `dloss`: `(exp * inv_sum - onehot(target)) * dloss`, the one-hot only
/// where the target is in this slice.
pub fn crossentropy_backward_inplace<F: Float>(
    exps: &mut [F],
    inv_sums: &[F],
    targets: &[u32],
    dloss: F,
    v0: usize,
) {
    let vl = exps.len() / targets.len();
    assert_eq!(inv_sums.len(), targets.len());
    exps.par_chunks_mut(vl).enumerate().for_each(|(row, p)| {
        let scale = inv_sums[row] * dloss;
        p.iter_mut().for_each(|x| *x *= scale);
        if let Some(i) = (targets[row] as usize).checked_sub(v0).filter(|&i| i < vl) {
            p[i] -= dloss;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// `dst += src`, elementwise.
#[inline]
pub fn add_into<F: Float>(dst: &mut [F], src: &[F]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `out (rows, C) += residual (rows, C) + bias (C)`: a row-parallel layer's summed output joins
/// the residual stream, with the bias added once after the sum.
pub fn residual_bias_add<F: Float>(out: &mut [F], residual: &[F], bias: &[F]) {
    let c = bias.len();
    assert_eq!(out.len(), residual.len());
    out.par_chunks_mut(c)
        .zip(residual.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(o, r)| {
            for i in 0..c {
                o[i] += r[i] + bias[i];
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dw += dout^T @ inp` in f64, one element at a time.
    fn dw_reference(dout: &[f32], inp: &[f32], rows: usize, ic: usize, oc: usize) -> Vec<f64> {
        let mut dw = vec![0f64; oc * ic];
        for r in 0..rows {
            for o in 0..oc {
                let g = dout[r * oc + o] as f64;
                for i in 0..ic {
                    dw[o * ic + i] += g * inp[r * ic + i] as f64;
                }
            }
        }
        dw
    }

    #[test]
    fn a_wide_weight_gradient_in_blocks_is_right_and_the_same_on_any_thread_count() {
        // Wide enough to be split by hand, with a last block shorter than the rest.
        let (rows, ic, oc) = (24, 8, DW_BLOCKS_MIN * DW_ROWS_PER_TASK + 40);
        let mut rng = crate::rng::Rng::new(7);
        let inp: Vec<f32> = (0..rows * ic).map(|_| rng.normal() as f32).collect();
        let dout: Vec<f32> = (0..rows * oc).map(|_| rng.normal() as f32).collect();
        let w = vec![0f32; oc * ic];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (mut dinp, mut dw) = (vec![0f32; rows * ic], vec![0f32; oc * ic]);
            pool.install(|| {
                matmul_backward(&mut dinp, &mut dw, None, &dout, &inp, &w, ic, oc, false)
            });
            dw
        };
        let (one, three) = (run(1), run(3));
        assert!(one
            .iter()
            .zip(&three)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let want = dw_reference(&dout, &inp, rows, ic, oc);
        let worst = one
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-4, "largest error {worst}");
    }
}
