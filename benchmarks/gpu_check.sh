#!/usr/bin/env bash
# One command on a GPU machine: bash benchmarks/gpu_check.sh
# Runs the GPU tests (pytest -m gpu), the kernel benchmarks (quick), and the model-zoo throughput of the smallest
# variant of each family, and writes everything under benchmarks/results/ (gpu_check_<device>.md, the summary,
# with device, driver, torch and triton versions; the benchmarks' own tables beside it). About 8 minutes on an
# H100/H200; each step has its own time limit, and a failing step is reported without stopping the others.
set -u
cd "$(dirname "$0")/.."
results=benchmarks/results
mkdir -p "$results"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: CUDA is not available here; nothing was run (the GPU tests skip on CPU: pytest -m gpu)"; exit 1; }

device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
log="$results/gpu_check_${device}.log"
summary="$results/gpu_check_${device}.md"
: > "$log"
smallest=$(python - <<'EOF'
import importlib, timm, vision
from vision.models import _FAMILIES
for family in _FAMILIES:
    names = timm.list_models(module=family)
    if names:
        published = importlib.import_module(f"vision.models.{family}").PUBLISHED_PARAMS
        print(min(names, key=lambda n: float(published[n].removesuffix("M"))))
EOF
)

{
  echo "# GPU check on ${device//_/ }"
  echo
  echo "\`bash benchmarks/gpu_check.sh\`, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  python - <<'EOF'
import subprocess, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip().splitlines()
print(f"- device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
print(f"- driver: {driver[0] if driver else 'unknown'}; CUDA (torch build): {torch.version.cuda}")
print(f"- torch {torch.__version__}; triton {triton_version}")
EOF
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---|---|"
} > "$summary"

step() {  # step <name> <time limit s> <output file or -> <command...>
  local name=$1 limit=$2 output=$3; shift 3
  local start=$SECONDS status
  echo "== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  case $? in 0) status=ok ;; 124) status="timed out (${limit} s)" ;; *) status=failed ;; esac
  echo "| $name | $status | $((SECONDS - start)) | $output |" >> "$summary"
  echo "== $name: $status" | tee -a "$log"
}

step "pytest -m gpu" 240 "$(basename "$log")" python -m pytest -m gpu -q -rA tests/pipeline/test_gpu.py
step "bench_window_kernels --quick" 50 "window_kernels_${device}.md" \
  python benchmarks/bench_window_kernels.py --quick --out "$results/window_kernels_${device}.md"
step "bench_bra --quick" 40 "bra_${device}.md" python benchmarks/bench_bra.py --quick --out "$results/bra_${device}.md"
# shellcheck disable=SC2086  # one pattern per model name
step "zoo --batch 64 (smallest per family)" 140 "zoo_${device}.md" \
  python -m vision.zoo --device cuda --batch 64 --repeats 5 --models $smallest --out "$results/zoo_${device}.md"

{
  echo
  echo "Test results (pytest -rA summary):"
  echo
  echo '```'
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$log" | head -80
  echo '```'
} >> "$summary"
cat "$summary"
! grep -qE "\| (failed|timed out)" "$summary"
