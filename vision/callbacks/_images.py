"""One way for the visualisation callbacks to log figures, whatever the run's loggers are."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image


def log_images(trainer: L.Trainer, figures: dict[str, torch.Tensor], folder: str) -> None:
    """``{key: [3, H, W] in [0, 1]}`` to W&B (one panel named ``folder``) and TensorBoard (one image per key);
    with neither, PNGs ``<log dir>/<folder>/epoch<NNN>_<key>.png`` next to the run's CSV logs."""
    step, epoch = trainer.global_step, trainer.current_epoch
    written = False
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            logger.log_image(key=folder, images=list(figures.values()), caption=list(figures), step=step)
            written = True
        elif kind == "TensorBoardLogger":
            for key, image in figures.items():
                logger.experiment.add_image(key, image, step)
            written = True
    if not written:
        root = Path(trainer.log_dir or trainer.default_root_dir) / folder
        root.mkdir(parents=True, exist_ok=True)
        for key, image in figures.items():
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            Image.fromarray(pixels).save(root / f"epoch{epoch:03d}_{key.replace('/', '_')}.png")
