"""timm-registered backbone families, one file per family.

Each family module registers its variants with ``@register_model`` on import, and every module here whose
name does not start with ``_`` is a family: this package imports them all, so a new family file is
registered (and in the shared test battery, tests/models/test_models.py) by existing. Shared building blocks live
in ``_``-prefixed modules (``_pyramid``, ``_vit``).
"""

import importlib
import pkgutil

import timm
from torch import nn

from ..weights import load_state_dict

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")  # registers the family's variants with timm
_FAMILIES = FAMILIES  # the former name
from . import _trace  # noqa: E402,F401  (FX leaves; after the families it names)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models this package registers (not timm's own), sorted."""
    return timm.list_models(pattern, module=list(FAMILIES)) if FAMILIES else []


def pretrained_overlay(pretrained_file: str, name: str | None = None, num_classes: int | None = None) -> dict:
    """timm's ``pretrained_cfg_overlay`` that loads ``pretrained_file`` as a state dict read by
    :func:`vision.weights.load_state_dict` (``weights_only=True``), so timm never opens the file itself.

    With ``num_classes``, the overlay states the checkpoint's own head size (read under the model's
    ``pretrained_cfg.classifier`` names), so timm keeps the head when it matches and drops it otherwise
    (fine-tuning an ImageNet checkpoint on 10 classes, or ``num_classes=0``)."""
    state_dict = load_state_dict(pretrained_file)
    overlay = dict(state_dict=state_dict)
    if num_classes is not None:
        overlay["num_classes"] = num_classes
        cfg = timm.get_pretrained_cfg(name) if name else None
        classifiers = getattr(cfg, "classifier", None) or ()
        for classifier in [classifiers] if isinstance(classifiers, str) else classifiers:
            weight = state_dict.get(f"{classifier}.weight")
            if weight is not None:
                overlay["num_classes"] = weight.shape[0]
                break
    return overlay


def forget_state_dict(model: nn.Module) -> nn.Module:
    """Drop the loaded state dict that timm keeps in every (sub)model's ``pretrained_cfg``."""
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


def create_model(name: str, pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with this package's registry loaded.

    ``pretrained_file`` loads a local checkpoint through the family's ``checkpoint_filter_fn`` (official key
    names are remapped; timm adapts the head and the input channels); nothing is downloaded, and only tensors
    and plain containers are read (:func:`vision.weights.load_state_dict`, ``weights_only=True``).
    Hydra configs target this function rather than ``timm.create_model`` so the registry is always imported.
    """
    if not pretrained_file:
        return timm.create_model(name, pretrained=False, **kwargs)
    overlay = {**pretrained_overlay(pretrained_file, name, kwargs.get("num_classes")),
               **kwargs.pop("pretrained_cfg_overlay", {})}
    return forget_state_dict(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs))
