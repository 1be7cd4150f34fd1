"""Predict with a checkpoint alone: ``python predict.py ckpt_path=/path/to.ckpt inputs=<image|folder|glob>`` (Hydra).

Writes top-k classes (classification), masks and overlays (segmentation, medical 2-D) or boxes (detection) to
``predictions.csv`` / ``predictions.json`` and image folders in the run directory.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    from vision.utils.pipeline import apply_extras
    from vision.utils.predict import predict

    apply_extras(cfg)
    predict(cfg)


if __name__ == "__main__":
    main()
