"""Device bugs without a GPU: models, kernels and task steps run on fake CUDA tensors (see ``_fake_cuda``).

A CPU tensor meeting a CUDA one raises here exactly as on a GPU, and dtypes propagate as under bf16 autocast.
Shapes, devices and dtypes are checked; values are not (fake tensors have none; numerics are tested on CPU
and, with ``-m gpu``, on a GPU). Steps that cannot run on fake tensors, and why:

- autograd's own engine (it asks the CUDA driver for streams): :func:`_fake_cuda.backward` replaces it.
- torchmetrics updates (NaN checks and bincounts read data): each task's metrics are replaced by recorders
  that check what they are given lives on CUDA; the metric objects themselves are tested on CPU.
- medical HD95 (MONAI computes surface distances with numpy/scipy on the host) and the detectors' box
  matching, sampling and NMS (torchvision: data-dependent shapes): the detection test covers the backbone +
  FPN and the heads' feature path up to the data-dependent matching; the medical test covers every piece of
  the evaluation step around HD95.
"""

from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
from _fake_cuda import autocast, backward, fake_cuda, host_values, to_cuda
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics import Metric

import kernels
from vision.models import _FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`:UserWarning")


def smallest_variants() -> dict[str, str]:
    """The smallest registered model of each family (by its published parameter count)."""
    out = {}
    for family in _FAMILIES:
        names = timm.list_models(module=family)
        if names:
            published = importlib.import_module(f"vision.models.{family}").PUBLISHED_PARAMS
            out[family] = min(names, key=lambda n: float(published[n].removesuffix("M")))
    return out


SMALLEST = smallest_variants()


def on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def check_grads(module: torch.nn.Module) -> None:
    """Every trainable parameter got a gradient, on CUDA, in its own dtype."""
    bad = [n for n, p in module.named_parameters()
           if p.requires_grad and (p.grad is None or not on_cuda(p.grad) or p.grad.dtype != p.dtype)]
    assert not bad, f"parameters without a CUDA gradient of their dtype: {bad[:5]}"


# ---- the harness itself catches what it should ---------------------------------------------------------------


def test_fake_cuda_catches_a_device_mix_forward_and_backward():
    class CPUGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.ones(grad.shape)  # the bug: a gradient created on the CPU

    with fake_cuda():
        x = torch.randn(3, device="cuda", requires_grad=True)
        with pytest.raises(RuntimeError, match="device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="gradient on cpu"):
            backward(CPUGradient.apply(x).sum())
        w = torch.randn(4, 3, device="cuda", requires_grad=True)
        backward((x @ w.T).sum() + w.sum())  # broadcasting and accumulation from two paths
        assert on_cuda(x.grad) and x.grad.shape == (3,) and on_cuda(w.grad) and w.grad.shape == (4, 3)
        with autocast():
            assert (x[None] @ w.T).dtype == torch.bfloat16
        assert (x[None] @ w.T).dtype == torch.float32


def test_host_values_answer_only_the_given_tensor():
    with fake_cuda():
        sizes, other = torch.zeros(2, 4, device="cuda"), torch.zeros(2, device="cuda")
        with host_values((sizes, [[1, 2, 3, 4]] * 2)):
            assert sizes.tolist() == [[1, 2, 3, 4]] * 2
            with pytest.raises(Exception, match="local_scalar_dense|[Dd]ata.dependent"):
                other.tolist()


# ---- models: forward and backward, fp32 and bf16 autocast; inference with bf16 weights -----------------------


@pytest.mark.parametrize("name", sorted(SMALLEST.values()))
def test_model_on_fake_cuda(name):
    # device mixes show in any dtype, dtype clashes only in bf16: one bf16-autocast training pass and one
    # inference pass with bf16 weights (no autocast) cover both; fp32 on CUDA adds nothing a fake can see
    with fake_cuda():
        model = to_cuda(timm.create_model(name, num_classes=10)).train()
        images = torch.randn(2, 3, 64, 64, device="cuda")
        with autocast(torch.bfloat16):
            out = model(images)
            loss = F.cross_entropy(out, torch.zeros(2, dtype=torch.long, device="cuda"))
        assert on_cuda(out) and out.shape == (2, 10) and out.dtype == torch.bfloat16
        assert on_cuda(loss) and loss.dtype == torch.float32
        backward(loss)
        check_grads(model)
        to_cuda(model, torch.bfloat16).eval()
        with torch.no_grad():
            out = model(images.bfloat16())
        assert on_cuda(out) and out.shape == (2, 10) and out.dtype == torch.bfloat16


def test_every_family_is_covered():
    families_with_models = {f for f in _FAMILIES if timm.list_models(module=f)}
    assert set(SMALLEST) == families_with_models  # dtop registers no timm model: covered by the segmentation test


# ---- kernels: backend="auto" picks the Triton op for CUDA tensors and traces through its fake ------------------


class OpLog(TorchDispatchMode):
    """The operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _kernel_calls():
    def qkv(shape, dtype, dv=None):
        q, k = (torch.randn(*shape, dtype=dtype, device="cuda", requires_grad=True) for _ in range(2))
        v = torch.randn(*shape[:-1], dv or shape[-1], dtype=dtype, device="cuda", requires_grad=True)
        return q, k, v

    def neighborhood(dtype):
        q, k, v = qkv((2, 14, 14, 2, 32), dtype)
        rpb = torch.randn(2, 13, 13, dtype=dtype, device="cuda", requires_grad=True)
        return (q, k, v, rpb), kernels.neighborhood_attention2d(q, k, v, 7, 2, rpb=rpb), "windowed_attention"

    def window(dtype):
        q, k, v = qkv((2, 14, 14, 2, 32), dtype)
        rpb = torch.randn(2, 13, 13, dtype=dtype, device="cuda", requires_grad=True)
        return (q, k, v, rpb), kernels.window_attention2d(q, k, v, 7, 3, rpb=rpb), "windowed_attention"

    def bilevel(dtype):
        q, k, v = qkv((2, 14, 14, 2, 32), dtype, dv=64)
        index = torch.randint(0, 4, (2, 4, 2), device="cuda")
        return (q, k, v), kernels.bilevel_routing_attention(q, k, v, index, 2), "bilevel_routing_attention"

    return {"neighborhood": neighborhood, "window": window, "bilevel": bilevel}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["neighborhood", "window", "bilevel"])
def test_kernel_auto_backend_dispatches_triton_on_cuda(op, dtype):
    with fake_cuda():
        log = OpLog()
        with log:
            inputs, out, triton_op = _kernel_calls()[op](dtype)
        assert f"vision_kernels.{triton_op}" in log.ops, sorted(log.ops)
        q, v = inputs[0], inputs[2]
        assert on_cuda(out) and out.dtype == dtype and out.shape == (*q.shape[:-1], v.shape[-1])
        with log:
            backward(out.float().sum())
        assert f"vision_kernels.{triton_op}_backward" in log.ops
        for t in inputs:
            assert on_cuda(t.grad) and t.grad.dtype == t.dtype and t.grad.shape == t.shape


# ---- tasks: loss, training step and evaluation step on a fake batch ------------------------------------------


class Recorder(torch.nn.Module):
    """Stands in for a torchmetrics metric: records its inputs, which must all be CUDA tensors."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        assert all(on_cuda(t) for t in tensors), [t.device for t in tensors]
        self.calls.append(tensors)

    update = forward


def record_metrics(module: torch.nn.Module) -> dict[str, Recorder]:
    """Replace every torchmetrics metric of ``module`` by a :class:`Recorder`, and its logging (Lightning's,
    which refuses to log a recorder) by a no-op."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    recorders = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Metric):
                recorders[name] = Recorder()
                setattr(parent, name, recorders[name])
    return recorders


BACKBONE = dict(name="resnet18", kwargs=dict(channels=[8, 16, 32, 64]))


@pytest.mark.parametrize("mixup", [False, True])
def test_classification_steps_on_fake_cuda(mixup):
    from vision.tasks import ClassificationModule

    module = ClassificationModule(BACKBONE, num_classes=4, in_chans=1,
                                  mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0) if mixup else None)
    metrics = record_metrics(module)
    with fake_cuda():
        to_cuda(module)
        batch = (torch.randn(4, 1, 28, 28, device="cuda"), torch.randint(0, 4, (4,), device="cuda"))
        with autocast():
            loss = module.training_step(batch, 0)
        assert on_cuda(loss) and loss.dtype == torch.float32 and metrics["train_loss"].calls
        backward(loss)
        check_grads(module.model)
        module.eval()
        logits = module.validation_step(batch, 0)
        module.test_step(batch, 0)
        assert on_cuda(logits) and logits.shape == (4, 4)
        assert all(metrics[n].calls for n in ("val_loss", "val_acc", "val_acc5", "test_loss", "test_acc"))


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_segmentation_steps_on_fake_cuda(head):
    from vision.tasks.segmentation import SegmentationModule

    module = SegmentationModule(BACKBONE, num_classes=5, head=head, decoder_channels=32, aux_channels=8)
    metrics = record_metrics(module)
    with fake_cuda():
        to_cuda(module)
        images, masks = torch.randn(2, 3, 64, 48, device="cuda"), torch.randint(0, 5, (2, 64, 48), device="cuda")
        with autocast():
            loss = module.training_step((images, masks, None), 0)
        assert on_cuda(loss) and loss.dtype == torch.float32
        backward(loss)
        check_grads(module.net)
        module.eval()
        # nothing resized (the fast path) and resized + padded samples (one pair per sample)
        sizes = torch.tensor([[64, 48, 64, 48]] * 2, device="cuda")
        resized = torch.tensor([[64, 48, 60, 40], [56, 48, 30, 24]], device="cuda")
        with host_values((sizes, [[64, 48, 64, 48]] * 2), (resized, [[64, 48, 60, 40], [56, 48, 30, 24]])):
            predictions = module.validation_step((images, masks, sizes), 0)
            assert [p.shape for p in predictions] == [(64, 48)] * 2 and all(on_cuda(p) for p in predictions)
            predictions = module.validation_step((images, masks[:, :60, :40], resized), 0)
            assert [p.shape for p in predictions] == [(60, 40), (30, 24)]
            module.test_step((images, masks, sizes), 0)
        assert metrics["val_loss"].calls and metrics["val_miou"].calls and metrics["test_iou"].calls


def test_segmentation_slide_inference_on_fake_cuda():
    from vision.tasks.segmentation import SegmentationModule

    module = SegmentationModule(BACKBONE, num_classes=3, head="fpn", decoder_channels=32, aux_weight=0,
                                inference=dict(mode="slide", crop_size=[64, 64], stride=[48, 48]))
    record_metrics(module)
    with fake_cuda():
        to_cuda(module).eval()
        logits = module(torch.randn(1, 3, 96, 112, device="cuda"))
        assert on_cuda(logits) and logits.shape == (1, 3, 96, 112)


def test_dtop_segmenter_on_fake_cuda():
    from vision.tasks.segmentation import SegmentationModule

    vit = dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
    # threshold > 1: no token exits. Which tokens exit is data-dependent (per-image token counts), and so is
    # the ATM loss (the classes present in each mask select the masks it scores): the fakes cover the ViT and
    # every ATM head forward and backward, and the pruning and the loss are tested on CPU
    module = SegmentationModule(vit, num_classes=4, head="dtop", aux_weight=0,
                                dtop=dict(variant="dtop_tiny", img_size=32, threshold=1.5))
    record_metrics(module)
    with fake_cuda():
        to_cuda(module)
        out = module.net.dtop(torch.randn(2, 3, 32, 32, device="cuda"))
        assert all(on_cuda(t) for t in (out["logits"], out["kept"], out["exit_head"]))
        backward(out["logits"].mean() + sum(h["cls"].mean() + h["masks"].mean() for h in out["heads"]))
        check_grads(module.net)
        module.eval()
        logits = module(torch.randn(2, 3, 32, 32, device="cuda"))
        assert on_cuda(logits) and logits.shape == (2, 4, 32, 32)


def test_medical_steps_on_fake_cuda(monkeypatch):
    from vision.tasks import medical
    from vision.tasks.medical import MedicalSegmentationModule

    module = MedicalSegmentationModule(BACKBONE, num_classes=3, in_channels=1, roi_size=(32, 32, 8),
                                       slices_per_patch=4, net_kwargs=dict(decoder_channels=[32, 16, 8, 8, 8]))
    metrics = record_metrics(module)
    # MONAI's DiceCELoss reads torch.arange(...).tolist() on the host, which a fake tensor cannot answer: the
    # task's loss is replaced by a cross-entropy on the same (logits, label) pair, checking its inputs' devices
    loss_inputs = []

    class CrossEntropy(torch.nn.Module):
        def forward(self, logits, label):
            loss_inputs.extend([logits, label])
            return F.cross_entropy(logits.float(), label[:, 0].long())

    module.loss = CrossEntropy()
    with fake_cuda():
        to_cuda(module)
        batch = {"image": torch.randn(2, 1, 32, 32, 8, device="cuda"),
                 "label": torch.randint(0, 3, (2, 1, 32, 32, 8), device="cuda")}
        with autocast():
            loss = module.training_step(batch, 0)
        assert on_cuda(loss)
        backward(loss)
        check_grads(module.net)
        module.eval()
        # MONAI's Dice (data-dependent empty-class checks) and HD95 (surface distances with numpy/scipy on the
        # host) stand in as per-case, per-class results on the batch's device (HD95 on the host too, as MONAI
        # may return it), so our glue around them (one-hot, the missed-class diagonal fallback) runs
        metric_inputs = []

        def per_class(pred, label, **kwargs):
            metric_inputs.extend([pred, label])
            return torch.zeros(pred.shape[0], pred.shape[1] - 1, device=pred.device)

        def per_class_on_host(pred, label, **kwargs):
            return per_class(pred, label).cpu()

        monkeypatch.setattr(medical, "compute_dice", per_class)
        monkeypatch.setattr(medical, "compute_hausdorff_distance", per_class_on_host)
        # MONAI's sliding window checks its gaussian importance map's minimum on the host; the volume here is
        # exactly one window, where sliding-window inference is the predictor applied to the whole volume
        windows = []

        def one_window(image, roi_size, sw_batch_size, predictor, **kwargs):
            assert [s if r == -1 else r for s, r in zip(image.shape[2:], roi_size)] == list(image.shape[2:])
            windows.append(image)
            return predictor(image)

        monkeypatch.setattr(medical, "sliding_window_inference", one_window)
        out = module.validation_step(batch, 0)
        assert on_cuda(out["pred"]) and out["pred"].shape == (2, 1, 32, 32, 8) and windows
        assert metric_inputs and all(on_cuda(t) for t in metric_inputs)
        assert loss_inputs and all(on_cuda(t) for t in loss_inputs)
        assert metrics["val_loss"].calls and metrics["val_dice"].calls and metrics["val_hd95"].calls


def test_detection_backbone_and_heads_on_fake_cuda():
    from vision.tasks.detection import build_detector

    for kind in ("retinanet", "faster_rcnn"):
        detector = build_detector(kind, BACKBONE, num_classes=3, fpn_channels=32, min_size=64, max_size=64)
        with fake_cuda():
            to_cuda(detector).train()
            features = detector.backbone(torch.randn(2, 3, 64, 64, device="cuda"))
            assert all(on_cuda(f) for f in features.values())
            if kind == "retinanet":
                head = detector.head(list(features.values()))
                assert all(on_cuda(t) for t in head.values())
                backward(sum(t.float().mean() for t in head.values()))
            else:
                objectness, deltas = detector.rpn.head(list(features.values()))
                backward(sum(t.mean() for t in objectness + deltas))
            check_grads(detector.backbone)
        # anchor matching, proposal sampling and NMS have data-dependent shapes: they run on CPU in the
        # detection tests and on a GPU with -m gpu
