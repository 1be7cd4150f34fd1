"""Static performance report of the fused Triton kernels, compiled ahead of time for a GPU that is not here.

For every configuration the dispatchers choose (neighborhood kernels 3..13 with dilation, Swin windows 2..13
with shift, BiFormer routing; head dims 16..128; fp16/bf16/fp32) it records what the compiler produced for
sm_90 (H100/H200) and sm_80 (A100): registers, spill bytes, shared memory (and whether it fits a block),
the hot loop's SASS instruction count and mix, instructions per score element, computed / useful score
elements, and fences or non-relaxed atomics inside loops; plus a predicted time for the goal shape from a
roofline model. No GPU is needed: Triton compiles for a GPU target on the CPU and ships ptxas/cuobjdump.

How a configuration is read, so the report always reflects what ships:

* launches: the kernels' own host functions (``windowed_attention_fwd/bwd``, ``routed_attention_fwd/bwd``)
  run on ``meta`` tensors with every module-level ``@triton.jit``'s ``run`` replaced by a recorder, so the
  grid, arguments, constexprs and ``num_warps``/``num_stages`` are the dispatcher's; Triton's own binder
  specialises the arguments (dtypes, ``== 1`` and 16-divisible integers) as a real launch would;
* compile: ``triton.compile`` for ``GPUTarget("cuda", 90|80, 32)``; ``ptxas -v`` gives registers and spills,
  the metadata shared memory, ``cuobjdump -sass`` the machine code and the PTX the atomics' semantics;
* work: one interpreter run (``TRITON_INTERPRET=1``, in a subprocess, batch 1 and 1 head, the same grid side)
  counts the score elements each kernel computes (elements of 2-D ``exp``/``exp2``: one per score, masked
  lanes included), the score tile of one hot-loop iteration (that exp's shape) and the tensor-core work
  (multiply-adds of ``tl.dot``). Useful scores are counted exactly from the window definitions.

Model (per kernel, the slowest of three bounds, perfectly overlapped, no launch or tail effects):

* issue: hot-loop warp instructions x iterations / (SMs x 4 schedulers x clock); code outside the loop is
  ignored (so this is a lower bound);
* tensor cores: 2 x multiply-adds / dense peak (fp32 dots use IEEE fp32 FMA, no tensor cores);
* memory: the kernel's minimal traffic (every tensor argument read or written once; halo re-reads assumed
  to hit L2) / HBM bandwidth. Torch work on the host side of the op (e.g. a delta pre-pass) is tallied
  from the aten ops the host functions run, at HBM bandwidth.

Results are cached on disk (``benchmarks/results/.cache``, ignored by git) by the compiled source's hash.

    python benchmarks/kernel_report.py              # sweep on sm_90, goal + largest tiles on sm_80
    python benchmarks/kernel_report.py --all        # every kernel size / window / head dim / dtype (hours)
    python benchmarks/kernel_report.py --quick      # the CI subset, sm_90 only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / ".cache" / "kernel_report.json"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    gpu: str
    smem: int  # bytes of shared memory one block may use
    sms: int
    clock_ghz: float  # sustained SM clock
    tensor_tflops: dict  # dense, by input dtype
    hbm_gbs: float


ARCHS = {
    "sm90": Arch("sm90", 90, "H100 SXM (H200: same SMs, 4.8 TB/s)", 232_448, 132, 1.755,
                 {"fp16": 989, "bf16": 989, "fp32": 67}, 3350),
    "sm80": Arch("sm80", 80, "A100 SXM 80GB", 166_912, 108, 1.41, {"fp16": 312, "bf16": 312, "fp32": 19.5}, 2039),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One call of an op: its family, window parameters, head dim and dtype, on a ``[B, side, side, heads, D]``
    grid (the grid side and batch set the launch grid; the compiled code depends on them only through the
    dispatcher)."""

    family: str  # "na" | "swin" | "bra"
    size: int  # NA kernel, Swin window, or BRA regions per side (n_win)
    D: int
    dtype: str
    dilation: int = 1
    shift: int = 0
    topk: int = 0
    rpb: bool = True
    side: int = 56
    batch: int = 8
    heads: int = 4

    @property
    def key(self) -> str:
        parts = {"na": f"na k={self.size} dil={self.dilation}", "swin": f"swin w={self.size} shift={self.shift}",
                 "bra": f"bra n={self.size} top-{self.topk}"}[self.family]
        rpb = "" if self.family == "bra" else (" rpb" if self.rpb else " no-rpb")
        return f"{parts}{rpb} D={self.D} {self.dtype} {self.batch}x{self.side}x{self.side}x{self.heads}"


