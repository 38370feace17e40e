//! Hugging Face GPT-2 models in and out of marathon's checkpoints (`marathon ckpt export` and
//! `marathon ckpt import`).
//!
//! - [`export`]: a committed checkpoint, written by any layout, as a Hugging Face GPT-2 model
//!   (`model.safetensors` with GPT-2's tensor names and Conv1D orientation, the vocabulary
//!   unpadded, and `config.json`), in fp32 or bf16. One tensor is in memory at a time.
//! - [`import`]: a Hugging Face GPT-2 safetensors model as a committed checkpoint of step 0 with
//!   fresh optimizer state, for fine-tuning. Every tensor's presence, type and shape is checked
//!   before anything is written.
//!
//! The safetensors format is an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, and the tensors' bytes.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use marathon_model::{GptConfig, ParallelLayout, ParamLayout};
use marathon_storage::{Reader, Store, WriterOptions};

use crate::checkpoint::{read_whole, run_state, save_whole, RunState};
use crate::error::{Result, RuntimeError};

/// The weights' file in a Hugging Face model directory.
const MODEL_FILE: &str = "model.safetensors";
/// The model's shape in a Hugging Face model directory.
const CONFIG_FILE: &str = "config.json";

/// Element type of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    /// The safetensors name of the type.
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

    /// The name `config.json`'s `torch_dtype` gives the type.
    fn torch(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub step: u64,
    /// The root the checkpoint was read from.
    pub url: String,
    pub tensors: usize,
    /// The tensors' bytes in `model.safetensors`, its header aside.
    pub bytes: u64,
    pub seconds: f64,
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The root the checkpoint of step 0 was written under.
    pub url: String,
    pub parameters: usize,
    pub seconds: f64,
}

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

/// The safetensors header of `maps` in `dtype`, padded to a multiple of 8 bytes, and the length
/// of the data that follows it. Every tensor's byte range follows from the shapes.
fn header(maps: &[Mapped], step: u64, dtype: Dtype) -> (Vec<u8>, usize) {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "marathon_step": step.to_string() }),
    );
    let mut at = 0usize;
    for t in maps {
        let n = t.hf_numel() * dtype.bytes();
        header.insert(
            t.hf_name.clone(),
            serde_json::json!({ "dtype": dtype.tag(), "shape": t.hf_shape, "data_offsets": [at, at + n] }),
        );
        at += n;
    }
    let mut head = serde_json::to_vec(&header).expect("a JSON map serialises");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    (head, at)
}

/// `config.json` of the Hugging Face GPT-2 model of shape `c` in `dtype`.
fn config_json(c: &GptConfig, dtype: Dtype) -> serde_json::Value {
    serde_json::json!({
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
        "torch_dtype": dtype.torch(),
    })
}

