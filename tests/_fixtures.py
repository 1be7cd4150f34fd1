"""Golden outputs of the official implementations (../shared/fixtures/official, see its README)."""

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"


def load(name: str) -> dict:
    """One fixture file: state_dict, input, output, grad_output, grad_input, meta (aux)."""
    path = FIXTURES / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fixture {path} is missing: CI checks out shared/ beside the repository")
    return torch.load(path, weights_only=True)