GOAL = Config("na", 7, 32, "fp16")  # B=8, 56x56, 4 heads, D=32, k=7, fp16
GOAL_NO_RPB = dataclasses.replace(GOAL, rpb=False)
# counted in the interpreter by default: the goal, Swin-T's stage 1 window, BiFormer-T's stage 1 at 224 px
HEADLINE = (GOAL, Config("swin", 7, 32, "fp16", shift=3), Config("bra", 7, 32, "fp16", topk=1))


def sweep(level: str) -> list[Config]:
    """``quick``: the CI subset (the shapes the static review found broken, a few per kernel);
    ``default``: every kernel size / window / top-k at D=32 fp16, head dims and dtypes on the common sizes;
    ``all``: the full cross product."""
    swin = lambda w, D=32, dtype="fp16", **kw: Config("swin", w, D, dtype, shift=w // 2, **kw)
    bra = lambda side, topk, D=32, dtype="fp16": Config("bra", 7, D, dtype, topk=topk, side=side)
    if level == "quick":  # the goal, the largest Swin window (overflowed before), BRA's widest head dim
        return [GOAL, swin(13, 64, side=39), swin(13, 128, side=39), bra(14, 16, 128)]
    sizes, dims, dtypes = range(3, 14, 2), (16, 32, 64, 128), ("fp16", "bf16", "fp32")
    if level == "all":
        return ([Config("na", k, D, t, dilation=d) for k in sizes for d in (1, 2) for D in dims for t in dtypes]
                + [Config("swin", w, D, t, shift=s, side=side)
                   for w in range(2, 14) for s in sorted({0, w // 2}) for D in dims for t in dtypes
                   for side in {56, 3 * w}]
                + [bra(side, topk, D, t) for side, topk in ((56, 1), (28, 4), (14, 16), (133, 1)) for D in dims
                   for t in dtypes])
    if level == "arch":  # a second architecture: the goal and BiFormer's stage 1
        return [GOAL, bra(56, 1)]
    configs = [GOAL, GOAL_NO_RPB, Config("na", 3, 32, "fp16"), Config("na", 7, 32, "fp16", dilation=2),
               Config("na", 13, 128, "fp16"), swin(7), swin(2, rpb=False), swin(13, 64, side=39),
               swin(13, 128, side=39)]
    configs += [bra(56, 1), bra(14, 16), bra(56, 1, 128)]
    return list(dict.fromkeys(configs))


# --- launches: run the host functions on meta tensors and record every kernel launch ------------------------

def _module(family):
    if family == "bra":
        from kernels import triton_bilevel as module
    else:
        from kernels import triton_windowed as module
    return module


def _jit_functions(module):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kinds = (JITFunction, InterpretedFunction)
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, kinds)}


def _call_op(cfg: Config, device: str, seed: int = 0):
    """Run the op's forward and backward host functions once (real numbers on CPU, shapes only on meta)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, dt=dtype: (torch.empty(shape, dtype=dt, device="meta") if device == "meta"
                                     else torch.randn(shape, generator=g).to(dt))
    q, k, v, grad = (make(cfg.batch, cfg.side, cfg.side, cfg.heads, cfg.D) for _ in range(4))
    module = _module(cfg.family)
    scale = cfg.D ** -0.5
    if cfg.family == "bra":
        regions = cfg.size * cfg.size
        if device == "meta":
            index = torch.empty(cfg.batch, regions, cfg.topk, dtype=torch.int64, device="meta")
        else:
            index = torch.rand(cfg.batch, regions, regions, generator=g).topk(cfg.topk, -1).indices
        out, lse = module.routed_attention_fwd(q, k, v, index, cfg.size, scale, True)
        module.routed_attention_bwd(grad, q, k, v, out, lse, index, cfg.size, scale, True)
        return
    kernel, dilation = (cfg.size, cfg.size), (cfg.dilation, cfg.dilation)
    shift = (cfg.shift, cfg.shift)
    rpb = 0.1 * make(cfg.heads, 2 * cfg.size - 1, 2 * cfg.size - 1, dt=torch.float32) if cfg.rpb else None
    blocked = cfg.family == "swin"
    out, lse = module.windowed_attention_fwd(q, k, v, rpb, kernel, dilation, shift, blocked, scale)
    module.windowed_attention_bwd(grad, q, k, v, out, lse, rpb, kernel, dilation, shift, blocked, scale)


def launches(cfg: Config):
    """``([(kernel name, JITFunction, grid, args, kwargs)], host aten bytes)`` of one forward+backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    recorded = []
    host_bytes = [0]
    free = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "new_empty", "new_zeros", "view",
            "permute", "expand", "t", "transpose", "select", "slice", "as_strided", "unsqueeze", "squeeze",
            "detach", "alias", "lift_fresh", "_to_copy_noop", "split", "unbind", "_unsafe_view", "reshape"}

    class Traffic(TorchDispatchMode):  # bytes every aten op on the host side reads and writes
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name not in free and not (name == "contiguous"):
                tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
                outs = out if isinstance(out, (tuple, list)) else (out,)
                tensors += [o for o in outs if isinstance(o, torch.Tensor)]
                host_bytes[0] += sum(t.numel() * t.element_size() for t in tensors)
            return out

    module = _module(cfg.family)
    kernels = _jit_functions(module)
    saved = {name: kernel.__dict__.get("run") for name, kernel in kernels.items()}
    try:
        for name, kernel in kernels.items():
            kernel.run = (lambda *args, grid, warmup, _n=name, _k=kernel, **kwargs:
                          recorded.append((_n, _k, tuple(grid), args, kwargs)))
        with Traffic():
            _call_op(cfg, "meta")
    finally:
        for name, kernel in kernels.items():
            if saved[name] is None:
                del kernel.run
            else:
                kernel.run = saved[name]
    return recorded, host_bytes[0]


