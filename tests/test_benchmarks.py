"""The kernel benchmark's comparison methods compute the same attention as the reference (CPU smoke run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_window_kernels  # noqa: E402


def test_window_benchmark_smoke(tmp_path):
    out = tmp_path / "table.md"
    assert bench_window_kernels.main(["--device", "cpu", "--methods", "torch", "sdpa", "timm", "--out", str(out)]) == 0
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("torch", "sdpa", "timm"):
            rows.setdefault(cells[0], []).append(cells)
    assert all(len(rows[name]) == 2 for name in ("torch", "sdpa", "timm")), out.read_text()  # both shapes ran
    for cells in rows["sdpa"]:
        assert float(cells[-1]) < 1e-5  # the unfolded-window SDPA baseline computes the same attention
        assert float(cells[3]) > 0  # forward+backward time
