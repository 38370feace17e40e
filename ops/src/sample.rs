//! `marathon sample <root> --prompt <text>`: text from any checkpoint, on the CPU, so a user
//! can look at what a run has learned. Greedy at temperature 0, otherwise sampled from the
//! temperature-scaled distribution, optionally cut to the `top_k` most likely tokens.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use marathon_model::rng::Rng;
use marathon_model::Gpt;
use marathon_runtime::checkpoint::{load_params, RunState};
use marathon_runtime::data::prepare::gpt2_tokenizer;

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// The job's checkpoint root: a directory or a URL (file://, s3://, az://, gs://).
    root: String,
    /// The step (default: the newest committed).
    #[arg(long)]
    step: Option<u64>,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// 0 picks the most likely token each time; higher values sample more freely.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the next-token probabilities after the prompt here, as JSON.
    #[arg(long)]
    probs_out: Option<PathBuf>,
    /// Object store options, as key=value.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

pub fn run(args: SampleArgs) -> Result<()> {
    ensure!(
        args.temperature >= 0.0 && args.temperature.is_finite(),
        "--temperature {}: use 0 (greedy) or a positive number",
        args.temperature
    );
    let reader = crate::ckpt::reader(&args.root, &args.options)?;
    let step = crate::ckpt::pick(&reader, args.step)?;
    let m = reader.manifest(step)?;
    let state: RunState = serde_json::from_value(m.run.clone())
        .with_context(|| format!("step {step} under {} has no run state", args.root))?;
    let config = state.model;
    let t = config.seq_len;
    let mut model = Gpt::<f32>::new(config, 1, t)?;
    load_params(&reader, &m, &model.layout, &mut model.params)?;
    let bpe = gpt2_tokenizer();
    let mut ids: Vec<u32> = bpe.encode_ordinary(&args.prompt);
    ensure!(!ids.is_empty(), "--prompt: give some text to continue");
    let prompt_len = ids.len();
    let mut rng = Rng::new(args.seed);
    let mut window = vec![0u32; t];
    for i in 0..args.tokens.max(1) {
        // The last t tokens, padded after the end: attention is causal, so padding changes
        // nothing before it.
        let ctx = &ids[ids.len().saturating_sub(t)..];
        window.fill(0);
        window[..ctx.len()].copy_from_slice(ctx);
        model.forward(&window, &window);
        let probs = model.probabilities(ctx.len() - 1);
        if i == 0 {
            if let Some(path) = &args.probs_out {
                let v = serde_json::json!({ "tokens": &ids, "probs": probs });
                std::fs::write(path, serde_json::to_vec(&v)?)?;
            }
        }
        if i >= args.tokens {
            break;
        }
        ids.push(choose(&probs, args.temperature, args.top_k, &mut rng));
    }
    let prompt = bpe.decode(&ids[..prompt_len]).unwrap_or_default();
    let text = bpe
        .decode(&ids[prompt_len..])
        .unwrap_or_else(|_| "(tokens that do not decode to UTF-8)".into());
    println!("{prompt}{text}");
    Ok(())
}

/// The next token: the most likely at temperature 0, else drawn from p^(1/temperature) over
/// the `top_k` most likely (all when 0).
fn choose(probs: &[f32], temperature: f64, top_k: usize, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    if temperature == 0.0 {
        return order[0] as u32;
    }
    let k = if top_k == 0 {
        order.len()
    } else {
        top_k.min(order.len())
    };
    let weights: Vec<f64> = order[..k]
        .iter()
        .map(|&i| (probs[i] as f64).max(0.0).powf(1.0 / temperature))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.next_f64() * total;
    for (w, &i) in weights.iter().zip(&order) {
        if x < *w {
            return i as u32;
        }
        x -= w;
    }
    order[0] as u32
}