# --- compiling and reading the machine code ----------------------------------------------------------------

def _tool(name):
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


TENSOR_OPS = {"HMMA", "HGMMA", "IMMA", "IGMMA", "BMMA", "DMMA", "QGMMA", "UTCHMMA", "UTCQMMA"}
FLOAT_OPS = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "HADD2", "HMUL2", "HFMA2", "HMNMX2",
             "HSETP2", "FSWZADD", "FRND", "DADD", "DMUL", "DFMA", "FADD2", "FMUL2", "FFMA2"}
INT_OPS = {"IADD3", "IADD", "IMAD", "ISETP", "LOP3", "LOP", "SEL", "SHF", "SHL", "SHR", "LEA", "IABS", "IMNMX",
           "VIMNMX", "PRMT", "POPC", "FLO", "BMSK", "BREV", "IMUL", "IDP", "VIADD", "VIADDMNMX", "ICMP", "IMNMX3"}
CONVERT_OPS = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "I2I", "I2IP"}
MEMORY_OPS = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMG", "RED",
              "ATOMS", "UTMALDG", "UTMASTG", "UBLKCP", "LDL", "STL", "REDG", "UTMAPF", "SYNCS"}
CONTROL_OPS = {"BRA", "BAR", "EXIT", "WARPSYNC", "DEPBAR", "MEMBAR", "FENCE", "CCTL", "ERRBAR", "BSSY", "BSYNC",
               "YIELD", "NOP", "WARPGROUP", "CALL", "RET", "JMP", "BPT", "ELECT", "ACQBULK", "BREAK"}
CATEGORIES = ("tensor", "float", "int", "convert", "memory", "control", "other")


