#!/usr/bin/env python3
"""PyTorch Distributed Checkpoint (DCP) on the state `marathon bench ckpt` checkpoints, for
`scripts/bench-ckpt-vs-dcp.sh`.

The state is GPT-2 124M's parameters and both AdamW moments in fp32, tensor for tensor in the
shapes marathon stores (the vocabulary padded to 50304), filled with random normal values. One
process, as `marathon bench ckpt` runs. Times, each the median of `--runs`:

- the stall of `dcp.async_save`: until the call returns and training could go on;
- `dcp.save`: the whole save, its files fsync'd (the file system writer's default);
- `dcp.load` into preallocated tensors, warm (the files in the page cache, just written) and
  cold (the files dropped from the page cache with posix_fadvise first).

Prints a line per figure, then one JSON object.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

VOCAB, CONTEXT, LAYERS, WIDTH = 50304, 1024, 12, 768


def shapes():
    """GPT-2 124M's tensors, as marathon names and shapes them."""
    out = {"wte": (VOCAB, WIDTH), "wpe": (CONTEXT, WIDTH)}
    for i in range(LAYERS):
        p = f"h.{i}."
        out |= {
            p + "ln_1.weight": (WIDTH,),
            p + "ln_1.bias": (WIDTH,),
            p + "attn.c_attn.weight": (3 * WIDTH, WIDTH),
            p + "attn.c_attn.bias": (3 * WIDTH,),
            p + "attn.c_proj.weight": (WIDTH, WIDTH),
            p + "attn.c_proj.bias": (WIDTH,),
            p + "ln_2.weight": (WIDTH,),
            p + "ln_2.bias": (WIDTH,),
            p + "mlp.c_fc.weight": (4 * WIDTH, WIDTH),
            p + "mlp.c_fc.bias": (4 * WIDTH,),
            p + "mlp.c_proj.weight": (WIDTH, 4 * WIDTH),
            p + "mlp.c_proj.bias": (WIDTH,),
        }
    return out | {"ln_f.weight": (WIDTH,), "ln_f.bias": (WIDTH,)}


def state(fill):
    return {
        family: {name: fill(shape) for name, shape in shapes().items()}
        for family in ("params", "adam_m", "adam_v")
    }


def nbytes(s):
    return sum(t.numel() * t.element_size() for f in s.values() for t in f.values())


def drop_cache(path):
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".", help="where the checkpoints go (a new directory in it)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    # async_save needs a process group; one rank of gloo on loopback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    src = state(lambda shape: torch.randn(shape))
    size = nbytes(src)
    base = tempfile.mkdtemp(prefix="dcp-bench-", dir=args.dir)
    stalls, saves, warm, cold = [], [], [], []
    try:
        for r in range(args.runs):
            path = os.path.join(base, f"save-{r}")
            t0 = time.perf_counter()
            dcp.save(src, checkpoint_id=path)
            saves.append(time.perf_counter() - t0)
            dst = state(lambda shape: torch.empty(shape))
            t0 = time.perf_counter()
            dcp.load(dst, checkpoint_id=path)
            warm.append(time.perf_counter() - t0)
            assert all(
                torch.equal(src[f][n], dst[f][n]) for f in src for n in src[f]
            ), "DCP loaded other values than it saved"
            drop_cache(path)
            t0 = time.perf_counter()
            dcp.load(dst, checkpoint_id=path)
            cold.append(time.perf_counter() - t0)
            apath = os.path.join(base, f"async-{r}")
            t0 = time.perf_counter()
            fut = dcp.async_save(src, checkpoint_id=apath)
            stalls.append(time.perf_counter() - t0)
            fut.result()
            shutil.rmtree(path)
            shutil.rmtree(apath)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        dist.destroy_process_group()
    med = statistics.median
    out = {
        "impl": f"torch {torch.__version__} dcp",
        "state_bytes": size,
        "async_save_stall_ms": 1e3 * med(stalls),
        "save_s": med(saves),
        "save_gbs": size / med(saves) / 1e9,
        "load_warm_s": med(warm),
        "load_warm_gbs": size / med(warm) / 1e9,
        "load_cold_s": med(cold),
        "load_cold_gbs": size / med(cold) / 1e9,
    }
    print(f"dcp: {size / 1e6:.1f} MB, median of {args.runs} runs, torch {torch.__version__}")
    print(f"  async_save stall {out['async_save_stall_ms']:.1f} ms")
    print(f"  save {out['save_s']:.2f} s ({out['save_gbs']:.2f} GB/s), fsync'd")
    print(f"  load warm {out['load_warm_s']:.2f} s ({out['load_warm_gbs']:.2f} GB/s)")
    print(f"  load cold {out['load_cold_s']:.2f} s ({out['load_cold_gbs']:.2f} GB/s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
