//! `marathon bench`: benchmarks that print figures, each measured beside a baseline taken in the
//! same run, one module per subcommand.

mod ckpt;
mod comm;
mod elastic;
#[cfg(feature = "cuda")]
mod gpu;
mod recovery;
mod train;

use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time training steps and compare with the GEMM library's speed on the step's largest
    /// matrix product.
    Train(train::TrainArgs),
    /// All-reduce bus bandwidth of the process groups, on shared memory and on TCP, beside
    /// memcpy bandwidth.
    Comm(comm::CommArgs),
    /// What a checkpoint costs: training stall beside memcpy, persist beside the disk,
    /// compression with and without the byte shuffle, load time.
    Ckpt(ckpt::CkptArgs),
    /// Many agents, each running the agent's own code on threads of this process against a real
    /// etcd: registration, the first plan held by all, and a crashed node's loss to the next
    /// plan held by all.
    Elastic(elastic::ElasticArgs),
    /// What a killed worker costs an elastic job on etcd, beside the same job stopping every
    /// worker and resuming from its newest checkpoint.
    Recovery(recovery::RecoveryArgs),
    /// Every GPU check (each kernel against the CPU, training against the CPU, NCCL, a GPU
    /// checkpoint resumed on the CPU) and the GPU bench, ending with a table. Needs a build
    /// with `--features cuda` and a GPU.
    Gpu(GpuArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::Comm(args) => comm::run(args),
        BenchCommand::Ckpt(args) => ckpt::run(args),
        BenchCommand::Elastic(args) => elastic::run(args),
        BenchCommand::Recovery(args) => recovery::run(args),
        BenchCommand::Gpu(args) => gpu_bench(args),
    }
}

#[cfg(feature = "cuda")]
use gpu::GpuArgs;

/// Without the `cuda` feature `bench gpu` only says how to get it.
#[cfg(not(feature = "cuda"))]
#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _rest: Vec<String>,
}

fn gpu_bench(args: GpuArgs) -> Result<()> {
    #[cfg(feature = "cuda")]
    return gpu::run(args);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        anyhow::bail!(
            "bench gpu: this marathon was built without CUDA; build it with `cargo build \
             --release --features cuda` (no CUDA installation is needed to build)"
        )
    }
}

/// Seconds a plain copy of `bytes` between two buffers takes, best of `tries`, after a first
/// touch of both: the memory bandwidth baseline of `bench comm` and `bench ckpt`.
fn memcpy_seconds(bytes: usize, tries: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for _ in 0..tries {
        let t0 = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}
