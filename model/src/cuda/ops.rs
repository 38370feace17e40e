//! One function per CPU kernel of [`crate::kernels`], running on the GPU's training stream.
//! Parameters and activations are bf16 ([`Bf16`]), the residual stream, LayerNorm statistics,
//! gradients and optimizer state fp32. Shapes are checked as the CPU kernels check them.

use half::bf16 as Bf16;

use super::blas::{Gelu, Gemm, Out};
use super::{args, Gpu, Result, Slice};

const THREADS: u32 = 256;

/// The head width the fused attention kernels take.
pub const FLASH_HEAD: usize = 64;

type B<'a> = Slice<'a, Bf16>;
type F<'a> = Slice<'a, f32>;

impl Gpu {
    fn elementwise(&self, name: &str, n: usize, args: &mut [*mut std::ffi::c_void]) -> Result<()> {
        let grid = (self.blocks(n, THREADS), 1, 1);
        // SAFETY: every caller passes its kernel's parameters in order, from live slices whose
        // lengths it has checked.
        unsafe { self.launch(name, grid, (THREADS, 1, 1), args) }
    }

    /// One warp per row, eight rows per block.
    fn per_row(&self, name: &str, rows: usize, args: &mut [*mut std::ffi::c_void]) -> Result<()> {
        let grid = (rows.div_ceil(8) as u32, 1, 1);
        // SAFETY: as `elementwise`.
        unsafe { self.launch(name, grid, (THREADS, 1, 1), args) }
    }

    /// Column sums over rows: 32 columns by 256 rows per block.
    fn columns(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        let grid = (cols.div_ceil(32) as u32, rows.div_ceil(256) as u32, 1);
        // SAFETY: as `elementwise`.
        unsafe { self.launch(name, grid, (32, 8, 1), args) }
    }

    /// `out = bf16(inp)`.
    pub fn cast_to_bf16(&self, out: B, inp: F) -> Result<()> {
        assert_eq!(out.len(), inp.len());
        let (o, i, n) = (out.ptr(), inp.ptr(), inp.len() as i64);
        self.elementwise("cast_f32_bf16", inp.len(), args![o, i, n])
    }

    /// `out = f32(inp)`.
    pub fn cast_to_f32(&self, out: F, inp: B) -> Result<()> {
        assert_eq!(out.len(), inp.len());
        let (o, i, n) = (out.ptr(), inp.ptr(), inp.len() as i64);
        self.elementwise("cast_bf16_f32", inp.len(), args![o, i, n])
    }

    /// [`crate::kernels::residual_bias_add`].
    pub fn residual_bias_add(&self, out: F, residual: F, bias: B) -> Result<()> {
        let c = bias.len();
        assert!(out.len() == residual.len() && out.len() % c == 0);
        let (o, r, b) = (out.ptr(), residual.ptr(), bias.ptr());
        let (rows, c32) = ((out.len() / c) as i64, c as i32);
        self.elementwise("residual_bias_add", out.len(), args![o, r, b, rows, c32])
    }

    /// [`crate::kernels::embedding_forward`] for the vocabulary slice `wte` (ids from `v0`)
    /// followed, given `wpe`, by [`crate::kernels::position_forward`]. A tensor-parallel rank
    /// passes no `wpe`: the slices' sum over ranks comes first, then [`Gpu::position_forward`].
    pub fn embedding_forward(
        &self,
        out: F,
        tokens: Slice<u32>,
        wte: B,
        wpe: Option<B>,
        t: usize,
        v0: usize,
    ) -> Result<()> {
        let bt = tokens.len();
        let c = out.len() / bt;
        assert!(out.len() == bt * c && wte.len() % c == 0);
        assert!(wpe.is_none_or(|w| w.len() >= t * c));
        let (o, tk, we, wp) = (
            out.ptr(),
            tokens.ptr(),
            wte.ptr(),
            wpe.map_or(0, |w| w.ptr()),
        );
        let (bt64, t32, c32, v032, vl32) = (
            bt as i64,
            t as i32,
            c as i32,
            v0 as i32,
            (wte.len() / c) as i32,
        );
        self.elementwise(
            "embedding_forward",
            out.len(),
            args![o, tk, we, wp, bt64, t32, c32, v032, vl32],
        )
    }

