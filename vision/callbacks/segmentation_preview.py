"""Predicted masks over their images, for a fixed validation batch, every N validation epochs.

The first ``num_images`` images of the first validation batch are kept; at the end of each due validation
epoch the module predicts them again (eval mode, no grad, RNG untouched) and one grid is logged: a row per
image with the image, the ground truth and the prediction, masks blended over the image in a fixed palette
(ignored pixels show the bare image). W&B (``log_image``), TensorBoard (``add_image``), otherwise PNG files
under ``<log dir>/segmentation/`` (the CSV logger's version folder).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ._images import log_images


def palette(num_classes: int) -> torch.Tensor:
    """``[num_classes, 3]`` distinct colours in [0, 1] (the PASCAL VOC bit-interleaving scheme)."""
    colours = torch.zeros(num_classes, 3)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] += ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return colours / 255


def colourise(
    images: torch.Tensor, masks: torch.Tensor, num_classes: int, alpha: float = 0.6
) -> torch.Tensor:
    """``images [B, C, H, W]`` (any range) with ``masks [B, H, W]`` blended in; labels outside the classes
    (the ignore index) leave the image bare."""
    gray = images.float().mean(1, keepdim=True)
    lo, hi = gray.amin((2, 3), keepdim=True), gray.amax((2, 3), keepdim=True)
    base = ((gray - lo) / (hi - lo).clamp_min(1e-12)).expand(-1, 3, -1, -1)
    valid = (masks >= 0) & (masks < num_classes)
    colours = palette(num_classes).to(images.device)[masks.clamp(0, num_classes - 1)].permute(0, 3, 1, 2)
    return torch.where(valid[:, None], (1 - alpha) * base + alpha * colours, base)


class SegmentationPreview(L.Callback):
    def __init__(self, every_n_epochs: int = 1, num_images: int = 4):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs}: expected >= 0 (0 turns the callback off)")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            bool(self.every_n_epochs)
            and not trainer.sanity_checking
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if (
            self.images is not None
            or not self._due(trainer)
            or not isinstance(batch, (list, tuple))
            or len(batch) < 2
        ):
            return
        images, masks = batch[0][: self.num_images], batch[1][: self.num_images]
        if masks.ndim != 3:  # not a segmentation batch
            return
        # ground truth at the image's size (evaluation masks keep their original size)
        masks = F.interpolate(masks[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].long()
        self.images, self.masks = images.detach().clone(), masks.detach().clone()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due(trainer) or self.images is None:
            return
        training = pl_module.training
        try:
            pl_module.eval()
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=[self.images.device] if self.images.is_cuda else []),
            ):
                predictions = pl_module(self.images.to(pl_module.device)).argmax(1).cpu()
        finally:
            pl_module.train(training)
        num_classes = pl_module.hparams.num_classes
        images, masks = self.images.cpu(), self.masks.cpu()
        tiles = torch.stack(
            [
                colourise(images, torch.full_like(masks, -1), num_classes),
                colourise(images, masks, num_classes),
                colourise(images, predictions, num_classes),
            ],
            1,
        )
        grid = make_grid(tiles.flatten(0, 1), nrow=3, padding=2, pad_value=1.0)
        if trainer.is_global_zero:
            log_images(trainer, {"val/predictions": grid}, "segmentation")
