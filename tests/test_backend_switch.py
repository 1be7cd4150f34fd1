"""The one backend switch: ``kernels.use_backend`` reaches every attention module's kernel calls; a call's own
``backend=`` and a module's ``backend`` attribute override it."""

import inspect

import pytest
import torch

import kernels
import kernels._checks
import kernels.bilevel_routing
import vision.attention
from kernels import use_backend

# every attention module that calls a kernel, built small (grid 8x8, 16 channels, 2 heads)
FACTORIES = {
    "BiLevelRoutingAttention": lambda: vision.attention.BiLevelRoutingAttention(16, 2, n_win=2, topk=2),
    "HiLoAttention": lambda: vision.attention.HiLoAttention(16, 2, window_size=2, alpha=0.5),
    "NeighborhoodAttention2D": lambda: vision.attention.NeighborhoodAttention2D(16, 2, kernel_size=3),
    "VSAWindowAttention": lambda: vision.attention.VSAWindowAttention(16, 2, window_size=4),
    "WindowAttention": lambda: vision.attention.WindowAttention(16, 2, window_size=4, shift_size=2),
}


@pytest.fixture
def seen(monkeypatch):
    """The backend each kernel call decided on (the torch path then runs, as on any CPU)."""
    calls = []

    def spy(q, backend, *args, **kwargs):
        calls.append(kernels.backend.resolve_backend(backend))
        return False

    monkeypatch.setattr(kernels._checks, "use_triton", spy)
    monkeypatch.setattr(kernels.bilevel_routing, "use_triton", spy)
    return calls


def test_every_kernel_calling_module_is_covered():
    ops = [name for name in kernels.__all__ if name.endswith("attention2d") or name.endswith("routing_attention")]
    exported = [getattr(vision.attention, name) for name in vision.attention.__all__]
    calling = {cls.__name__ for cls in exported if inspect.isclass(cls) and any(op in inspect.getsource(cls) for op in ops)}
    assert len(ops) == 3 and calling == set(FACTORIES)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_switch_reaches_every_kernel_call(name, seen):
    module, x = FACTORIES[name]().eval(), torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        for backend in ("torch", "triton", "auto"):
            seen.clear()
            with use_backend(backend):
                module(x)
            assert seen and set(seen) == {backend}, (backend, seen)
        seen.clear()
        module(x)  # outside any use_backend: the default
        assert set(seen) == {"auto"} and kernels.get_backend() == "auto"
        module.backend = "torch"  # this module only
        seen.clear()
        with use_backend("triton"):
            module(x)
        assert set(seen) == {"torch"}


def test_per_call_override_and_bad_names():
    q = torch.randn(1, 4, 4, 2, 16)
    with use_backend("triton"):  # would fail on CPU tensors without TRITON_INTERPRET: the call's own choice wins
        kernels.window_attention2d(q, q, q, 2, backend="torch")
        with use_backend("torch"):
            assert kernels.get_backend() == "torch"
        assert kernels.get_backend() == "triton"  # restored on exit
    with pytest.raises(ValueError, match="backend='cuda'"):
        with use_backend("cuda"):
            pass
    assert kernels.get_backend() == "auto"
