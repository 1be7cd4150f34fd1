"""The model zoo, measured: ``python -m vision.zoo [--device cuda] [--models 'nat_*'] [--batch 32]``.

For every model this package registers: parameters, GMACs of one image at the model's default resolution
(``torch.utils.flop_counter``; papers print these as "FLOPs"), inference and training-step throughput
(img/s: eval forward without grad; forward + backward + SGD step) and peak memory of a training step. Each
model runs in its own subprocess so that one model's peak memory can't inflate another's (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS, weights and interpreter included). Writes
``benchmarks/results/zoo_<device>.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def gmacs(model: torch.nn.Module, inputs: tuple[int, int, int] | torch.Tensor, device: str = "cpu") -> float:
    """GMACs per image (half the multiply-adds + adds ``FlopCounterMode`` counts), as the model runs it, on
    ``inputs``: a batch, or the ``(C, H, W)`` size of one random image.

    Attention runs through SDPA's math backend while counting: the counter sees no FLOPs in the fused CPU
    kernel, so BiFormer's, LITv2's and timm ViTs' attention would otherwise count as free."""
    x = inputs if isinstance(inputs, torch.Tensor) else torch.randn(1, *inputs, device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9 / x.shape[0]


def write_report(text: str, out: Path) -> None:
    """Write a benchmark's markdown table (creating its folder) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written {out}")


def measure(name: str, device: str, batch: int, repeats: int) -> dict:
    """One model's row (run in a fresh process by :func:`main`)."""
    import vision

    torch.manual_seed(0)
    model = vision.create_model(name).to(device)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    macs = gmacs(model, size, device)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(batch, *size, device=device)
    target = torch.randint(0, model.num_classes, (batch,), device=device)

    def timed(step) -> float:
        step()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        return batch * repeats / (time.perf_counter() - start)

    with torch.no_grad():
        infer = timed(lambda: model(x))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train = timed(train_step)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(name=name, params=params, gmacs=macs, resolution=size[-1], infer=infer, train=train, peak=peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["*"], help="fnmatch patterns over the registered names")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 4 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps after one warm-up (CUDA 10, CPU 2)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this model, print JSON
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    batch, repeats = args.batch or (64 if cuda else 4), args.repeats or (10 if cuda else 2)
    if args.one:
        print(json.dumps(measure(args.one, args.device, batch, repeats)))
        return 0

    import vision

    names = sorted({name for pattern in args.models for name in vision.list_models(pattern)})
    if not names:
        raise SystemExit(f"--models {' '.join(args.models)!r} matches no registered model; see vision.list_models()")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "vision.zoo", "--one", name, "--device", args.device,
               "--batch", str(batch), "--repeats", str(repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            row = f"| `{name}` | failed: {done.stderr.strip().splitlines()[-1][:100]} ||||||"
        else:
            r = json.loads(done.stdout.strip().splitlines()[-1])
            row = (f"| `{name}` | {r['params'] / 1e6:.2f}M | {r['gmacs']:.2f} | {r['resolution']} | {r['infer']:.1f} "
                   f"| {r['train']:.1f} | {r['peak']:.0f} |")
        print(row, flush=True)
        rows.append(row)
    memory = "peak allocated MiB (train step)" if cuda else "peak RSS MiB (process)"
    text = "\n".join([
        f"# Model zoo on {device_name}", "",
        f"`python -m vision.zoo {' '.join(argv if argv is not None else sys.argv[1:])}`: batch {batch}, "
        f"{repeats} timed steps after one warm-up, fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. GMACs of one image (papers' \"FLOPs\").", "",
        f"| model | params | GMACs | res | infer img/s | train img/s | {memory} |",
        "|---|---|---|---|---|---|---|", *rows, "",
    ])
    write_report(text, args.out or RESULTS / f"zoo_{'cuda' if cuda else 'cpu'}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