/// Writes the checkpoint of `step` under `reader` to `dir` as a Hugging Face GPT-2 model:
/// `model.safetensors` and `config.json`, the weights in `dtype`. `dir` is created if need be.
///
/// The weights are written to `model.safetensors.partial` and renamed once synced, so a
/// `model.safetensors` is whole; `config.json` is written last. One tensor is in memory at a
/// time.
///
/// Errors: the checkpoint lacks a tensor of its model or holds one of another shape
/// ([`RuntimeError::CheckpointContent`], before anything is written); `dir` holds a
/// `model.safetensors` already ([`RuntimeError::Argument`]; it is left as it is); reading the
/// checkpoint or writing the files fails.
pub fn export(reader: &Reader, step: u64, dir: &Path, dtype: Dtype) -> Result<ExportReport> {
    let started = Instant::now();
    let m = reader.manifest(step)?;
    let url = &reader.store.url;
    let content = |reason: String| RuntimeError::content(url, step, reason);
    let state = run_state(&m, url)?;
    let maps = mapping(&state.model);
    for t in &maps {
        let name = format!("params/{}", t.name);
        let entry = m
            .tensor(&name)
            .ok_or_else(|| content(format!("it has no tensor {name}")))?;
        let want: Vec<u64> = t.global.iter().map(|&d| d as u64).collect();
        if entry.shape != want {
            return Err(content(format!(
                "{name} has shape {:?}, but its model needs {want:?}",
                entry.shape
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("create", dir, e))?;
    let target = dir.join(MODEL_FILE);
    if target.exists() {
        return Err(RuntimeError::Argument {
            name: "export directory",
            reason: format!(
                "{} already exists; export into an empty directory",
                target.display()
            ),
        });
    }
    let (head, data_bytes) = header(&maps, step, dtype);
    let tmp = dir.join("model.safetensors.partial");
    let write = |e| RuntimeError::io("write", &tmp, e);
    let mut out = BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| RuntimeError::io("create", &tmp, e))?,
    );
    out.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(write)?;
    out.write_all(&head).map_err(write)?;
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
        out.write_all(&bytes).map_err(write)?;
    }
    out.into_inner()
        .map_err(|e| write(e.into_error()))?
        .sync_all()
        .map_err(write)?;
    std::fs::rename(&tmp, &target).map_err(|e| RuntimeError::io("rename", &tmp, e))?;
    let config = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&config_json(&state.model, dtype))
        .expect("a JSON value serialises");
    std::fs::write(&config, json).map_err(|e| RuntimeError::io("write", &config, e))?;
    Ok(ExportReport {
        step,
        url: url.clone(),
        tensors: maps.len(),
        bytes: data_bytes as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One tensor's entry in a safetensors header.
#[derive(Debug)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    /// The tensor's bytes, relative to the end of the header.
    bytes: std::ops::Range<usize>,
}

/// A safetensors file, mapped, with its header read and every tensor's bytes checked to lie
/// within the file.
#[derive(Debug)]
struct Safetensors {
    bytes: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, Entry>,
    path: PathBuf,
}

impl Safetensors {
    /// Maps `path` and reads its header. Errors: the file cannot be opened, or it is not a
    /// safetensors file (too short, a header past its end or not JSON, a tensor's bytes past
    /// its end), as [`RuntimeError::Data`] naming the file.
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| RuntimeError::io("open", path, e))?;
        // SAFETY: the file is only read, and not expected to change while it is imported.
        let bytes =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| RuntimeError::io("map", path, e))?;
        let bad = |why: String| RuntimeError::data(path, format!("not a safetensors file: {why}"));
        if bytes.len() < 8 {
            return Err(bad("shorter than its header length".into()));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"));
        let data_start = match usize::try_from(n).ok().and_then(|n| n.checked_add(8)) {
            Some(end) if end <= bytes.len() => end,
            _ => return Err(bad(format!("a header of {n} bytes overruns the file"))),
        };
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start])
                .map_err(|e| bad(format!("header: {e}")))?;
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
            if off[0] > off[1] || off[1] > bytes.len() - data_start {
                return Err(bad(format!("{name}: its bytes {off:?} overrun the file")));
            }
            tensors.insert(
                name,
                Entry {
                    dtype,
                    shape,
                    bytes: off[0]..off[1],
                },
            );
        }
        Ok(Safetensors {
            bytes,
            data_start,
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// The tensor `name` (or `transformer.name`), checked against `shape`, as f32. Errors
    /// ([`RuntimeError::Data`], naming the file and the tensor): no such tensor, another
    /// shape, a type other than F32, BF16 and F16, or a byte length its shape does not need.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let bad = |why: String| RuntimeError::data(&self.path, why);
        let prefixed = format!("transformer.{name}");
        let entry = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&prefixed))
            .ok_or_else(|| bad(format!("no tensor {name}, which config.json's model needs")))?;
        if entry.shape != shape {
            return Err(bad(format!(
                "tensor {name} has shape {:?}, but config.json's model needs {shape:?}",
                entry.shape
            )));
        }
        let raw =
            &self.bytes[self.data_start + entry.bytes.start..self.data_start + entry.bytes.end];
        let n: usize = shape.iter().product();
        let width = match entry.dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => {
                return Err(bad(format!(
                    "tensor {name} is {other}; F32, BF16 and F16 can be imported"
                )))
            }
        };
        if raw.len() != n * width {
            return Err(bad(format!(
                "tensor {name} holds {} bytes, not the {} its shape needs",
                raw.len(),
                n * width
            )));
        }
        Ok(match entry.dtype.as_str() {
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

/// The model the Hugging Face `config.json` in `dir` describes. Errors ([`RuntimeError::Data`],
/// naming the file): not JSON, a field missing, a `model_type` other than GPT-2's, or a shape
/// marathon cannot train.
fn hf_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| RuntimeError::io("read", &path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::data(&path, format!("not JSON: {e}")))?;
    let field = |k: &str| -> Result<usize> {
        v[k].as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| RuntimeError::data(&path, format!("no integer field {k}")))
    };
    if let Some(t) = v["model_type"].as_str() {
        if t != "gpt2" {
            return Err(RuntimeError::data(
                &path,
                format!("model_type is {t}; only GPT-2 models can be imported"),
            ));
        }
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
        .map_err(|e| RuntimeError::data(&path, e.to_string()))?;
    Ok(config)
}

/// Writes the Hugging Face GPT-2 model in `dir` (`config.json` and `model.safetensors`) as the
/// checkpoint of step 0 under the root that `open_root` opens, with fresh (zero) optimizer
/// state, recorded as written for `layout`; any layout can load it. `single_writer` is
/// [`WriterOptions::single_writer`].
///
/// Atomicity: the model is read and every tensor checked, and `layout` validated against it,
/// before `open_root` is called; nothing is written until then. The checkpoint commits whole
/// or not at all.
///
/// Errors: the model is not a GPT-2 safetensors model marathon can train, or a tensor is
/// missing, of another shape or type ([`RuntimeError::Data`], naming the file and tensor);
/// `layout` does not divide the model ([`RuntimeError::Argument`]); the root holds a committed
/// step 0 already, which is left as it is ([`RuntimeError::Checkpoint`]); writing fails.
pub fn import(
    dir: &Path,
    open_root: impl FnOnce() -> Result<Store>,
    layout: ParallelLayout,
    single_writer: bool,
) -> Result<ImportReport> {
    let started = Instant::now();
    let config = hf_config(dir)?;
    let ParallelLayout { tp, pp, dp, .. } = layout;
    layout
        .validate(&config)
        .map_err(|e| RuntimeError::Argument {
            name: "layout",
            reason: format!("tp {tp} pp {pp} dp {dp}: {e}"),
        })?;
    let st = Safetensors::open(&dir.join(MODEL_FILE))?;
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
    Ok(ImportReport {
        url,
        parameters: params.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GptConfig {
        GptConfig {
            vocab_size: 300,
            seq_len: 16,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
        }
    }

    /// A safetensors file of `header` (JSON) and `data`, as the format lays them out.
    fn safetensors(path: &Path, header: &serde_json::Value, data: &[u8]) {
        let head = serde_json::to_vec(header).unwrap();
        let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    /// `result`'s error, which must be a data error naming `path` and saying `says`.
    fn refused<T: std::fmt::Debug>(result: Result<T>, path: &Path, says: &str) {
        match result {
            Err(e @ RuntimeError::Data { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&path.display().to_string()) && text.contains(says),
                    "{text}"
                );
            }
            other => panic!(
                "{} should be refused with {says:?}: {other:?}",
                path.display()
            ),
        }
    }

    #[test]
    fn hugging_face_order_round_trips() {
        let config = small();
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

    #[test]
    fn safetensors_refuses_files_whose_header_or_tensors_overrun_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, [1, 0, 0]).unwrap();
        refused(
            Safetensors::open(&path),
            &path,
            "shorter than its header length",
        );
        // A header length past the end, and one so large that 8 more would overflow.
        for n in [64u64, u64::MAX] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}      ");
            std::fs::write(&path, bytes).unwrap();
            refused(
                Safetensors::open(&path),
                &path,
                &format!("a header of {n} bytes overruns the file"),
            );
        }
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\"a\"");
        std::fs::write(&path, bytes).unwrap();
        refused(Safetensors::open(&path), &path, "header:");
        let header = serde_json::json!({
            "wpe.weight": { "dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16] },
        });
        safetensors(&path, &header, &[0; 12]);
        refused(
            Safetensors::open(&path),
            &path,
            "wpe.weight: its bytes [0, 16] overrun the file",
        );
        let header = serde_json::json!({
            "wpe.weight": { "dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0] },
        });
        safetensors(&path, &header, &[0; 16]);
        refused(Safetensors::open(&path), &path, "overrun the file");
        safetensors(
            &path,
            &serde_json::json!({ "wpe.weight": { "dtype": "F32", "shape": "2" } }),
            &[],
        );
        refused(Safetensors::open(&path), &path, "wpe.weight: shape:");
    }

    #[test]
    fn safetensors_reads_each_imported_type_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let values = [1.5f32, -2.0, 0.25];
        let mut data = Vec::new();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        data.extend(
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
        );
        data.extend(
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
        );
        data.extend([0u8; 24]);
        let header = serde_json::json!({
            "__metadata__": { "format": "pt" },
            "f32": { "dtype": "F32", "shape": [3], "data_offsets": [0, 12] },
            "transformer.bf16": { "dtype": "BF16", "shape": [3], "data_offsets": [12, 18] },
            "f16": { "dtype": "F16", "shape": [3], "data_offsets": [18, 24] },
            "i64": { "dtype": "I64", "shape": [3], "data_offsets": [24, 48] },
            "short": { "dtype": "F32", "shape": [3], "data_offsets": [24, 32] },
        });
        safetensors(&path, &header, &data);
        let st = Safetensors::open(&path).unwrap();
        // The values are exact in all three types; the prefixed name is found by its own.
        for name in ["f32", "bf16", "f16"] {
            assert_eq!(st.read(name, &[3]).unwrap(), values, "{name}");
        }
        refused(st.read("f32", &[1, 3]), &path, "tensor f32 has shape [3]");
        refused(st.read("absent", &[3]), &path, "no tensor absent");
        refused(st.read("i64", &[3]), &path, "tensor i64 is I64");
        refused(
            st.read("short", &[3]),
            &path,
            "tensor short holds 8 bytes, not the 12",
        );
    }

    #[test]
    fn config_refuses_other_models_and_missing_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let good = config_json(&small(), Dtype::F32);
        std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
        assert_eq!(hf_config(dir.path()).unwrap(), small());
        let mut llama = good.clone();
        llama["model_type"] = "llama".into();
        let mut headless = good.clone();
        headless.as_object_mut().unwrap().remove("n_head");
        let mut odd = good.clone();
        odd["n_head"] = 3.into();
        for (v, says) in [
            (
                llama,
                "model_type is llama; only GPT-2 models can be imported",
            ),
            (headless, "no integer field n_head"),
            (odd, "n_head"),
        ] {
            std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
            refused(hf_config(dir.path()), &path, says);
        }
        std::fs::write(&path, "{").unwrap();
        refused(hf_config(dir.path()), &path, "not JSON");
    }

    #[test]
    fn export_imports_back_bitwise_and_refuses_a_taken_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = small();
        let n = ParamLayout::new(&config).numel();
        let params: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let state = RunState {
            step: 3,
            consumed_samples: 0,
            tokens_consumed: 0,
            data_seed: 0,
            samples_per_epoch: 0,
            init_seed: 0,
            optimizer_step: 3,
            lr: 0.0,
            seq_len: config.seq_len,
            model: config.clone(),
            layout: ParallelLayout {
                tp: 1,
                pp: 1,
                dp: 1,
                distributed_optimizer: false,
            },
            origin: None,
        };
        let ones = vec![1f32; n];
        let root = dir.path().join("ck").display().to_string();
        save_whole(
            Store::open(&root).unwrap(),
            &state,
            &params,
            &ones,
            &ones,
            WriterOptions::default(),
        )
        .unwrap();
        let reader = Reader::new(Store::open(&root).unwrap());
        let hf = dir.path().join("hf");
        let report = export(&reader, 3, &hf, Dtype::F32).unwrap();
        assert_eq!(report.tensors, mapping(&config).len());
        let written = std::fs::read(hf.join(MODEL_FILE)).unwrap();
        match export(&reader, 3, &hf, Dtype::Bf16) {
            Err(e @ RuntimeError::Argument { .. }) => {
                assert!(e.to_string().contains("already exists"), "{e}")
            }
            other => panic!("a second export into {} ran: {other:?}", hf.display()),
        }
        assert_eq!(std::fs::read(hf.join(MODEL_FILE)).unwrap(), written);
        let back = dir.path().join("back").display().to_string();
        let layout = ParallelLayout {
            tp: 2,
            ..state.layout
        };
        let report = import(&hf, || Ok(Store::open(&back)?), layout, false).unwrap();
        assert_eq!(report.parameters, n);
        let reader = Reader::new(Store::open(&back).unwrap());
        let m = reader.manifest(0).unwrap();
        assert_eq!(run_state(&m, &back).unwrap().layout, layout);
        for t in ParamLayout::new(&config).tensors() {
            let got =
                read_whole(&reader, &m, &format!("params/{}", t.name), &t.global_shape).unwrap();
            let want = &params[t.range()];
            if t.name == "wte" {
                // The vocabulary's padding rows are not exported and come back zero.
                let kept = config.vocab_size * config.n_embd;
                assert_eq!(&got[..kept], &want[..kept]);
                assert!(got[kept..].iter().all(|&v| v == 0.0));
            } else {
                assert_eq!(got, want, "{}", t.name);
            }
            let moment =
                read_whole(&reader, &m, &format!("adam_m/{}", t.name), &t.global_shape).unwrap();
            assert!(moment.iter().all(|&v| v == 0.0), "fresh moments");
        }
        // A layout that does not divide the model is refused before the root is opened.
        let opened = std::cell::Cell::new(false);
        let bad = ParallelLayout {
            tp: 3,
            ..state.layout
        };
        let result = import(
            &hf,
            || {
                opened.set(true);
                Ok(Store::open(&back)?)
            },
            bad,
            false,
        );
        assert!(
            matches!(&result, Err(RuntimeError::Argument { name: "layout", .. })),
            "{result:?}"
        );
        assert!(
            !opened.get(),
            "the root is opened only once the model is checked"
        );
    }
}
