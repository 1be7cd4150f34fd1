"""Bi-level routing attention (token-level step): fused Triton kernels against the torch reference and the
straightforward gather implementation.

Every method gets the same q, k, v ``[B, H, W, heads, 32]`` and routing index ``[B, 49, topk]``:

* ``gather`` -- the official approach: ``torch.gather`` of every query region's top-k key/value regions in one
  piece (a top-k-fold copy of K and V), then matmul, softmax, matmul;
* ``torch``  -- ``kernels.bilevel_routing_attention(backend="torch")``: the same gather over bounded chunks of
  query regions, each checkpointed;
* ``triton`` -- ``backend="triton"``: the fused kernels, which read routed regions in place.

Shapes: BiFormer-T/S stages 1-3 (T and S share widths, heads and top-k; S is only deeper; stage 4 is global
attention) at 224, 512 and 1024 px, ``n_win = 7``, grids padded to a multiple of 7 as the model pads them.
Columns: forward, backward and forward+backward ms (``triton.testing.do_bench`` median on CUDA), forward+backward
replayed from a CUDA graph (``do_bench_cudagraph``: no launch overhead), peak memory of one forward+backward
above the inputs (``max_memory_allocated``), the gather's K/V copy and the targets (workspace <= copy / top-k;
forward+backward >= 2x gather), and the largest output and dq/dk/dv errors against the fp32 torch reference. On CPU it is a smoke run: gather and torch only (the kernels need a GPU), batch 1, peak memory
as the growth of peak RSS in one subprocess per method. Writes ``benchmarks/results/bra_<device>.md``.

    python benchmarks/bench_bra.py [--batch 4] [--dtypes fp16 fp32] [--sizes 224 512 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import bilevel_routing_attention  # noqa: E402
from kernels.bilevel_routing import _to_regions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
N_WIN, HEAD_DIM = 7, 32
STAGES = {1: (64, 1, 4), 2: (128, 4, 8), 3: (256, 16, 16)}  # BiFormer-T/S stage: channels, top-k, stride
METHODS = ("gather", "torch", "triton")


def gather_attention(q, k, v, index, n, scale):
    """The official token step: gather K/V regions for every query region at once, dense attention."""
    B, H, W, heads, D = q.shape
    qr, kr, vr = (_to_regions(t, n).permute(0, 2, 3, 1, 4).flatten(-2) for t in (q, k, v))  # [B, R, P, C]
    R, P, C = kr.shape[1:]
    topk = index.shape[-1]
    gathered = lambda t: torch.gather(  # [B, R, topk, P, C]: top-k copies of K (and of V)
        t[:, None].expand(-1, R, -1, -1, -1), 2, index[..., None, None].expand(-1, -1, -1, P, C))
    ks, vs = (gathered(t).reshape(B, R, topk * P, heads, D).transpose(2, 3) for t in (kr, vr))  # [B, R, h, kP, D]
    qh = qr.view(B, R, P, heads, D).transpose(2, 3)
    out = ((qh * scale) @ ks.transpose(-1, -2)).softmax(-1) @ vs  # [B, R, heads, P, D]
    out = out.view(B, n, n, heads, H // n, W // n, D).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, heads, D)


def problem(size, stage, batch, dtype, device, seed=0):
    dim, topk, stride = STAGES[stage]
    side = -(-size // stride)
    side += -side % N_WIN
    heads = dim // HEAD_DIM
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, side, side, heads, HEAD_DIM, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    regions = N_WIN * N_WIN
    index = torch.rand(batch, regions, regions, generator=g).topk(topk, dim=-1).indices.to(device)
    return q, k, v, index, side


def method(name):
    if name == "gather":
        return lambda q, k, v, index: gather_attention(q, k, v, index, N_WIN, HEAD_DIM**-0.5)
    return lambda q, k, v, index: bilevel_routing_attention(q, k, v, index, N_WIN, HEAD_DIM**-0.5, backend=name)


def bench(fn, device, repeats, leaves=()):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves), return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_graph(fn, leaves):
    """Median ms of ``fn`` replayed from a CUDA graph; nan where it cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=list(leaves), return_mode="median")
    except Exception:  # noqa: BLE001 -- e.g. a method that synchronises: reported as nan, not fatal
        return float("nan")