def _category(op: str) -> str:
    for name, ops in (("tensor", TENSOR_OPS), ("float", FLOAT_OPS), ("int", INT_OPS), ("convert", CONVERT_OPS),
                      ("memory", MEMORY_OPS), ("control", CONTROL_OPS)):
        if op in ops:
            return name
    if op.startswith("U") and op[1:] in INT_OPS:  # the uniform datapath's integer ops
        return "int"
    return "other"


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """``[(address, opcode, full instruction)]`` of the first function in ``cuobjdump -sass`` output."""
    rows = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            rows.append((int(m.group(1), 16), m.group(3), (m.group(3) + (m.group(4) or "") + m.group(5)).strip()))
    return rows


def is_gpu_fence(instruction: str) -> bool:
    """A fence that orders memory GPU- or system-wide (or invalidates L1 for one): far costlier than
    the shared-memory / async-proxy fences tensor-core pipelines use."""
    return bool(re.match(r"MEMBAR\.[A-Z.]*(GPU|SYS)", instruction)) or instruction.startswith("CCTL.IVALL")


def analyse_sass(rows) -> dict:
    """Loops (a branch back to a lower address), the hot loop (the innermost one with the most tensor-core
    instructions), its size and instruction mix, and GPU-scope fences / atomics inside any loop."""
    address = {a: i for i, (a, _, _) in enumerate(rows)}
    loops = []
    for i, (a, op, ins) in enumerate(rows):
        if op == "BRA":
            m = re.search(r"0x([0-9a-f]+)", ins)
            target = int(m.group(1), 16) if m else None
            if target is not None and target < a and target in address:
                body = rows[address[target]:i + 1]
                loops.append(dict(start=target, end=a, n=len(body),
                                  tensor=sum(op in TENSOR_OPS for _, op, _ in body), body=body))
    in_loops = {a: ins for lp in loops for a, _, ins in lp["body"]}
    fences = sorted({ins.split()[0] for ins in in_loops.values() if is_gpu_fence(ins)})
    atomics = sum(ins.split(".")[0].split()[0] in ("ATOM", "ATOMG", "RED", "REDG") for ins in in_loops.values())
    result = dict(loops=len(loops), fences_in_loops=fences, atomics_in_loops=atomics, total=len(rows))
    candidates = [lp for lp in loops if lp["tensor"]] or loops
    # no loop: a trip count Triton specialised to a constant (an argument equal to 1) unrolled it, so the
    # whole kernel is one iteration
    hot = min(candidates, key=lambda lp: (-lp["tensor"], lp["n"])) if candidates else dict(n=len(rows), body=rows)
    mix = {c: 0 for c in CATEGORIES}
    for _, op, _ in hot["body"]:
        mix[_category(op)] += 1
    return dict(result, loop_instr=hot["n"], mix=mix)


def ptx_atomics(ptx: str) -> dict:
    """Atomic / reduction instructions in the PTX by memory-ordering semantics."""
    counts = {}
    for m in re.finditer(r"^\s*(?:@%p\d+\s+)?(atom|red)\.([\w.]+)", ptx, re.M):
        quals = m.group(2).split(".")
        sem = next((q for q in quals if q in ("relaxed", "acquire", "release", "acq_rel", "sc")), "relaxed")
        counts[sem] = counts.get(sem, 0) + 1
    return counts


def _ptxas_stats(log: str, name: str) -> dict:
    section = log[log.find(f"Compiling entry function '{name}'"):]
    regs = re.search(r"Used (\d+) registers", section)
    stores = re.search(r"(\d+) bytes spill stores", section)
    loads = re.search(r"(\d+) bytes spill loads", section)
    return dict(registers=int(regs.group(1)) if regs else None, spill_stores=int(stores.group(1)) if stores else 0,
                spill_loads=int(loads.group(1)) if loads else 0)


