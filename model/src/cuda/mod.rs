//! The CUDA backend (feature `cuda`): the same flat-buffer GPT on a GPU, whole or one rank's
//! shard of it, with bf16 parameters
//! and activations, fp32 master weights, gradients and Adam moments, fp32 accumulation in every
//! reduction, matrix products through cuBLASLt and the other kernels compiled at run time by
//! NVRTC from [`KERNELS`].
//!
//! cudarc loads the CUDA libraries when first called and panics if one is missing, so nothing
//! here calls into CUDA before [`probe`] (or [`require`]) has found the library it needs:
//! absence becomes a [`CudaError::Missing`] that says what to install. A machine without a GPU
//! builds this module and runs its tests.
//!
//! - [`Gpu`]: one device's context, its two streams (training and copies), the compiled
//!   kernels and the cuBLASLt handle.
//! - [`DeviceBuffer`] and [`PinnedBuffer`]: plain allocations, freed on drop.
//! - [`ops`]: one launch per CPU kernel of [`crate::kernels`], on raw device pointers.
//! - [`CudaGpt`]: a shard's forward, backward and AdamW step on the device.
//! - [`selftest`]: every kernel against the CPU kernel it mirrors, within a stated tolerance.

mod blas;
mod gpt;
pub mod ops;
pub mod selftest;

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

pub use blas::{Blas, Gelu, Gemm, Out};
pub use gpt::{CudaGpt, CudaModelError, DeviceCollective, StageError, State};

/// The CUDA C source of every kernel but the matrix products.
pub const KERNELS: &str = include_str!("kernels.cu");

/// The kernels [`KERNELS`] defines, all loaded by [`Gpu::new`].
pub const KERNEL_NAMES: &[&str] = &[
    "cast_f32_bf16",
    "cast_bf16_f32",
    "residual_bias_add",
    "embedding_forward",
    "embedding_backward",
    "position_backward",
    "position_forward",
    "layernorm_forward",
    "layernorm_backward",
    "layernorm_param_backward",
    "bias_backward",
    "gelu_forward",
    "gelu_backward",
    "attention_split",
    "attention_merge",
    "attention_unmerge",
    "attention_join",
    "softmax_causal_forward",
    "softmax_causal_backward",
    "crossentropy",
    "crossentropy_partial",
    "crossentropy_finish",
    "sum_squares_partial",
    "sum_squares_finish",
    "adamw",
    "flash_forward",
    "flash_backward_dot",
    "flash_backward_kv",
    "flash_backward_q",
];

/// What went wrong on the CUDA path, each naming the part and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded.
    #[error("{library} is not installed or not on the library path ({hint})")]
    Missing {
        library: &'static str,
        hint: &'static str,
    },
    /// The driver loaded but reports no device.
    #[error("no CUDA GPU found: {0}")]
    NoDevice(String),
    /// A driver call failed.
    #[error("CUDA driver: {what}: {error}")]
    Driver { what: String, error: String },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt: {what}: {error}")]
    Blas { what: String, error: String },
    /// NVRTC rejected the kernels; the log says where.
    #[error("NVRTC could not compile marathon's kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    /// An NCCL call failed.
    #[error("NCCL: {what}: {error}")]
    Nccl { what: String, error: String },
}

pub type Result<T> = std::result::Result<T, CudaError>;

pub(crate) fn driver<E: std::fmt::Debug>(what: impl Into<String>) -> impl FnOnce(E) -> CudaError {
    let what = what.into();
    move |e| CudaError::Driver {
        what,
        error: format!("{e:?}"),
    }
}

/// A CUDA library marathon loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// The driver (`libcuda.so`), installed with the NVIDIA driver.
    Driver,
    /// The run-time compiler (`libnvrtc.so`).
    Nvrtc,
    /// cuBLASLt (`libcublasLt.so`).
    CublasLt,
    /// NCCL (`libnccl.so`).
    Nccl,
}

