//! Matrix products through cuBLASLt: bf16 operands, fp32 accumulation, a bf16 or fp32 result,
//! optionally a bias added in the epilogue and a batch of equally strided products.
//!
//! Callers speak row-major, as the CPU kernels do: `C (r, c) = op(A) (r, k) @ op(B) (k, c)`.
//! cuBLASLt is column-major, and a row-major matrix read column-major is its transpose, so the
//! product is run as `C^T = op(B)^T @ op(A)^T` with the operands swapped. Each distinct shape
//! gets its descriptors and the heuristic's algorithm once, cached.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys as lts;
use cudarc::driver::sys::CUstream;

use super::{CudaError, DeviceBuffer, Gpu, Result};

/// cuBLASLt's workspace: enough for its split-k and stream-k algorithms.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The element type of a product's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Out {
    Bf16,
    F32,
}

/// GELU fused into a product's epilogue, with the pre-activation in an auxiliary buffer of the
/// result's shape and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Gelu {
    #[default]
    None,
    /// `c = gelu(op(a) @ op(b) + bias)`, the pre-activation written to the auxiliary buffer.
    Forward,
    /// `c = (op(a) @ op(b)) * gelu'(aux)`: the input gradient of a GELU whose pre-activation is
    /// the auxiliary buffer.
    Backward,
}

/// One product's shape, row-major. `lda`, `ldb` and `ldc` are row strides in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub r: usize,
    pub c: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub out: Out,
    /// A bias of `c` bf16 values added to every row of the result.
    pub bias: bool,
    /// GELU in the epilogue.
    pub gelu: Gelu,
    /// `(count, stride of A, stride of B, stride of C)` in elements, for a batch of products.
    pub batch: Option<(usize, usize, usize, usize)>,
}

impl Gemm {
    /// `out (rows, oc) = inp (rows, ic) @ w (oc, ic)^T`: a linear layer's forward.
    pub fn linear(rows: usize, ic: usize, oc: usize, out: Out, bias: bool) -> Self {
        Gemm {
            ta: false,
            tb: true,
            r: rows,
            c: oc,
            k: ic,
            lda: ic,
            ldb: ic,
            ldc: oc,
            out,
            bias,
            gelu: Gelu::None,
            batch: None,
        }
    }

    /// `dinp (rows, ic) = dout (rows, oc) @ w (oc, ic)`, bf16, with `gelu` in the epilogue: a
    /// linear layer's input gradient.
    pub fn input_grad(rows: usize, ic: usize, oc: usize, gelu: Gelu) -> Self {
        Gemm {
            ta: false,
            tb: false,
            r: rows,
            c: ic,
            k: oc,
            lda: oc,
            ldb: ic,
            ldc: ic,
            out: Out::Bf16,
            bias: false,
            gelu,
            batch: None,
        }
    }

    /// `dw (oc, ic) += dout^T (oc, rows) @ inp (rows, ic)`, fp32: a linear layer's weight
    /// gradient.
    pub fn weight_grad(rows: usize, ic: usize, oc: usize) -> Self {
        Gemm {
            ta: true,
            tb: false,
            r: oc,
            c: ic,
            k: rows,
            lda: oc,
            ldb: ic,
            ldc: ic,
            out: Out::F32,
            bias: false,
            gelu: Gelu::None,
            batch: None,
        }
    }
}

struct Plan {
    desc: lts::cublasLtMatmulDesc_t,
    a: lts::cublasLtMatrixLayout_t,
    b: lts::cublasLtMatrixLayout_t,
    d: lts::cublasLtMatrixLayout_t,
    algo: lts::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle, its workspace and the plans of the shapes seen so far.
pub struct Blas {
    handle: lts::cublasLtHandle_t,
    workspace: Option<DeviceBuffer<u8>>,
    plans: HashMap<Gemm, Plan>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blas({} plans)", self.plans.len())
    }
}

fn blas<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> CudaError {
    move |e| CudaError::Blas {
        what: what.into(),
        error: format!("{e:?}"),
    }
}

fn dtype(out: Out) -> lts::cudaDataType {
    match out {
        Out::Bf16 => lts::cudaDataType::CUDA_R_16BF,
        Out::F32 => lts::cudaDataType::CUDA_R_32F,
    }
}

