"""experiment=compare_mechanisms trains a step of every family; vision.report reads back what runs logged."""

import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

import vision
from vision.report import find_runs, report

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=3", "+trainer.num_sanity_val_steps=0", "data.train_subset=64",
        "data.batch_size=8", "data.num_workers=0", "callbacks.rich_progress_bar=null", "extras.print_config=false"]


def multirun(tmp_path: Path, *overrides: str) -> Path:
    command = [sys.executable, "train.py", "-m", *overrides, *TINY, f"paths.log_dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "train" / "multiruns").iterdir()
    return sweep_dir


def logged(run_dir: Path, key: str) -> float:
    """The last value of ``key`` in the run's metrics.csv, read independently of vision.report."""
    (path,) = run_dir.glob("csv/*/metrics.csv")
    with path.open() as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key)]
    assert values, f"{path}: nothing logged as {key}"
    return float(values[-1])


def test_compare_mechanisms_runs_a_step_per_family(tmp_path):
    import timm

    from vision.models import FAMILIES

    nano = {p.stem: yaml.safe_load(p.read_text())["name"] for p in (ROOT / "configs" / "model").glob("nano_*.yaml")}
    for family in FAMILIES:  # every family registering classifiers has a nano config built on one of them
        models = set(timm.list_models(module=family))
        assert not models or set(nano.values()) & models, family
    assert {"nano_nat", "nano_dinat"} <= set(nano)  # one module, two mechanisms
    sweep = yaml.safe_load((ROOT / "configs" / "experiment" / "compare_mechanisms.yaml").read_text())
    assert set(sweep["hydra"]["sweeper"]["params"]["model"].split(",")) == set(nano)
    sweep_dir = multirun(tmp_path, "experiment=compare_mechanisms", "seed=1", "trainer.limit_train_batches=1",
                         "trainer.limit_test_batches=1")
    runs = find_runs(sweep_dir)
    assert len(runs) == len(nano)
    for run in runs:
        assert 0.0 <= logged(run, "test/acc") <= 1.0 and math.isfinite(logged(run, "train/loss_epoch")), run


def test_report_reads_back_what_two_runs_logged(tmp_path):
    sweep_dir = multirun(tmp_path, "experiment=compare_mechanisms", "model=nano_nat", "seed=1,2")
    runs = find_runs(sweep_dir)
    assert len(runs) == 2
    rows, table, png = report(sweep_dir)
    (row,) = rows
    accs = [logged(r, "test/acc") for r in runs]
    assert row["model"] == "nano_nat" and row["runs"] == 2 and row["seeds"] == [1, 2]
    assert math.isclose(row["acc"], statistics.fmean(accs)) and math.isclose(row["acc_std"], statistics.stdev(accs))
    for key in ("train_img_s", "infer_img_s", "peak_mem_mb"):
        values = [logged(r, f"perf/{key}") for r in runs]
        expected = max(values) if key.endswith("img_s") else statistics.fmean(values)  # fastest seed's speed
        assert all(v > 0 for v in values) and math.isclose(row[key], expected), key
    spec = yaml.safe_load((ROOT / "configs" / "model" / "nano_nat.yaml").read_text())
    model = vision.create_model(spec["name"], num_classes=10, in_chans=1, **spec["kwargs"])
    assert math.isclose(row["params_m"], sum(p.numel() for p in model.parameters()) / 1e6)
    assert 0 < row["gmacs"] < 1
    text = table.read_text()
    assert table.parent == sweep_dir and "| nano_nat | nat_mini | 2 |" in text
    assert f"{100 * row['acc']:.2f} ± {100 * row['acc_std']:.2f}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cpu_peak_memory_resets_between_runs():
    import torch

    from vision.callbacks.throughput import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    block = torch.ones(50_000_000)  # 200 MB resident
    block[::1024] += 1
    high = peak_memory_mb(cpu)
    del block
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 150