impl Library {
    fn present(self) -> bool {
        // SAFETY: each call only tries to open the library by name; nothing is called in it.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Library::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }

    fn missing(self) -> CudaError {
        let (library, hint) = match self {
            Library::Driver => (
                "the CUDA driver (libcuda.so)",
                "install the NVIDIA driver on a machine with a GPU, or train with --device cpu",
            ),
            Library::Nvrtc => (
                "NVRTC (libnvrtc.so)",
                "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib \
                 folder to LD_LIBRARY_PATH",
            ),
            Library::CublasLt => (
                "cuBLASLt (libcublasLt.so)",
                "install the CUDA toolkit or `pip install nvidia-cublas` and add its lib folder \
                 to LD_LIBRARY_PATH",
            ),
            Library::Nccl => (
                "NCCL (libnccl.so)",
                "install NCCL or `pip install nvidia-nccl-cu13` and add its lib folder to \
                 LD_LIBRARY_PATH",
            ),
        };
        CudaError::Missing { library, hint }
    }
}

/// Fails with [`CudaError::Missing`] unless every library in `libs` can be loaded.
pub fn require(libs: &[Library]) -> Result<()> {
    match libs.iter().find(|l| !l.present()) {
        Some(l) => Err(l.missing()),
        None => Ok(()),
    }
}

/// Whether this machine can run the CUDA backend: the driver, NVRTC and cuBLASLt load and the
/// driver sees at least one device. Returns the device count.
pub fn probe() -> Result<usize> {
    require(&[Library::Driver, Library::Nvrtc, Library::CublasLt])?;
    drv::init().map_err(|e| CudaError::NoDevice(format!("cuInit failed: {e:?}")))?;
    let n = drv::device::get_count().map_err(driver("cuDeviceGetCount"))?;
    if n < 1 {
        return Err(CudaError::NoDevice("the driver reports no device".into()));
    }
    Ok(n as usize)
}

/// Compiles [`KERNELS`] to PTX for `arch` (`compute_90`, say). Needs NVRTC only, no GPU.
pub fn compile_kernels(arch: &str) -> Result<String> {
    compile_source(KERNELS, arch)
}

/// Compiles CUDA C `source` to PTX for `arch` with the options the kernels use.
pub fn compile_source(source: &str, arch: &str) -> Result<String> {
    require(&[Library::Nvrtc])?;
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "-lineinfo".into(),
        ],
        name: Some("marathon_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
        arch: arch.into(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })?;
    Ok(ptx.to_src())
}

