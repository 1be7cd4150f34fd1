"""On a GPU (``pytest -m gpu``; skipped without CUDA): the fused kernels against the torch path in fp16/bf16 on
real stage shapes, each task's quickstart for a few bf16-mixed steps (compiled where the task offers
``model.compile``), resume from ``last.ckpt``, and ``torch.export`` of one model per family.

``bash benchmarks/gpu_check.sh`` runs these with the benchmarks and writes everything to benchmarks/results/.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# ---- kernels vs the torch reference, forward and gradients, on the backbones' stage shapes at 224 px ---------

# (name, B, H, W, heads, D, op arguments): NAT-Mini stage 1, DiNAT-Mini stage 2 (dilation 4), Swin-T stages 1 and
# 3 (shifted), BiFormer-T stages 1 (top-1) and 3 (top-16)
STAGES = [
    ("nat_stage1", 2, 56, 56, 2, 32, dict(op="neighborhood", kernel_size=7, dilation=1)),
    ("dinat_stage2", 2, 28, 28, 4, 32, dict(op="neighborhood", kernel_size=7, dilation=4)),
    ("swin_stage1", 2, 56, 56, 3, 32, dict(op="window", window_size=7, shift_size=3)),
    ("swin_stage3", 2, 14, 14, 12, 32, dict(op="window", window_size=7, shift_size=3)),
    ("biformer_stage1", 2, 56, 56, 2, 32, dict(op="bilevel", n_win=7, topk=1)),
    ("biformer_stage3", 2, 14, 14, 8, 32, dict(op="bilevel", n_win=7, topk=16)),
]
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max error relative to the reference's largest value


def _run(args: dict, q, k, v, rpb, index, backend):
    args = dict(args)
    op = args.pop("op")
    if op == "neighborhood":
        return kernels.neighborhood_attention2d(q, k, v, rpb=rpb, backend=backend, **args)
    if op == "window":
        return kernels.window_attention2d(q, k, v, rpb=rpb, backend=backend, **args)
    args.pop("topk")
    return kernels.bilevel_routing_attention(q, k, v, index, backend=backend, **args)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name, B, H, W, heads, D, args", STAGES, ids=[s[0] for s in STAGES])
def test_kernel_matches_torch_on_stage_shapes(name, B, H, W, heads, D, args, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, W, heads, D, device="cuda", generator=g).to(dtype) for _ in range(3))
    rpb = index = None
    if args["op"] == "bilevel":
        regions = args["n_win"] ** 2
        index = torch.rand(B, regions, regions, device="cuda", generator=g).topk(args["topk"], -1).indices
    else:
        size = args.get("kernel_size") or args["window_size"]
        rpb = torch.randn(heads, 2 * size - 1, 2 * size - 1, device="cuda", generator=g).to(dtype)
    grad_out = torch.randn(B, H, W, heads, D, device="cuda", generator=g).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        # the reference runs in fp32 on the same (rounded) inputs
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, rpb) if t is not None]
        cast = [t if backend == "triton" else t.float() for t in inputs]
        out = _run(args, *cast[:3], cast[3] if rpb is not None else None, index, backend)
        out.backward(grad_out if backend == "triton" else grad_out.float())
        results[backend] = (out, *(t.grad for t in inputs))
    assert results["triton"][0].dtype == dtype
    for i, (got, want) in enumerate(zip(results["triton"], results["torch"])):
        error = _relative_error(got, want)
        assert error < TOLERANCE[dtype], f"{name} {dtype} {['out', 'dq', 'dk', 'dv', 'drpb'][i]}: {error:.3g}"


def test_auto_backend_picks_triton_on_cuda():
    q = torch.randn(1, 14, 14, 2, 32, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(kernels.window_attention2d(q, q, q, 7), kernels.window_attention2d(q, q, q, 7,
                               backend="triton"), rtol=0, atol=0)


# ---- each task's quickstart for a few steps: GPU, bf16-mixed, compiled where the task can be ------------------

GPU = ["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
       "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
       "data.num_workers=2", "callbacks.rich_progress_bar=null"]


def _quickstarts(tmp: Path) -> dict[str, list[str]]:
    return {
        "quickstart": ["model.compile=true", "data.train_subset=512", "data.batch_size=64"],
        "quickstart_segmentation": ["model.compile=true", f"data.root={tmp / 'seg'}",
                                    "data.scene_splits={train: 32, val: 8, test: 8}", "data.batch_size=8"],
        # the detection and medical tasks have no model.compile (torchvision detectors and MONAI's sliding
        # window recompile on every input size)
        "quickstart_detection": [f"data.root={tmp / 'det'}", "data.scene_splits={train: 16, val: 4, test: 4}",
                                 "data.batch_size=4", "data.eval_batch_size=4"],
        "quickstart_medical": [f"data.root={tmp / 'msd'}", "data.synthetic.num_cases=6", "data.synthetic.size=32",
                               "data.val_fraction=0.2", "data.test_fraction=0.2", "data.patch_size=[32,32,8]"],
        "quickstart_medical2d": [f"data.root={tmp / 'kvasir'}", "data.synthetic.num_images=16",
                                 "data.synthetic.size=64", "data.patch_size=[64,64]", "data.batch_size=4"],
    }


@pytest.mark.parametrize("experiment", ["quickstart", "quickstart_segmentation", "quickstart_detection",
                                        "quickstart_medical", "quickstart_medical2d"])
def test_quickstart_steps_on_gpu(compose_cfg, tmp_path, experiment):
    from vision.utils import train

    cfg = compose_cfg("train", [f"experiment={experiment}", *GPU, *_quickstarts(tmp_path)[experiment]])
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.state.finished and trainer.global_step > 0 and trainer.strategy.root_device.type == "cuda"
    assert np.isfinite(metrics["train/loss"]), metrics
    assert any(key.startswith("test/") for key in metrics), sorted(metrics)


def test_resume_from_last_checkpoint_on_gpu(compose_cfg, tmp_path):
    from vision.utils import train

    common = [*GPU, "data.train_subset=512", "data.batch_size=64", "callbacks.last_checkpoint.every_n_train_steps=2"]
    _, first = train(compose_cfg("train", common))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and first["trainer"].global_step == 4
    _, resumed = train(compose_cfg("train", [*common, "trainer.max_epochs=2", "ckpt_path=last"]))
    trainer = resumed["trainer"]
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # continued, not restarted
    assert next(resumed["model"].parameters()).device.type == "cuda"


# ---- torch.export of the smallest model of each family on CUDA ----------------------------------------------


def _smallest() -> list[str]:
    from vision.models import _FAMILIES

    names = []
    for family in _FAMILIES:
        variants = timm.list_models(module=family)
        if variants:
            published = importlib.import_module(f"vision.models.{family}").PUBLISHED_PARAMS
            names.append(min(variants, key=lambda n: float(published[n].removesuffix("M"))))
    return sorted(names)


@pytest.mark.parametrize("name", _smallest())
def test_torch_export_on_cuda(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().eval()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        exported = torch.export.export(model, (images,))
        torch.testing.assert_close(exported.module()(images), model(images), rtol=1e-3, atol=1e-3)
