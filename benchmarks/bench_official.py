"""Ours against the official implementation on CPU, same weights: time and peak memory as ratios.

The official code is not a dependency: point the script at a checkout of the official repository. Each official
model is built from its own classes, its weights are copied into ours through our ``checkpoint_filter_fn`` (the
path a user's official checkpoint takes), the outputs are checked equal, then the two models alternate for
``--repeats`` rounds of an inference batch (eval, no grad) and a forward + backward (train mode); times are
medians. Peak memory: growth of peak RSS over one inference batch and one forward + backward, after a warm-up,
each model in its own process (as ``bench_cpu.py`` measures it). Appends to
``benchmarks/results/cpu_vs_official.md``.

    git clone https://github.com/ziplab/LITv2 /tmp/LITv2
    python benchmarks/bench_official.py --litv2 /tmp/LITv2 [--batch 8] [--threads 1] [--repeats 5]

LITv2's official Deformable Token Merging uses the repository's own compiled DCN extension
(``mm_modules/DCN``), which needs building; the script stands in ``torchvision.ops.deform_conv2d`` for it (the
same operator ours calls, so that layer costs the same on both sides and the comparison measures the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import peak_growth, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _TorchvisionDeformConv2dPack(nn.Module):
    """Stand-in for the official ``DeformConv2dPack``: same parameters (``weight``, ``bias``, ``conv_offset``),
    offsets from a zero-initialised conv, the deformable conv through torchvision."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, im2col_step=64, bias=True, lr_mult=0.1):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.conv_offset = nn.Conv2d(in_channels, deformable_groups * 2 * k[0] * k[1], k, stride, padding,
                                     dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        from torchvision.ops import deform_conv2d

        return deform_conv2d(x, self.conv_offset(x), self.weight, self.bias, self.stride, self.padding,
                             self.dilation)


def official_litv2(repo: Path) -> nn.Module:
    """The official LITv2-S classifier (configs/litv2-small.yaml) from a checkout of ziplab/LITv2."""
    dcn = types.ModuleType("mm_modules.DCN.modules.deform_conv2d")
    dcn.DeformConv2dPack = _TorchvisionDeformConv2dPack
    for name in ("mm_modules", "mm_modules.DCN", "mm_modules.DCN.modules"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[dcn.__name__] = dcn
    sys.path.insert(0, str(repo / "classification"))
    from models.litv2 import LITv2  # the official class

    return LITv2(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=[2, 2, 6, 2],
                 num_heads=[3, 6, 12, 24], mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 drop_path_rate=0.0, ape=False, patch_norm=True, use_checkpoint=False, alpha=0.9,
                 local_ws=[0, 0, 2, 1])


OFFICIAL = {"litv2_small": ("litv2", official_litv2)}  # ours -> (command-line flag, official builder)


def pair(name: str, repo: Path) -> tuple[nn.Module, nn.Module]:
    """(ours, official) with the official model's weights in both, dropout and drop path off."""
    import timm

    import vision  # noqa: F401  (registers ours)

    torch.manual_seed(0)
    official = OFFICIAL[name][1](repo).eval()
    ours = timm.create_model(name, drop_path_rate=0.0)
    convert = sys.modules[type(ours).__module__].checkpoint_filter_fn
    ours.load_state_dict(convert(official.state_dict(), ours))
    return ours.eval(), official


def _subprocess(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steps(model: nn.Module, batch: int):
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))

    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()

    return infer, train


def compare(name: str, repo: Path, batch: int, repeats: int) -> dict:
    ours, official = pair(name, repo)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = (ours(x) - official(x)).abs().max().item()
    runs = {"ours": steps(ours, batch), "official": steps(official, batch)}
    out = {side: dict(infer=[], train=[]) for side in runs}
    for infer, train in runs.values():
        infer(), train()  # warm-up
    for _ in range(repeats):
        for side, (infer, train) in runs.items():
            out[side]["infer"].append(timed(infer))
            out[side]["train"].append(timed(train))
    return dict({side: {k: statistics.median(v) for k, v in r.items()} for side, r in out.items()},
                max_abs_error=error)


def peaks(name: str, side: str, repo: Path, batch: int) -> dict:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed blocks >= 64 KiB go back to the OS
    model = dict(zip(("ours", "official"), pair(name, repo)))[side]
    infer, train = steps(model, batch)
    infer()
    out = dict(infer=peak_growth(infer))
    train()
    out["train"] = peak_growth(train)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, (flag, _) in OFFICIAL.items():
        parser.add_argument(f"--{flag}", type=Path, help=f"a checkout of the official repository ({name})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_vs_official.md")
    parser.add_argument("--peaks", help=argparse.SUPPRESS)  # internal: "<name>:<side>", one process each
    parser.add_argument("--times", help=argparse.SUPPRESS)  # internal: one model's interleaved times
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repos = {name: getattr(args, flag) for name, (flag, _) in OFFICIAL.items() if getattr(args, flag)}
    if args.peaks:
        name, side = args.peaks.split(":")
        print(json.dumps(peaks(name, side, repos[name], args.batch)))
        return 0
    if args.times:
        print(json.dumps(compare(args.times, repos[args.times], args.batch, args.repeats)))
        return 0
    if not repos:
        parser.error("name at least one official checkout, e.g. --litv2 /path/to/LITv2")
    rows = []
    for name, repo in repos.items():
        flag = f"--{OFFICIAL[name][0]}"
        common = [flag, str(repo), "--batch", str(args.batch)]
        t = _subprocess([*common, "--times", name, "--repeats", str(args.repeats)], args.threads)
        m = {side: _subprocess([*common, "--peaks", f"{name}:{side}"], args.threads) for side in ("ours", "official")}
        rows.append(f"| `{name}` | {t['ours']['infer'] / t['official']['infer']:.2f} "
                    f"| {t['ours']['train'] / t['official']['train']:.2f} "
                    f"| {m['ours']['infer'] / m['official']['infer']:.2f} "
                    f"| {m['ours']['train'] / m['official']['train']:.2f} | {t['max_abs_error']:.1e} "
                    f"| {1e3 * t['ours']['train']:.0f} / {1e3 * t['official']['train']:.0f} |")
        print(rows[-1], flush=True)
    command = "python benchmarks/bench_official.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.write_text("\n".join([
        "# Ours against the official implementations on CPU", "",
        f"`{command}`: batch {args.batch}, 224 px, fp32, {args.threads} thread(s), {args.repeats} interleaved "
        f"rounds after a warm-up (medians), torch {torch.__version__}; the official weights in both models.", "",
        "Ratios are ours / official; below 1 is better. Peaks: growth of peak RSS over one inference batch / one "
        "forward + backward after a warm-up, each model in its own process.", "",
        "| ours | forward | forward + backward | forward peak | train peak | max abs output diff "
        "| fwd+bwd ms (ours / official) |",
        "|---|---|---|---|---|---|---|", *rows, ""]))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