/// One GPU: its context, a training stream and a copy stream, the compiled kernels and
/// cuBLASLt. Every call enqueues on the training stream unless it says otherwise.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    /// The training stream: every kernel and product runs here, in order.
    pub(crate) stream: sys::CUstream,
    /// The copy stream: checkpoint snapshots copy device state to the host here, fenced by
    /// events so the training stream does not wait for them.
    pub(crate) copies: sys::CUstream,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    pub(crate) blas: Blas,
    sms: u32,
    name: String,
    capability: (i32, i32),
    /// Per-operation timings, when profiling is on.
    profile: Option<std::cell::RefCell<Vec<(String, Event, Event)>>>,
    /// Whether cuBLASLt's GELU epilogues work here; `None` until first tried.
    pub(crate) fused_gelu: Option<bool>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("capability", &self.capability)
            .field("sms", &self.sms)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks the libraries, compiles the kernels for its compute
    /// capability and creates the streams and the cuBLASLt handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} asked for, but the driver sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the context"))?;
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        let capability = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))? as u32;
        let arch = format!("compute_{}{}", capability.0, capability.1);
        let ptx = compile_kernels(&arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(driver("loading the kernels"))?;
        let mut funcs = HashMap::new();
        for &k in KERNEL_NAMES {
            let f = module
                .load_function(k)
                .map_err(driver(format!("loading kernel {k}")))?;
            funcs.insert(k, f);
        }
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(driver("creating the training stream"))?;
        let copies = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(driver("creating the copy stream"))?;
        let blas = Blas::new()?;
        Ok(Gpu {
            ctx,
            stream,
            copies,
            _module: module,
            funcs,
            blas,
            sms,
            name,
            capability,
            profile: None,
            fused_gelu: None,
        })
    }

    /// The device's UUID, as `GPU-` and 32 hex digits: the same device seen from any process.
    pub fn uuid(&self) -> Result<String> {
        let u = self.ctx.uuid().map_err(driver("reading the device UUID"))?;
        let hex: String = u
            .bytes
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect();
        Ok(format!("GPU-{hex}"))
    }

    /// The device's name, as the driver gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Result<usize> {
        self.bind()?;
        let (free, _total) = self
            .ctx
            .mem_get_info()
            .map_err(driver("reading free memory"))?;
        Ok(free)
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))
    }

    /// Waits until everything enqueued on the training stream has run.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: the stream was created by this context and lives as long as `self`.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(driver("synchronizing"))
    }

    /// Blocks for an elementwise kernel over `n` elements: a grid-stride loop over at most 32
    /// blocks per multiprocessor.
    pub(crate) fn blocks(&self, n: usize, threads: u32) -> u32 {
        (n.div_ceil(threads as usize) as u32).clamp(1, self.sms * 32)
    }

    /// Launches kernel `name` on the training stream.
    ///
    /// # Safety
    /// `args` must point at values whose types and order are the kernel's parameters, and
    /// every device pointer among them must be valid for what the kernel reads and writes.
    pub(crate) unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.funcs.get(name).expect("every kernel is loaded");
        let timer = self.profile_start()?;
        // SAFETY: the caller's contract.
        unsafe { drv::launch_kernel(f.cu_function(), grid, block, 0, self.stream, args) }
            .map_err(driver(format!("launching {name}")))?;
        self.profile_end(timer, name)
    }

    /// Starts timing the next operation when profiling is on.
    pub(crate) fn profile_start(&self) -> Result<Option<Event>> {
        if self.profile.is_none() {
            return Ok(None);
        }
        let e = self.event(true)?;
        self.record(&e, Stream::Training)?;
        Ok(Some(e))
    }

    /// Ends the timing begun by [`Gpu::profile_start`], filing it under `name`.
    pub(crate) fn profile_end(&self, start: Option<Event>, name: &str) -> Result<()> {
        if let (Some(start), Some(p)) = (start, &self.profile) {
            let end = self.event(true)?;
            self.record(&end, Stream::Training)?;
            p.borrow_mut().push((name.to_string(), start, end));
        }
        Ok(())
    }

    /// Turns per-operation timing on or off (off by default: it adds two events per launch).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Default::default);
    }

    /// Milliseconds per operation name since profiling was turned on, largest first, with the
    /// number of launches.
    pub fn profile_report(&self) -> Result<Vec<(String, f64, usize)>> {
        let Some(p) = &self.profile else {
            return Ok(Vec::new());
        };
        let mut by: HashMap<String, (f64, usize)> = HashMap::new();
        for (name, start, end) in p.borrow_mut().drain(..) {
            let e = by.entry(name).or_default();
            e.0 += end.elapsed_ms(&start)? as f64;
            e.1 += 1;
        }
        let mut v: Vec<_> = by.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// An event on this GPU; `timing` makes it usable for elapsed times.
    pub fn event(&self, timing: bool) -> Result<Event> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let event = drv::event::create(flags).map_err(driver("creating an event"))?;
        Ok(Event {
            ctx: self.ctx.clone(),
            event,
        })
    }

    /// The raw handle of `stream`, for libraries that enqueue on it (NCCL).
    pub fn stream_handle(&self, stream: Stream) -> sys::CUstream {
        self.handle(stream)
    }

    fn handle(&self, stream: Stream) -> sys::CUstream {
        match stream {
            Stream::Training => self.stream,
            Stream::Copies => self.copies,
        }
    }

    /// Records `event` after the work enqueued so far on `stream`.
    pub fn record(&self, event: &Event, stream: Stream) -> Result<()> {
        // SAFETY: the event and stream belong to this context.
        unsafe { drv::event::record(event.event, self.handle(stream)) }
            .map_err(driver("recording an event"))
    }

    /// Makes `stream` wait for `event` before running what is enqueued on it afterwards.
    pub fn wait(&self, stream: Stream, event: &Event) -> Result<()> {
        // SAFETY: both handles belong to this context and are alive.
        unsafe {
            drv::stream::wait_event(
                self.handle(stream),
                event.event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(driver("waiting on an event"))
    }

    /// Copies `src` into `dst` on the training stream, in order with the kernels.
    pub fn copy_within<T>(&self, dst: Slice<T>, src: Slice<T>) -> Result<()> {
        assert_eq!(
            dst.len(),
            src.len(),
            "a device copy between slices of different lengths"
        );
        let bytes = src.len() * std::mem::size_of::<T>();
        // SAFETY: both ranges lie in live allocations (slices borrow them).
        unsafe { drv::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream) }
            .map_err(driver("copying on the device"))
    }

    /// Copies `src` into `host` after the training stream's work so far, and waits for it.
    pub fn download_slice<T>(&self, src: Slice<T>, host: &mut [T]) -> Result<()> {
        assert_eq!(
            src.len(),
            host.len(),
            "a download into a host buffer of another length"
        );
        // SAFETY: the source lies in a live allocation; the sync completes the copy before
        // `host` is released.
        unsafe { drv::memcpy_dtoh_async(host, src.ptr(), self.stream) }
            .map_err(driver("copying to the host"))?;
        self.sync()
    }

    /// Copies `host` into `dst` in order on the training stream, and waits for it.
    pub fn upload_slice<T>(&self, dst: Slice<T>, host: &[T]) -> Result<()> {
        assert_eq!(
            dst.len(),
            host.len(),
            "an upload from a host buffer of another length"
        );
        // SAFETY: the destination lies in a live allocation.
        unsafe { drv::memcpy_htod_async(dst.ptr(), host, self.stream) }
            .map_err(driver("copying to the device"))?;
        self.sync()
    }

    /// Holds back everything enqueued on `stream` after this call until the device value at
    /// `flag` equals `value` ([`Gpu::release`] writes it). Tests use it to keep an operation
    /// pending for as long as they need.
    pub fn hold(&self, stream: Stream, flag: &DeviceBuffer<u32>, value: u32) -> Result<()> {
        // SAFETY: the flag is a live device allocation; the wait only reads it.
        unsafe {
            sys::cuStreamWaitValue32_v2(
                self.handle(stream),
                flag.ptr(),
                value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
            )
        }
        .result()
        .map_err(driver("holding a stream on a flag"))
    }

    /// Writes `value` to `flag` on the copy stream, releasing a stream held on it.
    pub fn release(&self, flag: &DeviceBuffer<u32>, value: u32) -> Result<()> {
        // SAFETY: the flag is a live device allocation of one u32.
        unsafe { drv::memcpy_htod_async(flag.ptr(), &[value], self.copies) }
            .map_err(driver("releasing a held stream"))?;
        // SAFETY: the copy stream belongs to this context.
        unsafe { drv::stream::synchronize(self.copies) }.map_err(driver("releasing a held stream"))
    }

    /// Page-locks `host` so copies to and from it run at full speed and asynchronously.
    /// Returns a guard that unlocks it when dropped; the memory must outlive the guard.
    pub fn pin(&self, host: &mut [f32]) -> Result<Pinned> {
        let ptr = host.as_mut_ptr().cast::<c_void>();
        let bytes = std::mem::size_of_val(host);
        // SAFETY: the range is one live allocation; the guard unregisters exactly this pointer.
        unsafe { sys::cuMemHostRegister_v2(ptr, bytes, 0) }
            .result()
            .map_err(driver("page-locking the staging buffer"))?;
        Ok(Pinned {
            ctx: self.ctx.clone(),
            ptr: ptr as usize,
            bytes,
        })
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the streams were created by this context and nothing uses them after this.
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            let _ = drv::stream::destroy(self.stream);
            let _ = drv::stream::synchronize(self.copies);
            let _ = drv::stream::destroy(self.copies);
        }
    }
}

