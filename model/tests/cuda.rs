//! The CUDA backend on a machine without a GPU: every kernel compiles with NVRTC, and opening
//! a device fails with an error that says what is missing instead of cudarc's panic. The GPU
//! checks themselves are `scripts/gpu-check.sh`.
#![cfg(feature = "cuda")]

use marathon_model::cuda::{self, CudaError, Library};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if let Err(e) = cuda::require(&[Library::Nvrtc]) {
        panic!(
            "{e}\n`scripts/setup.sh --test-servers` installs NVRTC into \
             ~/.cache/marathon/tools/nvrtc and `scripts/test.sh` puts it on LD_LIBRARY_PATH"
        );
    }
    // Ampere and Hopper: the GPUs the bf16 path is meant for.
    for arch in ["compute_80", "compute_90"] {
        let ptx = cuda::compile_kernels(arch).unwrap_or_else(|e| panic!("{e}"));
        for k in cuda::KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "kernel {k} is missing from the PTX for {arch}"
            );
        }
    }
}

#[test]
fn a_compile_error_names_the_line() {
    // The same path as the real kernels, on a source with a mistake, shows what a user sees.
    if cuda::require(&[Library::Nvrtc]).is_err() {
        panic!("NVRTC is missing; see every_kernel_compiles_with_nvrtc");
    }
    let err = cuda::compile_source(
        "extern \"C\" __global__ void k(float* x) { x[0] = y; }",
        "compute_90",
    )
    .expect_err("an undefined name must not compile");
    let msg = err.to_string();
    assert!(
        msg.contains("compute_90") && msg.contains("\"y\" is undefined"),
        "{msg}"
    );
}

#[test]
fn opening_a_device_without_one_is_a_clear_error() {
    match cuda::Gpu::new(0) {
        Ok(gpu) => eprintln!("a GPU is present here: {}", gpu.name()),
        Err(e @ (CudaError::Missing { .. } | CudaError::NoDevice(_))) => {
            let msg = e.to_string();
            assert!(
                msg.contains("libcuda.so") || msg.contains("no CUDA GPU"),
                "the error should name the driver or the device: {msg}"
            );
        }
        Err(e) => panic!("a machine without a GPU should get a missing-driver error, not: {e}"),
    }
}
