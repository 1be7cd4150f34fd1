"""Token pruning: each pruned model next to the same model with pruning off.

For EViT-DeiT-T/S/B and DynamicViT-DeiT-S/B at keep rate 0.7 (the published models) against keep rate 1
(the plain DeiT, same weights; DynamicViT's predictors then don't run): GMACs of one 224 px image counted
with the pruning in effect (``torch.utils.flop_counter``; DynamicViT's include its predictors), and inference
throughput (eval, no grad; median of ``--repeats`` timed batches after a warm-up). Writes
``benchmarks/results/pruning_<device>.md``.

    python benchmarks/bench_pruning.py [--batch 8] [--repeats 3] [--models evit_deit_tiny dynamicvit_deit_small]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vision  # noqa: E402
from vision.zoo import gmacs, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["evit_deit_tiny", "evit_deit_small", "evit_deit_base", "dynamicvit_deit_small", "dynamicvit_deit_base"]


def throughput(model: torch.nn.Module, batch: int, repeats: int, device: str) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def compare(name: str, keep_rate: float, batch: int, repeats: int, device: str) -> dict:
    pruned = vision.create_model(name, keep_rate=keep_rate).to(device).eval()
    full = vision.create_model(name, keep_rate=1.0).to(device).eval()
    full.load_state_dict(pruned.state_dict())  # same weights: only the pruning differs
    return dict(name=name, keep_rate=keep_rate, gmacs=gmacs(pruned, (3, 224, 224), device),
                gmacs_full=gmacs(full, (3, 224, 224), device),
                ips=throughput(pruned, batch, repeats, device), ips_full=throughput(full, batch, repeats, device))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = args.device
    batch = args.batch or (128 if device == "cuda" else 8)
    rows = []
    for name in args.models:
        r = compare(name, args.keep_rate, batch, args.repeats, device)
        rows.append(f"| `{name}` | {r['keep_rate']} | {r['gmacs']:.2f} | {r['gmacs_full']:.2f} | "
                    f"{r['gmacs'] / r['gmacs_full']:.2f} | {r['ips']:.1f} | {r['ips_full']:.1f} | "
                    f"{r['ips'] / r['ips_full']:.2f}x |")
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    text = "\n".join([
        f"# Token pruning on {name}", "",
        f"`python benchmarks/bench_pruning.py {' '.join(argv if argv is not None else sys.argv[1:])}`: batch {batch}, "
        f"median of {args.repeats} timed batches, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
        "| model | keep rate | GMACs | GMACs unpruned | ratio | img/s | img/s unpruned | speed-up |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ])
    write_report(text, args.out or RESULTS / f"pruning_{device}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