def compile_launch(kernel, args, kwargs, arch: Arch, cache: dict) -> dict:
    """Compile one recorded launch exactly as Triton's launcher would, for ``arch``; read the result."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    key = hashlib.sha256(f"{src.hash()}|{target}|{sorted(options.__dict__.items())}".encode()).hexdigest()
    if key in cache:
        return cache[key]
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):  # Triton prints ptxas -v when asked; a cache hit prints nothing
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = False
    stats = _ptxas_stats(log.getvalue(), compiled.metadata.name)
    if stats["registers"] is None:  # compiled earlier (Triton's own cache): ask ptxas again
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch.capability}a" if arch.capability >= 90 else f"sm_{arch.capability}"
        run = subprocess.run([str(_tool("ptxas")), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        stats = _ptxas_stats(run.stderr + run.stdout, compiled.metadata.name)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([str(_tool("cuobjdump")), "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    meta = compiled.metadata
    result = dict(stats, shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
                  fits=meta.shared <= arch.smem, atomics=ptx_atomics(compiled.asm["ptx"]),
                  constexprs={kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
                  **analyse_sass(parse_sass(sass)))
    cache[key] = result
    return result


# --- work: the interpreter counts computed scores and tensor-core work -------------------------------------

def count_work(cfg: Config) -> dict:
    """Per kernel: score elements computed (2-D exps), the hot-loop score tile, and tl.dot multiply-adds, from
    one interpreter run at batch 1 and 1 head (the per-(batch, head) work is the same). Needs
    ``TRITON_INTERPRET=1`` before Triton is imported (see ``--count``)."""
    from triton.runtime import interpreter

    counts, current = {}, [None]
    builder = interpreter.InterpreterBuilder
    originals = {name: getattr(builder, name) for name in ("create_exp", "create_exp2", "create_dot")}

    def entry():
        return counts.setdefault(current[0], dict(scores=0, tile=None, macs=0))

    def exp(name):
        def patched(self, arg):
            shape = arg.data.shape
            if len(shape) == 2:
                e = entry()
                e["scores"] += int(arg.data.size)
                e["tile"] = e["tile"] or list(shape)
            return originals[name](self, arg)
        return patched

    def dot(self, a, b, d, *rest):
        entry()["macs"] += int(a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1])
        return originals["create_dot"](self, a, b, d, *rest)

    module = _module(cfg.family)
    kernels = _jit_functions(module)
    try:
        builder.create_exp, builder.create_exp2, builder.create_dot = exp("create_exp"), exp("create_exp2"), dot
        for name, kernel in kernels.items():
            def run(*args, _n=name, _k=kernel, **kwargs):
                current[0] = _n
                return type(_k).run(_k, *args, **kwargs)
            kernel.run = run
        dtype = "fp32" if cfg.dtype == "fp32" else "fp16"  # the interpreter has no bf16 arithmetic
        _call_op(dataclasses.replace(cfg, batch=1, heads=1, dtype=dtype), "cpu")
    finally:
        for name, method in originals.items():
            setattr(builder, name, method)
        for kernel in kernels.values():
            kernel.__dict__.pop("run", None)
    return counts


def useful_scores(cfg: Config) -> int:
    """Query-key pairs the attention really has, per (batch, head)."""
    L, k = cfg.side, cfg.size
    if cfg.family == "na":
        return (L * k) ** 2  # every query has exactly k x k keys (the grid is at least k x dilation wide)
    if cfg.family == "bra":
        region = -(-L // k)
        real = lambda r: min(region, max(0, L - r * region))  # real rows of region row r
        per_row = [real(r) for r in range(k)]
        tokens_per_region = sum(a * b for a in per_row for b in per_row) / (k * k)
        return int(L * L * cfg.topk * tokens_per_region)  # exact when the side is a multiple of n_win
    frame = -(-L // k) * k
    pairs = 0
    for p in range(frame):  # per axis: real queries x real keys of the same window and Swin region
        for t in range(p // k * k, p // k * k + k):
            region = lambda x: (x >= frame - k) + (x >= frame - cfg.shift) if cfg.shift else 0
            real = lambda x: (x + cfg.shift) % frame < L
            pairs += real(p) and real(t) and region(p) == region(t)
    return pairs ** 2


# --- the report --------------------------------------------------------------------------------------------

def _tensor_bytes(args) -> int:
    import torch

    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def analyse(cfg: Config, archs, cache: dict, work: dict | None) -> dict:
    """Compile every launch of ``cfg`` for each arch; the per-kernel rows and the predicted time."""
    try:
        recorded, host_bytes = launches(cfg)
    except (ValueError, RuntimeError) as error:  # the dispatcher has no configuration for this shape
        return dict(config=cfg.key, error=f"{type(error).__name__}: {error}")
    out = dict(config=cfg.key, family=cfg.family, goal=cfg == GOAL, host_bytes=host_bytes, archs={})
    scale = cfg.batch * cfg.heads  # the interpreter counted one (batch, head)
    useful = useful_scores(cfg)
    for arch in archs:
        rows, total_us = [], 0.0
        for name, kernel, grid, args, kwargs in recorded:
            r = dict(kernel=name, grid=list(grid), **compile_launch(kernel, args, kwargs, arch, cache))
            w = (work or {}).get(name)
            if w and w["tile"]:
                tile = w["tile"][0] * w["tile"][1]
                threads = 32 * r["num_warps"]
                r["instr_per_score"] = r["loop_instr"] * threads / tile
                r["computed_over_useful"] = w["scores"] / useful
                iterations = w["scores"] * scale / tile
                issue_us = iterations * r["loop_instr"] * r["num_warps"] / (arch.sms * 4 * arch.clock_ghz * 1e3)
                tensor_us = 2 * w["macs"] * scale / (arch.tensor_tflops[cfg.dtype] * 1e6)
                memory_us = _tensor_bytes(args) / (arch.hbm_gbs * 1e3)
                r["bounds_us"] = dict(issue=issue_us, tensor=tensor_us, memory=memory_us)
                r["predicted_us"] = max(issue_us, tensor_us, memory_us)
                total_us += r["predicted_us"]
            rows.append(r)
        host_us = host_bytes / (arch.hbm_gbs * 1e3)
        minimal = 12 * cfg.batch * cfg.side ** 2 * cfg.heads * cfg.D * {"fp32": 4}.get(cfg.dtype, 2)
        out["archs"][arch.name] = dict(
            kernels=rows, host_us=host_us, predicted_us=total_us + host_us if work else None,
            goal_us=minimal / (0.75 * arch.hbm_gbs * 1e3),  # 75 % of HBM peak on 12 tensor-sizes
        )
    return out


def _work_key(cfg: Config) -> str:
    """Cache key of a work count: the config and the source of the module its kernels live in."""
    source = (ROOT / "kernels" / ("triton_bilevel.py" if cfg.family == "bra" else "triton_windowed.py")).read_bytes()
    return f"work|{cfg.key}|{hashlib.sha256(source).hexdigest()[:16]}"


def _start_count(configs):
    """Start :func:`count_work` for every config in one interpreter subprocess (it runs beside the compiles)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--count"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    proc.stdin.write(json.dumps([dataclasses.asdict(c) for c in configs]))
    proc.stdin.close()
    return proc


