"""The torch neighborhood-attention reference against Swin window attention of the same size, on CPU.

For NAT stage shapes (56², 28², 14² tokens, k = 7, D = 32) and one 3-D volume, forward+backward time of
``kernels.neighborhood_attention`` (torch backend; sliding windows with RPB, the blocked case stride = k, and the
query tile sizes ``--tiles``) as a ratio to ``kernels.window_attention2d`` (torch; Swin's 7×7 windows with RPB)
on the same tensors, median of ``--repeats`` interleaved runs. Writes
``benchmarks/results/neighborhood_cpu.md``.

    python benchmarks/bench_neighborhood.py [--batch 4] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import neighborhood, window_attention2d  # noqa: E402
from vision.zoo import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(56, 56, 2), (28, 28, 4), (14, 14, 8)]  # NAT-T stages 1-3: tokens per side, heads


def fwd_bwd(fn, tensors) -> float:
    for t in tensors:
        t.grad = None
    start = time.perf_counter()
    fn(*tensors).sum().backward()
    return time.perf_counter() - start


def rows_for(size, heads, batch, k, repeats, tiles):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, *size, heads, 32, generator=g, requires_grad=True) for _ in range(3)]
    n = len(size)
    rpb = torch.zeros(heads, *[2 * k - 1] * n, requires_grad=True)
    methods = {}
    if n == 2:
        methods["swin window (baseline)"] = lambda q, kk, v: window_attention2d(q, kk, v, k, rpb=rpb, backend="torch")
    base = "swin window (baseline)" if n == 2 else None
    methods["neighborhood, rpb"] = lambda q, kk, v: neighborhood.neighborhood_attention(q, kk, v, k, rpb=rpb,
                                                                                       backend="torch")
    methods["blocked (stride = k)"] = lambda q, kk, v: neighborhood.neighborhood_attention(q, kk, v, k, stride=k,
                                                                                          backend="torch")
    def tiled(t):
        return lambda q, kk, v: neighborhood._attend_tiles(q, kk, v, (k,) * n, (1,) * n, (1,) * n, (False,) * n,
                                                           32**-0.5, rpb, None, None, 0.0, False, (t,) * n)[0]

    for t in tiles:
        methods[f"neighborhood, tile {t}"] = tiled(t)
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up (tables, allocator)
        fwd_bwd(fn, tensors)
    for _ in range(repeats):  # interleaved, so load changes hit every method alike
        for name, fn in methods.items():
            times[name].append(fwd_bwd(fn, tensors))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med[base] if base else med["neighborhood, rpb"]
    shape = "x".join(map(str, size)) + f", {heads} heads"
    return [(shape, name, med[name] * 1e3, med[name] / ref) for name in methods]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiles", type=int, nargs="*", default=[5, 8])
    p.add_argument("--out", type=Path, default=RESULTS / "neighborhood_cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for h, w, heads in SHAPES:
        rows += rows_for((h, w), heads, args.batch, 7, args.repeats, args.tiles)
    rows += rows_for((16, 16, 16), 2, 1, 3, args.repeats, [])  # a 3-D volume (ratio to its neighborhood row)
    lines = [f"# Neighborhood attention, torch backend, CPU ({args.threads} thread(s), batch {args.batch}, D = 32, "
             "fp32, forward+backward)", "",
             "Ratio: time / Swin window attention (torch, 7×7 windows, RPB) on the same tensors; the 3-D rows are "
             "relative to the neighborhood row.", "",
             "| shape | method | fwd+bwd ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {s} | {m} | {t:.1f} | {r:.2f} |" for s, m, t, r in rows]
    print("\n".join(lines))
    write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
