"""DToP: the pruned segmenter next to itself with pruning off (threshold above 1, same weights).

For each threshold: the share of tokens that exit at each auxiliary head, GMACs of one image counted with the
pruning in effect (``torch.utils.flop_counter``; timm's fused attention is switched to its explicit form while
counting, since the counter does not see CPU SDPA), and inference throughput (eval, no grad; median of
``--repeats`` timed batches after a warm-up, pruned and unpruned alternating), all on the same fixed input.

Which tokens exit depends on how confident the heads are. Randomly initialised heads (the default; pass
``--checkpoint`` for trained weights) are never confident enough for the official threshold, so besides it the
script also runs thresholds calibrated on this input so that a share ``--easy`` of the tokens is easy at the
first exit (quantiles of its token confidences ``max_k P``; the top-k kept per class exit less). Writes
``benchmarks/results/dtop_<device>.md``.

    python benchmarks/bench_dtop.py [--model dtop_vit_base] [--size 256] [--batch 1] [--easy 0.25 0.5 0.75]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision.heads.dtop import VARIANTS, class_presence, create_dtop  # noqa: E402
from vision.zoo import gmacs, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNPRUNED = 1.01  # above 1: no token exits


def throughput(model: torch.nn.Module, x: torch.Tensor, threshold: float, repeats: int) -> tuple[float, float]:
    """img/s at ``threshold`` and unpruned, timed alternately so a busy machine slows both alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = {threshold: [], UNPRUNED: []}
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            for thr in times:
                model.threshold = thr
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times[thr].append(time.perf_counter() - start)
    return tuple(x.shape[0] / statistics.median(times[thr]) for thr in (threshold, UNPRUNED))


def exit_shares(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Share of all tokens whose prediction comes from each head."""
    with torch.no_grad():
        exit_head = model(x)["exit_head"]
    return [(exit_head == j).float().mean().item() for j in range(len(model.heads))]


def first_head_confidence(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        head = model(x)["heads"][0]
    return (class_presence(head["cls"]) * head["masks"].flatten(2).sigmoid()).amax(1).flatten()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dtop_vit_base", choices=sorted(VARIANTS))
    parser.add_argument("--size", type=int, default=256, help="square input side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--easy", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a DToP state_dict (default: random init)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = create_dtop(args.model, num_classes=args.num_classes, img_size=args.size).to(args.device).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location=args.device))
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    official = model.threshold

    model.threshold = UNPRUNED
    full_macs = gmacs(model, x)
    conf = first_head_confidence(model, x)
    thresholds = [(official, "official")]
    thresholds += [(conf.quantile(1 - q).item(), f"{q:.0%} easy at head 0") for q in args.easy]

    rows = []
    for thr, why in thresholds:
        model.threshold = thr
        shares = exit_shares(model, x)
        macs = gmacs(model, x)
        ips, full_ips = throughput(model, x, thr, args.repeats)
        exits = " / ".join(f"{s:.0%}" for s in shares[:-1])
        rows.append(f"| {thr:.3f} ({why}) | {exits} | {macs:.3g} | {full_macs:.3g} | {macs / full_macs:.2f} | "
                    f"{ips:.2f} | {full_ips:.2f} | {ips / full_ips:.2f}x |")
        print(rows[-1], flush=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    params = sum(p.numel() for p in model.parameters())
    weights = f"weights from `{args.checkpoint}`" if args.checkpoint else "random initialisation (seed 0)"
    heads = ", ".join(str(i) for i in model.out_indices[:-1])
    text = "\n".join([
        f"# DToP on {device}", "",
        f"`python benchmarks/bench_dtop.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"`{args.model}` ({params:,} parameters, {args.num_classes} classes), {weights}, one fixed "
        f"{args.size}x{args.size} input, batch {args.batch}, median of {args.repeats} timed batches (pruned and unpruned alternating), fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
        f"Exits: share of all tokens leaving at the auxiliary heads (after blocks {heads}); the rest run to "
        "the last block. Unpruned: the same model and weights with threshold 1.01 (no token exits). "
        "Thresholds other than the official one are calibrated on this input (quantiles of the first head's "
        "confidence), since untrained heads are never confident enough for it; the top-k per class stay, so "
        "fewer tokens exit than are easy.", "",
        "| threshold | exits | GMACs | GMACs unpruned | ratio | img/s | img/s unpruned | speed-up |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ])
    write_report(text, args.out or RESULTS / f"dtop_{args.device}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
