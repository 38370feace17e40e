//! Tensor and pipeline shards of the model compute the whole model's loss and gradients.
//!
//! Each tensor-parallel rank is a thread with a shared-memory [`Collective`]; each holds every
//! pipeline stage of its slice and runs them in order, passing activations forward and
//! gradients back by hand. In f64 the shards must match the whole model to rounding.

use std::sync::{Arc, Barrier, Mutex};

use marathon_model::layout::copy_box;
use marathon_model::{Collective, Gpt, GptConfig, Shard};

/// A tensor-parallel group of threads that meet at a barrier.
struct Threads {
    parts: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

struct Member {
    shared: Arc<Threads>,
    rank: usize,
    size: usize,
}

impl Member {
    /// Publishes `buf` and returns every member's copy, in rank order.
    fn exchange(&mut self, buf: &[f64]) -> Vec<Vec<f64>> {
        self.shared.parts.lock().expect("collective lock")[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        let all = self.shared.parts.lock().expect("collective lock").clone();
        self.shared.barrier.wait();
        all
    }
}

impl Collective<f64> for Member {
    type Error = std::convert::Infallible;

    fn size(&self) -> usize {
        self.size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<(), Self::Error> {
        let all = self.exchange(buf);
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().map(|p| p[i]).sum();
        }
        Ok(())
    }

    fn all_gather(&mut self, buf: &mut [f64]) -> Result<(), Self::Error> {
        let all = self.exchange(buf);
        let n = buf.len() / self.size;
        for (r, part) in all.iter().enumerate() {
            buf[r * n..(r + 1) * n].copy_from_slice(&part[r * n..(r + 1) * n]);
        }
        Ok(())
    }
}

fn config() -> GptConfig {
    // 300 tokens pad to 384: with tp 4 the last slice holds 12 real ids and 84 padding ids.
    GptConfig {
        vocab_size: 300,
        seq_len: 8,
        n_layer: 4,
        n_head: 4,
        n_embd: 16,
    }
}

const B: usize = 2;
const T: usize = 7;

fn batch() -> (Vec<u32>, Vec<u32>) {
    let tokens = (0..B * T).map(|i| (i * 37 % 300) as u32).collect();
    // Targets in every tensor-parallel slice, the last one included.
    let targets = (0..B * T).map(|i| (i * 53 % 300) as u32).collect();
    (tokens, targets)
}

/// The whole model's loss and gradients for [`batch`].
fn whole() -> (f64, Gpt<f64>) {
    let mut m = Gpt::<f64>::new(config(), B, T).expect("sharded test");
    m.init_params(3, 0.1);
    let (tokens, targets) = batch();
    let loss = m.forward(&tokens, &targets);
    m.backward(1.0 / (B * T) as f64);
    (loss, m)
}

/// Every stage of tensor-parallel rank `rank`, after one forward and backward of [`batch`];
/// the last stage's loss.
fn run_slice(rank: usize, tp: usize, pp: usize, shared: Arc<Threads>) -> (f64, Vec<Gpt<f64>>) {
    let mut group = Member {
        shared,
        rank,
        size: tp,
    };
    let mut stages: Vec<Gpt<f64>> = (0..pp)
        .map(|stage| {
            let shard = Shard {
                tp,
                tp_rank: rank,
                pp,
                stage,
            };
            let mut m =
                Gpt::<f64>::new_shard(config(), shard, B, T, 1, marathon_model::Recompute::None)
                    .expect("sharded test");
            m.init_params(3, 0.1);
            m
        })
        .collect();
    let (tokens, targets) = batch();
    let mut loss = None;
    let mut carry: Option<Vec<f64>> = None;
    for m in stages.iter_mut() {
        loss = m
            .forward_stage(0, &tokens, &targets, carry.as_deref(), &mut group)
            .expect("sharded test");
        carry = Some(m.stage_output(0).to_vec());
    }
    let mut carry: Option<Vec<f64>> = None;
    for m in stages.iter_mut().rev() {
        let mut grads = std::mem::take(&mut m.grads);
        let dloss = 1.0 / (B * T) as f64;
        m.backward_stage(0, &mut grads, dloss, carry.as_deref(), &mut group, |_| {})
            .expect("sharded test");
        m.grads = grads;
        carry = Some(m.input_grad().to_vec());
    }
    (loss.expect("the last stage has the loss"), stages)
}

fn check(tp: usize, pp: usize) {
    let (loss, reference) = whole();
    let shared = Arc::new(Threads {
        parts: Mutex::new(vec![Vec::new(); tp]),
        barrier: Barrier::new(tp),
    });
    let slices: Vec<(f64, Vec<Gpt<f64>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..tp)
            .map(|r| {
                let shared = shared.clone();
                s.spawn(move || run_slice(r, tp, pp, shared))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sharded test"))
            .collect()
    });
    let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-11 * scale.max(1e-3);
    for (r, (l, stages)) in slices.iter().enumerate() {
        assert!(
            close(*l, loss, loss),
            "tp{tp} pp{pp} rank {r}: loss {l} vs {loss}"
        );
        for m in stages {
            for t in m.layout.tensors() {
                let g = reference.layout.get(&t.name).expect("sharded test");
                let cut = |buf: &[f64]| {
                    let mut out = vec![0.0; t.numel()];
                    copy_box(
                        &buf[g.range()],
                        &g.global_shape,
                        &t.box_offset,
                        &mut out,
                        &t.shape,
                    );
                    out
                };
                // Parameters start as the whole model's box, bitwise.
                assert_eq!(
                    cut(&reference.params),
                    m.params[t.range()],
                    "{} init",
                    t.name
                );
                let want = cut(&reference.grads);
                let mut got = m.grads[t.range()].to_vec();
                if t.name == "wte" && pp > 1 {
                    // The tied embedding's gradient is split between the first stage (input)
                    // and the last (head); together they are the whole.
                    let other = &stages[if m.layout.shard.first_stage() {
                        pp - 1
                    } else {
                        0
                    }];
                    let o = other.layout.get("wte").expect("sharded test");
                    got.iter_mut()
                        .zip(&other.grads[o.range()])
                        .for_each(|(a, b)| *a += b);
                }
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        close(*a, *b, scale),
                        "tp{tp} pp{pp} rank {r} {}[{i}]: {a} vs {b}",
                        t.name
                    );
                }
            }
        }
    }
}

