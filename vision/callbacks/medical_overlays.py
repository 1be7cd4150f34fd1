"""Predicted and true masks drawn over validation slices, every N validation epochs.

The first ``num_cases`` validation cases are kept (image, label and the task's predicted label map, which
``MedicalSegmentationModule.validation_step`` returns). Volumes are shown at the axial slice where the true
foreground is largest. One row per case: the image, the ground truth over it, the prediction over it (one
colour per class). The figure goes to W&B (``log_image``) or TensorBoard (``add_image``) when one is active,
otherwise to PNG files under ``<log dir>/medical_overlays/``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ._images import log_images

# class colours (background is transparent): red, green, blue, yellow, magenta, cyan, orange, purple
PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0.4, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0],
                        [0.6, 0.2, 1]], dtype=torch.float32)


def largest_slice(label: torch.Tensor) -> int:
    """Index of the axial (last-axis) slice of ``label [H, W, D]`` with the most foreground."""
    return int((label > 0).flatten(0, 1).sum(0).argmax())


def _gray(image: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` -> ``[3, H, W]`` in [0, 1] (channel mean, min-max)."""
    g = image.float().mean(0)
    g = (g - g.min()) / (g.max() - g.min()).clamp_min(1e-12)
    return g.expand(3, -1, -1)


def paint(base: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend class colours of ``mask [H, W]`` (0 = background, left as is) over ``base [3, H, W]``."""
    colours = PALETTE[(mask.long() - 1).clamp_min(0) % len(PALETTE)].permute(2, 0, 1)  # [3, H, W]
    fg = (mask > 0).unsqueeze(0)
    return torch.where(fg, (1 - alpha) * base + alpha * colours, base)


def overlay_row(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``[3 tiles, 3, H, W]``: image, truth over image, prediction over image, for one 2-D case
    (``image [C, H, W]``, ``label``/``pred`` ``[H, W]``)."""
    base = _gray(image)
    return torch.stack([base, paint(base, label), paint(base, pred)])


def case_slices(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor):
    """One case's ``(image [C, H, W], label [H, W], pred [H, W])``: itself in 2-D, its fullest slice in 3-D."""
    label, pred = label[0], pred[0]
    if label.ndim == 3:
        z = largest_slice(label)
        return image[..., z], label[..., z], pred[..., z]
    return image, label, pred


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> tensor


class MedicalOverlays(L.Callback):
    def __init__(self, every_n_epochs: int = 1, num_cases: int = 4):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs}: expected >= 0 (0 turns the callback off)")
        self.every_n_epochs, self.num_cases = every_n_epochs, num_cases
        self.rows: list[torch.Tensor] = []

    def _due(self, trainer: L.Trainer) -> bool:
        return (bool(self.every_n_epochs) and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._due(trainer) or not isinstance(outputs, dict) or "pred" not in outputs:
            return
        for i in range(min(len(outputs["pred"]), self.num_cases - len(self.rows))):
            parts = case_slices(batch["image"][i], batch["label"][i], outputs["pred"][i])
            row = overlay_row(*(_plain(p).detach().float().cpu() for p in parts))
            if self.rows and row.shape[-2:] != self.rows[0].shape[-2:]:  # cases differ in size: match the first
                row = F.interpolate(row, size=self.rows[0].shape[-2:], mode="nearest")
            self.rows.append(row)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due(trainer) or not self.rows:
            return
        grid = make_grid(torch.cat(self.rows), nrow=3, padding=2, pad_value=1.0)
        self.rows = []
        if trainer.is_global_zero:
            log_images(trainer, {"val/overlays": grid}, "medical_overlays")