    /// [`crate::kernels::position_forward`]: `out[b, t] += wpe[t]`.
    pub fn position_forward(&self, out: F, wpe: B, t: usize) -> Result<()> {
        let c = wpe.len() / t.max(1);
        assert!(c > 0 && out.len() % (t * c) == 0 && wpe.len() >= t * c);
        let (o, wp) = (out.ptr(), wpe.ptr());
        let (bt64, t32, c32) = ((out.len() / c) as i64, t as i32, c as i32);
        self.elementwise("position_forward", out.len(), args![o, wp, bt64, t32, c32])
    }

    /// [`crate::kernels::embedding_backward`] and [`crate::kernels::position_backward`]:
    /// `dwte[token - v0] += dout`, `dwpe[t] += dout` summed over the batch.
    pub fn embedding_backward(
        &self,
        dwte: F,
        dwpe: F,
        dout: F,
        tokens: Slice<u32>,
        t: usize,
        v0: usize,
    ) -> Result<()> {
        let bt = tokens.len();
        let c = dout.len() / bt;
        assert!(dout.len() == bt * c && dwpe.len() >= t * c && dwte.len() % c == 0);
        let (dw, d, tk) = (dwte.ptr(), dout.ptr(), tokens.ptr());
        let (bt64, c32, v032, vl32) = (bt as i64, c as i32, v0 as i32, (dwte.len() / c) as i32);
        self.elementwise(
            "embedding_backward",
            dout.len(),
            args![dw, d, tk, bt64, c32, v032, vl32],
        )?;
        let dp = dwpe.ptr();
        let (b32, t32) = ((bt / t) as i32, t as i32);
        self.elementwise("position_backward", t * c, args![dp, d, b32, t32, c32])
    }

    /// [`crate::kernels::layernorm_forward`], reading the fp32 residual stream.
    pub fn layernorm_forward(&self, out: B, mean: F, rstd: F, inp: F, w: B, b: B) -> Result<()> {
        let c = w.len();
        let rows = inp.len() / c;
        assert!(inp.len() == rows * c && out.len() == inp.len() && b.len() == c);
        assert!(mean.len() == rows && rstd.len() == rows);
        let (o, m, r, i, wp, bp) = (
            out.ptr(),
            mean.ptr(),
            rstd.ptr(),
            inp.ptr(),
            w.ptr(),
            b.ptr(),
        );
        let (rows64, c32) = (rows as i64, c as i32);
        self.per_row(
            "layernorm_forward",
            rows,
            args![o, m, r, i, wp, bp, rows64, c32],
        )
    }

    /// [`crate::kernels::layernorm_backward`]: `dinp += dL/dinp` (fp32), `dw`, `db` += their
    /// gradients (fp32).
    pub fn layernorm_backward(
        &self,
        dinp: F,
        dw: F,
        db: F,
        dout: B,
        inp: F,
        mean: F,
        rstd: F,
        w: B,
    ) -> Result<()> {
        let c = w.len();
        let rows = inp.len() / c;
        assert!(inp.len() == rows * c && dinp.len() == inp.len() && dout.len() == inp.len());
        assert!(mean.len() == rows && rstd.len() == rows && dw.len() == c && db.len() == c);
        let (di, d, i, m, r, wp) = (
            dinp.ptr(),
            dout.ptr(),
            inp.ptr(),
            mean.ptr(),
            rstd.ptr(),
            w.ptr(),
        );
        let (rows64, c32) = (rows as i64, c as i32);
        self.per_row(
            "layernorm_backward",
            rows,
            args![di, d, i, m, r, wp, rows64, c32],
        )?;
        let (dwp, dbp) = (dw.ptr(), db.ptr());
        self.columns(
            "layernorm_param_backward",
            rows,
            c,
            args![dwp, dbp, d, i, m, r, rows64, c32],
        )
    }