def _finish_count(proc) -> dict:
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.wait():
        raise RuntimeError(f"interpreter count failed:\n{err[-3000:]}")
    return json.loads(out.splitlines()[-1])


def _fmt(value, spec="{:.0f}"):
    return "–" if value is None else spec.format(value)


def sources() -> dict:
    """Which kernels a report describes: the git commit and the kernel files' hashes."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    files = {name: hashlib.sha256((ROOT / "kernels" / name).read_bytes()).hexdigest()[:12]
             for name in ("triton_windowed.py", "triton_bilevel.py")}
    return dict(commit=commit.stdout.strip() or "unknown", **files)


def markdown(results, arch: Arch, command: str) -> str:
    import triton

    src = sources()
    lines = [f"# Static kernel report, {arch.name} ({arch.gpu})", "",
             f"`{command}`: compiled ahead of time with Triton {triton.__version__}'s compiler for "
             f"`GPUTarget(\"cuda\", {arch.capability}, 32)`; no GPU ran anything. Kernels of commit {src['commit']} "
             f"(sha256 triton_windowed.py {src['triton_windowed.py']}, triton_bilevel.py {src['triton_bilevel.py']}). "
             "How to read it: README, section Kernels.", "",
             f"Model: each kernel takes the slowest of issue ({arch.sms} SMs x 4 warp-instructions/clock x "
             f"{arch.clock_ghz} GHz, hot loop only), tensor cores ({arch.tensor_tflops['fp16']} TFLOP/s dense "
             f"fp16/bf16, {arch.tensor_tflops['fp32']} fp32 FMA) and HBM ({arch.hbm_gbs:.0f} GB/s, every tensor "
             "argument moved once); host-side torch ops add their bytes at HBM speed. Goal: 75 % of HBM peak on "
             "the 12 tensor-sizes a fused forward+backward must move.", ""]
    goal = next((r for r in results if r.get("goal")), None)
    if goal and arch.name in goal.get("archs", {}):
        g = goal["archs"][arch.name]
        lines += [f"## Goal shape: {goal['config']}", "",
                  f"Predicted forward+backward **{_fmt(g['predicted_us'])} µs** (goal ≤ {g['goal_us']:.0f} µs); "
                  f"host-side torch ops {g['host_us']:.1f} µs.", "",
                  "| kernel | SASS / score | computed ÷ useful | hot loop instr | int % | tensor instr | regs | spill B "
                  "| smem B | issue / tensor / memory µs | predicted µs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in g["kernels"]:
            b = r.get("bounds_us")
            lines.append(
                f"| {r['kernel']} | {_fmt(r.get('instr_per_score'), '{:.1f}')} | "
                f"{_fmt(r.get('computed_over_useful'), '{:.2f}')} | {r['loop_instr']} | "
                f"{100 * r['mix']['int'] / max(1, r['loop_instr']):.0f} | {r['mix']['tensor']} | {r['registers']} | "
                f"{r['spill_stores'] + r['spill_loads']} | {r['shared']} | "
                f"{'/'.join(f'{b[x]:.1f}' for x in ('issue', 'tensor', 'memory')) if b else '–'} | "
                f"{_fmt(r.get('predicted_us'), '{:.1f}')} |")
        lines.append("")
    problems = [(res["config"], r) for res in results for r in res.get("archs", {}).get(arch.name, {}).get("kernels", [])
                if not r["fits"] or r["spill_stores"] or r["spill_loads"] or r["fences_in_loops"]]
    lines += ["## Problems (must never ship: overflowing shared memory, spills, GPU-scope fences in loops)", ""]
    lines += [f"- {cfg}: `{r['kernel']}` smem {r['shared']} B{' (does not fit)' if not r['fits'] else ''}, "
              f"spills {r['spill_stores']}/{r['spill_loads']} B, fences in loops {r['fences_in_loops'] or 'none'}"
              for cfg, r in problems] or ["- none"]
    errors = [res for res in results if "error" in res]
    lines += ["", "## Shapes without a Triton configuration (auto falls back to torch)", ""]
    lines += [f"- {res['config']}: {res['error']}" for res in errors] or ["- none"]
    lines += ["", "## Every configuration", "",
              "| configuration | kernel | grid | warps/stages | regs | spill B | smem B | fits | hot loop instr "
              "| tensor / float / int / memory / other | SASS / score | computed ÷ useful | loop fences / atomics "
              "| atomics (PTX) | predicted µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        a = res.get("archs", {}).get(arch.name)
        if not a:
            continue
        for r in a["kernels"]:
            m = r["mix"]
            lines.append(
                f"| {res['config']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['num_warps']}/"
                f"{r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | "
                f"{'yes' if r['fits'] else '**no**'} | {r['loop_instr']} | {m['tensor']}/{m['float']}/{m['int']}/"
                f"{m['memory']}/{m['other'] + m['control'] + m['convert']} | "
                f"{_fmt(r.get('instr_per_score'), '{:.1f}')} | {_fmt(r.get('computed_over_useful'), '{:.2f}')} | "
                f"{','.join(r['fences_in_loops']) or '–'} / {r['atomics_in_loops']} | "
                f"{', '.join(f'{k} {v}' for k, v in r['atomics'].items()) or '–'} | "
                f"{_fmt(r.get('predicted_us'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def report(level="default", arch_names=("sm90", "sm80"), count="headline", cache_path: Path | None = CACHE,
           log=print) -> list[dict]:
    configs = sweep(level)
    work_path = cache_path.with_name(f"{cache_path.stem}_work.json") if cache_path else None
    if cache_path:  # one file per architecture set, so two architectures can be compiled side by side
        cache_path = cache_path.with_name(f"{cache_path.stem}_{'_'.join(arch_names)}.json")
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    if work_path and work_path.exists():
        cache.update(json.loads(work_path.read_text()))
    # the interpreter is slow on shared cores: by default only the headline configurations are counted
    counted_configs = [c for c in configs if count is True or c in HEADLINE]
    todo = [c for c in counted_configs if _work_key(c) not in cache] if count else []
    proc = _start_count(todo) if todo else None
    if todo:
        log(f"counting the work of {len(todo)} configurations in the interpreter (in the background) ...")

    def save():
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))

    archs = [ARCHS[a] for a in arch_names]
    for i, cfg in enumerate(configs):  # compile first (fills the cache), while the interpreter counts
        analyse(cfg, archs, cache, None)
        log(f"[{i + 1}/{len(configs)}] compiled {cfg.key}")
        save()
    if proc:
        counted = _finish_count(proc)
        for cfg in todo:
            cache[_work_key(cfg)] = counted[cfg.key]
        save()
        if work_path:
            work_path.write_text(json.dumps({k: v for k, v in cache.items() if k.startswith("work|")}))
    return [analyse(cfg, archs, cache, cache.get(_work_key(cfg)) if count else None) for cfg in configs]


def _merge(results, others):
    by_config = {r["config"]: r for r in results}
    for r in others:
        if r["config"] in by_config and "archs" in r:
            by_config[r["config"]].setdefault("archs", {}).update(r["archs"])
        else:
            by_config.setdefault(r["config"], r)
    return list(by_config.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_const", dest="level", const="quick", help="the CI subset")
    level.add_argument("--all", action="store_const", dest="level", const="all", help="the full cross product")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=("first", "others"), help=argparse.SUPPRESS)  # fill one cache only
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)  # internal: interpreter counts
    args = parser.parse_args(argv)
    if args.count:
        counts = {}
        for c in map(lambda fields: Config(**fields), json.loads(sys.stdin.read())):
            counts[c.key] = count_work(c)
            print(f"counted {c.key}", file=sys.stderr, flush=True)
        print(json.dumps(counts))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles for a GPU target")
    level = args.level or "default"
    archs = args.archs or (["sm90"] if level == "quick" else ["sm90", "sm80"])
    cache = None if args.no_cache else CACHE
    # the first architecture gets the whole sweep; by default the others the goal and the largest tiles
    count = True if level == "all" else "headline"
    if args.only == "others":
        report("arch" if level == "default" else level, archs[1:], count=count, cache_path=cache)
        return 0
    count = True if level == "all" else "headline"
    results = report(level, archs[:1], count=count, cache_path=cache)
    if args.only == "first":
        return 0
    if archs[1:]:
        others = report("arch" if level == "default" else level, archs[1:], count=count, cache_path=cache)
        results = _merge(results, others)
    command = "python benchmarks/kernel_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    for name in archs:
        stem = args.out / f"kernel_report_{name}"
        rows = [dict(r, archs={name: r["archs"][name]}) for r in results if name in r.get("archs", {})]
        rows += [r for r in results if "error" in r]
        stem.with_suffix(".json").write_text(json.dumps(dict(arch=dataclasses.asdict(ARCHS[name]), sources=sources(),
                                                             results=rows), indent=1))
        stem.with_suffix(".md").write_text(markdown(results, ARCHS[name], command.strip()))
        print(f"written {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
