"""Sweeps: W&B sweep files address real config keys and render runnable train.py commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def sample(spec: dict):
    """One value W&B could choose for a parameter spec."""
    if "values" in spec:
        return spec["values"][-1]
    if "value" in spec:
        return spec["value"]
    return spec["min"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_exist_in_config(compose_cfg, path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    params = sweep["parameters"]
    experiments = params.get("experiment", {"values": ["quickstart"]})["values"]
    for experiment in experiments:
        cfg = compose_cfg("train", [f"experiment={experiment}"])
        for key in params:
            if key != "experiment":  # a group choice, not a value
                assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key in cfg, key
    assert sweep["metric"]["name"] == cfg.optimized_metric


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_rendered_sweep_command_runs(path, tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(path.read_text())
    args = {k: {"value": sample(v)} for k, v in sweep["parameters"].items()}
    rendered = create_sweep_command_args({"args": args})["args_no_hyphens"]
    assert all("=" in a and not a.startswith("-") for a in rendered)
    command = [sys.executable, "train.py", "logger=wandb", *rendered, "trainer.fast_dev_run=true",
               "data.num_workers=0", f"paths.log_dir={tmp_path}", "extras.print_config=false"]
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout


def test_hydra_multirun_gives_each_run_its_own_directory(tmp_path):
    command = [sys.executable, "train.py", "-m", "model.lr=1e-3,2e-3", "trainer.fast_dev_run=true",
               "data.num_workers=0", "data.train_subset=64", "data.batch_size=16", f"paths.log_dir={tmp_path}",
               "extras.print_config=false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "train" / "multiruns").iterdir()
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert runs == ["0", "1"]
    for run in runs:
        overrides = yaml.safe_load((sweep_dir / run / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.lr=") for o in overrides)
