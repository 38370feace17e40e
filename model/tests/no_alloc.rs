//! The step allocates nothing: all memory is taken when the model and optimizer are built.
//!
//! The one exception is the GEMM library, which takes its packing scratch from the heap on
//! every call; its allocations are told apart with `kernels::in_gemm`, which is why the step runs
//! on a one-thread pool here (with more threads, the library's work runs on other threads).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use marathon_model::optim::{clip_grads, sum_squares};
use marathon_model::{AdamW, AdamWConfig, Gpt, GptConfig};

/// Counts heap allocations outside the GEMM library.
struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    if !marathon_model::kernels::in_gemm() {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_training_step_allocates_nothing_after_the_first() {
    let config = GptConfig {
        vocab_size: 500,
        seq_len: 64,
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
    };
    let (b, t) = (4, 64);
    let mut model = Gpt::<f32>::new(config, b, t).unwrap();
    model.init_params(1, 0.02);
    let mut opt = AdamW::<f32>::new(AdamWConfig::default(), &model.layout);
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 500) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|i| (i * 11 % 500) as u32).collect();
    let mut step = |model: &mut Gpt<f32>| {
        model.zero_grad();
        for _ in 0..2 {
            model.forward(&tokens, &targets);
            model.backward(1.0 / (2 * b * t) as f32);
        }
        let norm = sum_squares(&model.grads).sqrt();
        clip_grads(&mut model.grads, norm, 1.0);
        opt.update(&mut model.params, &model.grads, 1e-3);
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let during = pool.install(|| {
        step(&mut model); // warms up the pool
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for _ in 0..3 {
            step(&mut model);
        }
        ALLOCATIONS.load(Ordering::SeqCst) - before
    });
    assert_eq!(during, 0, "the step loop allocated {during} times");
}