/// One of a [`Gpu`]'s two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Every kernel and product of training, in order.
    Training,
    /// Snapshot copies to the host.
    Copies,
}

/// A CUDA event. `Send`: the persist thread waits on a snapshot's copy event.
#[derive(Debug)]
pub struct Event {
    ctx: Arc<CudaContext>,
    event: sys::CUevent,
}

// SAFETY: CUDA events may be recorded, queried and waited on from any thread once the owning
// context is current, which every method here makes it.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// Whether the work before the event has completed, without waiting.
    pub fn done(&self) -> Result<bool> {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the event is alive; a query does not wait.
        match unsafe { sys::cuEventQuery(self.event) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            e => Err(CudaError::Driver {
                what: "querying an event".into(),
                error: format!("{e:?}"),
            }),
        }
    }

    /// Blocks until the work before the event's last record has run.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        // SAFETY: the event is alive.
        unsafe { drv::event::synchronize(self.event) }.map_err(driver("waiting for an event"))
    }

    /// Milliseconds between `start`'s record and this event's; both need timing enabled.
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        self.synchronize()?;
        // SAFETY: both events are alive and recorded.
        unsafe { drv::event::elapsed(start.event, self.event) }.map_err(driver("reading an event"))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: nothing refers to the event after this.
        unsafe {
            let _ = drv::event::destroy(self.event);
        }
    }
}

