//! Checkpoints in and out of marathon, and side by side:
//!
//! - `marathon ckpt export <root> <dir> --format hf`: a committed checkpoint, written by any
//!   layout, as a Hugging Face GPT-2 model (`model.safetensors` with GPT-2's tensor names and
//!   Conv1D orientation, the vocabulary unpadded, and `config.json`), in fp32 or bf16. One
//!   tensor is in memory at a time.
//! - `marathon ckpt import <dir> <root>`: a Hugging Face GPT-2 safetensors model as a committed
//!   checkpoint of step 0 with fresh optimizer state, for fine-tuning. Every tensor's presence,
//!   type and shape is checked before anything is written.
//! - `marathon ckpt diff <a> <b>`: two checkpoints of one model, from any two layouts, tensor by
//!   tensor; exits non-zero where they differ beyond a tolerance.
//!
//! The safetensors format is an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, and the tensors' bytes.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use marathon_model::ParallelLayout;
use marathon_model::{GptConfig, ParamLayout};
use marathon_runtime::checkpoint::{run_state, save_whole, RunState};
use marathon_storage::format::Manifest;
use marathon_storage::{Reader, Store, TensorBox, WriterOptions};

/// How a marathon tensor maps onto its Hugging Face GPT-2 counterpart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Orient {
    /// The same values in the same order.
    Same,
    /// marathon's (rows, cols) is Hugging Face's Conv1D (cols, rows): transposed.
    Transpose(usize, usize),
    /// The token embedding: marathon pads the vocabulary; Hugging Face keeps `rows` of it.
    Unpad(usize),
}

/// One tensor of the export: marathon's name and shape, the Hugging Face name and shape.
#[derive(Debug, Clone)]
struct Mapped {
    name: String,
    global: Vec<usize>,
    hf_name: String,
    hf_shape: Vec<usize>,
    orient: Orient,
}

impl Mapped {
    fn hf_numel(&self) -> usize {
        self.hf_shape.iter().product()
    }
}

/// Every tensor of `config`'s model in buffer order, mapped to Hugging Face GPT-2.
fn mapping(config: &GptConfig) -> Vec<Mapped> {
    let (c, v) = (config.n_embd, config.vocab_size);
    ParamLayout::new(config)
        .tensors()
        .iter()
        .map(|t| {
            let g = t.global_shape.clone();
            let (hf_name, hf_shape, orient) = match t.name.as_str() {
                "wte" => ("wte.weight".to_string(), vec![v, c], Orient::Unpad(v)),
                "wpe" => ("wpe.weight".to_string(), g.clone(), Orient::Same),
                n if n.ends_with(".weight") && n.contains(".c_") => {
                    // Linear weights are (out, in) here and Conv1D (in, out) there.
                    let rows: usize = g[..g.len() - 1].iter().product();
                    let cols = g[g.len() - 1];
                    (
                        n.to_string(),
                        vec![cols, rows],
                        Orient::Transpose(rows, cols),
                    )
                }
                // Norms, biases (c_attn's (3, C) flattened) and the rest: one axis.
                n => (n.to_string(), vec![g.iter().product()], Orient::Same),
            };
            Mapped {
                name: t.name.clone(),
                global: g,
                hf_name,
                hf_shape,
                orient,
            }
        })
        .collect()
}

/// marathon's values of one tensor in Hugging Face order (in place where no transpose is
/// needed).
fn to_hf(m: &Mapped, mut x: Vec<f32>) -> Vec<f32> {
    match m.orient {
        Orient::Same => x,
        Orient::Unpad(rows) => {
            x.truncate(rows * m.global[m.global.len() - 1]);
            x
        }
        Orient::Transpose(r, c) => {
            let mut out = vec![0.0; r * c];
            for i in 0..r {
                for j in 0..c {
                    out[j * r + i] = x[i * c + j];
                }
            }
            out
        }
    }
}

