"""The one backend switch of every attention kernel.

``"torch"`` is the readable reference, ``"triton"`` the fused kernels (which must match it), ``"auto"`` (the
default) picks Triton for CUDA tensors the kernels support and torch elsewhere. Choose for a block of code
with :func:`use_backend` (every attention module's kernel calls inside it follow), or per call with the
kernel functions' ``backend=`` argument, which wins over the switch. Modules take no backend argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

BACKENDS = ("auto", "torch", "triton")
_current = "auto"  # a plain global (not a ContextVar): torch.compile guards on it without a graph break


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    return backend


def get_backend() -> str:
    """The switch's current value."""
    return _current


@contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the enclosed kernel calls on ``backend`` (``"auto" | "torch" | "triton"``); restores on exit."""
    global _current
    previous, _current = _current, check_backend(backend)
    try:
        yield
    finally:
        _current = previous


def resolve_backend(backend: str | None) -> str:
    """A call's backend: its own ``backend=`` when given, else the switch's."""
    return _current if backend is None else check_backend(backend)
