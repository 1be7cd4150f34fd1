"""Train a model: ``python train.py experiment=<name> [key=value ...]`` (Hydra).

With no arguments it runs ``experiment=quickstart`` on the embedded Fashion-MNIST.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vision.utils import metric_value, train
    from vision.utils.pipeline import apply_extras

    apply_extras(cfg)
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