/// The inverse of [`to_hf`]: Hugging Face's values into marathon's buffer (padding rows zero).
fn from_hf(m: &Mapped, y: &[f32], out: &mut [f32]) {
    match m.orient {
        Orient::Same => out.copy_from_slice(y),
        Orient::Unpad(_) => {
            out[..y.len()].copy_from_slice(y);
            out[y.len()..].fill(0.0);
        }
        Orient::Transpose(r, c) => {
            for i in 0..r {
                for j in 0..c {
                    out[i * c + j] = y[j * r + i];
                }
            }
        }
    }
}

fn read_whole(reader: &Reader, m: &Manifest, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut out = vec![0f32; shape.iter().product::<u64>() as usize];
    reader
        .read_box(m, name, &TensorBox::whole(&shape), &mut out)
        .with_context(|| format!("reading {name} of step {}", m.step))?;
    Ok(out)
}

/// Element type of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn tag(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
        }
    }
    fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// Writes the checkpoint of `step` under `reader` to `dir` as a Hugging Face GPT-2 model.
pub fn export_hf(reader: &Reader, step: u64, dir: &Path, dtype: Dtype) -> Result<()> {
    let started = Instant::now();
    let m = reader.manifest(step)?;
    let state = run_state(&m, &reader.store.url)?;
    let maps = mapping(&state.model);
    for t in &maps {
        let name = format!("params/{}", t.name);
        let entry = m
            .tensor(&name)
            .with_context(|| format!("the checkpoint of step {step} has no tensor {name}"))?;
        let want: Vec<u64> = t.global.iter().map(|&d| d as u64).collect();
        ensure!(
            entry.shape == want,
            "{name} of step {step} has shape {:?}, but its model needs {want:?}",
            entry.shape
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let target = dir.join("model.safetensors");
    if target.exists() {
        bail!(
            "{} already exists; export into an empty directory",
            target.display()
        );
    }
    // The header first: every tensor's byte range follows from the shapes.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "marathon_step": step.to_string() }),
    );
    let mut at = 0usize;
    for t in &maps {
        let n = t.hf_numel() * dtype.bytes();
        header.insert(
            t.hf_name.clone(),
            serde_json::json!({ "dtype": dtype.tag(), "shape": t.hf_shape, "data_offsets": [at, at + n] }),
        );
        at += n;
    }
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = dir.join("model.safetensors.partial");
    let mut out = BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?,
    );
    out.write_all(&(head.len() as u64).to_le_bytes())?;
    out.write_all(&head)?;
    for t in &maps {
        let y = to_hf(
            t,
            read_whole(reader, &m, &format!("params/{}", t.name), &t.global)?,
        );
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => y.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::Bf16 => y
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        out.write_all(&bytes)?;
    }
    out.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &target)?;
    let c = &state.model;
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.seq_len,
        "n_ctx": c.seq_len,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": true,
        "torch_dtype": if dtype == Dtype::F32 { "float32" } else { "bfloat16" },
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "exported step {step} of {} ({} tensors, {:.1} MB) to {} in {secs:.2} s",
        reader.store.url,
        maps.len(),
        at as f64 / 1e6,
        dir.display()
    );
    Ok(())
}

/// A safetensors file's header: name to (dtype, shape, byte range), and where the data starts.
struct Safetensors {
    bytes: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, (String, Vec<usize>, usize, usize)>,
    path: PathBuf,
}

