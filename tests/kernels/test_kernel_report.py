"""The static kernel report (benchmarks/kernel_report.py): its SASS reading on fixed snippets, and the CI checks
on what must never ship, from a few dispatched configurations per kernel compiled for sm_90 on the CPU.

The interpreter is looser than the GPU compiler (it takes any shared-memory size, never spills, ignores
memory-ordering costs), so these compile the real launches ahead of time with Triton's bundled ptxas.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report  # noqa: E402

pytest.importorskip("triton")

SASS = """
        /*0000*/                   S2R R9, SR_CTAID.X ;
        /*0010*/                   IADD3 R2, R9, 0x1, RZ ;
        /*0020*/                   HGMMA.64x32x16.F32 R24, gdesc[UR20], RZ, !UPT ;
        /*0030*/                   ISETP.GE.AND P0, PT, R2, 0x7, PT ;
        /*0040*/                   MEMBAR.ALL.GPU ;
        /*0050*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR22][R64.64], R67 ;
        /*0060*/                   FFMA R3, R2, R2, R3 ;
        /*0070*/              @!P0 BRA 0x20 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_sass_reading_finds_the_hot_loop_its_mix_and_fences():
    result = kernel_report.analyse_sass(kernel_report.parse_sass(SASS))
    assert result["loops"] == 1  # the trailing self-branch is padding, not a loop
    assert result["loop_instr"] == 6  # 0x20 .. 0x70
    assert result["mix"] == {"tensor": 1, "float": 1, "int": 1, "convert": 0, "memory": 1, "control": 2, "other": 0}
    assert result["fences_in_loops"] == ["MEMBAR.ALL.GPU"] and result["atomics_in_loops"] == 1
    relaxed = kernel_report.analyse_sass(kernel_report.parse_sass(SASS.replace("MEMBAR.ALL.GPU", "NOP")))
    assert relaxed["fences_in_loops"] == []


def test_ptx_atomics_by_semantics():
    ptx = "\t@%p1 atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;\n\tred.global.gpu.relaxed.add.f32 [%rd2], %f3;\n"
    assert kernel_report.ptx_atomics(ptx) == {"acq_rel": 1, "relaxed": 1}


@pytest.mark.parametrize("cfg,useful", [
    (kernel_report.Config("na", 7, 32, "fp16", side=9), 81 * 49),
    (kernel_report.Config("swin", 4, 32, "fp16", side=8), 64 * 16),  # no shift: every window whole
    (kernel_report.Config("swin", 4, 32, "fp16", shift=2, side=8), (16 + 4 + 4) ** 2),
    (kernel_report.Config("bra", 2, 32, "fp16", topk=3, side=8), 64 * 3 * 16),
])
def test_useful_scores(cfg, useful):
    # shifted 1-D frame of 8 with w=4, s=2: window 0 is whole (16 pairs), window 1 splits into regions 2 + 2
    assert kernel_report.useful_scores(cfg) == useful


CI_CHECK = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_report as kr
results = kr.report("quick", ["sm90"], count=False, cache_path=None, log=lambda m: None)
print(json.dumps(results))
"""


def test_dispatched_configurations_fit_spill_nothing_and_have_no_fence_in_a_loop():
    """Every kernel of a few dispatched configurations per family (the goal shape, the largest windows and head
    dims, the shapes the static review found broken), compiled for sm_90: shared memory within an H100 block,
    zero spill bytes, no GPU-scope fence inside a loop, and only relaxed atomics."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", CI_CHECK], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert {r["config"].split()[0] for r in results} == {"na", "swin", "bra"}
    for res in results:
        assert "error" not in res, res  # the quick shapes all have a Triton configuration
        kernels = res["archs"]["sm90"]["kernels"]
        assert len(kernels) >= 3, res["config"]  # forward, dQ, dK/dV at least
        for k in kernels:
            where = f"{res['config']} {k['kernel']}"
            assert k["shared"] <= kernel_report.ARCHS["sm90"].smem, f"{where}: {k['shared']} B of shared memory"
            assert k["spill_stores"] == k["spill_loads"] == 0, f"{where}: spills {k}"
            assert k["fences_in_loops"] == [], f"{where}: {k['fences_in_loops']} inside a loop"
            assert set(k["atomics"]) <= {"relaxed"}, f"{where}: atomics {k['atomics']}"
            assert k["loop_instr"] > 0 and k["mix"]["tensor"] > 0, f"{where}: no tensor-core hot loop found"