/// A column-major layout of `rows x cols` with leading dimension `ld`, batched like `g`.
fn layout(
    ty: lts::cudaDataType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: Option<(usize, usize)>,
) -> Result<lts::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
        .map_err(blas("creating a matrix layout"))?;
    if let Some((count, stride)) = batch {
        let (count, stride) = (count as i32, stride as i64);
        // SAFETY: `l` is alive; each attribute gets a value of its documented type.
        unsafe {
            lt::set_matrix_layout_attribute(
                l,
                lts::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                std::ptr::addr_of!(count).cast(),
                4,
            )
            .map_err(blas("setting the batch count"))?;
            lt::set_matrix_layout_attribute(
                l,
                lts::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                std::ptr::addr_of!(stride).cast(),
                8,
            )
            .map_err(blas("setting the batch stride"))?;
        }
    }
    Ok(l)
}

impl Blas {
    pub(crate) fn new() -> Result<Self> {
        let handle = lt::create_handle().map_err(blas("creating the handle"))?;
        Ok(Blas {
            handle,
            workspace: None,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, g: Gemm) -> Result<&Plan> {
        if !self.plans.contains_key(&g) {
            let plan = self.make_plan(g)?;
            self.plans.insert(g, plan);
        }
        Ok(&self.plans[&g])
    }

    fn make_plan(&self, g: Gemm) -> Result<Plan> {
        use lts::cublasLtMatmulDescAttributes_t as D;
        let bf = lts::cudaDataType::CUDA_R_16BF;
        let desc = lt::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType::CUDA_R_32F,
        )
        .map_err(blas("creating a matmul descriptor"))?;
        // Column-major: the first operand is B, the second A (see the module doc).
        let (op_first, op_second): (i32, i32) = (g.tb as i32, g.ta as i32);
        // SAFETY: `desc` is alive; each attribute gets a value of its documented type.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_TRANSA,
                std::ptr::addr_of!(op_first).cast(),
                4,
            )
            .map_err(blas("setting transa"))?;
            lt::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_TRANSB,
                std::ptr::addr_of!(op_second).cast(),
                4,
            )
            .map_err(blas("setting transb"))?;
            use lts::cublasLtEpilogue_t as E;
            let epi = match (g.bias, g.gelu) {
                (true, Gelu::None) => Some(E::CUBLASLT_EPILOGUE_BIAS),
                (true, Gelu::Forward) => Some(E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS),
                (false, Gelu::Forward) => Some(E::CUBLASLT_EPILOGUE_GELU_AUX),
                (false, Gelu::Backward) => Some(E::CUBLASLT_EPILOGUE_DGELU),
                (false, Gelu::None) => None,
                (true, Gelu::Backward) => unreachable!("a GELU's input gradient takes no bias"),
            };
            if let Some(epi) = epi {
                lt::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    std::ptr::addr_of!(epi).cast(),
                    std::mem::size_of_val(&epi),
                )
                .map_err(blas("setting the epilogue"))?;
            }
            if g.bias {
                lt::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    std::ptr::addr_of!(bf).cast(),
                    std::mem::size_of_val(&bf),
                )
                .map_err(blas("setting the bias type"))?;
            }
            if g.gelu != Gelu::None {
                // The auxiliary buffer has the result's column-major shape (c x r).
                let ld = g.ldc as i64;
                lt::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    std::ptr::addr_of!(ld).cast(),
                    8,
                )
                .map_err(blas("setting the auxiliary leading dimension"))?;
            }
        }
        // Column-major shapes: first operand (c x k) after its op, second (k x r), D (c x r).
        let (fr, fc) = if g.tb { (g.k, g.c) } else { (g.c, g.k) };
        let (sr, sc) = if g.ta { (g.r, g.k) } else { (g.k, g.r) };
        let batch = |i: usize| g.batch.map(|b| (b.0, [b.1, b.2, b.3][i]));
        let a = layout(bf, fr, fc, g.ldb, batch(1))?;
        let b = layout(bf, sr, sc, g.lda, batch(0))?;
        let d = layout(dtype(g.out), g.c, g.r, g.ldc, batch(2))?;
        let pref = lt::create_matmul_pref().map_err(blas("creating a preference"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: all descriptors are alive; the heuristic only reads them.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                std::ptr::addr_of!(ws).cast(),
                8,
            )
            .map_err(blas("setting the workspace size"))?;
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref);
            let _ = lt::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| CudaError::Blas {
            what: format!("no algorithm for {g:?}"),
            error: format!("{e:?}"),
        })?;
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo: heuristic.algo,
        })
    }

    /// Runs `c = alpha * op(a) @ op(b) [+ bias] + beta * c` for shape `g` on `stream`.
    ///
    /// # Safety
    /// The pointers must address device memory holding the operands `g` describes (`c` of the
    /// type `g.out`, `bias` of `g.c` bf16 values when `g.bias`), live until the product runs.
    pub(crate) unsafe fn run(
        &mut self,
        gpu_stream: CUstream,
        g: Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        bias: u64,
        aux: u64,
    ) -> Result<()> {
        let ws = match &self.workspace {
            Some(w) => w.ptr(),
            None => unreachable!("the workspace is allocated before the first product"),
        };
        let handle = self.handle;
        let plan = self.plan(g)?;
        use lts::cublasLtMatmulDescAttributes_t as D;
        for (on, attr, ptr, what) in [
            (
                g.bias,
                D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                bias,
                "setting the bias pointer",
            ),
            (
                g.gelu != Gelu::None,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                aux,
                "setting the auxiliary pointer",
            ),
        ] {
            if on {
                // SAFETY: `desc` is alive; the attribute takes a device pointer.
                unsafe {
                    lt::set_matmul_desc_attribute(
                        plan.desc,
                        attr,
                        std::ptr::addr_of!(ptr).cast(),
                        8,
                    )
                }
                .map_err(blas(what))?;
            }
        }
        // SAFETY: the caller's contract; the plan matches `g`.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                std::ptr::addr_of!(alpha).cast(),
                std::ptr::addr_of!(beta).cast(),
                b as *const c_void,
                plan.a,
                a as *const c_void,
                plan.b,
                c as *const c_void,
                plan.d,
                c as *mut c_void,
                plan.d,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                gpu_stream as lts::cudaStream_t,
            )
        }
        .map_err(|e| CudaError::Blas {
            what: format!("running {g:?}"),
            error: format!("{e:?}"),
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: every descriptor and the handle are destroyed once, after their last use.
        unsafe {
            for (_, p) in self.plans.drain() {
                let _ = lt::destroy_matrix_layout(p.a);
                let _ = lt::destroy_matrix_layout(p.b);
                let _ = lt::destroy_matrix_layout(p.d);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Gpu {
    /// Runs product `g` on the training stream: `c = alpha * op(a) @ op(b) [+ bias] + beta * c`.
    ///
    /// # Safety
    /// As [`Blas::run`].
    pub unsafe fn gemm(
        &mut self,
        g: Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        bias: u64,
    ) -> Result<()> {
        // SAFETY: the caller's contract; no auxiliary buffer.
        unsafe { self.gemm_aux(g, alpha, a, b, beta, c, bias, 0) }
    }

    /// As [`Gpu::gemm`] with `aux`, the auxiliary buffer of a GELU epilogue.
    ///
    /// # Safety
    /// As [`Blas::run`], and `aux` must hold a bf16 (or `g.out`) matrix of the result's shape
    /// when `g.gelu` is set.
    pub unsafe fn gemm_aux(
        &mut self,
        g: Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        bias: u64,
        aux: u64,
    ) -> Result<()> {
        if self.blas.workspace.is_none() {
            self.blas.workspace = Some(DeviceBuffer::zeros(self, WORKSPACE_BYTES)?);
        }
        let stream = self.stream;
        let timer = self.profile_start()?;
        // SAFETY: the caller's contract.
        unsafe { self.blas.run(stream, g, alpha, a, b, beta, c, bias, aux) }?;
        let ops = format!(
            "{}{}",
            if g.ta { "T" } else { "N" },
            if g.tb { "T" } else { "N" }
        );
        let name = match g.batch {
            Some((n, ..)) => format!("gemm {ops} {n} x ({} x {} x {})", g.r, g.c, g.k),
            None => format!(
                "gemm {ops} {} x {} x {}{}{}",
                g.r,
                g.c,
                g.k,
                if g.bias { " + bias" } else { "" },
                match g.gelu {
                    Gelu::None => "",
                    Gelu::Forward => " + gelu",
                    Gelu::Backward => " * gelu'",
                }
            ),
        };
        self.profile_end(timer, &name)
    }
}
