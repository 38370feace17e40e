//! Where the trainer computes: the CPU (the default) or one GPU (`train.device = "cuda"`,
//! feature `cuda`).
//!
//! On a GPU the trainer keeps its host model for what only the host does (initialisation,
//! loading a checkpoint, the state tools read) and runs every step on [`GpuModel`]: forward and
//! backward per microbatch, the gradient norm and AdamW on the device. A checkpoint's snapshot
//! copies the device's fp32 master weights and moments straight into the writer's page-locked
//! staging buffer on a side stream; the next step's forward and backward run meanwhile, and
//! only its optimizer update waits for the copy.

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// The device a job trains on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?}; use cpu or cuda")),
        }
    }
}

fn device_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Device(e.to_string())
}

#[cfg(feature = "cuda")]
pub use imp::GpuModel;

#[cfg(feature = "cuda")]
mod imp {
    use std::ops::Range;

    use marathon_model::cuda::{CudaGpt, Gpu, Pinned, State};
    use marathon_model::AdamWConfig;
    use marathon_storage::Fence;

    use super::device_error;
    use crate::checkpoint::Source;
    use crate::config::TrainConfig;
    use crate::Result;

    /// The model and its optimizer state on GPU 0.
    #[derive(Debug)]
    pub struct GpuModel {
        pub model: CudaGpt,
        /// The writer's staging buffer, page-locked on the first snapshot.
        pinned: Option<Pinned>,
    }

    impl GpuModel {
        /// Opens GPU 0 and builds the model from the host's fp32 `master` weights.
        pub fn open(cfg: &TrainConfig, master: &[f32]) -> Result<Self> {
            let gpu = Gpu::new(0).map_err(device_error)?;
            let need = CudaGpt::memory_bytes(&cfg.model, cfg.batch.micro_batch, cfg.batch.seq_len);
            let free = gpu.free_memory().map_err(device_error)? as f64;
            if need > free {
                let gib = |b: f64| b / (1u64 << 30) as f64;
                return Err(crate::RuntimeError::Config {
                    path: cfg.source.clone(),
                    field: "batch.micro_batch".into(),
                    reason: format!(
                        "the model with microbatches of {} x {} tokens needs {:.1} GiB on the \
                         GPU, which has {:.1} GiB free; lower batch.micro_batch (and raise the \
                         microbatch count through batch.global_batch) or batch.seq_len",
                        cfg.batch.micro_batch,
                        cfg.batch.seq_len,
                        gib(need),
                        gib(free)
                    ),
                });
            }
            let model = CudaGpt::new(
                gpu,
                cfg.model.clone(),
                cfg.batch.micro_batch,
                cfg.batch.seq_len,
                master,
            )
            .map_err(device_error)?;
            Ok(GpuModel {
                model,
                pinned: None,
            })
        }

        /// The device's name.
        pub fn name(&self) -> &str {
            self.model.gpu.name()
        }

        /// Turns per-operation timing on or off ([`marathon_model::cuda::Gpu::set_profiling`]).
        pub fn set_profiling(&mut self, on: bool) {
            self.model.gpu.set_profiling(on);
        }

        /// Milliseconds per operation since profiling was turned on, largest first.
        pub fn profile_report(&self) -> Result<Vec<(String, f64, usize)>> {
            self.model.gpu.profile_report().map_err(device_error)
        }

        pub fn zero_grad(&mut self) -> Result<()> {
            self.model.zero_grad().map_err(device_error)
        }

        pub fn reset_losses(&mut self) -> Result<()> {
            self.model.reset_losses().map_err(device_error)
        }

        pub fn forward(&mut self, tokens: &[u32], targets: &[u32], dloss: f32) -> Result<()> {
            self.model
                .forward(tokens, targets, dloss)
                .map_err(device_error)
        }

        pub fn backward(&mut self) -> Result<()> {
            self.model.backward().map_err(device_error)
        }

        pub fn loss_sum(&mut self) -> Result<f64> {
            self.model.loss_sum().map_err(device_error)
        }

