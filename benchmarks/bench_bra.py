"""Bi-level routing attention: our chunked BRA against a straightforward top-k gather implementation.

For BiFormer-T stage shapes at 224 and 512 px, one training step (forward + backward) of the layer:
median step time and peak memory, each configuration in its own subprocess so peaks don't mix.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the growth of the process's peak RSS
on CPU. Writes ``benchmarks/results/bra_<device>.md``.

    python benchmarks/bench_bra.py [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision.attention import BiLevelRoutingAttention  # noqa: E402
from vision.attention.routing import _from_regions, _to_regions  # noqa: E402

# BiFormer-T: (stage, channels, heads, top-k, stride) with n_win = 7 regions per side
STAGES = [(1, 64, 2, 1, 4), (2, 128, 4, 4, 8), (3, 256, 8, 16, 16)]


def gather_bra(layer: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The straightforward implementation: gather every query region's top-k K/V in one piece."""
    B, H, W, C = x.shape
    n = layer.n_win
    q, k, v = layer.qkv(x).split([layer.qk_dim, layer.qk_dim, layer.dim], dim=-1)
    qr, kr, vr = (_to_regions(t, n) for t in (q, k, v))
    index = layer.route(qr, kr)
    batch = torch.arange(B, device=x.device)[:, None, None]
    ks, vs = kr[batch, index].flatten(2, 3), vr[batch, index].flatten(2, 3)  # [B, n², topk*P, C]: topk copies
    heads = layer.num_heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(2, 3)
    attn = ((split(qr) * layer.scale) @ split(ks).transpose(-1, -2)).softmax(-1)
    out = (attn @ split(vs)).transpose(2, 3).flatten(-2)
    out = _from_regions(out, n, H, W) + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.proj(out)


def measure(impl: str, size: int, stage: int, batch: int, repeats: int, device: str) -> dict:
    _, dim, heads, topk, stride = next(s for s in STAGES if s[0] == stage)
    side = -(-size // stride)
    side += -side % 7  # a multiple of n_win, as the official model requires at these sizes
    layer = BiLevelRoutingAttention(dim, heads, 7, topk=topk).to(device)
    x = torch.randn(batch, side, side, dim, device=device, requires_grad=True)
    run = (lambda: gather_bra(layer, x)) if impl == "gather" else (lambda: layer(x))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run().sum().backward()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run().sum().backward()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"ms": 1000 * statistics.median(times), "peak_mb": max(peak, 0) / 2**20, "grid": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: impl,size,stage in a subprocess
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        impl, size, stage = args.one.split(",")
        print(json.dumps(measure(impl, int(size), int(stage), args.batch, args.repeats, device)))
        return

    rows = []
    for size in (224, 512):
        for stage, *_ in STAGES:
            result = {}
            for impl in ("gather", "ours"):
                cmd = [sys.executable, __file__, "--one", f"{impl},{size},{stage}", "--batch", str(args.batch),
                       "--repeats", str(args.repeats)]
                result[impl] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            g, o = result["gather"], result["ours"]
            rows.append(f"| {size} | {stage} ({g['grid']}x{g['grid']}) | {g['ms']:.1f} | {o['ms']:.1f} | "
                        f"{g['ms'] / o['ms']:.2f}x | {g['peak_mb']:.0f} | {o['peak_mb']:.0f} | "
                        f"{g['peak_mb'] / max(o['peak_mb'], 1e-9):.2f}x |")
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = "\n".join([
        f"# BRA forward+backward, BiFormer-T stages, batch {args.batch}, fp32, {name}",
        "",
        "Command: `python benchmarks/bench_bra.py`. Speed-up and memory ratio: gather / ours (higher is better for ours).",
        "",
        "| input | stage (grid) | gather ms | ours ms | speed-up | gather peak MB | ours peak MB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    out = Path(__file__).parent / "results" / f"bra_{device}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