    /// [`crate::kernels::matmul_forward`]: `out (rows, OC) = inp (rows, IC) @ w (OC, IC)^T
    /// [+ bias]`, into a bf16 or fp32 `out`.
    pub fn matmul_forward(
        &mut self,
        out: Slice<u8>,
        out_type: Out,
        inp: B,
        w: B,
        bias: Option<B>,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let rows = inp.len() / ic;
        let size = match out_type {
            Out::Bf16 => 2,
            Out::F32 => 4,
        };
        assert!(inp.len() == rows * ic && w.len() == oc * ic && out.len() == rows * oc * size);
        assert!(bias.is_none_or(|b| b.len() == oc));
        let g = Gemm::linear(rows, ic, oc, out_type, bias.is_some());
        // SAFETY: shapes checked above; all pointers come from live slices.
        unsafe {
            self.gemm(
                g,
                1.0,
                inp.ptr(),
                w.ptr(),
                0.0,
                out.ptr(),
                bias.map_or(0, |b| b.ptr()),
            )
        }
    }

    /// [`crate::kernels::matmul_backward`]: `dinp (rows, IC) = dout @ w` (bf16, overwritten)
    /// and `dw (OC, IC) += dout^T @ inp` (fp32). The bias gradient is [`Gpu::bias_backward`].
    pub fn matmul_backward(
        &mut self,
        dinp: B,
        dw: F,
        dout: B,
        inp: B,
        w: B,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let rows = inp.len() / ic;
        assert!(inp.len() == rows * ic && dinp.len() == inp.len() && dout.len() == rows * oc);
        assert!(w.len() == oc * ic && dw.len() == oc * ic);
        let g_in = Gemm::input_grad(rows, ic, oc, Gelu::None);
        // SAFETY: shapes checked above; all pointers come from live slices.
        unsafe { self.gemm(g_in, 1.0, dout.ptr(), w.ptr(), 0.0, dinp.ptr(), 0)? };
        self.weight_grad(dw, dout, inp, ic, oc)
    }

    /// `dw (OC, IC) += dout^T @ inp`, accumulated in fp32.
    fn weight_grad(&mut self, dw: F, dout: B, inp: B, ic: usize, oc: usize) -> Result<()> {
        let rows = inp.len() / ic;
        assert!(inp.len() == rows * ic && dout.len() == rows * oc && dw.len() == oc * ic);
        let g_w = Gemm::weight_grad(rows, ic, oc);
        // SAFETY: shapes checked above; all pointers come from live slices.
        unsafe { self.gemm(g_w, 1.0, dout.ptr(), inp.ptr(), 1.0, dw.ptr(), 0) }
    }

    /// [`Gpu::matmul_forward`] with a bias, then [`Gpu::gelu_forward`]: `pre (rows, OC)` gets
    /// the product plus bias and `out` its GELU, in one product through cuBLASLt's GELU
    /// epilogue where the library offers it for these types, else in two passes.
    pub fn matmul_forward_gelu(
        &mut self,
        out: B,
        pre: B,
        inp: B,
        w: B,
        bias: B,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        assert!(out.len() == pre.len());
        if self.fused_gelu != Some(false) {
            let rows = inp.len() / ic;
            assert!(inp.len() == rows * ic && w.len() == oc * ic && pre.len() == rows * oc);
            assert!(bias.len() == oc);
            let mut g = Gemm::linear(rows, ic, oc, Out::Bf16, true);
            g.gelu = Gelu::Forward;
            // SAFETY: shapes checked above; all pointers come from live slices.
            let fused = unsafe {
                self.gemm_aux(
                    g,
                    1.0,
                    inp.ptr(),
                    w.ptr(),
                    0.0,
                    out.ptr(),
                    bias.ptr(),
                    pre.ptr(),
                )
            };
            match fused {
                Ok(()) => {
                    self.fused_gelu = Some(true);
                    return Ok(());
                }
                Err(super::CudaError::Blas { .. }) => self.fused_gelu = Some(false),
                Err(e) => return Err(e),
            }
        }
        self.matmul_forward(super::bytes(pre), Out::Bf16, inp, w, Some(bias), ic, oc)?;
        self.gelu_forward(out, pre)
    }

