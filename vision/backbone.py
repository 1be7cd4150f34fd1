"""The backbone spec: how every task names, sizes and initialises the timm backbone it builds on.

A ``configs/model`` entry (``{name, drop_path_rate, pretrained_file, kwargs}``, plus ``out_indices`` for dense
tasks) parses into one :class:`BackboneSpec`; the classification, detection, segmentation, medical and
distillation paths and DToP all build from it, so each of them reads a weight file the same way:
:func:`vision.weights.load_state_dict` (``weights_only=True``), never timm's or smp's own loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from .models import create_model, pretrained_overlay

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """A timm backbone by name.

    Args:
        name: a registered timm model (this package's or timm's own).
        drop_path_rate: stochastic depth; always passed, so 0 switches off a family's default.
        pretrained_file: a local checkpoint (official or timm key names; the family's ``checkpoint_filter_fn``
            remaps them); read with ``weights_only=True``. Nothing is ever downloaded.
        kwargs: further ``timm.create_model`` arguments (sizes, ``dilation_policy``, ...).
        out_indices: the feature levels a dense task takes (``features_only``); None: the task's default.
    """

    name: str
    drop_path_rate: float = 0.0
    pretrained_file: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    out_indices: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, spec: BackboneSpec | Mapping[str, Any] | str, where: str = "model.backbone") -> BackboneSpec:
        """A spec from a config mapping (or a bare name); unknown keys are an error naming ``where``."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if not isinstance(spec, Mapping) or not spec.get("name"):
            raise ValueError(f"{where}={spec!r}: expected a mapping {{name, drop_path_rate, pretrained_file, kwargs}}")
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {[f.name for f in fields(cls)]}")
        out_indices = spec.get("out_indices")
        return cls(
            name=str(spec["name"]),
            drop_path_rate=float(spec.get("drop_path_rate") or 0.0),
            pretrained_file=str(spec["pretrained_file"]) if spec.get("pretrained_file") else None,
            kwargs=dict(spec.get("kwargs") or {}),
            out_indices=tuple(out_indices) if out_indices else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, for hyper-parameters saved in checkpoints (read back with ``weights_only``)."""
        out = asdict(self)
        out["kwargs"], out["out_indices"] = dict(self.kwargs), list(self.out_indices) if self.out_indices else None
        return out

    def timm_kwargs(self, **extra: Any) -> dict[str, Any]:
        """The ``timm.create_model`` keyword arguments (without the weights); ``extra`` wins."""
        return {**self.kwargs, "drop_path_rate": self.drop_path_rate, **extra}

    def create(self, **extra: Any) -> nn.Module:
        """``vision.create_model`` of this backbone, ``extra`` (``num_classes``, ``features_only`` ...) added."""
        return create_model(self.name, pretrained_file=self.pretrained_file, **self.timm_kwargs(**extra))

    def smp_encoder(self) -> dict[str, Any]:
        """The encoder arguments of a segmentation-models-pytorch model: the ``tu-`` (timm) encoder, and a
        pretrained file passed as an already (safely) loaded state dict."""
        kwargs = dict(encoder_name=f"tu-{self.name}", encoder_weights=None, **self.timm_kwargs())
        if self.pretrained_file:
            kwargs["encoder_weights"] = True  # smp's switch for timm's pretrained=True; the overlay says from what
            kwargs["pretrained_cfg_overlay"] = pretrained_overlay(self.pretrained_file)
        return kwargs

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` the backbone was trained with (its timm pretrained_cfg; ImageNet's otherwise), for
        the detectors' own input transform."""
        import timm

        cfg = timm.get_pretrained_cfg(self.name)
        return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
