//! Every parameter's analytic gradient against central finite differences, in f64.

use marathon_model::rng::Rng;
use marathon_model::{Gpt, GptConfig};

#[test]
fn every_gradient_matches_finite_differences_in_f64() {
    let config = GptConfig {
        vocab_size: 50,
        seq_len: 6,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
    };
    let (b, t) = (2, 5);
    let mut model = Gpt::<f64>::new(config.clone(), b, t).unwrap();
    model.init_params(3, 0.3);
    // Move every parameter off its structured initial value (LayerNorm weights of exactly one,
    // zero biases) so every term of every backward formula is exercised.
    let mut rng = Rng::new(11);
    let real_vocab = config.vocab_size * config.n_embd;
    for (i, p) in model.params.iter_mut().enumerate() {
        if i >= real_vocab && i < config.padded_vocab_size() * config.n_embd {
            continue; // padding rows of wte stay zero
        }
        *p += 0.1 * rng.normal();
    }
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(50) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(50) as u32).collect();

    model.zero_grad();
    model.forward(&tokens, &targets);
    model.backward(1.0 / (b * t) as f64);
    let analytic = model.grads.clone();

    let h = 1e-5;
    let mut worst = (0.0f64, String::new());
    for spec in model.layout.tensors().to_vec() {
        let (mut diff2, mut num2) = (0.0, 0.0);
        for i in spec.range() {
            let orig = model.params[i];
            model.params[i] = orig + h;
            let up = model.forward(&tokens, &targets);
            model.params[i] = orig - h;
            let down = model.forward(&tokens, &targets);
            model.params[i] = orig;
            let numeric = (up - down) / (2.0 * h);
            diff2 += (numeric - analytic[i]).powi(2);
            num2 += numeric * numeric;
        }
        assert!(
            num2 > 0.0,
            "{} has an all-zero gradient: the check would prove nothing",
            spec.name
        );
        let rel = (diff2 / num2).sqrt();
        if rel > worst.0 {
            worst = (rel, spec.name.clone());
        }
        assert!(
            rel < 1e-6,
            "{}: relative error {rel:e} of the analytic gradient",
            spec.name
        );
    }
    println!("worst relative gradient error {:e} in {}", worst.0, worst.1);
    // The padding rows of the tied embedding never receive gradient.
    let pad = real_vocab..config.padded_vocab_size() * config.n_embd;
    assert!(analytic[pad].iter().all(|&g| g == 0.0));
}