    /// [`Gpu::matmul_backward`] into a GELU's output gradient, then [`Gpu::gelu_backward`]:
    /// `dinp` gets `(dout @ w) * gelu'(pre)`, fused into the product's epilogue where the
    /// library offers it, and `dw += dout^T @ inp` as usual.
    pub fn matmul_backward_gelu(
        &mut self,
        dinp: B,
        dw: F,
        dout: B,
        inp: B,
        w: B,
        pre: B,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        assert_eq!(pre.len(), inp.len());
        if self.fused_gelu != Some(false) {
            let rows = inp.len() / ic;
            assert!(dinp.len() == inp.len() && dout.len() == rows * oc && w.len() == oc * ic);
            let g_in = Gemm::input_grad(rows, ic, oc, Gelu::Backward);
            // SAFETY: shapes checked above; all pointers come from live slices.
            let fused = unsafe {
                self.gemm_aux(
                    g_in,
                    1.0,
                    dout.ptr(),
                    w.ptr(),
                    0.0,
                    dinp.ptr(),
                    0,
                    pre.ptr(),
                )
            };
            match fused {
                Ok(()) => {
                    self.fused_gelu = Some(true);
                    return self.weight_grad(dw, dout, inp, ic, oc);
                }
                Err(super::CudaError::Blas { .. }) => self.fused_gelu = Some(false),
                Err(e) => return Err(e),
            }
        }
        self.matmul_backward(dinp, dw, dout, inp, w, ic, oc)?;
        self.gelu_backward(dinp, pre)
    }

    /// Whether GELU runs in cuBLASLt's epilogues on this device (`None` until first tried).
    pub fn gelu_fused(&self) -> Option<bool> {
        self.fused_gelu
    }

    /// `dbias (OC) += sum over rows of dout (rows, OC)`.
    pub fn bias_backward(&self, dbias: F, dout: B) -> Result<()> {
        let oc = dbias.len();
        let rows = dout.len() / oc;
        assert_eq!(dout.len(), rows * oc);
        assert!(oc % 2 == 0, "bias gradients are summed in pairs of columns");
        let (db, d, rows64, oc32) = (dbias.ptr(), dout.ptr(), rows as i64, oc as i32);
        // 64 columns a block: the kernel sums a pair of columns per thread.
        self.columns(
            "bias_backward",
            rows,
            oc.div_ceil(2),
            args![db, d, rows64, oc32],
        )
    }

    /// [`crate::kernels::gelu_forward`].
    pub fn gelu_forward(&self, out: B, inp: B) -> Result<()> {
        assert!(out.len() == inp.len() && inp.len() % 2 == 0);
        let (o, i, n) = (out.ptr(), inp.ptr(), inp.len() as i64);
        self.elementwise("gelu_forward", inp.len() / 2, args![o, i, n])
    }

    /// [`crate::kernels::gelu_backward_inplace`].
    pub fn gelu_backward(&self, d: B, inp: B) -> Result<()> {
        assert!(d.len() == inp.len() && inp.len() % 2 == 0);
        let (dp, i, n) = (d.ptr(), inp.ptr(), inp.len() as i64);
        self.elementwise("gelu_backward", inp.len() / 2, args![dp, i, n])
    }

