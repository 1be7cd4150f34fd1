"""Comparing one attention module under the torch and triton backends."""

import torch

# Triton against the torch path: fp32 (interpreter or tf32-free GPU) and fp16
TOLERANCE = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float16: dict(atol=6e-3, rtol=6e-3)}


def assert_backends_agree(layer: torch.nn.Module, x: torch.Tensor, rtol: float, atol: float) -> None:
    """``layer`` gives the same output (``rtol``/``atol``) and parameter gradients (1e-4) with
    ``backend="triton"`` as with ``backend="torch"``."""
    results = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
