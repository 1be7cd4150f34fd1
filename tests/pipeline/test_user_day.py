"""A user's day (issue 26): swap the backbone, train on own data, stop and resume, evaluate and predict."""

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from PIL import Image

import vision
from vision.datamodules import ImageFolderDataModule
from vision.datamodules.datasets import BadSamples, CorruptImageError
from vision.utils import evaluate, metric_value, train
from vision.utils.checkpoint import AtomicCheckpointIO, load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["data.num_workers=0", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
         "callbacks.attention_maps=null", "trainer.accelerator=cpu"]
EVAL_QUIET = ["data.num_workers=0", "callbacks.rich_progress_bar=null", "trainer.accelerator=cpu"]
TINY = [*QUIET, "model.backbone.kwargs.channels=[8,8,8,8]", "data.image_size=16", "data.train_subset=32",
        "data.batch_size=16", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def in_dir(cfg, output_dir: Path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


# ---- 1. experiments compose with any backbone -------------------------------------------------------------

SIZES = ("mini", "tiny", "small", "medium", "base", "large")


def family(name: str) -> str:
    """``nat_mini`` -> ``nat``, ``evit_deit_small`` -> ``evit_deit``, ``vitaev2_vsa_48m`` -> ``vitaev2_vsa``: a
    variant's name without its size."""
    head, _, size = name.rpartition("_")
    return head if size in SIZES or re.fullmatch(r"\d+m|[stbl]", size) else name


def size_rank(name: str) -> tuple[int, str]:
    size = name.rpartition("_")[2]
    size = {"t": "tiny", "s": "small", "b": "base", "l": "large"}.get(size, size)
    return (SIZES.index(size) if size in SIZES else len(SIZES), name)


# the smallest variant of every registered family (its name without the size)
FAMILY_MODELS = sorted({family(n): min((m for m in vision.list_models() if family(m) == family(n)), key=size_rank)
                        for n in vision.list_models()}.values())


def test_family_list_covers_every_registered_model():
    assert {family(m) for m in vision.list_models()} == {family(m) for m in FAMILY_MODELS}
    assert len(FAMILY_MODELS) >= 11 and "nat_mini" in FAMILY_MODELS and "dinat_mini" in FAMILY_MODELS


@pytest.mark.parametrize("override", [f"model={name}" for name in FAMILY_MODELS]
                         + ["model.backbone.name=convnext_atto", "model.backbone.name=resnet10t"])
def test_default_experiment_trains_a_step_with_any_backbone(compose_cfg, override):
    """The quickstart (channels_last, a 3/8-width ResNet's kwargs) with another backbone chosen either way."""
    cfg = compose_cfg("train", [override, *QUIET, "trainer.fast_dev_run=true", "data.image_size=64",
                                "data.batch_size=2", "data.train_subset=4"])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert objects["model"].hparams.backbone["name"] == override.split("=")[1]
    assert objects["model"].hparams.channels_last  # the default experiment's memory format, on any backbone


@pytest.mark.parametrize("experiment", ["quickstart_segmentation", "quickstart_detection"])
def test_quickstart_experiments_keep_backbone_kwargs_with_their_backbone(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.model.backbone.kwargs.channels == [32, 64, 128, 256]
    other = compose_cfg("train", [f"experiment={experiment}", "model=biformer_tiny"])
    assert dict(other.model.backbone.kwargs) == {}


def test_backbone_name_on_the_command_line_drops_other_backbones_kwargs(compose_cfg):
    from vision.utils.config import command_line_overrides, reconcile_backbone

    cfg = compose_cfg("train", ["model.backbone.name=convnext_atto", "+model.backbone.kwargs.ls_init_value=0.5"])
    reconcile_backbone(cfg, command_line_overrides())
    assert dict(cfg.model.backbone.kwargs) == {"ls_init_value": 0.5}
    kept = compose_cfg("train", ["model.backbone.kwargs.channels=[8,8,8,8]"])
    reconcile_backbone(kept, command_line_overrides())
    assert kept.model.backbone.kwargs.channels == [8, 8, 8, 8]


# ---- 2. stopping never loses more than the running batch --------------------------------------------------

class SlowSteps(Callback):
    """Test aid: ``ready`` appears once a step is done; each step then takes ``delay`` seconds more, so a
    signal lands mid-training."""

    def __init__(self, ready: str, delay: float = 0.2):
        self.ready, self.delay = Path(ready), delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ready.touch()
        time.sleep(self.delay)


SIGNAL_RUN = [*QUIET, "data.num_workers=1", "model.backbone.kwargs.channels=[8,8,8,8]", "data.image_size=16",
              "data.train_subset=64", "data.batch_size=8", "trainer.max_epochs=50", "trainer.limit_val_batches=0",
              "test=false", "extras.print_config=false", "callbacks.last_checkpoint.every_n_train_steps=1000",
              "callbacks.model_checkpoint=null"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("target", ["process", "group"])
def test_signal_saves_last_checkpoint_and_exits_cleanly(tmp_path, sig, target):
    run, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / 'tests', Path(__file__).parent))), "PROJECT_ROOT": str(ROOT)}
    cmd = [sys.executable, "train.py", *SIGNAL_RUN, f"hydra.run.dir={run}",
           "+callbacks.slow._target_=test_user_day.SlowSteps", f"+callbacks.slow.ready={ready}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a job under a scheduler
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), proc.communicate()[0][-3000:]
        signum = getattr(signal, sig)
        os.killpg(proc.pid, signum) if target == "group" else os.kill(proc.pid, signum)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert f"({sig})" in output and "preempted at epoch 0" in output, output[-3000:]
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert 1 <= state["global_step"] < 400  # stopped during the run, after the step that was running
    assert state["run_record"]["finished"] is None


