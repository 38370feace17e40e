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
use marathon_runtime::checkpoint::{save_whole, RunState};
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

/// The run state of a checkpoint's manifest.
fn run_state(m: &Manifest, url: &str) -> Result<RunState> {
    serde_json::from_value(m.run.clone()).with_context(|| {
        format!(
            "the checkpoint of step {} under {url} has no marathon run state",
            m.step
        )
    })
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
/// state, recorded as written for (tp, pp).
pub fn import_hf(
    dir: &Path,
    open_root: impl FnOnce() -> Result<Store>,
    tp: usize,
    pp: usize,
    single_writer: bool,
) -> Result<()> {
    let started = Instant::now();
    let config = hf_config(dir)?;
    let layout = ParallelLayout {
        tp,
        pp,
        dp: 1,
        distributed_optimizer: false,
    };
    layout
        .validate(&config)
        .map_err(|e| anyhow::anyhow!("--tp {tp} --pp {pp}: {e}"))?;
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

/// What an offline reshard did.
#[derive(Debug, serde::Serialize)]
pub struct ReshardReport {
    pub step: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
    /// The objects the new checkpoint was written as, each at most `bound_bytes` of values.
    pub writers: usize,
    pub bound_bytes: u64,
    pub largest_box_bytes: u64,
    /// Peak resident memory of this process (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// This process's peak resident memory, from /proc.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Holds this process's allocator to two arenas. glibc gives a thread that allocates while
/// another holds its arena an arena of its own (up to eight per core) and keeps what is freed
/// there for that arena's next use. The reshard's read, encode and upload threads each free
/// chunk-sized buffers (4 MiB and more) on whichever thread ran last, so a run could keep a
/// dozen arenas' worth of them resident, and its peak varied by twice the staging from one
/// run to the next.
fn few_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; any thread may call it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Writes the checkpoint of `step` under `reader` as a new committed checkpoint of the same
/// step under `dst`, stored the way a job in `target` would store it: every box each target
/// rank owns (parameters and, with `target.distributed_optimizer`, each replica's moment shard)
/// read straight from the chunks it intersects, checksums checked as they stream.
///
/// Memory: the pieces are written in batches of at most the largest tensor box (or 16 MiB of
/// values, if more), each batch as one writer of the new checkpoint, through two writers in
/// turn: one batch is read while the previous one is written. So two of the largest box are
/// held, plus the writers' upload and encode buffers; the allocator keeps few arenas, so
/// what is freed is used again rather than kept beside it.
pub fn reshard(
    reader: &Reader,
    step: u64,
    open_dst: impl FnOnce() -> Result<Store>,
    target: ParallelLayout,
    codec: marathon_storage::codec::Codec,
    single_writer: bool,
    progress: bool,
) -> Result<ReshardReport> {
    use marathon_model::Shard;
    use marathon_runtime::checkpoint::plan_pieces;
    use marathon_runtime::comm::chunk_range;
    use marathon_storage::{CheckpointWriter, Piece};
    few_allocator_arenas();
    let started = Instant::now();
    let m = reader.manifest(step)?;
    let mut state = run_state(&m, &reader.store.url)?;
    target.validate(&state.model).map_err(|e| {
        anyhow::anyhow!(
            "--tp {} --pp {} --dp {}: {e}",
            target.tp,
            target.pp,
            target.dp
        )
    })?;
    let dst = open_dst()?;
    if Reader::new(dst.clone()).committed()?.contains(&step) {
        bail!(
            "{} already holds a committed checkpoint of step {step}; it is left as it is. \
             Reshard into another root",
            dst.url
        );
    }
    // Every target rank's pieces, in rank order.
    let mut pieces: Vec<Piece> = Vec::new();
    for stage in 0..target.pp {
        for replica in 0..target.dp {
            for tp_rank in 0..target.tp {
                let shard = Shard {
                    tp: target.tp,
                    tp_rank,
                    pp: target.pp,
                    stage,
                };
                let layout = ParamLayout::sharded(&state.model, shard);
                let n = layout.numel();
                let opt = if target.distributed_optimizer {
                    chunk_range(n, target.dp, replica)
                } else {
                    0..n
                };
                let rank = plan_pieces(
                    &layout,
                    &opt,
                    replica,
                    target.dp,
                    target.distributed_optimizer,
                );
                pieces.extend(rank.into_iter().map(|(p, _, _)| p));
            }
        }
    }
    for p in &pieces {
        let entry = m
            .tensor(&p.tensor)
            .with_context(|| format!("the checkpoint of step {step} has no tensor {}", p.tensor))?;
        ensure!(
            entry.shape == p.shape,
            "{} of step {step} has shape {:?}, but the model needs {:?}",
            p.tensor,
            entry.shape,
            p.shape
        );
    }
    let largest = pieces.iter().map(|p| p.region.numel()).max().unwrap_or(0);
    let bound = largest.max(4 << 20);
    // The first writer commits once every writer's index exists, so its staging lives to the
    // end: it takes only the smallest piece.
    let smallest = (0..pieces.len())
        .min_by_key(|&i| pieces[i].region.numel())
        .context("the model has no tensors")?;
    let mut batches: Vec<Vec<Piece>> = vec![vec![pieces.remove(smallest)], Vec::new()];
    let mut filled = 0u64;
    for p in pieces {
        let n = p.region.numel();
        if filled + n > bound && !batches.last().expect("a batch").is_empty() {
            batches.push(Vec::new());
            filled = 0;
        }
        filled += n;
        batches.last_mut().expect("a batch").push(p);
    }
    let total: u64 = batches.iter().flatten().map(|p| 4 * p.region.numel()).sum();
    let bar = if progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "reshard {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    state.layout = target;
    let run = serde_json::to_value(&state)?;
    let writers = batches.len();
    // Upload and encode buffers kept small: two writers are alive at once.
    let opts = WriterOptions {
        retention: None,
        codec,
        uploads_inflight_max: 2,
        encoders_max: 1,
        single_writer,
        // The writers of this one persist share its epoch.
        epoch: Some(
            std::time::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.as_nanos() as u64),
        ),
        ..WriterOptions::default()
    };
    // The first writer commits once every writer's index exists, so it stays until the end;
    // the others are one writer taking each rank in turn, reusing its staging buffer.
    // Two more writers take the other ranks in turn, each reusing its staging buffer, so one
    // batch is read while the one before it is written.
    let mut first = CheckpointWriter::new(dst.clone(), 0, writers, opts.clone())?;
    let mut turns = [1, 2]
        .map(|r| CheckpointWriter::new(dst.clone(), r.min(writers - 1), writers, opts.clone()));
    let mut failed: Option<anyhow::Error> = None;
    for (i, batch) in batches.into_iter().enumerate() {
        let w = if i == 0 {
            &mut first
        } else {
            let w = turns[i % 2].as_mut().map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(done) = w.set_rank(i) {
                done?;
            }
            w
        };
        w.snapshot(step, run.clone(), batch.clone(), |buf| {
            let mut at = 0;
            for p in &batch {
                let n = p.region.numel() as usize;
                if failed.is_none() {
                    if let Err(e) = reader.read_box(&m, &p.tensor, &p.region, &mut buf[at..at + n])
                    {
                        failed =
                            Some(anyhow::Error::from(e).context(format!("reading {}", p.tensor)));
                    }
                }
                at += n;
                bar.inc(4 * n as u64);
            }
        });
        if let Some(e) = failed.take() {
            // Nothing commits without every writer's index; the first writer gives up at its
            // deadline, leaving an uncommitted prefix for `ckpt gc`.
            return Err(e);
        }
    }
    for w in turns.iter_mut().flatten() {
        if let Some(done) = w.wait() {
            done?;
        }
    }
    if let Some(done) = first.wait() {
        done?;
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(ReshardReport {
        step,
        bytes: total,
        seconds,
        gb_per_s: total as f64 / seconds / 1e9,
        writers,
        bound_bytes: 4 * bound,
        largest_box_bytes: 4 * largest,
        peak_rss_bytes: peak_rss(),
    })
}
