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


def bra_from_fixture(name: str, **kwargs):
    """The official BiFormer BRA layer of fixture ``name`` as our ``BiLevelRoutingAttention`` (eval), and the fixture."""
    from vision.attention import BiLevelRoutingAttention

    fx = load(name)
    kw = fx["meta"]["kwargs"]
    layer = BiLevelRoutingAttention(kw["dim"], kw["num_heads"], kw["n_win"], kw["qk_dim"], topk=kw["topk"],
                                    side_dwconv=kw["side_dwconv"], **kwargs).eval()
    state = {k.replace("qkv.qkv.", "qkv.").replace("wo.", "proj."): v for k, v in fx["state_dict"].items()}
    layer.load_state_dict(state)
    return layer, fx
