"""Evaluate a checkpoint: ``python eval.py ckpt_path=/path/to.ckpt [key=value ...]`` (Hydra); the model and data
configs come from the checkpoint, command-line ``model.*`` / ``data.*`` overrides apply on top."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from vision.utils import evaluate
    from vision.utils.pipeline import apply_extras

    apply_extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
