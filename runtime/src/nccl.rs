//! NCCL process groups on GPUs (feature `cuda`): the collectives of the TCP groups in
//! [`crate::comm`] (all-reduce, all-gather, reduce-scatter, broadcast, send and receive), on
//! device buffers, enqueued on the GPU's training stream.
//!
//! A group's NCCL unique id travels through the job's coordinator: rank 0 creates it and puts
//! it under `<prefix>/nccl/<name>` (the prefix names the job and the generation, so a group of
//! an old generation can never meet one of the new), the others wait for it.
//!
//! The abort semantics are the TCP groups': the communicator is non-blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`), and every operation, the join included, is
//! waited for by polling its completion and `ncclCommGetAsyncError` against the operation's
//! deadline. A deadline that passes aborts the group (`ncclCommAbort`) and fails with
//! [`RuntimeError::CommTimeout`]; [`NcclGroup::abort`], from any thread through an
//! [`NcclAbort`] handle, fails the pending operation at once with [`RuntimeError::Aborted`],
//! and every later one.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::nccl::result as nc;
use cudarc::nccl::sys as ns;
use half::bf16 as Bf16;
use marathon_elastic::Coordinator;
use marathon_model::cuda::{self, Gpu, Library, Slice, Stream};

use crate::error::{Result, RuntimeError};

/// The communicator, shared with abort handles; `None` once destroyed or aborted.
#[derive(Debug)]
struct Comm(Mutex<Option<usize>>);

/// One rank's membership of an NCCL group.
#[derive(Debug)]
pub struct NcclGroup {
    name: String,
    rank: usize,
    size: usize,
    comm: Arc<Comm>,
    aborted: Arc<AtomicBool>,
    /// Each operation's deadline, from its start.
    op_timeout: Duration,
}

/// How often a pending operation's completion and error state are polled.
const POLL: Duration = Duration::from_micros(50);

/// Aborts an [`NcclGroup`] from any thread.
#[derive(Debug, Clone)]
pub struct NcclAbort {
    comm: Arc<Comm>,
    aborted: Arc<AtomicBool>,
}

impl NcclAbort {
    /// Aborts the group's communicator: its pending and later operations fail at once. The
    /// call itself returns once NCCL has torn the communicator down.
    pub fn abort(&self) {
        if let Some(c) = self.take() {
            // SAFETY: the communicator was alive until taken; it is aborted once.
            unsafe {
                let _ = nc::comm_abort(c as ns::ncclComm_t);
            }
        }
    }

    /// As [`NcclAbort::abort`], tearing the communicator down on a thread of its own, so a
    /// caller that must fail at once (an operation past its deadline) does not wait for NCCL.
    fn abort_in_background(&self) {
        if let Some(c) = self.take() {
            std::thread::spawn(move || {
                // SAFETY: as in `abort`.
                unsafe {
                    let _ = nc::comm_abort(c as ns::ncclComm_t);
                }
            });
        }
    }

