"""Shared fixtures: offline environment and composed Hydra configs for the pipeline tests."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach the network: W&B writes locally, Hugging Face hub is off.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# Without a GPU the Triton kernels run in Triton's interpreter; @triton.jit reads this when `kernels` is
# first imported, so it is set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def compose_cfg(tmp_path):
    """``compose_cfg(config_name, overrides)``: a composed config writing into ``tmp_path``, with
    HydraConfig set so ``${hydra:...}`` interpolations resolve as under ``@hydra.main``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(config_name: str = "train", overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.extras.print_config = False
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The embedded Fashion-MNIST idx files."""
    return ROOT / "data" / "fashion-mnist"
