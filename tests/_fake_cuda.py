"""CUDA without a GPU: fake tensors that carry a device, shape and dtype but no data.

Inside :func:`fake_cuda`, ``torch.empty(2, device="cuda")`` works on a CPU-only machine, every op propagates
devices, shapes and dtypes, and mixing a CUDA tensor with a CPU one raises as on a real GPU
(``FakeTensorDeviceMismatchError``). What it cannot do, and how these helpers work around it:

- Data: a fake tensor has none, so ``.item()``, ``.tolist()``, ``bool(t)`` and ops with data-dependent output
  shapes (``nonzero``, boolean masks, ``bincount``) raise ``DataDependentOutputException`` /
  ``DynamicOutputShapeException``. :func:`host_values` lets a test supply what a host read of a tensor it built
  would return; code behind other data-dependent reads is tested in pieces (each test says which).
- Autograd: the engine asks the CUDA driver for its streams before running a backward
  (``GraphTask::stash_current_streams``), so ``loss.backward()`` fails without a GPU.
  :func:`backward` walks the autograd graph itself, calling each node's backward in topological order and
  checking, as the engine does, that every gradient lands on the device of the tensor it belongs to.
- Autocast: ``torch.autocast("cuda")`` disables itself when CUDA is unavailable; :func:`autocast` switches
  the CUDA autocast state on directly.
- ``Module.to("cuda")`` swaps parameters in place, which fake tensors refuse; :func:`to_cuda` moves parameters
  and buffers (what ``.to`` moves) by assignment. Plain tensor attributes stay behind, as they would on a GPU.
- cuDNN: choosing a cuDNN kernel (grid_sample, ...) queries the driver; :func:`fake_cuda` disables cuDNN so the
  native kernel's shape rules run (same devices and dtypes).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

_MODES: list[FakeTensorMode] = []


@contextlib.contextmanager
def fake_cuda():
    """A fake-tensor mode in which ``device="cuda"`` works without a GPU. Real tensors that meet fake ones are
    treated as fake tensors on their own device: a real CPU tensor meeting a CUDA one raises as on a GPU."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _MODES.append(mode)
    try:
        with mode, torch.backends.cudnn.flags(enabled=False):
            yield mode
    finally:
        _MODES.pop()


def to_cuda(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``module.to("cuda"[, dtype])`` inside :func:`fake_cuda`, for a module built there or a real one (built on
    the CPU beforehand, as the pipeline does: torchmetrics cannot build its states from fake tensors)."""
    mode = _MODES[-1]

    def move(t):
        t = (t if isinstance(t, FakeTensor) else mode.from_tensor(t)).to("cuda")
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(move(p), p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = move(b)
    return module


@contextlib.contextmanager
def autocast(dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast("cuda", dtype)`` without the CUDA availability check."""
    enabled, old_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old_dtype)


@contextlib.contextmanager
def host_values(*pairs: tuple[torch.Tensor, list]):
    """``tensor.tolist()`` of each given fake tensor returns the paired values (what a device-to-host copy
    of the data the test put there would return); any other host read still raises."""
    table = {id(t): values for t, values in pairs}
    original = FakeTensor.tolist

    def tolist(self):
        if id(self) in table:
            return table[id(self)]
        return original(self)

    FakeTensor.tolist = tolist
    try:
        yield
    finally:
        FakeTensor.tolist = original


def _topological(root) -> list:
    order, seen, stack = [], set(), [(root, False)]
    while stack:  # iterative post-order: deep models would overflow Python's recursion limit
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    return order[::-1]


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the autograd engine (see the module docstring): gradients accumulate in the
    leaves' ``.grad``; a gradient on another device than its tensor raises, as the engine's check does."""
    grads = {loss.grad_fn: {0: torch.ones_like(loss)}}
    for node in _topological(loss.grad_fn):
        slots = grads.pop(node, None)
        if slots is None:  # no gradient reaches this node (a branch that does not lead to the loss)
            continue
        metadata = node._input_metadata
        inputs = [slots.get(i) for i in range(len(metadata))]
        if callable(node):  # a C++ node
            outputs = node(*inputs)
        else:  # a Python autograd.Function's node; missing gradients become zeros, as the engine materialises them
            inputs = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                      for g, m in zip(inputs, metadata)]
            outputs = node.apply(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (nxt, index), grad in zip(node.next_functions, outputs):
            if nxt is None or grad is None:
                continue
            expected = nxt._input_metadata[index]
            if grad.device != expected.device:
                raise RuntimeError(f"{node.name()} returned a gradient on {grad.device} for a tensor on "
                                   f"{expected.device} (input {index} of {nxt.name()})")
            if tuple(grad.shape) != tuple(expected.shape):  # broadcast inputs: reduce, as the engine does
                grad = grad.sum_to_size(expected.shape)
            if grad.dtype != expected.dtype:
                grad = grad.to(expected.dtype)
            slot = grads.setdefault(nxt, {})
            slot[index] = grad if index not in slot else slot[index] + grad
