"""The kernel benchmark's comparison methods compute the same attention as the reference (CPU smoke run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_window_kernels  # noqa: E402


def test_window_benchmark_smoke(tmp_path):
    out = tmp_path / "table.md"
    names = ("torch", "sdpa", "timm_attn", "timm")
    assert bench_window_kernels.main(["--device", "cpu", "--methods", *names, "--out", str(out)]) == 0
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in names:
            rows.setdefault(cells[0], []).append(cells)
    assert all(len(rows[name]) == 2 for name in names), out.read_text()  # both shapes ran
    for cells in rows["sdpa"]:
        assert float(cells[-2]) < 1e-5 and float(cells[-1]) < 1e-5  # same attention: output and gradients
        assert float(cells[3]) > 0  # forward+backward time
    swin = rows["timm_attn"][1]  # timm's attention math (no projections) equals the Swin reference
    assert float(swin[-2]) < 1e-5 and float(swin[-1]) < 1e-5, swin


def test_tiled_flex_mask_computes_the_same_attention(monkeypatch):
    """The token-permuted FlexAttention baseline (8x8 tiles, padded; Swin windows padded to 64 slots) equals
    the reference; eager Flex on CPU, forward only (Flex has no CPU backward)."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    for kind, ks in (("na", 3), ("swin", 4)):
        shape = (1, 12, 12, 2, 16)
        q, k, v = (torch.randn(shape) for _ in range(3))
        rpb = 0.5 * torch.randn(2, 2 * ks - 1, 2 * ks - 1)
        ref = bench_window_kernels.methods(kind, shape, ks, "cpu", ["torch"])["torch"][0](q, k, v, rpb)
        got = bench_window_kernels.flex_tiled_method(kind, shape, ks, "cpu")(q, k, v, rpb)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=kind)


def test_pruning_flops_are_counted_with_pruning_in_effect():
    import bench_pruning

    r = bench_pruning.compare("evit_deit_tiny", 0.7, batch=1, repeats=1, device="cpu")
    assert abs(r["gmacs_full"] - 1.26) < 0.02  # DeiT-T: 1.3 GFLOPs in the papers
    assert 0.6 < r["gmacs"] / r["gmacs_full"] < 0.7  # EViT-T/0.7: 0.8 vs 1.3 in the paper
