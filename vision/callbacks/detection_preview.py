"""Ground truth and predictions drawn on a few fixed validation images, every N validation epochs.

The first ``num_images`` images of the first validation batch are kept; at the end of each due validation
epoch the detector runs on them once more (eval mode, no grad, RNG state untouched). Each row of the
figure is one image: ground-truth boxes (green) beside the predictions scoring at least ``score_threshold``
(red, with label and score; instance masks blended in when the detector predicts them).

Images go to whichever logger is active: W&B (``log_image``), TensorBoard (``add_image``), and otherwise
PNG files under ``<log dir>/detection_preview/`` (the CSV logger's version folder).
"""

from __future__ import annotations

import lightning as L
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from ._images import log_images


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], color: str,
                    masks: torch.Tensor | None = None) -> torch.Tensor:
    """``image`` float ``[3, H, W]`` in [0, 1] with boxes (and boolean masks) drawn; uint8 ``[3, H, W]``."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if masks is not None and len(masks):
        pixels = draw_segmentation_masks(pixels, masks.cpu(), alpha=0.4, colors=color)
    if len(boxes):
        pixels = draw_bounding_boxes(pixels, boxes.cpu().float(), labels=labels, colors=color, width=1)
    return pixels


class DetectionPreview(L.Callback):
    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, score_threshold: float = 0.3):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs}: expected >= 0 (0 turns the callback off)")
        self.every_n_epochs, self.num_images, self.score_threshold = every_n_epochs, num_images, score_threshold
        self.images: list[torch.Tensor] | None = None
        self.targets: list[dict] | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return (bool(self.every_n_epochs) and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.images is None and batch is not None and self._due(trainer):
            images, targets = batch
            self.images = [im.detach().cpu().clone() for im in images[: self.num_images]]
            self.targets = [{k: v.detach().cpu() for k, v in t.items()} for t in targets[: self.num_images]]

    def figure(self, pl_module: L.LightningModule, names: list[str]) -> torch.Tensor:
        """The ``[3, h, w]`` float grid: per image, ground truth then predictions."""
        model = getattr(pl_module, "eval_model", pl_module)
        training = model.training
        device = pl_module.device
        try:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                preds = model([im.to(device) for im in self.images])
        finally:
            model.train(training)

        def name(label: int) -> str:
            return names[label - 1] if 0 < label <= len(names) else str(label)

        tiles = []
        for image, target, pred in zip(self.images, self.targets, preds):
            tiles.append(draw_detections(image, target["boxes"], [name(int(v)) for v in target["labels"]], "lime",
                                         target["masks"].bool() if "masks" in target else None))
            keep = pred["scores"] >= self.score_threshold
            labels = [f"{name(int(v))} {s:.2f}" for v, s in zip(pred["labels"][keep], pred["scores"][keep])]
            masks = pred["masks"][keep, 0] > 0.5 if "masks" in pred else None
            tiles.append(draw_detections(image, pred["boxes"][keep], labels, "red", masks))
        side = max(max(t.shape[1], t.shape[2]) for t in tiles)
        padded = [torch.nn.functional.pad(t, (0, side - t.shape[2], 0, side - t.shape[1])) for t in tiles]
        return make_grid(padded, nrow=2, padding=2, pad_value=255).float() / 255

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due(trainer) or not self.images:
            return
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None) or []
        figure = self.figure(pl_module, names)
        if trainer.is_global_zero:
            log_images(trainer, {"val/predictions": figure}, "detection_preview")
