"""Time PyTorch's eager fp32 CPU training step for GPT-2.

This gives a baseline to compare against marathon's own step benchmark. The
model follows marathon's architecture (pre-LN, tanh GELU, causal attention,
output head tied to a vocabulary-padded wte). It is written with plain torch
ops and nn.Linear, and attention is an explicit matmul with a mask rather
than scaled_dot_product_attention, so the timing reflects ordinary eager
kernels and not a fused attention path that marathon has no equivalent for.

Example (GPT-2 124M, the defaults):
    python3 ops/bench/pytorch_step.py --threads 2 --steps 10 --warmup 2
Prints one line of JSON.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attn(self, x, causal):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        scores = scores.masked_fill(~causal[:T, :T], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, causal):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab_size, padded_vocab_size, seq_len, n_layer, n_head, n_embd):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Parameter(torch.empty(padded_vocab_size, n_embd))
        self.wpe = nn.Parameter(torch.empty(seq_len, n_embd))
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.register_buffer("causal", torch.ones(seq_len, seq_len, dtype=torch.bool).tril())
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)
        with torch.no_grad():
            # Padding rows are outside the vocabulary; keep them inert.
            self.wte[vocab_size:] = 0.0

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte[idx] + self.wpe[:T]
        for block in self.h:
            x = block(x, self.causal)
        logits = self.ln_f(x) @ self.wte.T
        # Padded logits stay out of the softmax, as in marathon.
        real = logits[..., : self.vocab_size]
        return F.cross_entropy(real.reshape(-1, self.vocab_size), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--seq-len", type=int, default=1024, help="model context (wpe rows)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row in the timed batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.seq > args.seq_len:
        ap.error("--seq must not exceed --seq-len")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    padded_vocab = (args.vocab_size + 127) // 128 * 128
    model = GPT2(args.vocab_size, padded_vocab, args.seq_len, args.n_layer, args.n_head, args.n_embd)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
    )
    idx = torch.randint(0, args.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, args.vocab_size, (args.batch, args.seq))

    def step():
        opt.zero_grad()
        model(idx, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    mean = sum(times) / len(times)
    print(json.dumps({
        "impl": "pytorch-eager-fp32",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "params": n_params,
        "ms_per_step": mean * 1e3,
        "ms_per_step_min": min(times) * 1e3,
        "tokens_per_s": args.batch * args.seq / mean,
    }))


if __name__ == "__main__":
    main()
