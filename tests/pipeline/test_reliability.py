"""Reliability: kill/preempt and resume, atomic and safe checkpoints, non-finite steps, bad samples, 2-process DDP,
bf16 and torch.compile through the pipeline. Tiny ResNets on 16 px Fashion-MNIST subsets, CPU."""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from vision.callbacks import NonFiniteGuard
from vision.datamodules import (
    BadSampleError,
    CorruptImageError,
    ImageFolderDataModule,
    check_boxes,
    check_mask,
)
from vision.tasks import ClassificationModule
from vision.utils import train
from vision.utils.checkpoint import (
    AtomicCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint_file,
    resolve_ckpt_path,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.backbone.kwargs.channels=[8,8,8,8]", "data.image_size=16", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "callbacks.attention_maps=null", "trainer.deterministic=true",
        "trainer.log_every_n_steps=1"]
# 8 steps an epoch, 2 epochs; last.ckpt every 5 steps; EMA and Mixup (numpy RNG) in play
RESUME = [*TINY, "data.train_subset=64", "data.batch_size=8", "trainer.max_epochs=2", "model.warmup_epochs=0.5",
          "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "model.ema_decay=0.9",
          "+model.mixup={mixup_alpha:0.8,cutmix_alpha:1.0}", "callbacks.last_checkpoint.every_n_train_steps=5"]


class SignalAtStep(Callback):
    """Test fault: sends ``signal`` to this process when ``step`` optimizer steps are done."""

    def __init__(self, step: int, signal: str = "SIGKILL"):
        self.step, self.signal = step, getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


signal_module = signal


def run_train(run_dir: Path, *overrides: str, launcher: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / 'tests', Path(__file__).parent))), "PROJECT_ROOT": str(ROOT), **(env or {})}
    cmd = [sys.executable, *launcher, "train.py", *overrides, f"hydra.run.dir={run_dir}", "extras.print_config=false"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def fault(step: int, sig: str) -> list[str]:
    return ["+callbacks.fault._target_=test_reliability.SignalAtStep", f"+callbacks.fault.step={step}",
            f"+callbacks.fault.signal={sig}"]


def in_dir(cfg, output_dir: Path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "data/skipped"}


def test_preempted_then_killed_run_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path):
    full_metrics, full = train(in_dir(compose_cfg("train", RESUME), tmp_path / "full"))
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"

    # SIGUSR1 (a SLURM-style warning signal, here outside SLURM) in step 7: last.ckpt after it, exit status 0
    preempted = run_train(run, *RESUME, *fault(6, "SIGUSR1"))
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "preempted at epoch 0, step 7" in preempted.stdout + preempted.stderr
    assert load_checkpoint_file(last)["global_step"] == 7

    # resumed with ckpt_path=last, then SIGKILLed in step 13 (mid epoch 1); the last checkpoint is step 10's
    killed = run_train(run, *RESUME, "ckpt_path=last", *fault(12, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = load_checkpoint_file(last)
    assert state["global_step"] == 10 and any(k.startswith("ema.") for k in state["state_dict"])
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2, "seed": 42, "num_replicas": 1, "batch_size": 8}]

    metrics, resumed = train(in_dir(compose_cfg("train", [*RESUME, "ckpt_path=last"]), run))
    assert comparable(metrics) == pytest.approx(comparable(full_metrics), abs=0, rel=0)
    full_weights = full["model"].state_dict()
    for key, value in resumed["model"].state_dict().items():
        torch.testing.assert_close(value, full_weights[key], rtol=0, atol=0, msg=key)


