"""The Hydra pipeline end to end: configs compose, every experiment trains a step, train→eval agree."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _layouts import QUICK
from PIL import Image

from vision.utils import evaluate, train

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# Experiments of a task with its own data (detection, segmentation, medical) train a step in that task's test
# file, on data made for it: the test named here (checked by test_experiments_stepped_elsewhere_really_run).
# Every other experiment trains a step in test_experiment_fast_dev_run below.
STEPPED_ELSEWHERE = {
    "biformer_ade20k_upernet": ("test_segmentation_task.py", "test_ade20k_experiments"),
    "nat_ade20k_upernet": ("test_segmentation_task.py", "test_ade20k_experiments"),
    "dtop_ade20k": ("test_segmentation_task.py", "test_dtop_experiment_composes_and_trains_a_step"),
    "quickstart_segmentation": ("test_segmentation_task.py", "test_quickstart_segmentation_trains_tests_and_draws"),
    "biformer_coco_maskrcnn": ("test_detection.py", "test_coco_experiments_train_a_step"),
    "nat_coco_retinanet": ("test_detection.py", "test_coco_experiments_train_a_step"),
    "quickstart_detection": ("test_detection.py", "test_quickstart_detection_fast_dev_run_writes_previews"),
    "quickstart_medical": ("test_medical.py", "test_quickstart_medical_step"),
    "quickstart_medical2d": ("test_medical.py", "test_quickstart_medical2d_step"),
    "msd_spleen": ("test_medical.py", "test_msd_spleen_recipe_step"),
    "medmnist": ("test_medical.py", "test_medmnist_recipe_step"),
    "quickstart_medical_nat3d": ("test_medical.py", "test_quickstart_medical_nat3d_step"),
    "quickstart": ("test_pipeline.py", "test_quickstart_learns"),
    "compare_mechanisms": ("test_report.py", "test_compare_mechanisms_runs_a_step_per_family"),
    "quickstart_wau": ("test_synapse.py", "test_quickstart_wau_step"),
    "synapse_wau": ("test_synapse.py", "test_paper_recipes_compose_and_train_a_step"),
    "acdc_wau": ("test_synapse.py", "test_paper_recipes_compose_and_train_a_step"),
}
# Small, offline stand-ins for the data each experiment expects.


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """A tiny ImageNet-layout dataset of random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def data_overrides(cfg_data_target: str, tmp_path: Path) -> list[str]:
    if cfg_data_target.endswith("ImageFolderDataModule"):
        root = make_image_folder(tmp_path / "images")
        return [f"data.root={root}", "data.num_classes=3", "data.batch_size=2", "data.eval_batch_size=2"]
    return ["data.batch_size=8", "data.train_subset=64"]


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(compose_cfg, experiment, config_name):
    import hydra

    overrides = [f"experiment={experiment}"] + (["ckpt_path=x.ckpt"] if config_name == "eval" else [])
    cfg = compose_cfg(config_name, overrides)
    assert cfg.model.backbone.name and cfg.data._target_ and cfg.model._target_
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.num_classes == cfg.model.num_classes


def runs_experiment(test_file: str, function: str, experiment: str) -> bool:
    """Whether ``function`` in ``test_file`` (under ``tests/``) composes ``experiment=<experiment>``: literally, or through
    an ``experiment={...}`` override with the name in its parametrize list."""
    found = sorted((ROOT / "tests").rglob(test_file))  # wherever the file sits under tests/
    if len(found) != 1:
        return False
    tree = ast.parse(found[0].read_text())
    test = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if test is None:
        return False
    strings = {n.value for n in ast.walk(test) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    parametrized = {n.value for d in test.decorator_list for n in ast.walk(d) if isinstance(n, ast.Constant)}
    formatted = any(isinstance(n, ast.JoinedStr) and n.values and getattr(n.values[0], "value", None) == "experiment="
                    for n in ast.walk(test))
    return f"experiment={experiment}" in strings or (experiment in parametrized and formatted)


def test_experiments_stepped_elsewhere_really_run():
    assert set(STEPPED_ELSEWHERE) <= set(EXPERIMENTS), sorted(set(STEPPED_ELSEWHERE) - set(EXPERIMENTS))
    missing = [name for name, (file, test) in STEPPED_ELSEWHERE.items() if not runs_experiment(file, test, name)]
    assert not missing, f"these tests do not train the experiment they are listed for: {missing}"
    assert not runs_experiment("test_detection.py", "test_coco_experiments_train_a_step", "quickstart")


@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - set(STEPPED_ELSEWHERE)))
def test_experiment_fast_dev_run(compose_cfg, tmp_path, experiment):
    target = compose_cfg("train", [f"experiment={experiment}"]).data._target_
    cfg = compose_cfg("train", [f"experiment={experiment}", "trainer.fast_dev_run=true", *QUICK,
                                *data_overrides(target, tmp_path)])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert objects["trainer"].state.finished


def test_train_then_eval_gives_same_test_accuracy(compose_cfg, tmp_path):
    common = [*QUICK, "data.train_subset=256", "data.batch_size=32", "trainer.max_epochs=1",
              "trainer.limit_val_batches=2", "trainer.limit_test_batches=3"]
    metrics, objects = train(compose_cfg("train", common))
    ckpt = objects["best_ckpt"]
    assert Path(ckpt).is_file()
    eval_metrics, _ = evaluate(compose_cfg("eval", [*common, f"ckpt_path={ckpt}"]))
    assert eval_metrics["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert eval_metrics["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_quickstart_learns(compose_cfg):
    """A short quickstart run on a subset is far above chance (10%)."""
    cfg = compose_cfg("train", ["experiment=quickstart", *QUICK, "data.train_subset=2048", "trainer.max_epochs=2",
                                "data.batch_size=64",
                                "trainer.limit_val_batches=4", "trainer.limit_test_batches=16",
                                "callbacks.model_checkpoint=null"])
    metrics, _ = train(cfg)
    assert metrics["test/acc"] > 0.6, metrics


def test_optimized_metric_missing_is_a_clear_error():
    from vision.utils import metric_value

    assert metric_value({"val/acc_best": 0.5}, "val/acc_best") == 0.5
    with pytest.raises(KeyError, match="val/nope.*logged metrics"):
        metric_value({"val/acc_best": 0.5}, "val/nope")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_unknown_experiment_lists_choices():
    result = run_script("train.py", "experiment=does_not_exist")
    assert result.returncode != 0
    assert "does_not_exist" in result.stderr and "quickstart" in result.stderr


def test_unknown_config_key_is_rejected():
    result = run_script("train.py", "trainer.not_a_key=1")
    assert result.returncode != 0
    assert "not_a_key" in result.stderr


def test_eval_needs_a_checkpoint(compose_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        evaluate(compose_cfg("eval", [*QUICK, f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