    /// [`crate::kernels::attention_forward`]: `out (B, T, C)` and the probabilities
    /// `att (B, NH, T, T)` from `qkv (B, T, 3C)`. `q`, `k`, `v` and `y` are (B, NH, T, hs)
    /// scratch.
    pub fn attention_forward(
        &mut self,
        out: B,
        att: B,
        qkv: B,
        scratch: [B; 4],
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let c = out.len() / (b * t);
        let hs = c / nh;
        assert!(
            out.len() == b * t * c && qkv.len() == 3 * out.len() && att.len() == b * nh * t * t
        );
        let [q, k, v, y] = scratch;
        assert!(scratch.iter().all(|s| s.len() == out.len()));
        let (qp, kp, vp, src) = (q.ptr(), k.ptr(), v.ptr(), qkv.ptr());
        let (b32, t32, nh32, hs32) = (b as i32, t as i32, nh as i32, hs as i32);
        self.elementwise(
            "attention_split",
            out.len(),
            args![qp, kp, vp, src, b32, t32, nh32, hs32],
        )?;
        let bh = b * nh;
        let scale = 1.0 / (hs as f32).sqrt();
        let scores = Gemm {
            ta: false,
            tb: true,
            r: t,
            c: t,
            k: hs,
            lda: hs,
            ldb: hs,
            ldc: t,
            out: Out::Bf16,
            bias: false,
            gelu: Gelu::None,
            batch: Some((bh, t * hs, t * hs, t * t)),
        };
        let mix = Gemm {
            ta: false,
            tb: false,
            r: t,
            c: hs,
            k: t,
            lda: t,
            ldb: hs,
            ldc: hs,
            out: Out::Bf16,
            bias: false,
            gelu: Gelu::None,
            batch: Some((bh, t * t, t * hs, t * hs)),
        };
        // SAFETY: shapes checked above; all pointers come from live slices.
        unsafe { self.gemm(scores, scale, qp, kp, 0.0, att.ptr(), 0)? };
        let (ap, rows, t32) = (att.ptr(), (bh * t) as i64, t as i32);
        self.per_row("softmax_causal_forward", bh * t, args![ap, rows, t32])?;
        // SAFETY: as above.
        unsafe { self.gemm(mix, 1.0, ap, vp, 0.0, y.ptr(), 0)? };
        let (op, yp) = (out.ptr(), y.ptr());
        self.elementwise(
            "attention_merge",
            out.len(),
            args![op, yp, b32, t32, nh32, hs32],
        )
    }

    /// [`crate::kernels::attention_backward`]: overwrites `dqkv (B, T, 3C)` from
    /// `dout (B, T, C)`. `datt (B, NH, T, T)` and eight (B, NH, T, hs) buffers are scratch.
    pub fn attention_backward(
        &mut self,
        dqkv: B,
        datt: B,
        dout: B,
        qkv: B,
        att: B,
        scratch: [B; 8],
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let c = dout.len() / (b * t);
        let hs = c / nh;
        assert!(dout.len() == b * t * c && qkv.len() == 3 * dout.len() && dqkv.len() == qkv.len());
        assert!(att.len() == b * nh * t * t && datt.len() == att.len());
        assert!(scratch.iter().all(|s| s.len() == dout.len()));
        let [q, k, v, dy, dq, dk, dv, _] = scratch;
        let (qp, kp, vp, src) = (q.ptr(), k.ptr(), v.ptr(), qkv.ptr());
        let (b32, t32, nh32, hs32) = (b as i32, t as i32, nh as i32, hs as i32);
        self.elementwise(
            "attention_split",
            dout.len(),
            args![qp, kp, vp, src, b32, t32, nh32, hs32],
        )?;
        let (dyp, dp) = (dy.ptr(), dout.ptr());
        self.elementwise(
            "attention_unmerge",
            dout.len(),
            args![dyp, dp, b32, t32, nh32, hs32],
        )?;
        let bh = b * nh;
        let (tt, ths) = (t * t, t * hs);
        let g = |ta, tb, r, cc, k, lda, ldb, ldc, sa, sb, sc| Gemm {
            ta,
            tb,
            r,
            c: cc,
            k,
            lda,
            ldb,
            ldc,
            out: Out::Bf16,
            bias: false,
            gelu: Gelu::None,
            batch: Some((bh, sa, sb, sc)),
        };
        let (ap, dap) = (att.ptr(), datt.ptr());
        // SAFETY: shapes checked above; all pointers come from live slices.
        unsafe {
            // datt (T, T) = dy (T, hs) @ v^T
            self.gemm(
                g(false, true, t, t, hs, hs, hs, t, ths, ths, tt),
                1.0,
                dyp,
                vp,
                0.0,
                dap,
                0,
            )?;
            // dv (T, hs) = att^T (T, T) @ dy
            self.gemm(
                g(true, false, t, hs, t, t, hs, hs, tt, ths, ths),
                1.0,
                ap,
                dyp,
                0.0,
                dv.ptr(),
                0,
            )?;
        }
        let scale = 1.0 / (hs as f32).sqrt();
        let (rows, t32b) = ((bh * t) as i64, t as i32);
        self.per_row(
            "softmax_causal_backward",
            bh * t,
            args![dap, ap, rows, t32b, scale],
        )?;
        // SAFETY: as above.
        unsafe {
            // dq (T, hs) = dscores (T, T) @ k
            self.gemm(
                g(false, false, t, hs, t, t, hs, hs, tt, ths, ths),
                1.0,
                dap,
                kp,
                0.0,
                dq.ptr(),
                0,
            )?;
            // dk (T, hs) = dscores^T @ q
            self.gemm(
                g(true, false, t, hs, t, t, hs, hs, tt, ths, ths),
                1.0,
                dap,
                qp,
                0.0,
                dk.ptr(),
                0,
            )?;
        }
        let (dqkvp, dqp, dkp, dvp) = (dqkv.ptr(), dq.ptr(), dk.ptr(), dv.ptr());
        self.elementwise(
            "attention_join",
            dout.len(),
            args![dqkvp, dqp, dkp, dvp, b32, t32, nh32, hs32],
        )
    }