def peak_mib(fn, device) -> float:
    """MiB allocated by ``fn`` at its peak (result held) above what was allocated before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # peak RSS only grows: meaningful for the first runs of a fresh process
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del result
    return max(peak, 0) / 2**20


def measure(name, size, stage, batch, dtype, device, repeats) -> dict:
    """ms of forward, backward and both; MiB at the peak of the forward (autograd on) and of forward+backward
    above the inputs; the largest output error against the fp32 torch reference."""
    q, k, v, index, side = problem(size, stage, batch, dtype, device)
    fn = method(name)
    call = lambda: fn(q, k, v, index)
    grad = torch.randn(q.shape, device=device, dtype=dtype)
    step = lambda: torch.autograd.grad(call(), (q, k, v), grad)
    if device == "cuda":
        step()  # warm-up: compiles the kernels
    fwd_peak, both_peak = peak_mib(call, device), peak_mib(step, device)
    out = call()
    fwd = bench(call, device, repeats)
    bwd = bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), device, repeats)
    both = bench(step, device, repeats)
    graph = bench_graph(step, (q, k, v)) if device == "cuda" else float("nan")
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = bilevel_routing_attention(*leaves, index, N_WIN, HEAD_DIM**-0.5, backend="torch")
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    out = call()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    error = (out.detach().float() - ref.detach()).abs().max().item()
    grad_error = max((g.float() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return {"fwd": fwd, "bwd": bwd, "both": both, "graph": graph, "fwd_peak": fwd_peak, "both_peak": both_peak,
            "out_grads": 4 * q.numel() * q.element_size() / 2**20, "error": error, "grad_error": grad_error,
            "side": side}


def kv_copy_mib(size, stage, batch, dtype) -> float:
    """MiB of the gathered K and V of the gather implementation: every query region's top-k regions."""
    dim, topk, stride = STAGES[stage]
    side = -(-size // stride)
    side += -side % N_WIN
    return 2 * batch * side * side * topk * dim * DTYPES[dtype].itemsize / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (CPU: 1)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp16 fp32 (CPU: fp32)")
    parser.add_argument("--sizes", nargs="+", type=int, help="input px, default 224 512 1024 (CPU: 224)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default all (CPU: gather torch)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (CUDA uses do_bench)")
    parser.add_argument("--quick", action="store_true", help="224 px in fp16 only (CUDA), unless given")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: method,size,stage,dtype in a subprocess
    args = parser.parse_args(argv)
    device = torch.device(args.device).type
    cuda = device == "cuda"
    batch = args.batch or (4 if cuda else 1)
    if args.one:
        name, size, stage, dtype = args.one.split(",")
        print(json.dumps(measure(name, int(size), int(stage), batch, DTYPES[dtype], device, args.repeats)))
        return 0
    dtypes = args.dtypes or (["fp16"] if cuda and args.quick else ["fp16", "fp32"] if cuda else ["fp32"])
    sizes = args.sizes or ([224, 512, 1024] if cuda and not args.quick else [224])
    names = args.methods or (list(METHODS) if cuda else ["gather", "torch"])

    def run(name, size, stage, dtype):
        if cuda:  # in process: the peak is reset per measurement
            return measure(name, size, stage, batch, DTYPES[dtype], device, args.repeats)
        cmd = [sys.executable, __file__, "--device", device, "--one", f"{name},{size},{stage},{dtype}",
               "--batch", str(batch), "--repeats", str(args.repeats)]  # a fresh process: peak RSS is per method
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    title = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads), smoke run"
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Bi-level routing attention (token step), BiFormer-T/S stages, batch {batch}, {title}", "",
             f"`{' '.join(['python benchmarks/bench_bra.py', command]).strip()}`; torch {torch.__version__}.", "",
             *([] if cuda else ["CPU: a smoke run that checks the script end to end. On a shared CPU the timings are "
                                "noisy, and RSS peaks include first-call allocations (~15 MiB), so neither "
                                "measures the methods; the fused kernels need CUDA.", ""]),
             "Speed-up: gather fwd+bwd ms / this method's. Peaks are above the inputs; workspace is the fwd+bwd peak "
             "less the output and dQ/dK/dV (4 input-sized tensors every method must hold). K/V copy: the gather's "
             "gathered keys and values. Targets (issue #7, triton): workspace <= copy / top-k (the size of K and V), "
             "speed-up >= 2.", "",
             "| dtype | input | stage (grid, top-k) | method | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ms (CUDA graph) "
             "| speed-up | fwd peak MiB | fwd+bwd peak MiB | workspace MiB | K/V copy MiB | copy / top-k MiB "
             "| max error | max dq/dk/dv error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for size in sizes:
            for stage in STAGES:
                topk = STAGES[stage][1]
                copy = kv_copy_mib(size, stage, batch, dtype)
                results = {}
                for name in names:
                    try:
                        results[name] = run(name, size, stage, dtype)
                    except Exception as failure:  # e.g. out of memory: reported, not fatal
                        results[name] = {"failed": f"{type(failure).__name__}: {str(failure).splitlines()[0][:80]}"}
                base = results.get("gather", {}).get("both")
                for name, r in results.items():
                    where = f"| {dtype} | {size} | {stage} ({r.get('side', '?')}², {topk}) | {name} |"
                    if "failed" in r:
                        lines.append(f"{where} failed: {r['failed']} |||||||||||")
                    else:
                        speedup = f"{base / r['both']:.2f}x" if base else "n/a"
                        lines.append(f"{where} {r['fwd']:.2f} | {r['bwd']:.2f} | {r['both']:.2f} | "
                                     f"{r['graph']:.2f} | {speedup} | "
                                     f"{r['fwd_peak']:.1f} | {r['both_peak']:.1f} | "
                                     f"{r['both_peak'] - r['out_grads']:.1f} | {copy:.1f} | {copy / topk:.1f} | "
                                     f"{r['error']:.1e} | {r['grad_error']:.1e} |")
                    print(lines[-1], flush=True)
    out = args.out or RESULTS / f"bra_{device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
