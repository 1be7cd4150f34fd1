"""Fused Triton windowed attention against the alternatives, forward, backward and both.

For NAT/Swin-typical shapes (56x56, 28x28, 14x14; kernel or window 7 and 13; D 32 and 64; fp16 and
bf16) every method gets the same q, k, v ``[B, H, W, heads, D]`` and relative position bias:

* ``triton``  -- ``kernels.*(backend="triton")``, the fused kernels;
* ``torch``   -- ``kernels.*(backend="torch")``, the readable reference (gathers k² keys per query);
* ``sdpa``    -- ``scaled_dot_product_attention`` on unfolded neighborhoods / partitioned windows, bias
  (and Swin's shift mask) as a float mask;
* ``flex``    -- compiled FlexAttention over the flattened grid in row-major order, block mask built once;
* ``flex_tiled`` -- the strongest FlexAttention mask: tokens permuted so that every 64-token block is one
  8x8 tile of the grid (neighborhoods) or one whole window padded to a multiple of 64 slots (Swin), so
  blocks hold tokens that attend to each other (attention-gym's tiled NATTEN mask, NATTEN's token
  permutation); the permutation copies are timed with it;
* ``triton_norpb`` / ``natten`` -- like for like with NATTEN (which has no RPB): our kernels without a bias,
  and ``natten.na2d`` when importable (neighborhoods only); the backend NATTEN picks is logged;
* ``timm_attn`` -- timm's window attention math with the projections left out (unfused matmul, softmax with
  the materialised bias and shift mask, matmul, as ``WindowAttention`` runs unless ``TIMM_FUSED_ATTN=2``) on
  partitioned windows of the same size: attention-only, against the fused kernels;
* ``timm`` / ``ours`` -- timm's ``WindowAttention`` module and this package's matching module on the fused
  path; these two rows include the qkv and output projections.

Columns: median ms (``triton.testing.do_bench``) of forward, backward and both, forward+backward under a CUDA
graph (``do_bench_cudagraph``: no launch overhead, what small windows are bound by), useful TFLOP/s (forward
4·B·heads·N·k²·D, backward 2.5x), achieved GB/s of the minimal traffic (q, k, v, out; plus dO, dQ, dK, dV in
backward) and its share of the device's HBM peak, peak memory of one forward+backward, and the largest
output and q/k/v-gradient errors against the torch reference in fp32 (natten and the no-bias rows: against
the reference without bias). The first shape is the goal: B=8, 56x56, 4 heads, D=32, k=7, fp16 (targets:
fwd+bwd >= 75% of HBM peak, >= 1.0x NATTEN, >= 2x the best Flex mask, >= 3x timm's attention).
Without CUDA the script says so and exits 0 (``--device cpu`` runs a tiny smoke configuration of the
CPU-capable methods instead).

    python benchmarks/bench_window_kernels.py [--quick] [--dtypes fp16 bf16] [--peak-gbs 3350]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import neighborhood_indices  # noqa: E402
from kernels.window import _region_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100-PCIE": 1555, "L40S": 864, "RTX 4090": 1008}
# (kind, batch, side, kernel, heads, head dim): NAT-T / Swin-T stage shapes, plus k=13 and D=64
SHAPES = [
    ("na", 8, 56, 7, 4, 32),  # the goal shape
    ("na", 32, 56, 7, 2, 32), ("na", 32, 28, 7, 4, 32), ("na", 32, 14, 7, 8, 32), ("na", 32, 56, 7, 2, 64),
    ("na", 32, 28, 13, 4, 32), ("na", 32, 14, 13, 8, 64),
    ("swin", 32, 56, 7, 3, 32), ("swin", 32, 28, 7, 6, 32), ("swin", 32, 14, 7, 12, 32), ("swin", 32, 39, 13, 4, 64),
]
QUICK = [SHAPES[0], SHAPES[5], SHAPES[7]]
SMOKE = [("na", 1, 12, 3, 1, 16), ("swin", 1, 12, 4, 1, 16)]


# --- the methods -----------------------------------------------------------------------------------------

def sdpa_neighborhood(q, k, v, rpb, ks):
    B, H, W, heads, D = q.shape
    rows, cols = neighborhood_indices(H, ks, 1, q.device), neighborhood_indices(W, ks, 1, q.device)
    gather = (slice(None), rows[:, None, :, None], cols[None, :, None, :])
    keys, values = (t[gather].reshape(B * H * W, ks * ks, heads, D).transpose(1, 2) for t in (k, v))
    dy = rows - torch.arange(H, device=q.device)[:, None] + ks - 1
    dx = cols - torch.arange(W, device=q.device)[:, None] + ks - 1
    bias = rpb[:, dy[:, None, :, None], dx[None, :, None, :]].permute(1, 2, 0, 3, 4)  # [H, W, heads, k, k]
    bias = bias.reshape(1, H * W, heads, 1, ks * ks).expand(B, -1, -1, -1, -1).reshape(B * H * W, heads, 1, -1)
    out = F.scaled_dot_product_attention(q.reshape(B * H * W, 1, heads, D).transpose(1, 2), keys, values,
                                         attn_mask=bias.to(q.dtype))
    return out.reshape(B, H, W, heads, D)


def sdpa_window(q, k, v, rpb, ws, shift):
    B, H, W, heads, D = q.shape  # sides are multiples of the window here
    q, k, v = (torch.roll(t, (-shift, -shift), (1, 2)) for t in (q, k, v))
    part = lambda t: t.view(B, H // ws, ws, W // ws, ws, heads, D).permute(0, 1, 3, 5, 2, 4, 6).reshape(
        B, (H // ws) * (W // ws), heads, ws * ws, D)
    ys, xs = torch.meshgrid(torch.arange(ws, device=q.device), torch.arange(ws, device=q.device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    bias = rpb[:, ys[None, :] - ys[:, None] + ws - 1, xs[None, :] - xs[:, None] + ws - 1]  # [heads, N, N]
    region = _region_ids(H, W, (ws, ws), (shift, shift), q.device)
    region = region.view(H // ws, ws, W // ws, ws).transpose(1, 2).reshape(-1, ws * ws)  # [windows, N]
    mask = torch.where(region[:, :, None] == region[:, None, :], 0.0, float("-inf"))
    out = F.scaled_dot_product_attention(part(q), part(k), part(v), attn_mask=(bias + mask[:, None]).to(q.dtype))
    out = out.view(B, H // ws, W // ws, heads, ws, ws, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, heads, D)
    return torch.roll(out, (shift, shift), (1, 2))


def flex_method(kind, shape, ks, device):
    """Compiled FlexAttention on the flattened grid; mask and bias read from per-position tables."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, W, heads, D = shape
    if kind == "na":
        start_y = neighborhood_indices(H, ks, 1, device)[:, 0]
        start_x = neighborhood_indices(W, ks, 1, device)[:, 0]

        def mask_mod(b, h, qi, ki):
            qy, qx, ky, kx = qi // W, qi % W, ki // W, ki % W
            return ((ky - start_y[qy]) >= 0) & ((ky - start_y[qy]) < ks) & ((kx - start_x[qx]) >= 0) & (
                (kx - start_x[qx]) < ks)
    else:
        shift = ks // 2
        region = _region_ids(H, W, (ks, ks), (shift, shift), device).flatten()

        def mask_mod(b, h, qi, ki):
            same_window = ((qi // W) // ks == (ki // W) // ks) & ((qi % W) // ks == (ki % W) // ks)
            return same_window & (region[qi] == region[ki])

    block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device=device)
    attend = torch.compile(flex_attention)

    def run(q, k, v, rpb):
        def score_mod(score, b, h, qi, ki):
            # clamped: masked pairs of a partial block are scored too, and must not read out of bounds
            dy = (ki // W - qi // W + ks - 1).clamp(0, 2 * ks - 2)
            dx = (ki % W - qi % W + ks - 1).clamp(0, 2 * ks - 2)
            return score + rpb[h, dy, dx]

        flat = lambda t: t.reshape(B, H * W, heads, D).transpose(1, 2)
        if kind == "swin":  # Swin rolls the grid first
            q, k, v = (torch.roll(t, (-(ks // 2), -(ks // 2)), (1, 2)) for t in (q, k, v))
        out = attend(flat(q), flat(k), flat(v), score_mod=score_mod, block_mask=block_mask)
        out = out.transpose(1, 2).reshape(B, H, W, heads, D)
        return torch.roll(out, (ks // 2, ks // 2), (1, 2)) if kind == "swin" else out

    return run


def flex_tiled_method(kind, shape, ks, device):
    """Compiled FlexAttention on a token permutation whose 64-token blocks attend to few blocks: 8x8 tiles of
    the grid for neighborhoods, whole windows padded to a multiple of 64 slots for Swin (sides are multiples
    of the window here). Padding slots are masked keys; as queries they attend to themselves and are dropped.
    The permutation and its inverse are gathers, timed with the attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, W, heads, D = shape
    if kind == "na":
        Hp, Wp = -(-H // 8) * 8, -(-W // 8) * 8
        t = torch.arange(Hp * Wp, device=device)
        tile, inner = t // 64, t % 64
        y, x = (tile // (Wp // 8)) * 8 + inner // 8, (tile % (Wp // 8)) * 8 + inner % 8
        real = (y < H) & (x < W)
        group = tile
    else:  # Swin: window-major, in the rolled grid
        slots = -(-ks * ks // 64) * 64
        t = torch.arange((H // ks) * (W // ks) * slots, device=device)
        group, slot = t // slots, t % slots
        real = slot < ks * ks
        y, x = (group // (W // ks)) * ks + slot // ks, (group % (W // ks)) * ks + slot % ks
    y, x = torch.where(real, y, 0), torch.where(real, x, 0)
    pos = y * W + x  # flattened grid index of every slot (padding slots read token 0, masked)
    inverse = torch.empty(H * W, dtype=torch.long, device=device)
    inverse[pos[real]] = t[real]
    if kind == "na":
        start_y = neighborhood_indices(H, ks, 1, device)[:, 0]
        start_x = neighborhood_indices(W, ks, 1, device)[:, 0]

        def allowed(qi, ki):
            dy, dx = y[ki] - start_y[y[qi]], x[ki] - start_x[x[qi]]
            return (dy >= 0) & (dy < ks) & (dx >= 0) & (dx < ks)
    else:
        region = _region_ids(H, W, (ks, ks), (ks // 2, ks // 2), device).flatten()

        def allowed(qi, ki):
            return (group[qi] == group[ki]) & (region[pos[qi]] == region[pos[ki]])

    def mask_mod(b, h, qi, ki):
        return (real[ki] & allowed(qi, ki)) | ((qi == ki) & ~real[qi])

    block_mask = create_block_mask(mask_mod, None, None, len(t), len(t), device=device, BLOCK_SIZE=64)
    attend = torch.compile(flex_attention)

    def run(q, k, v, rpb):
        def score_mod(score, b, h, qi, ki):
            dy = (y[ki] - y[qi] + ks - 1).clamp(0, 2 * ks - 2)
            dx = (x[ki] - x[qi] + ks - 1).clamp(0, 2 * ks - 2)
            return score + rpb[h, dy, dx]

        if kind == "swin":
            q, k, v = (torch.roll(t, (-(ks // 2), -(ks // 2)), (1, 2)) for t in (q, k, v))
        permuted = lambda t: t.reshape(B, H * W, heads, D)[:, pos].transpose(1, 2)
        out = attend(permuted(q), permuted(k), permuted(v), score_mod=score_mod, block_mask=block_mask)
        out = out.transpose(1, 2)[:, inverse].reshape(B, H, W, heads, D)
        return torch.roll(out, (ks // 2, ks // 2), (1, 2)) if kind == "swin" else out

    return run


def timm_attention(q, k, v, rpb, ws, shift):
    """timm's ``WindowAttention`` math without its projections, on partitioned windows: q scaled, ``q @ kᵀ``,
    the relative position bias and (shifted) the -100 region mask added to a materialised attention matrix,
    softmax, ``@ v`` (timm's default, unfused path)."""
    B, H, W, heads, D = q.shape  # sides are multiples of the window here
    if shift:
        q, k, v = (torch.roll(t, (-shift, -shift), (1, 2)) for t in (q, k, v))
    n = ws * ws
    part = lambda t: t.view(B, H // ws, ws, W // ws, ws, heads, D).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, n, D)
    ys, xs = torch.meshgrid(torch.arange(ws, device=q.device), torch.arange(ws, device=q.device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    bias = rpb[:, ys[None, :] - ys[:, None] + ws - 1, xs[None, :] - xs[:, None] + ws - 1]  # [heads, n, n]
    attn = (part(q) * D**-0.5) @ part(k).transpose(-2, -1) + bias.to(q.dtype)
    if shift:
        region = _region_ids(H, W, (ws, ws), (shift, shift), q.device)
        region = region.view(H // ws, ws, W // ws, ws).transpose(1, 2).reshape(-1, n)  # [windows, n]
        mask = torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).to(q.dtype)
        attn = (attn.view(B, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = attn.softmax(-1) @ part(v)
    out = out.view(B, H // ws, W // ws, heads, ws, ws, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, heads, D)
    return torch.roll(out, (shift, shift), (1, 2)) if shift else out


def methods(kind, shape, ks, device, names):
    """``{name: (fn(q, k, v, rpb), computes)}``: ``computes`` is "rpb" or "norpb" (the attention it equals, so
    its errors are measured against that reference) or None (a different attention: no error column)."""
    shift = ks // 2
    if kind == "na":
        fused = lambda backend: lambda q, k, v, rpb: kernels.neighborhood_attention2d(q, k, v, ks, rpb=rpb, backend=backend)
        sdpa = lambda q, k, v, rpb: sdpa_neighborhood(q, k, v, rpb, ks)
    else:
        fused = lambda backend: lambda q, k, v, rpb: kernels.window_attention2d(q, k, v, ks, shift, rpb=rpb,
                                                                                 backend=backend)
        sdpa = lambda q, k, v, rpb: sdpa_window(q, k, v, rpb, ks, shift)
    triton_norpb = lambda: (lambda q, k, v, rpb: fused("triton")(q, k, v, None), "norpb")
    timm_shift = shift if kind == "swin" else 0  # neighborhoods: timm's plain windows of the same size
    table = {"triton": lambda: (fused("triton"), "rpb"), "torch": lambda: (fused("torch"), "rpb"),
             "sdpa": lambda: (sdpa, "rpb"), "flex": lambda: (flex_method(kind, shape, ks, device), "rpb"),
             "flex_tiled": lambda: (flex_tiled_method(kind, shape, ks, device), "rpb"),
             "timm_attn": lambda: (lambda q, k, v, rpb: timm_attention(q, k, v, rpb, ks, timm_shift),
                                   "rpb" if kind == "swin" else None)}
    if kind == "na":
        table["triton_norpb"] = triton_norpb
        if natten_method(ks) is not None:
            table["natten"] = lambda: (natten_method(ks), "norpb")
    return {name: table[name]() for name in names if name in table}


def natten_method(ks):
    try:
        import natten
    except ImportError:
        return None
    return lambda q, k, v, rpb: natten.na2d(q, k, v, kernel_size=ks)


def natten_backend(q, k, v) -> str:
    """NATTEN's version and the backend it picks for these tensors (its chooser's name differs across
    releases, so a few are tried)."""
    try:
        import natten
    except ImportError:
        return "not installed"
    version = getattr(natten, "__version__", "?")
    chooser_module = getattr(natten, "backends", None)
    for name in ("choose_backend", "choose_fna_backend"):
        chooser = getattr(chooser_module, name, None)
        if chooser is None:
            continue
        for args in ((q, k, v), (q, k, v, False)):
            try:
                return f"natten {version}, backend {chooser(*args)}"
            except TypeError:
                continue
            except Exception as failure:  # noqa: BLE001 -- a log line, never fatal
                return f"natten {version}, backend unknown ({type(failure).__name__})"
    return f"natten {version}, backend chosen internally (no chooser exposed)"


def module_pair(kind, shape, ks, device, dtype):
    """timm's WindowAttention on partitioned windows, and this package's module on the fused path."""
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    from vision.attention import NeighborhoodAttention2D, WindowAttention

    B, H, W, heads, D = shape
    dim = heads * D
    timm_attn = TimmWindowAttention(dim, heads, window_size=ks).to(device, dtype)
    ours = (NeighborhoodAttention2D(dim, heads, kernel_size=ks) if kind == "na"
            else WindowAttention(dim, heads, ks, ks // 2, rel_pos_bias=True)).to(device, dtype)
    ours.backend = "triton"  # this module only; kernels.use_backend would switch every module

    def timm_run(x):
        windows = x.view(B, H // ks, ks, W // ks, ks, dim).transpose(2, 3).reshape(-1, ks * ks, dim)
        return timm_attn(windows).view(B, H // ks, W // ks, ks, ks, dim).transpose(2, 3).reshape(B, H, W, dim)

    return {"timm": timm_run, "ours": ours}


# --- measuring -------------------------------------------------------------------------------------------

def bench(fn, device, grad_to_none=()):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none), return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_graph(fn, device, grad_to_none=()):
    """Median ms of ``fn`` replayed from a CUDA graph (no launch overhead); nan where it cannot be captured."""
    if device != "cuda":
        return float("nan")
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=list(grad_to_none), return_mode="median")
    except Exception:  # noqa: BLE001 -- e.g. a method that synchronises: reported as nan, not fatal
        return float("nan")


def measure(call, leaves, device):
    """ms of forward, backward, forward+backward and forward+backward in a CUDA graph; MiB of one
    forward+backward."""
    out = call()
    grad = torch.randn_like(out)
    fwd = bench(call, device)
    bwd = bench(lambda: out.backward(grad, retain_graph=True), device, leaves)
    both = bench(lambda: call().backward(grad), device, leaves)
    graph = bench_graph(lambda: call().backward(grad), device, leaves)
    return fwd, bwd, both, graph, peak_memory(lambda: call().backward(grad), device)


def errors(call, q, k, v, expected, expected_grads, grad):
    """Largest |output error| and |dq, dk, dv error| against the fp32 reference."""
    out = call()
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    out_error = (out.detach().float() - expected).abs().max().item()
    grad_error = max((g.float() - e).abs().max().item() for g, e in zip(grads, expected_grads))
    return out_error, grad_error


def run_shape(kind, B, side, ks, heads, D, dtype, device, names, peak_gbs):
    shape = (B, side, side, heads, D)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    rpb = (0.1 * torch.randn(heads, 2 * ks - 1, 2 * ks - 1, device=device)).requires_grad_()
    tokens = B * side * side
    flops = 4 * tokens * heads * ks * ks * D
    traffic = tokens * heads * D * q.element_size()  # one q-sized tensor
    rows = []
    reference = methods(kind, shape, ks, device, ["torch"])["torch"][0]
    grad = torch.randn(shape, device=device)
    expected = {}  # fp32 reference output and q/k/v gradients, with and without the bias
    for computes, bias in (("rpb", rpb.detach()), ("norpb", None)):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = reference(*leaves, bias)
        expected[computes] = (out.detach(), torch.autograd.grad(out, leaves, grad))
    candidates = {name: (lambda fn=fn: fn(q, k, v, rpb), (q, k, v, rpb), computes) for name, (fn, computes) in
                  methods(kind, shape, ks, device, names).items()}
    if ("timm" in names or "ours" in names) and side % ks == 0:
        x = torch.randn(B, side, side, heads * D, device=device, dtype=dtype, requires_grad=True)
        for name, module in module_pair(kind, shape, ks, device, dtype).items():
            if name in names:
                candidates[name] = (lambda m=module: m(x), (x,), None)
    for name, (call, leaves, computes) in candidates.items():
        try:
            fwd, bwd, both, graph, mib = measure(call, leaves, device)
            out_error, grad_error = (errors(call, q, k, v, *expected[computes], grad) if computes
                                     else (float("nan"), float("nan")))
        except Exception as failure:  # a method that cannot run this shape is reported, not fatal
            rows.append(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:80]} ||||||||||")
            continue
        tflops = [flops * f / ms / 1e9 for f, ms in ((1, fwd), (2.5, bwd), (3.5, both))]
        gbs = 12 * traffic / both / 1e6
        share = f"{100 * gbs / peak_gbs:.0f}%" if peak_gbs else "n/a"
        rows.append(f"| {name} | {fwd:.3f} | {bwd:.3f} | {both:.3f} | {graph:.3f} | {tflops[0]:.1f} / "
                    f"{tflops[1]:.1f} / {tflops[2]:.1f} | {gbs:.0f} | {share} | {mib:.0f} | {out_error:.1e} | "
                    f"{grad_error:.1e} |")
    title = (f"{'neighborhood' if kind == 'na' else 'Swin window (shifted)'} {ks}x{ks}, B={B}, {side}x{side}, "
             f"heads={heads}, D={D}, {str(dtype).removeprefix('torch.')}")
    notes = [f"NATTEN: {natten_backend(q, k, v)}.", ""] if "natten" in candidates else []
    header = ("| method | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ms (CUDA graph) | TFLOP/s fwd / bwd / both "
              "| GB/s (fwd+bwd) | of peak | peak MiB | max error | max dq/dk/dv error |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([f"### {title}", "", *notes, header, *rows, ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp16 bf16 (CPU: fp32)")
    parser.add_argument("--methods", nargs="+", help="default: all (CPU: no flex, natten; triton needs "
                        "TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="three shapes instead of ten")
    parser.add_argument("--peak-gbs", type=float, default=None, help="HBM peak in GB/s (default: by device name)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device is None:
        print("CUDA is not available: this benchmark measures the fused kernels on a GPU, so nothing was measured. "
              "(`--device cpu` runs a tiny smoke configuration.)")
        return 0
    device = torch.device(args.device).type
    shapes = SMOKE if device == "cpu" else (QUICK if args.quick else SHAPES)
    cuda = device == "cuda"
    dtypes = args.dtypes or (["fp16", "bf16"] if cuda else ["fp32"])
    names = args.methods or ["triton", "torch", "sdpa", *(["flex", "flex_tiled", "triton_norpb", "natten"] if cuda
                                                         else []), "timm_attn", "timm", "ours"]
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = args.peak_gbs or next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)
    else:
        name, peak = "CPU", args.peak_gbs
    sections = [f"# Windowed attention kernels on {name}", "",
                f"`python benchmarks/bench_window_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
                f"torch {torch.__version__}; HBM peak {peak or 'unknown'} GB/s.", ""]
    for dtype in dtypes:
        for kind, B, side, ks, heads, D in shapes:
            section = run_shape(kind, B, side, ks, heads, D, DTYPES[dtype], device, names, peak)
            print(section, flush=True)
            sections.append(section)
    out = args.out or RESULTS / f"window_kernels_{device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