        pub fn grad_norm_sq(&mut self) -> Result<f64> {
            self.model.grad_norm_sq().map_err(device_error)
        }

        pub fn update(&mut self, opt: &AdamWConfig, lr: f64, max_norm: f64) -> Result<()> {
            self.model.update(opt, lr, max_norm).map_err(device_error)
        }

        pub fn upload_state(
            &mut self,
            params: &[f32],
            m: &[f32],
            v: &[f32],
            step: u64,
        ) -> Result<()> {
            self.model
                .upload_state(params, m, v, step)
                .map_err(device_error)
        }

        pub fn download_state(
            &self,
            params: &mut [f32],
            m: &mut [f32],
            v: &mut [f32],
        ) -> Result<()> {
            self.model
                .download_state(params, m, v)
                .map_err(device_error)
        }

        /// Starts copying `pieces` into the writer's staging buffer `buf` and returns the fence
        /// the persist waits on. The buffer is page-locked once: the writer keeps the same one.
        pub(crate) fn snapshot(
            &mut self,
            buf: &mut [f32],
            pieces: &[(Source, Range<usize>)],
        ) -> Result<Fence> {
            if !self.pinned.as_ref().is_some_and(|p| p.covers(buf)) {
                self.pinned = None;
                self.pinned = Some(self.model.gpu.pin(buf).map_err(device_error)?);
            }
            let pieces: Vec<(State, Range<usize>)> = pieces
                .iter()
                .map(|(s, r)| {
                    let state = match s {
                        Source::Params => State::Master,
                        Source::AdamM => State::M,
                        Source::AdamV => State::V,
                    };
                    (state, r.clone())
                })
                .collect();
            // SAFETY: the writer keeps `buf` alive and unread until the fence returns, which
            // waits for the event.
            let done = unsafe { self.model.snapshot_async(buf, &pieces) }.map_err(device_error)?;
            Ok(Box::new(move || {
                done.synchronize().map_err(|e| e.to_string())
            }))
        }
    }
}

/// Without the `cuda` feature there is no GPU model: opening one says how to get it.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum GpuModel {}

#[cfg(not(feature = "cuda"))]
impl GpuModel {
    pub fn open(_cfg: &crate::config::TrainConfig, _master: &[f32]) -> crate::Result<Self> {
        Err(device_error(
            "this marathon was built without CUDA; build it with `cargo build --release \
             --features cuda` (no CUDA installation is needed to build), or train with --device cpu",
        ))
    }
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::needless_pass_by_ref_mut)]
impl GpuModel {
    pub fn name(&self) -> &str {
        match *self {}
    }

    pub fn zero_grad(&mut self) -> crate::Result<()> {
        match *self {}
    }

    pub fn reset_losses(&mut self) -> crate::Result<()> {
        match *self {}
    }

    pub fn forward(&mut self, _tokens: &[u32], _targets: &[u32], _dloss: f32) -> crate::Result<()> {
        match *self {}
    }

    pub fn backward(&mut self) -> crate::Result<()> {
        match *self {}
    }

    pub fn loss_sum(&mut self) -> crate::Result<f64> {
        match *self {}
    }

    pub fn grad_norm_sq(&mut self) -> crate::Result<f64> {
        match *self {}
    }

    pub fn update(
        &mut self,
        _opt: &marathon_model::AdamWConfig,
        _lr: f64,
        _max_norm: f64,
    ) -> crate::Result<()> {
        match *self {}
    }

    pub fn upload_state(
        &mut self,
        _p: &[f32],
        _m: &[f32],
        _v: &[f32],
        _step: u64,
    ) -> crate::Result<()> {
        match *self {}
    }

    pub fn download_state(
        &self,
        _p: &mut [f32],
        _m: &mut [f32],
        _v: &mut [f32],
    ) -> crate::Result<()> {
        match *self {}
    }

    pub(crate) fn snapshot(
        &mut self,
        _buf: &mut [f32],
        _pieces: &[(crate::checkpoint::Source, std::ops::Range<usize>)],
    ) -> crate::Result<marathon_storage::Fence> {
        match *self {}
    }
}
