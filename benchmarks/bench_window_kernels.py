"""Fused Triton windowed attention against the alternatives, forward, backward and both.

For NAT/Swin-typical shapes (56x56, 28x28, 14x14; kernel or window 7 and 13; D 32 and 64; fp16 and
bf16) every method gets the same q, k, v ``[B, H, W, heads, D]`` and relative position bias:

* ``triton``  -- ``kernels.*(backend="triton")``, the fused kernels;
* ``torch``   -- ``kernels.*(backend="torch")``, the readable reference (gathers k² keys per query);
* ``sdpa``    -- ``scaled_dot_product_attention`` on unfolded neighborhoods / partitioned windows, bias
  (and Swin's shift mask) as a float mask;
* ``flex``    -- compiled FlexAttention over the flattened grid, block mask built once per shape;
* ``natten``  -- ``natten.na2d`` when importable (neighborhoods only; NATTEN has no RPB, so it runs
  without one);
* ``timm``    -- timm's ``WindowAttention`` module on partitioned windows (unfused unless
  ``TIMM_FUSED_ATTN=2``), with ``ours`` the matching module of this package on the fused path; these two
  rows include the qkv and output projections.

Columns: median ms (``triton.testing.do_bench``), useful TFLOP/s (forward 4·B·heads·N·k²·D, backward 2.5x),
achieved GB/s of the minimal traffic (q, k, v, out; plus dO, dQ, dK, dV in backward) and its share of the
device's HBM peak, peak memory of one forward+backward, and the largest output error against the torch
reference in fp32 (natten: against the reference with its bias, so not comparable). Without CUDA the script says so and exits 0
(``--device cpu`` runs a tiny smoke configuration of the CPU-capable methods instead).

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
    ("na", 32, 56, 7, 2, 32), ("na", 32, 28, 7, 4, 32), ("na", 32, 14, 7, 8, 32), ("na", 32, 56, 7, 2, 64),
    ("na", 32, 28, 13, 4, 32), ("na", 32, 14, 13, 8, 64),
    ("swin", 32, 56, 7, 3, 32), ("swin", 32, 28, 7, 6, 32), ("swin", 32, 14, 7, 12, 32), ("swin", 32, 39, 13, 4, 64),
]
QUICK = [SHAPES[0], SHAPES[4], SHAPES[6]]
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


def methods(kind, shape, ks, device, names):
    shift = ks // 2
    if kind == "na":
        fused = lambda backend: lambda q, k, v, rpb: kernels.neighborhood_attention2d(q, k, v, ks, rpb=rpb, backend=backend)
        sdpa = lambda q, k, v, rpb: sdpa_neighborhood(q, k, v, rpb, ks)
    else:
        fused = lambda backend: lambda q, k, v, rpb: kernels.window_attention2d(q, k, v, ks, shift, rpb=rpb,
                                                                                 backend=backend)
        sdpa = lambda q, k, v, rpb: sdpa_window(q, k, v, rpb, ks, shift)
    table = {"triton": lambda: fused("triton"), "torch": lambda: fused("torch"), "sdpa": lambda: sdpa,
             "flex": lambda: flex_method(kind, shape, ks, device)}
    if kind == "na":
        table["natten"] = natten_method(ks)
    return {name: table[name]() for name in names if name in table and table[name] is not None}


def natten_method(ks):
    try:
        import natten
    except ImportError:
        return None
    return lambda: lambda q, k, v, rpb: natten.na2d(q, k, v, kernel_size=ks)


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


def measure(call, leaves, device):
    """ms of forward, backward and forward+backward, and MiB of one forward+backward."""
    out = call()
    grad = torch.randn_like(out)
    fwd = bench(call, device)
    bwd = bench(lambda: out.backward(grad, retain_graph=True), device, leaves)
    both = bench(lambda: call().backward(grad), device, leaves)
    return fwd, bwd, both, peak_memory(lambda: call().backward(grad), device)


def run_shape(kind, B, side, ks, heads, D, dtype, device, names, peak_gbs):
    shape = (B, side, side, heads, D)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    rpb = (0.1 * torch.randn(heads, 2 * ks - 1, 2 * ks - 1, device=device)).requires_grad_()
    tokens = B * side * side
    flops = 4 * tokens * heads * ks * ks * D
    traffic = tokens * heads * D * q.element_size()  # one q-sized tensor
    rows = []
    reference = methods(kind, shape, ks, device, ["torch"])["torch"]
    with torch.no_grad():
        expected = reference(*(t.float() for t in (q, k, v)), rpb)
    candidates = {name: (lambda fn=fn: fn(q, k, v, rpb), (q, k, v, rpb)) for name, fn in
                  methods(kind, shape, ks, device, names).items()}
    if ("timm" in names or "ours" in names) and side % ks == 0:
        x = torch.randn(B, side, side, heads * D, device=device, dtype=dtype, requires_grad=True)
        for name, module in module_pair(kind, shape, ks, device, dtype).items():
            if name in names:
                candidates[name] = (lambda m=module: m(x), (x,))
    for name, (call, leaves) in candidates.items():
        try:
            fwd, bwd, both, mib = measure(call, leaves, device)
            with torch.no_grad():
                error = (call().float() - expected).abs().max().item() if leaves[0] is q else float("nan")
        except Exception as failure:  # a method that cannot run this shape is reported, not fatal
            rows.append(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:80]} ||||||||")
            continue
        tflops = [flops * f / ms / 1e9 for f, ms in ((1, fwd), (2.5, bwd), (3.5, both))]
        gbs = 12 * traffic / both / 1e6
        share = f"{100 * gbs / peak_gbs:.0f}%" if peak_gbs else "n/a"
        rows.append(f"| {name} | {fwd:.3f} | {bwd:.3f} | {both:.3f} | {tflops[0]:.1f} / {tflops[1]:.1f} / "
                    f"{tflops[2]:.1f} | {gbs:.0f} | {share} | {mib:.0f} | {error:.1e} |")
    title = (f"{'neighborhood' if kind == 'na' else 'Swin window (shifted)'} {ks}x{ks}, B={B}, {side}x{side}, "
             f"heads={heads}, D={D}, {str(dtype).removeprefix('torch.')}")
    header = ("| method | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s fwd / bwd / both | GB/s (fwd+bwd) | of peak "
              "| peak MiB | max error |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([f"### {title}", "", header, *rows, ""])


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
    names = args.methods or ["triton", "torch", "sdpa", *(["flex", "natten"] if cuda else []), "timm", "ours"]
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
