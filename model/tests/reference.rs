//! The model against values recorded once from an independent PyTorch implementation
//! (`fixtures/make_reference.py`, float64): loss, gradients, and three clipped AdamW steps.

// The fixture helpers unwrap: a malformed fixture is a failed test, not a case to handle.
#![allow(clippy::unwrap_used)]

use marathon_model::optim::{clip_grads, sum_squares};
use marathon_model::{AdamW, AdamWConfig, Float, Gpt, GptConfig};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference_tiny.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn model<F: Float>(fx: &Value) -> (Gpt<F>, Vec<u32>, Vec<u32>) {
    let c = &fx["config"];
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    let config = GptConfig {
        vocab_size: get("vocab_size"),
        seq_len: get("seq_len"),
        n_layer: get("n_layer"),
        n_head: get("n_head"),
        n_embd: get("n_embd"),
    };
    assert_eq!(config.padded_vocab_size(), get("padded_vocab_size"));
    let (b, t) = (
        fx["batch"].as_u64().unwrap() as usize,
        fx["seq"].as_u64().unwrap() as usize,
    );
    let mut m = Gpt::<F>::new(config, b, t).unwrap();
    let names: Vec<String> = m.layout.tensors().iter().map(|s| s.name.clone()).collect();
    let recorded = fx["params"].as_object().unwrap();
    assert_eq!(
        recorded.len(),
        names.len(),
        "fixture and model name different tensors"
    );
    for name in &names {
        let values = floats(&recorded[name]);
        let view = m.layout.view_mut(&mut m.params, name);
        assert_eq!(view.len(), values.len(), "{name}");
        view.iter_mut()
            .zip(&values)
            .for_each(|(p, &v)| *p = F::from_f64(v));
    }
    (m, ints(&fx["inputs"]), ints(&fx["targets"]))
}

/// Runs the recorded checks in precision `F`, asserting relative errors below `tol`.
fn check<F: Float>(tol: f64) {
    let fx = fixture();
    let (mut m, tokens, targets) = model::<F>(&fx);
    let n = tokens.len();
    let loss = m.forward(&tokens, &targets).to_f64();
    let want = fx["loss"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() < tol,
        "loss {loss} vs reference {want}"
    );
    m.zero_grad();
    m.backward(F::from_f64(1.0 / n as f64));
    let mut worst = 0.0f64;
    for (name, g) in fx["grads"].as_object().unwrap() {
        let view = m.layout.view(&m.grads, name);
        let (idx, val) = (g["index"].as_array().unwrap(), floats(&g["value"]));
        let scale = val.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for (i, &want) in idx.iter().zip(&val) {
            let got = view[i.as_u64().unwrap() as usize].to_f64();
            if want == 0.0 {
                assert_eq!(got, 0.0, "{name}[{i}] must be exactly zero");
                continue;
            }
            let rel = (got - want).abs() / scale;
            worst = worst.max(rel);
            assert!(rel < tol, "{name}[{i}]: gradient {got} vs reference {want} (relative to the tensor's largest {scale})");
        }
    }
    println!(
        "{}: loss rel err {:e}, worst gradient rel err {worst:e}",
        std::any::type_name::<F>(),
        ((loss - want) / want).abs()
    );

    // Three AdamW steps with clipping on the same batch.
    let a = &fx["adamw"];
    let cfg = AdamWConfig {
        beta1: a["beta1"].as_f64().unwrap(),
        beta2: a["beta2"].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    let (lr, clip) = (a["lr"].as_f64().unwrap(), a["grad_clip"].as_f64().unwrap());
    let mut opt = AdamW::<F>::new(cfg, &m.layout);
    let (losses, norms) = (floats(&a["loss_before_step"]), floats(&a["grad_norm"]));
    for step in 0..losses.len() {
        m.zero_grad();
        let loss = m.forward(&tokens, &targets).to_f64();
        m.backward(F::from_f64(1.0 / n as f64));
        let norm = sum_squares(&m.grads).sqrt();
        assert!(
            ((loss - losses[step]) / losses[step]).abs() < tol,
            "step {step}: loss {loss} vs {}",
            losses[step]
        );
        assert!(
            ((norm - norms[step]) / norms[step]).abs() < tol,
            "step {step}: grad norm {norm} vs {}",
            norms[step]
        );
        clip_grads(&mut m.grads, norm, clip);
        opt.update(&mut m.params, &m.grads, lr);
    }
    let after = m.forward(&tokens, &targets).to_f64();
    let want = a["loss_after"].as_f64().unwrap();
    assert!(
        ((after - want) / want).abs() < tol,
        "loss after 3 AdamW steps {after} vs {want}"
    );
}

#[test]
fn f32_matches_pytorch_within_1e_5() {
    check::<f32>(1e-5);
}

#[test]
fn f64_matches_pytorch_within_1e_12() {
    check::<f64>(1e-12);
}