def test_rerunning_a_finished_run_with_ckpt_path_last_does_nothing(compose_cfg, tmp_path):
    metrics, _ = train(in_dir(compose_cfg("train", TINY), tmp_path))
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    again, objects = train(in_dir(compose_cfg("train", [*TINY, "ckpt_path=last"]), tmp_path))
    assert objects["complete"] and "trainer" not in objects
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files  # no epoch_000-v1.ckpt
    assert metric_value(again, "val/acc_best") == metrics["val/acc_best"]
    # a raised limit trains on from the finished state
    more, objects = train(in_dir(compose_cfg("train", [*TINY, "ckpt_path=last", "trainer.max_epochs=2"]), tmp_path))
    assert objects["trainer"].current_epoch == 2 and "test/acc" in more


# ---- 3. GPU experiments on a CPU machine --------------------------------------------------------------

def test_gpu_experiment_on_a_cpu_machine_falls_back_and_reaches_the_data_check(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg("train", ["experiment=biformer_imagenet", f"data.root={tmp_path / 'imagenet'}"])
    with pytest.warns(UserWarning, match="trainer=cpu"), pytest.raises(FileNotFoundError, match="imagenet.*train/<class>"):
        train(cfg)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "bf16-mixed"


def test_ade20k_missing_data_names_layout_and_source(tmp_path):
    from vision.datamodules import ADE20KDataModule

    with pytest.raises(FileNotFoundError, match=r"images/\{training,validation\}.*sceneparsing"):
        ADE20KDataModule(str(tmp_path)).setup("fit")


# ---- 4. evaluate and predict from a checkpoint alone --------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with non-default model and data settings (8-channel ResNet, 16 px)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    out = tmp_path_factory.mktemp("trained")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=TINY, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.extras.print_config = False
        del cfg.hydra
    metrics, objects = train(cfg)
    GlobalHydra.instance().clear()
    return metrics, Path(objects["best_ckpt"])


def test_checkpoint_holds_config_and_class_names(trained):
    record = load_checkpoint_file(trained[1])["run_record"]
    assert record["config"]["model"]["backbone"]["kwargs"] == {"channels": [8, 8, 8, 8]}
    assert record["config"]["data"]["image_size"] == 16
    assert record["class_names"][0] == "T-shirt/top" and len(record["class_names"]) == 10


def test_eval_needs_only_the_checkpoint(compose_cfg, trained):
    metrics, ckpt = trained
    evaluated, objects = evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", *EVAL_QUIET, "trainer.limit_test_batches=1"]))
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    # command-line overrides still apply on top of the saved config
    _, objects = evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", *EVAL_QUIET, "trainer.limit_test_batches=1",
                                               "data.batch_size=4"]))
    assert objects["datamodule"].eval_batch_size == 4 and objects["datamodule"].hparams.image_size == 16