impl Safetensors {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: the file is only read, and not expected to change while it is imported.
        let bytes = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("map {}", path.display()))?;
        let bad =
            |why: String| anyhow::anyhow!("{}: not a safetensors file: {why}", path.display());
        ensure!(
            bytes.len() >= 8,
            bad("shorter than its header length".into())
        );
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes")) as usize;
        ensure!(
            8 + n <= bytes.len(),
            bad(format!("a header of {n} bytes overruns the file"))
        );
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(format!("header: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap_or("").to_string();
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                .map_err(|e| bad(format!("{name}: shape: {e}")))?;
            let off: [usize; 2] = serde_json::from_value(v["data_offsets"].clone())
                .map_err(|e| bad(format!("{name}: data_offsets: {e}")))?;
            ensure!(
                off[0] <= off[1] && 8 + n + off[1] <= bytes.len(),
                bad(format!("{name}: its bytes {off:?} overrun the file"))
            );
            tensors.insert(name, (dtype, shape, off[0], off[1]));
        }
        Ok(Safetensors {
            bytes,
            data_start: 8 + n,
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// The tensor `name` (or `transformer.name`), checked against `shape`, as f32.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let prefixed = format!("transformer.{name}");
        let (dtype, have, lo, hi) = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&prefixed))
            .with_context(|| {
                format!(
                    "{}: no tensor {name}, which config.json's model needs",
                    self.path.display()
                )
            })?;
        ensure!(
            have == shape,
            "{}: tensor {name} has shape {have:?}, but config.json's model needs {shape:?}",
            self.path.display()
        );
        let raw = &self.bytes[self.data_start + lo..self.data_start + hi];
        let n: usize = shape.iter().product();
        let width = match dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => bail!(
                "{}: tensor {name} is {other}; F32, BF16 and F16 can be imported",
                self.path.display()
            ),
        };
        ensure!(
            raw.len() == n * width,
            "{}: tensor {name} holds {} bytes, not the {} its shape needs",
            self.path.display(),
            raw.len(),
            n * width
        );
        Ok(match dtype.as_str() {
            "F32" => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("four bytes")))
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            _ => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}