#[test]
fn tensor_parallel_slices_equal_the_whole_model() {
    check(2, 1);
    check(4, 1);
}

#[test]
fn pipeline_stages_equal_the_whole_model() {
    check(1, 2);
    check(1, 4);
    check(2, 2);
    check(4, 4);
}

#[test]
fn shards_tile_every_tensor_and_count_each_element_once() {
    let c = config();
    let whole = marathon_model::ParamLayout::new(&c);
    for (tp, pp) in [(2, 2), (4, 1), (1, 4)] {
        let mut counted = vec![0usize; whole.numel()];
        for stage in 0..pp {
            for tp_rank in 0..tp {
                let lay = marathon_model::ParamLayout::sharded(
                    &c,
                    Shard {
                        tp,
                        tp_rank,
                        pp,
                        stage,
                    },
                );
                // Mark each counted element of each local tensor at its global place.
                let mut marks = vec![0usize; lay.numel()];
                for r in lay.unique_ranges() {
                    marks[r.clone()].fill(1);
                }
                for t in lay.tensors() {
                    let g = whole.get(&t.name).expect("sharded test");
                    let ids: Vec<usize> = g.range().collect();
                    let mut mine = vec![0usize; t.numel()];
                    copy_box(&ids, &g.global_shape, &t.box_offset, &mut mine, &t.shape);
                    for (k, id) in mine.into_iter().enumerate() {
                        counted[id] += marks[t.offset + k];
                    }
                }
            }
        }
        assert!(
            counted.iter().all(|&n| n == 1),
            "tp{tp} pp{pp}: some element counted {:?}",
            counted.iter().position(|&n| n != 1)
        );
    }
}