def write_pngs(folder: Path, count: int, size=(28, 28), channels: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        shape = (*size, channels) if channels > 1 else size
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


def predict_cfg(compose_cfg, ckpt: Path, inputs: str, out: Path, *extra: str):
    cfg = compose_cfg("predict", [f"ckpt_path={ckpt}", f"inputs='{inputs}'", *extra])  # quoted: globs hold []
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_predict_classification_writes_top_k_with_class_names(compose_cfg, trained, tmp_path):
    from vision.utils.predict import predict

    paths = write_pngs(tmp_path / "images" / "nested", 3)
    (tmp_path / "images" / "._img0.png").write_bytes(b"\x00AppleDouble")  # macOS metadata, not an image
    result = predict(predict_cfg(compose_cfg, trained[1], str(tmp_path / "images"), tmp_path / "out", "top_k=3"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["path"]) for r in rows] == paths
    names = load_checkpoint_file(trained[1])["run_record"]["class_names"]
    for row, entry in zip(rows, result["results"]):
        probs = [float(row[f"prob_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and row["class_1"] == names[int(row["label_1"])]
        assert entry["top_k"][0]["class"] == row["class_1"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())[0]["path"] == str(paths[0])
    single = predict(predict_cfg(compose_cfg, trained[1], str(paths[1]), tmp_path / "one"))
    assert single["results"][0]["top_k"] == result["results"][1]["top_k"][:1] + single["results"][0]["top_k"][1:]
    globbed = predict(predict_cfg(compose_cfg, trained[1], str(tmp_path / "images" / "*" / "img[01].png"),
                                  tmp_path / "glob"))
    assert [r["path"] for r in globbed["results"]] == [str(p) for p in paths[:2]]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        predict(predict_cfg(compose_cfg, trained[1], str(tmp_path / "nothing_here"), tmp_path / "none"))


def save_untrained(compose_cfg, tmp_path: Path, overrides: list[str], class_names: list[str]) -> Path:
    """A checkpoint as the pipeline writes it (weights + run record) of an untrained dense-task model."""
    import hydra
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", overrides)
    model = hydra.utils.instantiate(cfg.model)
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data")}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(),
                "run_record": {"config": config, "class_names": class_names, "finished": None}}, path)
    return path


@pytest.mark.parametrize("experiment, outputs", [
    ("quickstart_segmentation", {"masks", "overlays"}),
    ("quickstart_medical2d", {"masks", "overlays"}),
    ("quickstart_detection", {"overlays"}),
])
def test_predict_dense_tasks_write_masks_or_boxes(compose_cfg, tmp_path, experiment, outputs):
    from vision.utils.predict import predict

    cfg = compose_cfg("train", [f"experiment={experiment}"])
    names = [f"thing{i}" for i in range(cfg.model.num_classes)]
    ckpt = save_untrained(compose_cfg, tmp_path, [f"experiment={experiment}", "model.backbone.kwargs.channels=[8,8,8,8]"],
                          names)
    channels = int(cfg.data.get("in_chans", cfg.data.get("in_channels", 3)))
    paths = write_pngs(tmp_path / "in", 2, size=(40, 52), channels=channels)
    result = predict(predict_cfg(compose_cfg, ckpt, str(tmp_path / "in"), tmp_path / "out", "score_threshold=0"))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"predictions.csv", "predictions.json", *outputs}
    for entry, path in zip(result["results"], paths):
        assert entry["path"] == str(path)
        if "mask" in entry:  # a class id per pixel of the original image, named in the summary
            mask = np.asarray(Image.open(entry["mask"]))
            assert mask.shape == (40, 52) and mask.max() < len(names)
            assert set(entry["classes"]) <= set(names)
        else:
            assert all(d["class"] in names for d in entry["detections"])
        assert Image.open(entry["overlay"]).size == (52, 40)


def test_every_task_has_predict_step():
    from vision import tasks

    for name in tasks.__all__:
        task = getattr(tasks, name)
        if isinstance(task, type):
            assert "predict_step" in vars(task), name


# ---- 5. own data ------------------------------------------------------------------------------------

def image_folder(root: Path, train=("a", "b", "c"), val=("a", "b", "c"), per_class: int = 2) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            write_pngs(root / split / name, per_class, size=(20, 20), channels=3)
    return root


def folder_module(root: Path, num_classes: int = 3, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), num_classes=num_classes, image_size=16, batch_size=2, num_workers=0,
                                 **kwargs)