/// Host memory page-locked by [`Gpu::pin`], unlocked on drop.
#[derive(Debug)]
pub struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: usize,
    bytes: usize,
}

// SAFETY: the guard holds an address, not a reference; unregistering works from any thread.
unsafe impl Send for Pinned {}

impl Pinned {
    /// Whether this guard locks exactly `host`.
    pub fn covers(&self, host: &[f32]) -> bool {
        self.ptr == host.as_ptr() as usize && self.bytes == std::mem::size_of_val(host)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` was registered by `Gpu::pin` and is unregistered once.
        unsafe {
            let _ = sys::cuMemHostUnregister(self.ptr as *mut c_void);
        }
    }
}

/// A plain device allocation of `len` values of `T`, freed on drop.
pub struct DeviceBuffer<T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({} x {})",
            self.len,
            std::any::type_name::<T>()
        )
    }
}

impl<T: Copy> DeviceBuffer<T> {
    /// Allocates `len` values, zeroed on the training stream.
    pub fn zeros(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: a plain allocation in the current context.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(|e| CudaError::Driver {
            what: format!("allocating {bytes} bytes"),
            error: format!("{e:?}"),
        })?;
        let buf = DeviceBuffer {
            ptr,
            len,
            _t: PhantomData,
        };
        buf.zero(gpu)?;
        Ok(buf)
    }

    /// Allocates and fills from `host`.
    pub fn from_host(gpu: &Gpu, host: &[T]) -> Result<Self> {
        let buf = Self::zeros(gpu, host.len())?;
        buf.upload(gpu, host)?;
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        assert!(i <= self.len, "offset {i} beyond a buffer of {}", self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The whole buffer as a [`Slice`].
    pub fn all(&self) -> Slice<'_, T> {
        self.slice(0..self.len)
    }

    /// Elements `range` as a [`Slice`].
    pub fn slice(&self, range: std::ops::Range<usize>) -> Slice<'_, T> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "{range:?} is outside a buffer of {}",
            self.len
        );
        Slice {
            ptr: self.at(range.start),
            len: range.len(),
            _t: PhantomData,
        }
    }

    /// Part `i` of `n` equal parts (layer `i` of a buffer stacked over `n` layers).
    pub fn part(&self, i: usize, n: usize) -> Slice<'_, T> {
        let each = self.len / n;
        self.slice(i * each..(i + 1) * each)
    }

    /// Zeroes the buffer on the training stream.
    pub fn zero(&self, gpu: &Gpu) -> Result<()> {
        // SAFETY: the range is this allocation.
        unsafe {
            drv::memset_d8_async(self.ptr, 0, self.len * std::mem::size_of::<T>(), gpu.stream)
        }
        .map_err(driver("zeroing a buffer"))
    }

    /// Copies `host` into the start of the buffer, in order on the training stream.
    pub fn upload(&self, gpu: &Gpu, host: &[T]) -> Result<()> {
        self.upload_at(gpu, 0, host)
    }

    /// Copies `host` into the buffer from element `at`, in order on the training stream. The
    /// copy is done with `host` when this returns (pageable memory is staged by the driver).
    pub fn upload_at(&self, gpu: &Gpu, at: usize, host: &[T]) -> Result<()> {
        assert!(at + host.len() <= self.len, "upload beyond the buffer");
        // SAFETY: the destination range lies inside this allocation.
        unsafe { drv::memcpy_htod_async(self.at(at), host, gpu.stream) }
            .map_err(driver("copying to the device"))?;
        gpu.sync()
    }

    /// Copies the buffer's first `host.len()` elements into `host`, waiting for the training
    /// stream first.
    pub fn download(&self, gpu: &Gpu, host: &mut [T]) -> Result<()> {
        self.download_at(gpu, 0, host)
    }

    /// As [`DeviceBuffer::download`] from element `at`.
    pub fn download_at(&self, gpu: &Gpu, at: usize, host: &mut [T]) -> Result<()> {
        assert!(at + host.len() <= self.len, "download beyond the buffer");
        // SAFETY: the source range lies inside this allocation; the sync below completes the
        // copy before `host` is released.
        unsafe { drv::memcpy_dtoh_async(host, self.at(at), gpu.stream) }
            .map_err(driver("copying to the host"))?;
        gpu.sync()
    }

    /// Enqueues a copy of the buffer's first `host.len()` elements into `host` on the training
    /// stream and returns at once.
    ///
    /// # Safety
    /// `host` must stay alive and untouched until the training stream has run the copy.
    pub unsafe fn download_async(&self, gpu: &Gpu, host: &mut [T]) -> Result<()> {
        assert!(host.len() <= self.len, "download beyond the buffer");
        // SAFETY: the source lies inside this allocation; the caller keeps `host` alive.
        unsafe { drv::memcpy_dtoh_async(host, self.ptr, gpu.stream) }
            .map_err(driver("copying to the host"))
    }

    /// The buffer's contents, after the training stream's work.
    pub fn to_vec(&self, gpu: &Gpu) -> Result<Vec<T>>
    where
        T: Default,
    {
        let mut v = vec![T::default(); self.len];
        self.download(gpu, &mut v)?;
        Ok(v)
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: the allocation is this buffer's alone.
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// A run of elements of a [`DeviceBuffer`], by address and length, borrowed from it. Kernels
/// check lengths as the CPU kernels do; reads and writes happen on the device, in stream order.
#[derive(Debug, Clone, Copy)]
pub struct Slice<'a, T> {
    ptr: u64,
    len: usize,
    _t: PhantomData<&'a T>,
}

impl<'a, T> Slice<'a, T> {
    /// `len` values at device address `ptr`, borrowed for as long as the caller says.
    pub(crate) fn raw(ptr: u64, len: usize) -> Self {
        Slice {
            ptr,
            len,
            _t: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements `range` of this slice.
    pub fn sub(&self, range: std::ops::Range<usize>) -> Slice<'a, T> {
        assert!(range.start <= range.end && range.end <= self.len);
        Slice {
            ptr: self.ptr + (range.start * std::mem::size_of::<T>()) as u64,
            len: range.len(),
            _t: PhantomData,
        }
    }
}

/// A slice's bytes, for products whose result type is chosen per call.
pub fn bytes<T>(s: Slice<T>) -> Slice<u8> {
    Slice::raw(s.ptr(), s.len() * std::mem::size_of::<T>())
}

/// Host memory allocated page-locked, for copies that run at the bus's full speed.
pub struct PinnedBuffer<T> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl<T> std::fmt::Debug for PinnedBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedBuffer({} x {})",
            self.len,
            std::any::type_name::<T>()
        )
    }
}

impl<T: Copy> PinnedBuffer<T> {
    /// Allocates `len` values (uninitialised bytes zeroed).
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: a plain page-locked allocation; zeroed before any read.
        let ptr = unsafe { drv::malloc_host(bytes, 0) }
            .map_err(driver("allocating pinned memory"))? as *mut T;
        // SAFETY: `bytes` bytes were just allocated at `ptr`.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        Ok(PinnedBuffer {
            ptr,
            len,
            ctx: gpu.ctx.clone(),
        })
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised values live at `ptr` for as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by `malloc_host`, freed once.
        unsafe {
            let _ = drv::free_host(self.ptr.cast());
        }
    }
}

/// Kernel arguments: a list of pointers to the values, in the kernel's parameter order.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        &mut [$(std::ptr::addr_of!($x) as *mut std::ffi::c_void),*]
    };
}
pub(crate) use args;
