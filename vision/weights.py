"""The one reader of weight files: checkpoints, pretrained backbones, distillation teachers.

Every file goes through :func:`load_checkpoint_file`, i.e. ``torch.load(weights_only=True)`` (tensors and plain
containers, never pickled code) or safetensors. Imports torch only, so models and tasks can use it without the
training pipeline (Lightning, Hydra).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that can only be loaded by running pickled code (``weights_only=False``)."""


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (``.safetensors``: safetensors' reader): tensors and plain
    containers only; a file that needs pickled code raises :class:`UnsafeCheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled Python objects that only load by running code "
            f"(weights_only=False). Re-save it from a trusted environment as a plain state_dict "
            f"(torch.save(model.state_dict(), path)). Details: {str(err).splitlines()[0]}"
        ) from err


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: its EMA weights if it has them, else its ``state_dict`` or
    ``model`` entry, else the file itself; a DDP ``module.`` prefix is dropped (timm's convention)."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}