/// The model a Hugging Face `config.json` describes.
fn hf_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    let field = |k: &str| -> Result<usize> {
        v[k].as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("{}: no integer field {k}", path.display()))
    };
    if let Some(t) = v["model_type"].as_str() {
        ensure!(
            t == "gpt2",
            "{}: model_type is {t}; only GPT-2 models can be imported",
            path.display()
        );
    }
    let config = GptConfig {
        vocab_size: field("vocab_size")?,
        seq_len: field("n_positions")?,
        n_layer: field("n_layer")?,
        n_head: field("n_head")?,
        n_embd: field("n_embd")?,
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Writes the Hugging Face GPT-2 model in `dir` as the checkpoint of step 0 under the root that
/// `open_root` opens (only once the model has been read and checked), with fresh optimizer
/// state, recorded as written for `layout`.
pub fn import_hf(
    dir: &Path,
    open_root: impl FnOnce() -> Result<Store>,
    layout: ParallelLayout,
    single_writer: bool,
) -> Result<()> {
    let started = Instant::now();
    let config = hf_config(dir)?;
    let ParallelLayout { tp, pp, dp, .. } = layout;
    layout
        .validate(&config)
        .map_err(|e| anyhow::anyhow!("--tp {tp} --pp {pp} --dp {dp}: {e}"))?;
    let st = Safetensors::open(&dir.join("model.safetensors"))?;
    let lay = ParamLayout::new(&config);
    let mut params = vec![0f32; lay.numel()];
    // Every tensor is read and checked before anything is written.
    for (t, spec) in mapping(&config).iter().zip(lay.tensors()) {
        let y = st.read(&t.hf_name, &t.hf_shape)?;
        from_hf(t, &y, &mut params[spec.range()]);
    }
    let state = RunState {
        step: 0,
        consumed_samples: 0,
        tokens_consumed: 0,
        data_seed: 0,
        samples_per_epoch: 0,
        init_seed: 0,
        optimizer_step: 0,
        lr: 0.0,
        seq_len: config.seq_len,
        model: config,
        layout,
        origin: Some(format!("imported from {}", dir.display())),
    };
    let zeros = vec![0f32; params.len()];
    let root = open_root()?;
    let url = root.url.clone();
    save_whole(
        root,
        &state,
        &params,
        &zeros,
        &zeros,
        WriterOptions {
            single_writer,
            ..WriterOptions::default()
        },
    )?;
    eprintln!(
        "imported {} ({} parameters) as step 0 under {url} in {:.2} s; fine-tune with \
         checkpoint.root pointing there",
        dir.display(),
        params.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How close two checkpoints must be.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Every element within `atol + rtol * |b|` (0 and 0: bitwise).
    Elementwise { atol: f64, rtol: f64 },
    /// Each family's ‖a − b‖ / ‖b‖ (over all its tensors) at most this: the measure for runs
    /// in two layouts, whose Adam updates of near-zero gradients may differ elementwise.
    L2(f64),
}

/// Compares the checkpoints `a` and `b` tensor by tensor, over `families` (`params`, `adam_m`,
/// `adam_v`). Returns whether they agree within `tol`.
pub fn diff(
    a: (&Reader, u64),
    b: (&Reader, u64),
    families: &[&str],
    tol: Tolerance,
) -> Result<bool> {
    let (atol, rtol) = match tol {
        Tolerance::Elementwise { atol, rtol } => (atol, rtol),
        Tolerance::L2(_) => (f64::INFINITY, 0.0),
    };
    let (ma, mb) = (a.0.manifest(a.1)?, b.0.manifest(b.1)?);
    let (sa, sb) = (
        run_state(&ma, &a.0.store.url)?,
        run_state(&mb, &b.0.store.url)?,
    );
    ensure!(
        sa.model == sb.model,
        "the checkpoints are of different models: {:?} and {:?}; diff compares one model's \
         checkpoints",
        sa.model,
        sb.model
    );
    println!(
        "a: step {} of {} (tp {} pp {} dp {}); b: step {} of {} (tp {} pp {} dp {})",
        a.1,
        a.0.store.url,
        sa.layout.tp,
        sa.layout.pp,
        sa.layout.dp,
        b.1,
        b.0.store.url,
        sb.layout.tp,
        sb.layout.pp,
        sb.layout.dp
    );
    println!(
        "{:<40} {:>11} {:>11} {:>11} {:>11}",
        "tensor", "elements", "bitwise eq", "max abs", "max rel"
    );
    let mut all_ok = true;
    for family in families {
        let (mut d2, mut n2) = (0f64, 0f64);
        for t in ParamLayout::new(&sa.model).tensors() {
            let name = format!("{family}/{}", t.name);
            let x = read_whole(a.0, &ma, &name, &t.global_shape)?;
            let y = read_whole(b.0, &mb, &name, &t.global_shape)?;
            let (mut same, mut max_abs, mut max_rel, mut ok) = (0usize, 0f64, 0f64, true);
            for (&p, &q) in x.iter().zip(&y) {
                d2 += (p as f64 - q as f64).powi(2);
                n2 += (q as f64).powi(2);
                if p.to_bits() == q.to_bits() {
                    same += 1;
                    continue;
                }
                let d = (p as f64 - q as f64).abs();
                let scale = (p.abs().max(q.abs()) as f64).max(f64::MIN_POSITIVE);
                max_abs = max_abs.max(d);
                max_rel = max_rel.max(d / scale);
                ok &= d <= atol + rtol * (q as f64).abs();
            }
            all_ok &= ok;
            println!(
                "{:<40} {:>11} {:>11} {:>11.3e} {:>11.3e}{}",
                name,
                x.len(),
                same,
                max_abs,
                max_rel,
                if ok { "" } else { "  DIFFERS" }
            );
        }
        let l2 = d2.sqrt() / n2.sqrt().max(f64::MIN_POSITIVE);
        let within = match tol {
            Tolerance::L2(max) => l2 <= max,
            Tolerance::Elementwise { .. } => true,
        };
        all_ok &= within;
        println!(
            "{family}: relative L2 difference {l2:.3e}{}",
            if within { "" } else { "  DIFFERS" }
        );
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_order_round_trips() {
        let config = GptConfig {
            vocab_size: 300,
            seq_len: 16,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
        };
        for m in mapping(&config) {
            let n: usize = m.global.iter().product();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let y = to_hf(&m, x.clone());
            assert_eq!(y.len(), m.hf_numel(), "{}", m.name);
            let mut back = vec![f32::NAN; n];
            from_hf(&m, &y, &mut back);
            let keep = match m.orient {
                Orient::Unpad(rows) => rows * config.n_embd,
                _ => n,
            };
            assert_eq!(&back[..keep], &x[..keep], "{}", m.name);
        }
        let attn = mapping(&config)
            .into_iter()
            .find(|m| m.name == "h.0.attn.c_attn.weight")
            .expect("c_attn");
        // GPT-2's Conv1D: (in, out) = (C, 3C).
        assert_eq!(attn.hf_shape, vec![8, 24]);
    }
}
