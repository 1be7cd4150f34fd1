"""DynamicViT against the official raoyongming/DynamicViT semantics, and the task's aux-loss/distillation path.

There is no DynamicViT fixture in shared/fixtures/official, so these test properties of the official code:
inference token counts (``int(196 * rho**s)``), training keeps every token and masks the dropped ones out of
the attention, hard Gumbel decisions with straight-through gradients, the ratio loss formula, the exact
parameter counts, and that with nothing pruned the model is the DeiT whose checkpoint it loads.
"""

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vision
from vision.attention.pruning import hard_keep_decision, keep_ratio_loss, policy_softmax
from vision.callbacks.attention_maps import collect_maps
from vision.models.dynamicvit import Block
from vision.tasks import ClassificationModule
from vision.tasks.distillation import Distillation

TINY = dict(embed_dim=48, num_heads=3)


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("dynamicvit_deit_small", **dict(TINY, **kwargs))


@pytest.mark.parametrize("rate,size,expected", [
    (0.7, (224, 224), [137, 96, 67]),  # official: int(196 * 0.7), int(196 * 0.7**2), int(196 * 0.7**3)
    (0.5, (224, 224), [98, 49, 24]),
    (0.7, (160, 224), [98, 68, 48]),  # 140 patches: int(98.0), int(68.6), int(48.02)
])
def test_inference_token_counts_follow_official_int_rule(rate, size, expected):
    model = tiny(keep_rate=rate).eval()
    with torch.no_grad():
        final, blocks = model.forward_intermediates(torch.randn(2, 3, *size), output_fmt="NLC")
    n = size[0] // 16 * size[1] // 16
    assert [b.shape[1] for b in blocks] == [n] * 3 + [expected[0]] * 3 + [expected[1]] * 3 + [expected[2]] * 3
    assert final.shape[1] == 1 + expected[2] == 1 + model.output_tokens(n)


def test_keep_rate_one_is_the_deit_it_loads(tmp_path):
    deit = timm.create_model("deit_small_patch16_224", num_classes=10, **TINY).eval()
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, path)  # the official DeiT release layout
    model = vision.create_model("dynamicvit_deit_small", pretrained_file=path, num_classes=10, keep_rate=1.0,
                                **TINY).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), rtol=1e-5, atol=1e-5)
        assert model.forward_features(x).shape == (2, 197, 48)  # nothing pruned


def test_training_keeps_every_token_with_hard_decisions():
    model = tiny().train()
    policies = {}
    for i in model.pruning_loc:  # the keep decisions each pruning block's attention sees
        model.blocks[i].register_forward_pre_hook(lambda m, args, i=i: policies.__setitem__(i, args[1]))
    features = model.forward_features(torch.randn(3, 3, 224, 224))
    assert features.shape == (3, 197, 48)  # no token removed
    d3, d6, d9 = (policies[i][:, :, 0] for i in (3, 6, 9))
    assert (d3[:, 0] == 1).all()  # the class token is always kept
    for d in (d3, d6, d9):
        assert set(d.unique().tolist()) <= {0.0, 1.0}
    assert (d6 <= d3).all() and (d9 <= d6).all()  # a dropped token stays dropped
    torch.testing.assert_close(model.token_keep_mask, d9[:, 1:])
    expected = 2.0 * sum(((d[:, 1:].mean(1) - r) ** 2).mean() for d, r in zip((d3, d6, d9), (0.7, 0.49, 0.343))) / 3
    torch.testing.assert_close(model.aux_losses["ratio"], expected)
    model.eval()(torch.randn(1, 3, 64, 64))
    assert model.aux_losses == {} and model.token_keep_mask is None  # nothing left over from training


def test_policy_softmax_gives_dropped_keys_no_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    policy = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 0]], dtype=torch.float32)[..., None]
    attn = policy_softmax(logits, policy)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 6))
    seen = (policy[:, None, None, :, 0] == 1) | torch.eye(6, dtype=torch.bool)  # [B, 1, query, key]: kept or itself
    # official: exp(l - row max) over the seen keys, smoothed by eps = 1e-6: a dropped key gets only eps/N
    total = (logits - logits.amax(-1, keepdim=True)).exp().masked_fill(~seen, 0).sum(-1, keepdim=True)
    dropped = attn.masked_select(~seen.expand_as(attn))
    torch.testing.assert_close(dropped, (1e-6 / 6 / (total + 1e-6)).expand_as(attn).masked_select(~seen))
    assert dropped.max() < 1e-5
    for b in range(2):  # among the seen keys a query's weights are the plain softmax
        for q in range(6):
            keys = seen[b, 0, q]
            torch.testing.assert_close(attn[b, :, q, keys], logits[b, :, q, keys].softmax(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(policy_softmax(logits, torch.ones(2, 6, 1)), logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_masked_block_equals_the_block_on_kept_tokens_only():
    torch.manual_seed(0)
    block = Block(48, 3).eval()
    x = torch.randn(2, 10, 48)
    kept = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)  # class token first
    masked = block(x, kept.float().expand(2, -1)[..., None])
    torch.testing.assert_close(masked[:, kept], block(x[:, kept]), rtol=1e-4, atol=1e-5)


def test_gumbel_decisions_are_hard_with_straight_through_gradients():
    log_probs = torch.randn(4, 20, 2).log_softmax(-1).requires_grad_()
    previous = (torch.rand(4, 20, 1) > 0.3).float()
    weights = torch.randn(4, 20, 1)
    torch.manual_seed(1)
    hard = hard_keep_decision(log_probs, previous)
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), log_probs)
    torch.manual_seed(1)  # the same Gumbel noise, soft sample
    soft = F.gumbel_softmax(log_probs, hard=False)[..., :1] * previous
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), log_probs)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and (hard[previous == 0] == 0).all()
    assert torch.equal(hard, (soft > 0.5).float() * previous)  # the soft sample's argmax
    torch.testing.assert_close(grad_hard, grad_soft)  # straight through: the soft sample's gradient
    assert grad_hard.abs().sum() > 0