def test_slurm_sigusr1_saves_an_hpc_checkpoint_and_requeues_the_job(tmp_path):
    """Lightning's SLURMEnvironment plugin (added by the pipeline when SLURM is detected): SIGUSR1 saves
    hpc_ckpt_1.ckpt and calls ``scontrol requeue <job>`` (a stand-in on PATH records the call); SLURM's later
    kill is SIGKILL here, and ``ckpt_path=last`` of the requeued job picks the hpc checkpoint."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "run"
    overrides = [*TINY, "data.train_subset=64", "data.batch_size=8", "trainer.max_epochs=1",
                 "trainer.limit_val_batches=1", *fault(6, "SIGUSR1"),
                 "+callbacks.kill._target_=test_reliability.SignalAtStep", "+callbacks.kill.step=7"]
    killed = run_train(run, *overrides, env=slurm)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert load_checkpoint_file(run / "hpc_ckpt_1.ckpt")["global_step"] == 6
    assert resolve_ckpt_path("last", run) == str(run / "hpc_ckpt_1.ckpt")


def test_sigterm_saves_last_checkpoint_and_exits_cleanly(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*TINY, "data.train_subset=32", "data.batch_size=8", "trainer.max_epochs=1",
                                "trainer.limit_val_batches=1"])
    with open_dict(cfg):
        cfg.callbacks.fault = {"_target_": "test_reliability.SignalAtStep", "step": 1, "signal": "SIGTERM"}
    with pytest.raises(SystemExit) as exit_info:  # Lightning's SIGTERMException
        train(cfg)
    assert not exit_info.value.code  # status 0
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_ckpt_path_last_without_checkpoint_starts_fresh(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*TINY, "data.train_subset=16", "data.batch_size=8", "trainer.max_steps=1",
                                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "ckpt_path=last"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and np.isfinite(metrics["train/loss_epoch"])
    assert isinstance(objects["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)


# ---- checkpoint files ---------------------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1  # the previous checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=1), "weight": torch.ones(1)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*pickled.pth.*weights_only=False"):
        load_checkpoint_file(bad)
    with pytest.raises(UnsafeCheckpointError, match="pickled.pth"):
        AtomicCheckpointIO().load_checkpoint(bad)
    from vision.models import create_model

    with pytest.raises(UnsafeCheckpointError, match="pickled.pth"):
        create_model("resnet18", pretrained_file=str(bad), channels=[8, 8, 8, 8])
    plain = tmp_path / "plain.pth"
    model = create_model("resnet18", channels=[8, 8, 8, 8], num_classes=3)
    torch.save(model.state_dict(), plain)
    loaded = create_model("resnet18", pretrained_file=str(plain), channels=[8, 8, 8, 8], num_classes=3)
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


# ---- non-finite losses --------------------------------------------------------------------------------------

BACKBONE = {"name": "resnet18", "kwargs": {"channels": [8, 8, 8, 8]}}


def nan_loader(bad_batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 1, 16, 16, generator=g)
    images[bad_batch * 8] = float("nan")  # one sample of one batch
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (48,), generator=g)), batch_size=8)


def nan_trainer(tmp_path, guard, steps=6):
    last = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=2)
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[guard, last], limit_val_batches=0,
                     enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()])


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at epoch 0, step 3 \(batch 3\)"):
        nan_trainer(tmp_path, NonFiniteGuard()).fit(module, nan_loader(bad_batch=3))
    last = load_checkpoint_file(tmp_path / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step never updated the weights


def test_nonfinite_step_is_skipped_on_request(tmp_path):
    guard = NonFiniteGuard(action="skip")

    class Snapshot(Callback):  # weights around the bad batch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                self.before = [p.detach().clone() for p in pl_module.model.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                self.after = [p.detach().clone() for p in pl_module.model.parameters()]

    module, snapshot = ClassificationModule(BACKBONE, num_classes=4, in_chans=1), Snapshot()
    trainer = nan_trainer(tmp_path, guard)
    trainer.callbacks.append(snapshot)
    with pytest.warns(UserWarning, match=r"skipping the optimizer step: non-finite training loss nan .*step 3"):
        trainer.fit(module, nan_loader(bad_batch=3))
    assert guard.skipped == 1 and trainer.global_step == 6
    assert all(torch.equal(a, b) for a, b in zip(snapshot.before, snapshot.after))  # BN buffers aside
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- bad samples ---------------------------------------------------------------------------------------------


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    good = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_bad_sample_policy(tmp_path):
    root = image_folder(tmp_path / "images")
    kw = dict(num_classes=2, image_size=16, batch_size=5, backbone="resnet18", num_workers=0,
              persistent_workers=False, pin_memory=False)
    strict = ImageFolderDataModule(str(root), **kw)
    strict.setup("fit")
    with pytest.raises(CorruptImageError, match="truncated.png"):
        list(strict._loader(strict.train_set, train=False))
    lenient = ImageFolderDataModule(str(root), on_bad_sample="skip", **kw)
    lenient.setup("fit")
    with pytest.warns(UserWarning, match="truncated.png"):
        seen = sum(len(labels) for _, labels in lenient._loader(lenient.train_set, train=False))
    assert seen == 4 and lenient.skipped == 1
    with pytest.raises(ValueError, match="on_bad_sample='ignore'"):
        ImageFolderDataModule(str(root), on_bad_sample="ignore", **kw)
    # annotation checks the dense tasks call; each error names the file
    with pytest.raises(BadSampleError, match=r"m.png has unexpected values \[7\]"):
        check_mask(np.array([[0, 1], [7, 255]]), allowed=[0, 1, 255], path="m.png")
    with pytest.raises(BadSampleError, match="a.json has no boxes"):
        check_boxes(np.zeros((0, 4)), "a.json")
    with pytest.raises(BadSampleError, match="a.json has non-finite or empty boxes"):
        check_boxes([[0, 0, 5, 5], [3, 3, 3, 9]], "a.json")
    assert check_boxes([[0, 0, 5, 5]], "a.json").shape == (1, 4)


def test_skipped_count_is_logged_and_summarised(compose_cfg, tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    cfg = compose_cfg("train", [*TINY, "data=image_folder", f"data.root={root}", "data.num_classes=2",
                                "data.batch_size=5", "data.eval_batch_size=4", "data.on_bad_sample=skip",
                                "trainer.max_epochs=1", "data.randaugment=null"])
    metrics, _ = train(cfg)
    assert metrics["data/skipped"] == 1
    assert "bad samples skipped" in capsys.readouterr().out


# ---- scale-out, precision, compile ----------------------------------------------------------------------------


def csv_metrics(run_dir: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v and k not in ("epoch", "step")}


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(compose_cfg, tmp_path):
    # LayerNorm instead of BatchNorm: SyncBatchNorm needs GPUs, and per-rank batch statistics would differ
    common = [*TINY, "+model.backbone.kwargs.norm_layer=layernorm2d", "data.train_subset=64", "trainer.max_epochs=1",
              "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "callbacks.lr_monitor=null",
              "callbacks.last_checkpoint.every_n_train_steps=4"]
    ddp = run_train(tmp_path / "ddp", *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8",
                    launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single_metrics, _ = train(in_dir(compose_cfg("train", [*common, "data.batch_size=16"]),
                                     tmp_path / "single"))

    ddp_ckpt, single_ckpt = (load_checkpoint_file(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("ddp", "single"))
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == 4
    weights = {k: v for k, v in single_ckpt["state_dict"].items() if k.startswith("model.")}  # not metric states
    assert len(weights) > 20
    for key, value in weights.items():
        torch.testing.assert_close(ddp_ckpt["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    ddp_metrics = csv_metrics(tmp_path / "ddp")  # written by rank 0 alone
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss_epoch"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4), key
    assert [p.name for p in (tmp_path / "ddp").glob("csv/version_*")] == ["version_0"]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]


def test_fsdp_config_builds_a_full_shard_strategy_with_full_checkpoints(compose_cfg):
    """Lightning runs FSDP on GPUs only, so CPU CI checks the configuration: the strategy it builds shards
    parameters, gradients and optimizer state, and gathers checkpoints into one file (loadable without FSDP)."""
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    cfg = compose_cfg("train", ["trainer=fsdp", "trainer.num_nodes=2"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.num_nodes) == ("gpu", "bf16-mixed", 2)
    assert cfg.trainer.use_distributed_sampler


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "model.compile=true"])
def test_bf16_and_compile_train_through_the_pipeline(compose_cfg, override):
    torch._dynamo.reset()  # graphs compiled for other tests' models in this process must not be reused
    # 28 px, not TINY's 16: torch's CPU bf16 weight gradient of a stride-2 convolution over a 1x1 channels-last
    # input (ResNet layer4 at 16 px) holds uninitialised values about half the time (torch 2.14.1)
    cfg = compose_cfg("train", [*TINY, override, "data.image_size=28", "data.train_subset=16", "data.batch_size=8",
                                "trainer.max_steps=2",
                                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                                "callbacks.model_checkpoint=null"])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss_epoch"]) and 0 <= metrics["test/acc"] <= 1
    assert objects["trainer"].global_step == 2
    if override.startswith("model.compile"):
        assert objects["model"].model._compiled_call_impl is not None
