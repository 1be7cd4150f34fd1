"""Compare runs: ``python -m vision.report <multirun dir | log dir, W&B sweep runs included> [--metric test/acc]``.

Finds every Hydra run under the directory (a folder with ``.hydra/config.yaml``), reads what it logged (the CSV
logger's ``metrics.csv``, else the W&B run's ``files/wandb-summary.json``, which online and synced runs have; an
offline W&B run keeps its metrics in a binary ``.wandb`` file, so sweeps log to CSV as well), groups the runs by
model config (``model=<name>``), and writes ``report.md`` (model, params, GMACs, accuracy mean ± std over seeds,
the fastest seed's train and inference img/s, mean peak memory) and ``report.png`` (accuracy against GMACs and
against inference throughput) next to the runs. Params and GMACs are counted on the model each run built (``vision.zoo.gmacs``);
everything else is read from the logs, never typed in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PERF = {"train_img_s": "perf/train_img_s", "infer_img_s": "perf/infer_img_s", "peak_mem_mb": "perf/peak_mem_mb"}
# Throughput is the best run of a model's seeds, not their mean: the seeds train the same network on the same
# data, so the runs differ in speed only by what else the machine was doing, which can only slow a run down.
BEST = {"train_img_s": max, "infer_img_s": max}


@dataclass
class Run:
    """One run: its directory, model config name, seed and last logged value of every metric."""

    path: Path
    model: str
    seed: int | None
    metrics: dict[str, float]
    config: dict = field(repr=False, default_factory=dict)


def csv_metrics(path: Path) -> dict[str, float]:
    """The last non-empty value of every column of a Lightning ``metrics.csv``."""
    out: dict[str, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if k and v not in ("", None)})
    return out


def wandb_metrics(run_dir: Path) -> dict[str, float]:
    """The numeric entries of the newest W&B summary under ``run_dir`` (online or offline run)."""
    summaries = sorted(run_dir.glob("**/wandb/*run-*/files/wandb-summary.json"))
    if not summaries:
        return {}
    summary = json.loads(summaries[-1].read_text())
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_run(run_dir: Path) -> Run:
    """A run from its Hydra directory; an error naming the directory when it logged nothing readable."""
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"] if hydra_file.exists() else {}
    model = choices.get("model") or config["model"]["backbone"]["name"]
    csvs = sorted(run_dir.glob("**/metrics.csv"))
    metrics = csv_metrics(csvs[-1]) if csvs else wandb_metrics(run_dir)
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no csv/**/metrics.csv nor wandb/*/files/wandb-summary.json")
    return Run(run_dir, model, config.get("seed"), metrics, config)


def find_runs(root: Path) -> list[Path]:
    """Hydra run directories under ``root`` (``root`` itself included), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: expected a multirun or log directory")
    runs = sorted({p.parent.parent for p in root.glob("**/.hydra/config.yaml")})
    if not runs:
        raise FileNotFoundError(f"{root}: no Hydra runs (<run>/.hydra/config.yaml) under it")
    return runs


def model_size(config: dict) -> tuple[float, float]:
    """(parameters in millions, GMACs per image) of the classifier a run built, at its data size."""
    import vision  # noqa: F401  (registers the families)
    from vision.backbone import BackboneSpec
    from vision.zoo import gmacs

    data = config["data"]
    model = BackboneSpec.parse(config["model"]["backbone"]).create(
        num_classes=data["num_classes"], in_chans=data["in_chans"]).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return params, gmacs(model, (data["in_chans"], data["image_size"], data["image_size"]))


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run], metric: str = "test/acc") -> list[dict]:
    """One row per model: size, ``metric`` mean ± std over its runs (seeds), the best throughput and the mean
    peak memory of those runs; sorted by accuracy."""
    rows = []
    for model in sorted({r.model for r in runs}):
        group = [r for r in runs if r.model == model]
        params, macs = model_size(group[0].config)
        acc, acc_std = _mean_std([r.metrics.get(metric, math.nan) for r in group])
        row = dict(model=model, backbone=group[0].config["model"]["backbone"]["name"], runs=len(group),
                   seeds=sorted(r.seed for r in group if r.seed is not None), params_m=params, gmacs=macs,
                   acc=acc, acc_std=acc_std)
        for key, logged in PERF.items():
            values = [v for v in (r.metrics.get(logged, math.nan) for r in group) if not math.isnan(v)]
            row[key] = (BEST[key](values) if values else math.nan) if key in BEST else _mean_std(values)[0]
        rows.append(row)
    return sorted(rows, key=lambda r: -r["acc"] if not math.isnan(r["acc"]) else math.inf)


def markdown(rows: list[dict], metric: str) -> str:
    head = (f"| model | backbone | runs | params (M) | GMACs | {metric} (mean ± std) | train img/s | infer img/s "
            "| peak mem (MB) |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['backbone']} | {r['runs']} | {r['params_m']:.2f} | {r['gmacs']:.3f} "
        f"| {100 * r['acc']:.2f} ± {100 * r['acc_std']:.2f} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} "
        f"| {r['peak_mem_mb']:.0f} |\n" for r in rows)


def figure(rows: list[dict], metric: str, out: Path) -> Path:
    """Accuracy against GMACs and against inference throughput, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gmacs", "GMACs per image"), (axes[1], "infer_img_s", "inference img/s")):
        for r in rows:
            ax.errorbar(r[key], 100 * r["acc"], yerr=100 * r["acc_std"], fmt="o", capsize=3)
            ax.annotate(r["model"], (r[key], 100 * r["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(root: Path, metric: str = "test/acc") -> tuple[list[dict], Path, Path]:
    """Collect the runs under ``root`` (with a progress bar), write ``report.md`` and ``report.png`` there."""
    from rich.progress import track

    root = Path(root)
    runs, unreadable = [], []
    for path in track(find_runs(root), description=f"reading runs under {root}"):
        try:
            runs.append(read_run(path))
        except FileNotFoundError as error:  # a run that crashed before logging: left out, and said
            unreadable.append(str(error))
    if unreadable:
        print("left out (nothing logged):\n  " + "\n  ".join(unreadable))
    if not runs:
        raise FileNotFoundError(f"{root}: none of its runs logged metrics")
    rows = summarize(runs, metric)
    table = root / "report.md"
    table.write_text(markdown(rows, metric))
    return rows, table, figure(rows, metric, root / "report.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vision.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a Hydra multirun directory, or a log directory holding runs")
    parser.add_argument("--metric", default="test/acc", help="the accuracy key to compare (default test/acc)")
    args = parser.parse_args(argv)
    _, table, png = report(args.root, args.metric)
    print(table.read_text())
    print(f"written {table} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
