//! The small job that marathon's own checks train (the GPU self-test, the chaos scenarios and
//! the tests), as TOML: a GPT of two layers, 32 wide, over GPT-2's vocabulary, with one
//! optimizer setting. A user changes the fields it needs; an optional field left `None` is
//! left out, so the configuration's own default applies.

/// A small job's configuration.
#[derive(Debug, Clone)]
pub struct SmallJob {
    pub vocab_size: usize,
    /// The model's context (model.seq_len).
    pub context: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// The token file trained on.
    pub train: String,
    pub val: Option<String>,
    /// The data order's seed (data.seed).
    pub data_seed: Option<u64>,
    pub micro_batch: usize,
    pub global_batch: usize,
    /// Tokens per sequence (batch.seq_len).
    pub seq_len: usize,
    pub peak_lr: f64,
    pub warmup_tokens: u64,
    pub decay_tokens: u64,
    pub min_lr_ratio: Option<f64>,
    pub steps: u64,
    /// The weights' seed (train.seed).
    pub seed: Option<u64>,
    /// Lines added to the `[train]` section, each ending in a newline.
    pub train_lines: String,
    /// Sections added after `[train]`, ending in a newline.
    pub sections: String,
}

impl Default for SmallJob {
    fn default() -> Self {
        SmallJob {
            vocab_size: 50257,
            context: 32,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            train: "corpus/train.bin".into(),
            val: None,
            data_seed: None,
            micro_batch: 2,
            global_batch: 6,
            seq_len: 32,
            peak_lr: 1e-3,
            warmup_tokens: 256,
            decay_tokens: 4096,
            min_lr_ratio: None,
            steps: 4,
            seed: None,
            train_lines: String::new(),
            sections: String::new(),
        }
    }
}

impl SmallJob {
    /// The configuration as TOML.
    pub fn toml(&self) -> String {
        let line =
            |key: &str, v: Option<String>| v.map_or(String::new(), |v| format!("{key} = {v}\n"));
        format!(
            "[model]\nvocab_size = {}\nseq_len = {}\nn_layer = {}\nn_head = {}\nn_embd = {}\n\
             [data]\ntrain = {:?}\n{}{}\
             [batch]\nmicro_batch = {}\nglobal_batch = {}\nseq_len = {}\n\
             [optim]\nbeta1 = 0.9\nbeta2 = 0.95\neps = 1e-8\nweight_decay = 0.1\ngrad_clip = 1.0\n\
             init_std = 0.02\n\
             [optim.lr]\npeak_lr = {:e}\nwarmup_tokens = {}\ndecay_tokens = {}\n{}\
             [train]\nsteps = {}\n{}{}{}",
            self.vocab_size,
            self.context,
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.train,
            line("val", self.val.as_ref().map(|v| format!("{v:?}"))),
            line("seed", self.data_seed.map(|s| s.to_string())),
            self.micro_batch,
            self.global_batch,
            self.seq_len,
            self.peak_lr,
            self.warmup_tokens,
            self.decay_tokens,
            line("min_lr_ratio", self.min_lr_ratio.map(|r| format!("{r:?}"))),
            self.steps,
            line("seed", self.seed.map(|s| s.to_string())),
            self.train_lines,
            self.sections,
        )
    }
}