def test_ratio_loss_is_the_official_formula():
    d1 = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]])  # kept fractions 0.5, 0.25
    d2 = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])  # 0.25, 0
    expected = (((0.5 - 0.7) ** 2 + (0.25 - 0.7) ** 2) / 2 + ((0.25 - 0.49) ** 2 + 0.49 ** 2) / 2) / 3
    assert keep_ratio_loss([d1, d2], [0.7, 0.49], stages=3).item() == pytest.approx(expected)


def predictor_params(c: int) -> int:
    """The official PredictorLG: LayerNorm, C->C, C->C/2, C/2->C/4, C/4->2 (all with bias)."""
    return 2 * c + (c * c + c) + (c * c // 2 + c // 2) + (c // 2 * c // 4 + c // 4) + (c // 4 * 2 + 2)


@pytest.mark.parametrize("name,deit,count", [("dynamicvit_deit_small", "deit_small_patch16_224", 22_774_414),
                                              ("dynamicvit_deit_base", "deit_base_patch16_224", 89_452_846)])
def test_parameter_count_is_deit_plus_three_predictors(name, deit, count):
    with torch.device("meta"):
        model, base = timm.create_model(name), timm.create_model(deit)
    assert sum(p.numel() for p in model.parameters()) == count
    assert count == sum(p.numel() for p in base.parameters()) + 3 * predictor_params(model.embed_dim)


def test_kept_token_maps_are_nested():
    model = tiny()
    maps = model.eval().attention_maps(torch.randn(1, 3, 224, 224))
    assert maps.shape == (1, 3, 14, 14)
    assert maps.sum((2, 3))[0].tolist() == [137, 96, 67]
    assert (maps[:, 1] <= maps[:, 0]).all() and (maps[:, 2] <= maps[:, 1]).all()
    drawn = collect_maps(model.train(), torch.randn(2, 3, 64, 64))  # what the attention-map callback draws
    assert list(drawn) == [""] and drawn[""].shape == (2, 3, 64, 64) and model.training


# ---- the classification task: aux losses and distillation -------------------------------------------

STUDENT = {"name": "dynamicvit_deit_small",
           "kwargs": dict(TINY, depth=3, pruning_loc=[1, 2], img_size=32, ratio_weight=2.0)}
TEACHER_KWARGS = dict(TINY, depth=1, img_size=32)


def test_distillation_losses_are_the_official_ones():
    torch.manual_seed(0)
    distill = Distillation({"name": "deit_small_patch16_224", "kwargs": TEACHER_KWARGS}, 0.5, 0.5)
    with pytest.warns(UserWarning, match="untrained teacher"):
        distill.build(num_classes=5, in_chans=3)
    student = tiny(num_classes=5, depth=3, pruning_loc=(1, 2), img_size=32).train()
    images = torch.randn(4, 3, 32, 32)
    features = student.forward_features(images)
    logits = student.forward_head(features)
    parts = distill.losses(student, images, logits, features)
    with torch.no_grad():
        t_features = distill.teacher.forward_features(images)
        t_prob = distill.teacher.forward_head(t_features).softmax(-1)
    kl = (t_prob * (t_prob.log() - logits.log_softmax(-1))).sum() / 4
    keep = student.token_keep_mask.bool()
    mse = ((features[:, 1:][keep] - t_features[:, 1:][keep]) ** 2).mean()
    torch.testing.assert_close(parts["distill_logits"], 0.5 * kl)
    torch.testing.assert_close(parts["distill_tokens"], 0.5 * mse)
    (parts["distill_logits"] + parts["distill_tokens"]).backward()
    assert all(p.grad is None for p in distill.teacher.parameters())


def test_task_trains_with_aux_and_distillation_losses(tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model("deit_small_patch16_224", num_classes=4, **TEACHER_KWARGS)
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    distill = {"teacher": {"name": "deit_small_patch16_224", "pretrained_file": str(path), "kwargs": TEACHER_KWARGS},
               "logit_weight": 0.5, "token_weight": 0.5}
    module = ClassificationModule(STUDENT, num_classes=4, distill=distill, warmup_epochs=0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    metrics = trainer.callback_metrics
    for name in ("train/ratio", "train/distill_logits", "train/distill_tokens", "train/loss"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["train/ratio"] > 0
    taught = module.distill.teacher
    assert not taught.training and not any(p.requires_grad for p in taught.parameters())
    for k, v in teacher.state_dict().items():  # loaded from the file, untouched by training
        torch.testing.assert_close(taught.state_dict()[k], v)
    assert not any(k.startswith("distill") or "teacher" in k for k in module.state_dict())


def test_bad_distillation_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="distill.teacher"):
        Distillation({"pretrained_file": "x.pth"})
    distill = Distillation({"name": "deit_small_patch16_224", "pretrained_file": str(tmp_path / "missing.pth")})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        distill.build(num_classes=4, in_chans=3)
