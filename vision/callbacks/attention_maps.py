"""Attention maps and a confusion matrix, drawn for a fixed validation batch every N epochs.

Enabled with one flag, ``python train.py visualize=N`` (0, the default, turns it off). The first images of
the first validation batch are kept; every ``N`` validation epochs the evaluated backbone runs on them once
more (eval mode, no grad, RNG state untouched) while forward pre-hooks catch the inputs of the attention
modules that implement ``attention_maps`` (neighborhood windows, routed regions, agent maps, VSA's learned
windows, HiLo's two branches, the tokens EViT keeps); up to ``max_layers`` of them, evenly spaced from first to last, are drawn
over the images. For classification the validation confusion matrix (rows normalised) is drawn as well.

Images go to whichever logger is active: W&B (``log_image``), TensorBoard (``add_image``), and otherwise PNG
files under ``<log dir>/attention_maps/``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ._images import log_images


def heat(values: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` in [0, 1] -> ``[..., 3, H, W]`` (black - red - yellow - white)."""
    v = values.clamp(0, 1).unsqueeze(-3)
    return torch.cat([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-3)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the last two dims."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def collect_maps(model: torch.nn.Module, images: torch.Tensor, max_layers: int = 4) -> dict[str, torch.Tensor]:
    """``{module name: [B, M, H_img, W_img]}`` maps in [0, 1] for up to ``max_layers`` attention modules."""
    modules = {name: m for name, m in model.named_modules() if callable(getattr(m, "attention_maps", None))}
    names = list(modules)
    if len(names) > max_layers:
        step = (len(names) - 1) / (max_layers - 1) if max_layers > 1 else 0
        names = [names[round(i * step)] for i in range(max_layers)]
    inputs, hooks = {}, []
    for name in names:
        def keep(module, args, kwargs, name=name):
            inputs[name] = (args, kwargs)

        hooks.append(modules[name].register_forward_pre_hook(keep, with_kwargs=True))
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            model(images)
            maps = {name: modules[name].attention_maps(*inputs[name][0], **inputs[name][1]).float()
                    for name in names if name in inputs}
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return {name: _unit(F.interpolate(m, size=images.shape[-2:], mode="nearest")) for name, m in maps.items()}


def overlay(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """One ``[3, h, w]`` grid: a row per image, the image then each map blended over it."""
    gray = _unit(images.float().mean(1))  # [B, H, W]
    base = gray[:, None, None].expand(-1, 1, 3, -1, -1)
    blended = 0.4 * base + 0.6 * heat(maps)  # [B, M, 3, H, W]
    tiles = torch.cat([base, blended], dim=1)
    return make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2, pad_value=1.0)


def confusion_image(matrix: torch.Tensor, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix ``[C, C]`` as a ``[3, C*cell, C*cell]`` heat map."""
    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
    return heat(rows.repeat_interleave(cell, 0).repeat_interleave(cell, 1))


class AttentionMaps(L.Callback):
    def __init__(self, every_n_epochs: int = 0, num_images: int = 4, max_layers: int = 4):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs}: expected >= 0 (0 turns the callback off)")
        self.every_n_epochs, self.num_images, self.max_layers = every_n_epochs, num_images, max_layers
        self.images: torch.Tensor | None = None
        self.confusion: torch.Tensor | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return (bool(self.every_n_epochs) and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._due(trainer) or not isinstance(batch, (list, tuple)):
            return
        images, targets = batch[0], batch[1]
        if self.images is None:
            self.images = images[: self.num_images].detach().clone()
        if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and targets.ndim == 1:
            classes = outputs.shape[1]
            if self.confusion is None:
                self.confusion = torch.zeros(classes, classes, dtype=torch.long, device=outputs.device)
            self.confusion.index_put_((targets, outputs.argmax(1)), torch.ones_like(targets), accumulate=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due(trainer) or self.images is None:
            return
        figures = {}
        model = getattr(pl_module, "eval_model", pl_module)
        for name, maps in collect_maps(model, self.images.to(pl_module.device), self.max_layers).items():
            figures[f"attention/{name or 'model'}"] = overlay(self.images.to(maps.device), maps).cpu()
        if self.confusion is not None:
            figures["val/confusion_matrix"] = confusion_image(self.confusion).cpu()
            self.confusion = None
        if trainer.is_global_zero:
            log_images(trainer, figures, "attention_maps")
