//! NCCL process groups on GPUs (feature `cuda`): the collectives of the TCP groups in
//! [`crate::comm`] (all-reduce, all-gather, reduce-scatter, broadcast, send and receive), on
//! fp32 device buffers, enqueued on the GPU's training stream.
//!
//! A group's NCCL unique id travels through the job's coordinator: rank 0 creates it and puts
//! it under `<prefix>/nccl/<name>` (the prefix names the job and the generation, so a group of
//! an old generation can never meet one of the new), the others wait for it. [`NcclGroup::abort`]
//! calls `ncclCommAbort`, which fails the group's pending operations at once instead of after a
//! timeout; it may be called from another thread (the membership watcher) through an
//! [`NcclAbort`] handle.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::nccl::result as nc;
use cudarc::nccl::sys as ns;
use marathon_elastic::Coordinator;
use marathon_model::cuda::{self, Gpu, Library, Slice, Stream};

use crate::{Result, RuntimeError};

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
}

/// Aborts an [`NcclGroup`] from any thread.
#[derive(Debug, Clone)]
pub struct NcclAbort {
    comm: Arc<Comm>,
    aborted: Arc<AtomicBool>,
}

impl NcclAbort {
    /// Aborts the group's communicator: its pending and later operations fail at once.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let mut comm = self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = comm.take() {
            // SAFETY: the communicator is alive until taken here; it is aborted once.
            unsafe {
                let _ = nc::comm_abort(c as ns::ncclComm_t);
            }
        }
    }
}

fn nccl_error(what: impl Into<String>) -> impl FnOnce(nc::NcclError) -> RuntimeError {
    let what = what.into();
    move |e| RuntimeError::Device(format!("NCCL {what}: {e:?}"))
}

impl NcclGroup {
    /// Joins group `name` as `rank` of `size` on `gpu`, exchanging the unique id through
    /// `coord` under `prefix` (the job's and generation's key prefix); waits for rank 0's id
    /// until `deadline`.
    pub fn connect(
        gpu: &Gpu,
        coord: &dyn Coordinator,
        prefix: &str,
        name: &str,
        rank: usize,
        size: usize,
        deadline: Instant,
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
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success.
        let comm = unsafe {
            nc::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32).map_err(
                nccl_error(format!("joining group {name} as rank {rank} of {size}")),
            )?;
            comm.assume_init()
        };
        Ok(NcclGroup {
            name: name.into(),
            rank,
            size,
            comm: Arc::new(Comm(Mutex::new(Some(comm as usize)))),
            aborted: Arc::new(AtomicBool::new(false)),
        })
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

    /// Runs `op` with the live communicator, or fails with [`RuntimeError::Aborted`].
    fn with(
        &self,
        op: &'static str,
        f: impl FnOnce(ns::ncclComm_t) -> std::result::Result<nc::NcclStatus, nc::NcclError>,
    ) -> Result<()> {
        let aborted = || RuntimeError::Aborted {
            op,
            group: self.name.clone(),
            rank: self.rank,
        };
        if self.aborted.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        let comm = self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = *comm else {
            return Err(aborted());
        };
        f(c as ns::ncclComm_t)
            .map(|_| ())
            .map_err(nccl_error(format!("{op} on group {}", self.name)))
    }

    fn stream(gpu: &Gpu) -> ns::cudaStream_t {
        gpu.stream_handle(Stream::Training) as ns::cudaStream_t
    }

    /// Sums `buf` over the group, in place.
    pub fn all_reduce(&self, gpu: &Gpu, buf: Slice<f32>) -> Result<()> {
        let s = Self::stream(gpu);
        let p = buf.ptr() as *mut c_void;
        // SAFETY: `buf` is a live device slice; in place is allowed.
        self.with("all_reduce", |c| unsafe {
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
        self.with("all_gather", |c| unsafe {
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
        self.with("reduce_scatter", |c| unsafe {
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
        self.with("broadcast", |c| unsafe {
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
        self.with("send_recv", |c| {
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
