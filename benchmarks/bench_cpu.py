"""Every family on CPU next to timm's nearest model: time per GMAC and peak memory, as ratios.

Each family's smallest and tiny variants are paired with a timm model of similar GMACs (Swin-T for the
windowed / neighborhood / linear-attention families, PVTv2-b1/b2 for Agent-PVT, DeiT-T/S for the DeiT-based
families, ConvNeXt-N for BiFormer-T). For each pair, in one process, the two models alternate for
``--repeats`` rounds of an inference batch (eval, no grad) and a training step (forward, cross-entropy,
backward, SGD step); times are medians over the rounds, divided by the model's GMACs (one 224 px image,
:func:`vision.zoo.gmacs`, pruning in effect), so a ratio below 1 means less time per multiply-add than timm's
model. Peak memory: each model in a fresh process, after one warm-up step (lazy initialisation and library
pages are not the step's memory), the growth of peak RSS over one inference batch and over one training step
(glibc is told to unmap every block of 64 KiB or more when freed, so RSS follows live tensors; Linux only).
Writes ``benchmarks/results/cpu_vs_timm.md``.

    python benchmarks/bench_cpu.py [--batch 4] [--threads 2] [--repeats 3] [--pairs nat_tiny:swin_tiny_patch4_window7_224]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision.zoo import gmacs, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SWIN_T, DEIT_T, DEIT_S = "swin_tiny_patch4_window7_224", "deit_tiny_patch16_224", "deit_small_patch16_224"
PAIRS = [  # (ours, timm's nearest model): each family's smallest and tiny variants
    ("nat_mini", SWIN_T), ("nat_tiny", SWIN_T), ("dinat_mini", SWIN_T), ("dinat_tiny", SWIN_T),
    ("agent_swin_tiny", SWIN_T), ("vsa_swin_tiny", SWIN_T), ("l2vit_tiny", SWIN_T), ("litv2_small", SWIN_T),
    ("agent_pvt_tiny", "pvt_v2_b1"), ("agent_pvt_small", "pvt_v2_b2"),
    ("agent_deit_tiny", DEIT_T), ("agent_deit_small", DEIT_S), ("evit_deit_tiny", DEIT_T), ("evit_deit_small", DEIT_S),
    ("dynamicvit_deit_small", DEIT_S), ("biformer_tiny", "convnext_nano"),
]


def build(name: str) -> torch.nn.Module:
    import timm

    import vision  # noqa: F401  (registers ours)

    torch.manual_seed(0)
    return timm.create_model(name)


def steps(model: torch.nn.Module, batch: int):
    """``(inference, training step)`` closures on a fixed random batch."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return infer, train


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compare(ours: str, base: str, batch: int, repeats: int) -> dict:
    """Interleaved median seconds per batch of both models (inference, training step) and their GMACs."""
    models = {ours: build(ours), base: build(base)}
    out = {}
    for name, model in models.items():
        out[name] = dict(gmacs=gmacs(model.eval(), (3, 224, 224)), infer=[], train=[])
        for step in steps(model, batch):
            step()  # warm-up
    runs = {name: steps(model, batch) for name, model in models.items()}
    for _ in range(repeats):
        for name, (infer, train) in runs.items():
            out[name]["infer"].append(timed(infer))
            out[name]["train"].append(timed(train))
    for r in out.values():
        r["infer"], r["train"] = statistics.median(r["infer"]), statistics.median(r["train"])
    return out


def _rss_mib(field: str) -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_growth(step) -> float:
    """MiB of peak-RSS growth over one call of ``step`` (Linux: VmHWM reset through ``clear_refs``)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = _rss_mib("VmRSS")
    step()
    return _rss_mib("VmHWM") - base


def peaks(name: str, batch: int) -> dict:
    """Peak memory of one inference batch and one training step, each after a warm-up (run in a fresh process)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are unmapped when freed
    infer, train = steps(build(name), batch)
    infer()
    out = dict(infer=peak_growth(infer))
    train()
    out["train"] = peak_growth(train)
    return out


def _subprocess(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(ours: str, base: str, t: dict, m: dict) -> str:
    a, b = t[ours], t[base]
    per_gmac = lambda key: (a[key] / a["gmacs"]) / (b[key] / b["gmacs"])
    return (f"| `{ours}` | `{base}` | {a['gmacs']:.2f} / {b['gmacs']:.2f} | {a['infer'] / b['infer']:.2f} "
            f"| {per_gmac('infer'):.2f} | {a['train'] / b['train']:.2f} | {per_gmac('train'):.2f} "
            f"| {m[ours]['infer'] / m[base]['infer']:.2f} | {m[ours]['train'] / m[base]['train']:.2f} "
            f"| {1e3 * a['train'] / a['gmacs']:.0f} | {m[ours]['train']:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds after one warm-up")
    parser.add_argument("--pairs", nargs="*", default=None, help="ours:timm pairs (default: every family)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_vs_timm.md")
    parser.add_argument("--peaks", help=argparse.SUPPRESS)  # internal: one model's peak memory, as JSON
    parser.add_argument("--times", help=argparse.SUPPRESS)  # internal: one pair's times, as JSON
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peaks:
        print(json.dumps(peaks(args.peaks, args.batch)))
        return 0
    if args.times:
        print(json.dumps(compare(*args.times.split(":"), args.batch, args.repeats)))
        return 0

    pairs = [tuple(p.split(":")) for p in args.pairs] if args.pairs else PAIRS
    command = "python benchmarks/bench_cpu.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    rows, memory = [], {}
    for ours, base in pairs:
        times = _subprocess(["--times", f"{ours}:{base}", "--batch", str(args.batch), "--repeats", str(args.repeats)],
                            args.threads)
        for name in (ours, base):
            if name not in memory:
                memory[name] = _subprocess(["--peaks", name, "--batch", str(args.batch)], args.threads)
        rows.append(row(ours, base, times, memory))
        print(rows[-1], flush=True)
        write_report(report(command, args, rows), args.out)  # after every pair: a long run keeps what it measured
    return 0


def report(command: str, args, rows: list[str]) -> str:
    return "\n".join([
        "# Every family on CPU against timm's nearest model", "",
        f"`{command}`: batch {args.batch}, 224 px, fp32, {args.threads} threads, {args.repeats} interleaved rounds "
        f"after a warm-up (medians), torch {torch.__version__}.", "",
        "Ratios are ours / timm's; below 1 is better. *per GMAC*: time divided by each model's GMACs first. "
        "Peaks: growth of peak RSS over one inference batch / one training step after a warm-up, each model in "
        "its own process.", "",
        "| ours | timm | GMACs | infer time | infer /GMAC | train time | train /GMAC | infer peak | train peak "
        "| ours train ms/GMAC | ours train peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
    ])


if __name__ == "__main__":
    sys.exit(main())
