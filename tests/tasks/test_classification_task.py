"""ClassificationModule: optimiser groups, schedule, Mixup/CutMix, EMA, and NaN losses."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vision.callbacks import NonFiniteGuard
from vision.tasks import ClassificationModule
from vision.tasks.schedules import warmup_cosine

BACKBONE = {"name": "resnet18", "drop_path_rate": 0.0, "kwargs": {"channels": [8, 8, 8, 8]}}


def loaders(n: int = 32, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch, drop_last=True), DataLoader(data, batch_size=batch)


def fit(module: ClassificationModule, steps: int = 4, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        callbacks=list(callbacks))
    train, val = loaders()
    trainer.fit(module, train, val)
    return trainer


def test_backbone_comes_from_timm_by_name():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1)
    assert module.model.default_cfg["architecture"] == "resnet18"
    assert module(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_no_weight_decay_on_norms_and_biases():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1, weight_decay=0.05)
    trainer = fit(module, steps=1)
    groups = trainer.optimizers[0].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in module.model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name  # 1-D params (norms, biases) have none


def test_layer_decay_scales_each_group_lr():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1, lr=1e-3, layer_decay=0.5, warmup_epochs=0)
    trainer = fit(module, steps=1)
    groups = trainer.optimizers[0].param_groups
    scales = {g["lr_scale"] for g in groups}
    assert min(scales) < 0.1 and max(scales) == 1.0  # the stem decays most, the head not at all
    schedule = trainer.lr_scheduler_configs[0].scheduler
    for group, base in zip(groups, schedule.base_lrs):
        assert base == pytest.approx(1e-3 * group["lr_scale"])


def test_warmup_then_cosine():
    total, warmup = 100, 10
    lrs = [warmup_cosine(s, total, warmup, 0.01) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then falling
    assert lrs[-1] == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_mixup_cutmix_and_ema_train():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1, ema_decay=0.5,
                                  mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    before = [p.clone() for p in module.ema.module.parameters()]
    fit(module, steps=3)
    assert module.eval_model is module.ema.module
    assert any(not torch.equal(a, b) for a, b in zip(before, module.ema.module.parameters()))
    # EMA weights differ from (lag behind) the trained weights
    assert any(not torch.equal(a, b) for a, b in zip(module.model.parameters(), module.ema.module.parameters()))


def test_nan_loss_is_a_clear_error():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1)
    module.model.fc.weight.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss.*epoch 0, step 0"):
        fit(module, steps=1, callbacks=[NonFiniteGuard()])  # the pipeline's callbacks.nonfinite


def test_bf16_mixed_precision_trains():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1)
    train, val = loaders()
    trainer.fit(module, train, val)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


def test_compiled_backbone_matches_eager():
    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1, compile=True).eval()
    x = torch.randn(2, 1, 28, 28)
    expected = module(x)
    keys = set(module.state_dict())
    module.setup("fit")
    assert module.model._compiled_call_impl is not None
    assert set(module.state_dict()) == keys  # checkpoints load into an uncompiled module
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)
