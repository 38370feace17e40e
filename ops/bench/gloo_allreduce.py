#!/usr/bin/env python3
"""All-reduce bus bandwidth of PyTorch's gloo backend, for `scripts/bench-comm-vs-gloo.sh`.

Times torch.distributed.all_reduce (sum, float32) on CPU tensors with the gloo backend, one
process per rank over loopback, for the same group sizes, message sizes, iteration counts and
rounds as `marathon bench comm` (the best of 3 rounds, a round ending with its slowest rank), and
prints the same columns: a table on stdout, one JSON line per row on stderr (with "transport":
"gloo").
"""

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# As in marathon bench comm: each size moves at least this many bytes, in 2 to 1000 operations,
# and is timed in 3 rounds of which the best counts.
COMM_BYTES_PER_SIZE = 256 << 20
ITERS_MAX = 1000
ROUNDS = 3


def sizes(min_kib, max_mib):
    out, size = [], min_kib << 10
    while size <= max_mib << 20:
        out.append(size)
        size *= 4
    return out


def member(rank, world, port, all_sizes, results):
    # One thread per process, as marathon's ranks compute on one thread each.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    buf = torch.ones(max(all_sizes) // 4, dtype=torch.float32)
    rows = []
    for nbytes in all_sizes:
        iters = min(max(COMM_BYTES_PER_SIZE // nbytes, 2), ITERS_MAX)
        b = buf[: nbytes // 4]
        rounds = []
        for _ in range(ROUNDS):
            dist.all_reduce(b)  # warm-up, and lines the members up
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(b)
            rounds.append((time.perf_counter() - t0) / iters)
        # A round ends when its slowest member does; the best round counts.
        t = torch.tensor(rounds, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append((nbytes, iters, t.min().item()))
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8", help="group sizes, comma-separated")
    ap.add_argument("--min-kib", type=int, default=64, help="smallest message, in KiB")
    ap.add_argument("--max-mib", type=int, default=256, help="largest message, in MiB")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if any(p < 2 for p in ranks):
        sys.exit("--ranks: every group needs at least 2 ranks")
    all_sizes = sizes(args.min_kib, args.max_mib)
    print(f"gloo all-reduce, torch {torch.__version__}, one process per rank, best of {ROUNDS} "
          "rounds; bus bandwidth = bytes / time x 2 (p - 1) / p")
    print(f"{'ranks':>6} {'bytes':>12} {'gloo GB/s':>12}")
    ctx = mp.get_context("spawn")
    for p in ranks:
        results = ctx.SimpleQueue()
        mp.start_processes(member, args=(p, free_port(), all_sizes, results), nprocs=p,
                           join=True, start_method="spawn")
        for nbytes, iters, secs in results.get():
            busbw = nbytes / secs * 2 * (p - 1) / p / 1e9
            print(f"{p:>6} {nbytes:>12} {busbw:>12.3f}", flush=True)
            print(json.dumps({"transport": "gloo", "ranks": p, "bytes": nbytes, "iters": iters,
                              "time_us": secs * 1e6, "busbw_gbs": busbw}), file=sys.stderr,
                  flush=True)


if __name__ == "__main__":
    main()
