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

# every attention module that calls a kernel, built small (16 channels, 2 heads), with an input
GRID = (1, 8, 8, 16)
FACTORIES = {
    "BiLevelRoutingAttention": lambda: (vision.attention.BiLevelRoutingAttention(16, 2, n_win=2, topk=2), GRID),
    "HiLoAttention": lambda: (vision.attention.HiLoAttention(16, 2, window_size=2, alpha=0.5), GRID),
    "NeighborhoodAttention1D": lambda: (vision.attention.NeighborhoodAttention1D(16, 2, kernel_size=3), (1, 8, 16)),
    "NeighborhoodAttention2D": lambda: (vision.attention.NeighborhoodAttention2D(16, 2, kernel_size=3), GRID),
    "NeighborhoodAttention3D": lambda: (vision.attention.NeighborhoodAttention3D(16, 2, kernel_size=3),
                                        (1, 4, 4, 4, 16)),
    "VSAWindowAttention": lambda: (vision.attention.VSAWindowAttention(16, 2, window_size=4), GRID),
    "WindowAttention": lambda: (vision.attention.WindowAttention(16, 2, window_size=4, shift_size=2), GRID),
}

NO_FUSED_KERNEL = {"NeighborhoodAttention1D", "NeighborhoodAttention3D"}  # the Triton kernels are 2-D


@pytest.fixture
def seen(monkeypatch):
    """The backend each kernel call decided on; the torch path then runs, as on any CPU."""
    calls = []
    resolve = kernels.backend.resolve_backend

    def spy_resolve(backend):
        calls.append(resolve(backend))
        return calls[-1]

    def spy_use_triton(q, backend, *args, **kwargs):
        spy_resolve(backend)
        return False

    monkeypatch.setattr(kernels._checks, "resolve_backend", spy_resolve)
    monkeypatch.setattr(kernels._checks, "use_triton", spy_use_triton)
    monkeypatch.setattr(kernels.bilevel_routing, "use_triton", spy_use_triton)
    return calls


def test_every_kernel_calling_module_is_covered():
    ops = [n for n in kernels.__all__ if n.endswith(("_attention", "attention1d", "attention2d", "attention3d"))]
    assert {"window_attention2d", "neighborhood_attention", "bilevel_routing_attention"} <= set(ops)

    def calls_a_kernel(cls) -> bool:  # its own code or an attention base class it inherits from
        sources = [inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("vision.attention")]
        return any(op + "(" in src for src in sources for op in ops)

    exported = [getattr(vision.attention, name) for name in vision.attention.__all__]
    assert {cls.__name__ for cls in exported if inspect.isclass(cls) and calls_a_kernel(cls)} == set(FACTORIES)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_switch_reaches_every_kernel_call(name, seen):
    module, shape = FACTORIES[name]()
    module, x = module.eval(), torch.randn(shape)
    with torch.no_grad():
        for backend in ("torch", "triton", "auto"):
            seen.clear()
            with use_backend(backend):
                if backend == "triton" and name in NO_FUSED_KERNEL:  # "triton" insists, so it says why not
                    with pytest.raises(ValueError, match="backend='triton' covers 2-D"):
                        module(x)
                else:
                    module(x)
            assert seen and set(seen) == {backend}, (backend, seen)
        seen.clear()
        module(x)  # outside any use_backend: the default
        assert set(seen) == {"auto"} and kernels.get_backend() == "auto"
        module.backend = "torch"  # this module only
        seen.clear()
        with use_backend("triton"):
            module(x)
        assert seen and set(seen) == {"torch"}


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