    /// Marks the group aborted and takes its communicator, if nobody did before.
    fn take(&self) -> Option<usize> {
        self.aborted.store(true, Ordering::SeqCst);
        self.comm.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn nccl_error(what: impl Into<String>) -> impl FnOnce(nc::NcclError) -> RuntimeError {
    let what = what.into();
    move |e| RuntimeError::Device(format!("NCCL {what}: {e:?}"))
}

impl NcclGroup {
    /// Joins group `name` as `rank` of `size` on `gpu`, exchanging the unique id through
    /// `coord` under `prefix` (the job's and generation's key prefix); waits for rank 0's id
    /// and for the other members until `deadline`. Every later operation must complete within
    /// `op_timeout`.
    pub fn connect(
        gpu: &Gpu,
        coord: &dyn Coordinator,
        prefix: &str,
        name: &str,
        rank: usize,
        size: usize,
        deadline: Instant,
        op_timeout: Duration,
    ) -> Result<Self> {
        cuda::require(&[Library::Nccl]).map_err(|e| RuntimeError::Device(e.to_string()))?;
        assert!(rank < size, "rank {rank} outside a group of {size}");
        gpu.bind()
            .map_err(|e| RuntimeError::Device(e.to_string()))?;
        let key = format!("{prefix}/nccl/{name}");
        let id = if rank == 0 {
            let id = nc::get_uniqueid().map_err(nccl_error("creating the unique id"))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            coord.put(&key, &bytes).map_err(|e| {
                RuntimeError::Device(format!("publishing NCCL id of group {name} at {key}: {e}"))
            })?;
            id
        } else {
            let bytes = coord.wait_get(&key, deadline).map_err(|e| {
                RuntimeError::Device(format!(
                    "rank {rank} of group {name} waiting for the NCCL id at {key}: {e}"
                ))
            })?;
            if bytes.len() != 128 {
                return Err(RuntimeError::Device(format!(
                    "the NCCL id of group {name} at {key} has {} bytes, not 128",
                    bytes.len()
                )));
            }
            let mut id = ns::ncclUniqueId { internal: [0; 128] };
            for (d, s) in id.internal.iter_mut().zip(&bytes) {
                *d = *s as _;
            }
            id
        };
        let mut config = non_blocking_config();
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL when the call is accepted (a non-blocking join
        // returns at once and completes in the background).
        let comm = unsafe {
            nc::comm_init_rank_config(comm.as_mut_ptr(), size as i32, id, rank as i32, &mut config)
                .map_err(nccl_error(format!(
                    "joining group {name} as rank {rank} of {size}"
                )))?;
            comm.assume_init()
        };
        let group = NcclGroup {
            name: name.into(),
            rank,
            size,
            comm: Arc::new(Comm(Mutex::new(Some(comm as usize)))),
            aborted: Arc::new(AtomicBool::new(false)),
            op_timeout,
        };
        // The join completes when every member has joined; wait for it like an operation.
        group.wait("join", deadline, || Ok(true))?;
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A handle that aborts this group from another thread.
    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort {
            comm: self.comm.clone(),
            aborted: self.aborted.clone(),
        }
    }

    /// Aborts this group (see [`NcclAbort::abort`]).
    pub fn abort(&self) {
        self.abort_handle().abort();
    }

    fn aborted(&self, op: &'static str) -> RuntimeError {
        RuntimeError::Aborted {
            op,
            group: self.name.clone(),
            rank: self.rank,
        }
    }

    /// Polls until `done` says the operation completed and the communicator reports no error
    /// in progress; fails at once when the group is aborted, with the communicator's error, or
    /// (aborting the group) when `deadline` passes.
    fn wait(
        &self,
        op: &'static str,
        deadline: Instant,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        loop {
            if self.aborted.load(Ordering::SeqCst) {
                return Err(self.aborted(op));
            }
            let state = {
                let comm = self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
                let Some(c) = *comm else {
                    return Err(self.aborted(op));
                };
                let mut state = ns::ncclResult_t::ncclSuccess;
                // SAFETY: the communicator is alive while the lock is held.
                unsafe { ns::ncclCommGetAsyncError(c as ns::ncclComm_t, &mut state) }
                    .result()
                    .map_err(nccl_error(format!("{op} on group {}", self.name)))?;
                state
            };
            match state {
                ns::ncclResult_t::ncclSuccess if done()? => return Ok(()),
                ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress => {}
                e => {
                    self.abort_handle().abort_in_background();
                    return Err(RuntimeError::Device(format!(
                        "NCCL {op} on group {} (rank {}): {e:?}",
                        self.name, self.rank
                    )));
                }
            }
            if Instant::now() >= deadline {
                self.abort_handle().abort_in_background();
                return Err(RuntimeError::CommTimeout {
                    op,
                    group: self.name.clone(),
                    rank: self.rank,
                    peer: usize::MAX,
                    timeout_ms: self.op_timeout.as_millis(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Enqueues `f` on the live communicator and waits for it to complete on the GPU's
    /// training stream (see [`NcclGroup::wait`]).
    fn run(
        &self,
        gpu: &Gpu,
        op: &'static str,
        f: impl FnOnce(ns::ncclComm_t) -> std::result::Result<nc::NcclStatus, nc::NcclError>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.op_timeout;
        {
            let comm = self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = *comm else {
                return Err(self.aborted(op));
            };
            f(c as ns::ncclComm_t).map_err(nccl_error(format!("{op} on group {}", self.name)))?;
        }
        // A non-blocking call may still be enqueueing (connections are set up on first use):
        // the operation is on the stream once the communicator no longer reports it in
        // progress, and done once the stream has run past it.
        self.wait(op, deadline, || Ok(true))?;
        let device = |e: cuda::CudaError| RuntimeError::Device(e.to_string());
        let enqueued = gpu.event(false).map_err(device)?;
        gpu.record(&enqueued, Stream::Training).map_err(device)?;
        self.wait(op, deadline, || enqueued.done().map_err(device))
    }

    fn stream(gpu: &Gpu) -> ns::cudaStream_t {
        gpu.stream_handle(Stream::Training) as ns::cudaStream_t
    }

    /// Sums bf16 `buf` over the group, in place (NCCL accumulates in fp32).
    pub fn all_reduce_bf16(&self, gpu: &Gpu, buf: Slice<Bf16>) -> Result<()> {
        let s = Self::stream(gpu);
        let p = buf.ptr() as *mut c_void;
        // SAFETY: `buf` is a live device slice; in place is allowed.
        self.run(gpu, "all_reduce", |c| unsafe {
            nc::all_reduce(
                p,
                p,
                buf.len(),
                ns::ncclDataType_t::ncclBfloat16,
                ns::ncclRedOp_t::ncclSum,
                c,
                s,
            )
        })
    }

    /// Sums `buf` over the group, in place.
    pub fn all_reduce(&self, gpu: &Gpu, buf: Slice<f32>) -> Result<()> {
        let s = Self::stream(gpu);
        let p = buf.ptr() as *mut c_void;
        // SAFETY: `buf` is a live device slice; in place is allowed.
        self.run(gpu, "all_reduce", |c| unsafe {
            nc::all_reduce(
                p,
                p,
                buf.len(),
                ns::ncclDataType_t::ncclFloat32,
                ns::ncclRedOp_t::ncclSum,
                c,
                s,
            )
        })
    }

    /// `out` (size x `part.len()`) gets every rank's `part`, in rank order.
    pub fn all_gather(&self, gpu: &Gpu, part: Slice<f32>, out: Slice<f32>) -> Result<()> {
        assert_eq!(out.len(), part.len() * self.size, "all_gather output size");
        let s = Self::stream(gpu);
        // SAFETY: both slices are live device memory of the checked sizes.
        self.run(gpu, "all_gather", |c| unsafe {
            nc::all_gather(
                part.ptr() as *const c_void,
                out.ptr() as *mut c_void,
                part.len(),
                ns::ncclDataType_t::ncclFloat32,
                c,
                s,
            )
        })
    }

    /// `out` gets this rank's part (rank `r`'s `out.len()` elements) of `input` summed over the
    /// group.
    pub fn reduce_scatter(&self, gpu: &Gpu, input: Slice<f32>, out: Slice<f32>) -> Result<()> {
        assert_eq!(
            input.len(),
            out.len() * self.size,
            "reduce_scatter input size"
        );
        let s = Self::stream(gpu);
        // SAFETY: both slices are live device memory of the checked sizes.
        self.run(gpu, "reduce_scatter", |c| unsafe {
            nc::reduce_scatter(
                input.ptr() as *const c_void,
                out.ptr() as *mut c_void,
                out.len(),
                ns::ncclDataType_t::ncclFloat32,
                ns::ncclRedOp_t::ncclSum,
                c,
                s,
            )
        })
    }

    /// Every rank's `buf` becomes `root`'s.
    pub fn broadcast(&self, gpu: &Gpu, buf: Slice<f32>, root: usize) -> Result<()> {
        let s = Self::stream(gpu);
        let p = buf.ptr() as *mut c_void;
        // SAFETY: `buf` is live device memory; in place is allowed.
        self.run(gpu, "broadcast", |c| unsafe {
            nc::broadcast(
                p,
                p,
                buf.len(),
                ns::ncclDataType_t::ncclFloat32,
                root as i32,
                c,
                s,
            )
        })
    }

    /// Sends `send` to rank `to` and receives `recv` from rank `from` as one grouped operation,
    /// so neighbours that send to each other at once do not deadlock.
    pub fn send_recv(
        &self,
        gpu: &Gpu,
        send: Slice<f32>,
        to: usize,
        recv: Slice<f32>,
        from: usize,
    ) -> Result<()> {
        let s = Self::stream(gpu);
        self.run(gpu, "send_recv", |c| {
            nc::group_start()?;
            // SAFETY: both slices are live device memory.
            let sent = unsafe {
                nc::send(
                    send.ptr() as *const c_void,
                    send.len(),
                    ns::ncclDataType_t::ncclFloat32,
                    to as i32,
                    c,
                    s,
                )
            };
            // SAFETY: as above.
            let received = unsafe {
                nc::recv(
                    recv.ptr() as *mut c_void,
                    recv.len(),
                    ns::ncclDataType_t::ncclFloat32,
                    from as i32,
                    c,
                    s,
                )
            };
            let ended = nc::group_end();
            sent?;
            received?;
            ended
        })
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        let mut comm = self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = comm.take() {
            // SAFETY: the communicator is alive and destroyed once.
            unsafe {
                let _ = nc::comm_destroy(c as ns::ncclComm_t);
            }
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every field NCCL should choose left
/// undefined, the size and version this build's header describes.
fn non_blocking_config() -> ns::ncclConfig_t {
    const UNDEF_INT: i32 = i32::MIN;
    let version = nc::get_nccl_version().unwrap_or(22800);
    ns::ncclConfig_t {
        size: std::mem::size_of::<ns::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}