def test_empty_class_folder_is_named_and_refused_unless_allowed(tmp_path):
    root = image_folder(tmp_path)
    (root / "train" / "empty_one").mkdir()
    (root / "val" / "empty_one").mkdir()
    with pytest.raises(ValueError, match="without images.*empty_one.*allow_empty_classes"):
        folder_module(root, num_classes=4).setup("fit")
    with pytest.raises(ValueError, match=r"4 class folders \(a, b, c, empty_one\)"):
        folder_module(root, num_classes=3, allow_empty_classes=True).setup("fit")
    dm = folder_module(root, num_classes=4, allow_empty_classes=True)
    dm.setup("fit")
    assert dm.class_names == ["a", "b", "c", "empty_one"]


@pytest.mark.parametrize("val, message", [(("a", "b"), "missing from val/: c"), (("a", "b", "c", "d"), "only in val/: d")])
def test_train_and_val_class_folders_must_match(tmp_path, val, message):
    with pytest.raises(ValueError, match=message):
        folder_module(image_folder(tmp_path, val=val)).setup("fit")


def test_hidden_and_appledouble_files_are_ignored(tmp_path):
    root = image_folder(tmp_path)
    (root / "train" / "a" / "._img0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    dm = folder_module(root)
    dm.setup("fit")
    assert dm.class_names == ["a", "b", "c"]
    assert len(dm.train_set) == 6 and not any(p.name.startswith(".") for p, _ in dm.train_set.samples)


def test_skipped_counts_files_not_reads(tmp_path):
    root = image_folder(tmp_path)
    (root / "val" / "a" / "broken.png").write_bytes(b"not a png")
    dm = folder_module(root, on_bad_sample="skip")
    dm.setup("fit")  # val/ is also the test split: the same file read by two datasets
    broken = [i for i, (p, _) in enumerate(dm.val_set.samples) if p.name == "broken.png"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # three epochs
            assert dm.val_set[broken] is None and dm.test_set[broken] is None
    assert dm.skipped == 1
    other = BadSamples("skip")

    def fail(index):
        raise CorruptImageError(f"bad {index}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in (0, 1, 0, 1, 2):
            other.read(fail, index)
    assert other.count == 3


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=abc", "data.batch_size='abc' must be a positive integer"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
    ("model.lr=fast", "model.lr='fast' must be a number"),
])
def test_common_keys_are_type_checked(compose_cfg, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(compose_cfg("train", [*QUIET, "trainer.fast_dev_run=true", override]))


def test_num_workers_default_follows_the_machine(compose_cfg):
    from vision.datamodules.loaders import available_cpus

    cfg = compose_cfg("train", ["data=image_folder", "data.root=/nowhere", "data.num_classes=3"])
    assert cfg.data.num_workers is None
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_workers == max(0, min(8, available_cpus() - 1))


# ---- 6. smaller points ------------------------------------------------------------------------------

def test_summary_prints_whole_paths_when_piped(capsys):
    from vision.utils.pipeline import _summary

    long_path = "/very/long/" + "nested/" * 20 + "checkpoints/epoch_002.ckpt"
    _summary("train finished", {"val/acc": 0.5}, {"best checkpoint": long_path})
    assert long_path in capsys.readouterr().out


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644


def test_sweep_files_are_not_a_config_group():
    """``--help`` lists every folder under configs/ as a group; the W&B sweep files are not Hydra configs."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        groups = GlobalHydra.instance().config_loader().list_groups("")
    GlobalHydra.instance().clear()
    assert "sweep" not in groups and {"model", "data", "experiment"} <= set(groups)
    assert (ROOT / "sweeps" / "classification.yaml").is_file()