    /// [`crate::kernels::attention_forward`] fused (heads of 64): `out (B, T, C)` from
    /// `qkv (B, T, 3C)` without forming the T x T probabilities; `lse (B, NH, T)` keeps what
    /// backward needs to form them again.
    pub fn flash_attention_forward(
        &self,
        out: B,
        lse: F,
        qkv: B,
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let c = out.len() / (b * t);
        assert!(
            c == nh * FLASH_HEAD,
            "fused attention takes heads of {FLASH_HEAD}"
        );
        assert!(out.len() == b * t * c && qkv.len() == 3 * out.len() && lse.len() == b * nh * t);
        let (o, l, q) = (out.ptr(), lse.ptr(), qkv.ptr());
        let (t32, nh32) = (t as i32, nh as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (FLASH_HEAD as f32).sqrt();
        // SAFETY: one block per 64 rows of one (batch, head); shapes checked above.
        unsafe {
            self.launch(
                "flash_forward",
                (t.div_ceil(64) as u32, (b * nh) as u32, 1),
                (128, 1, 1),
                args![o, l, q, t32, nh32, scale_log2],
            )
        }
    }

    /// [`crate::kernels::attention_backward`] fused (heads of 64): overwrites `dqkv` from
    /// `dout`, the forward's `out` and `lse`. `dd (B, NH, T)` is scratch.
    pub fn flash_attention_backward(
        &self,
        dqkv: B,
        dd: F,
        dout: B,
        out: B,
        qkv: B,
        lse: F,
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let c = out.len() / (b * t);
        assert!(
            c == nh * FLASH_HEAD,
            "fused attention takes heads of {FLASH_HEAD}"
        );
        assert!(dout.len() == out.len() && qkv.len() == 3 * out.len() && dqkv.len() == qkv.len());
        assert!(lse.len() == b * nh * t && dd.len() == lse.len());
        let (dp, d, o) = (dd.ptr(), dout.ptr(), out.ptr());
        let (b32, t32, nh32) = (b as i32, t as i32, nh as i32);
        self.per_row(
            "flash_backward_dot",
            b * nh * t,
            args![dp, d, o, b32, t32, nh32],
        )?;
        let (dq, q, l) = (dqkv.ptr(), qkv.ptr(), lse.ptr());
        let scale = 1.0 / (FLASH_HEAD as f32).sqrt();
        let scale_log2 = std::f32::consts::LOG2_E * scale;
        let grid = (t.div_ceil(64) as u32, (b * nh) as u32, 1);
        // SAFETY: one block per 64 keys (then queries) of one (batch, head); the two kernels
        // write disjoint parts of dqkv.
        unsafe {
            self.launch(
                "flash_backward_kv",
                grid,
                (128, 1, 1),
                args![dq, q, d, l, dp, t32, nh32, scale_log2, scale],
            )?;
            self.launch(
                "flash_backward_q",
                grid,
                (128, 1, 1),
                args![dq, q, d, l, dp, t32, nh32, scale_log2, scale],
            )
        }
    }

    /// The cross-entropy of [`crate::kernels::crossentropy_max`] through
    /// [`crate::kernels::crossentropy_backward_inplace`] in one pass per row, for one rank
    /// holding the whole vocabulary: adds each row's loss into `losses` and, when `dloss > 0`,
    /// leaves `logits` holding `dL/dlogits` weighted by `dloss`.
    pub fn crossentropy(
        &self,
        losses: F,
        logits: B,
        targets: Slice<u32>,
        v: usize,
        dloss: f32,
    ) -> Result<()> {
        let rows = targets.len();
        let vl = logits.len() / rows;
        assert!(logits.len() == rows * vl && losses.len() == rows && v <= vl);
        assert!(vl % 2 == 0, "the cross-entropy reads logits in pairs");
        let (l, lg, tg) = (losses.ptr(), logits.ptr(), targets.ptr());
        let (vl32, v032, v32) = (vl as i32, 0i32, v as i32);
        // SAFETY: one block per row; the shapes are checked above.
        unsafe {
            self.launch(
                "crossentropy",
                (rows as u32, 1, 1),
                (1024, 1, 1),
                args![l, lg, tg, vl32, v032, v32, dloss],
            )
        }
    }

    /// The first half of the vocabulary-parallel cross-entropy
    /// ([`crate::kernels::crossentropy_max`] and [`crate::kernels::crossentropy_exp`] in one
    /// pass): this rank's statistics of each row of its `logits` slice (ids from `v0`) into
    /// `stats (3, rows)`: the maximum, the sum of exp(x - max) and the target's logit (zero when
    /// another rank holds the target). The group all-gathers them for
    /// [`Gpu::crossentropy_finish`].
    pub fn crossentropy_partial(
        &self,
        stats: F,
        logits: B,
        targets: Slice<u32>,
        v0: usize,
        v: usize,
    ) -> Result<()> {
        let rows = targets.len();
        let vl = logits.len() / rows;
        assert!(logits.len() == rows * vl && stats.len() == 3 * rows);
        let (st, lg, tg) = (stats.ptr(), logits.ptr(), targets.ptr());
        let (rows64, vl32, v032, v32) = (rows as i64, vl as i32, v0 as i32, v as i32);
        // SAFETY: one block per row; the shapes are checked above.
        unsafe {
            self.launch(
                "crossentropy_partial",
                (rows as u32, 1, 1),
                (1024, 1, 1),
                args![st, lg, tg, rows64, vl32, v032, v32],
            )
        }
    }

    /// The second half: merges every rank's statistics `all (tp, 3, rows)` in rank order, adds
    /// each row's loss into `losses` and, when `dloss > 0`, leaves this rank's `logits` slice
    /// holding `dL/dlogits` weighted by `dloss` ([`crate::kernels::crossentropy_finish`] and
    /// [`crate::kernels::crossentropy_backward_inplace`]).
    pub fn crossentropy_finish(
        &self,
        losses: F,
        logits: B,
        all: F,
        targets: Slice<u32>,
        v0: usize,
        v: usize,
        dloss: f32,
    ) -> Result<()> {
        let rows = targets.len();
        let vl = logits.len() / rows;
        let tp = all.len() / (3 * rows);
        assert!(logits.len() == rows * vl && losses.len() == rows && all.len() == tp * 3 * rows);
        assert!(tp * vl >= v, "the slices do not cover the vocabulary");
        let (l, lg, a, tg) = (losses.ptr(), logits.ptr(), all.ptr(), targets.ptr());
        let (rows64, tp32, vl32, v032, v32) =
            (rows as i64, tp as i32, vl as i32, v0 as i32, v as i32);
        // SAFETY: one block per row; the shapes are checked above.
        unsafe {
            self.launch(
                "crossentropy_finish",
                (rows as u32, 1, 1),
                (256, 1, 1),
                args![l, lg, a, tg, rows64, tp32, vl32, v032, v32, dloss],
            )
        }
    }

    /// Writes the sum of the squares (fp64) of the elements of `x` inside `ranges`, a device
    /// list of (start, end) pairs, into `out[0]`, through `partials` (one per block, in a fixed
    /// order, so the sum is the same every time).
    pub fn sum_squares(
        &self,
        out: Slice<f64>,
        partials: Slice<f64>,
        x: F,
        ranges: Slice<i64>,
    ) -> Result<()> {
        let parts = partials.len() as u32;
        let (pp, xp, rp, nr) = (
            partials.ptr(),
            x.ptr(),
            ranges.ptr(),
            (ranges.len() / 2) as i32,
        );
        // SAFETY: `parts` blocks each write their own partial; the ranges lie inside `x` (the
        // caller builds them from its layout); the second launch reads the partials.
        unsafe {
            self.launch(
                "sum_squares_partial",
                (parts, 1, 1),
                (THREADS, 1, 1),
                args![pp, xp, rp, nr],
            )?;
            let (op, parts32) = (out.ptr(), parts as i32);
            self.launch(
                "sum_squares_finish",
                (1, 1, 1),
                (32, 1, 1),
                args![op, pp, parts32],
            )
        }
    }

    /// [`crate::AdamW::update`] after [`crate::optim::clip_grads`], with fp32 master weights:
    /// the gradient norm is read on the device from `norm_sq`, so no copy to the host stands
    /// between backward and the update.
    pub fn adamw(
        &self,
        master: F,
        params: B,
        grads: F,
        m: F,
        v: F,
        decay: Slice<u8>,
        h: &AdamWStep,
        norm_sq: Slice<f64>,
    ) -> Result<()> {
        let n = master.len();
        assert!(params.len() == n && grads.len() == n && m.len() == n && v.len() == n);
        assert!(decay.len() == n && !norm_sq.is_empty());
        let (mp, pp, gp, mm, vp, dp) = (
            master.ptr(),
            params.ptr(),
            grads.ptr(),
            m.ptr(),
            v.ptr(),
            decay.ptr(),
        );
        let n64 = n as i64;
        let AdamWStep {
            lr,
            b1,
            b2,
            one_b1,
            one_b2,
            inv_bc1,
            inv_bc2,
            eps,
            wd,
            max_norm,
        } = *h;
        let np = norm_sq.ptr();
        self.elementwise(
            "adamw",
            n,
            args![
                mp, pp, gp, mm, vp, dp, n64, lr, b1, b2, one_b1, one_b2, inv_bc1, inv_bc2, eps, wd,
                np, max_norm
            ],
        )
    }
}

/// One AdamW update's constants, in fp32 as the CPU optimizer computes them
/// ([`AdamWStep::new`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub one_b1: f32,
    pub one_b2: f32,
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub wd: f32,
    /// Gradients are clipped to this global norm.
    pub max_norm: f64,
}

impl AdamWStep {
    /// The constants of update number `step` (1-based), as [`crate::AdamW::update`] forms them.
    pub fn new(c: &crate::AdamWConfig, step: u64, lr: f64, max_norm: f64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        AdamWStep {
            lr: lr as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            one_b1: (1.0 - c.beta1) as f32,
            one_b2: (1.0 - c.beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
            wd: c.weight_decay as f32,
            max_norm,
        }
    }
}
