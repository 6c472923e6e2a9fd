#!/usr/bin/env bash
# What to run on the GPU machine, from the repository root:  bash bench/gpu.sh
#
# Writes under $OUT (default bench/results/gpu-run): the machine and versions, the CUDA tests
# (tests/process/test_gpu_sync.py: sync-free forms and CUDA-graph capture/replay under
# torch.cuda.set_sync_debug_mode("error"), compiled stages on CUDA; plus the CPU row-map and
# compile tests), and the selection benchmark tables for CPU and CUDA (eager / compiled /
# graph replay, host and device times, kernels and syncs per call), then bench/interleaved.py. Needs torch with CUDA,
# numpy and pytest; typer/rich/safetensors are not needed for these steps.
set -u
OUT="${OUT:-bench/results/gpu-run}"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname), $(nproc) cores"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PY" -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/process/test_gpu_sync.py tests/unit/test_row_map.py tests/capability/test_compile.py 2>&1 | tee "$OUT/gpu_sync_tests.txt"
  test "${PIPESTATUS[0]}" -eq 0 || status=1
else
  echo "pytest is not installed: tests/process/test_gpu_sync.py was not run (install pytest from a wheel and rerun)" \
    | tee "$OUT/gpu_sync_tests.txt"
  status=1
fi

"$PY" -m bench.selection --device all 2>&1 | tee "$OUT/selection.md"
test "${PIPESTATUS[0]}" -eq 0 || status=1
# issue 16's eager / replay targets with both shapes and both cu forms in one interleaved loop (the VMs drift);
# BASELINE=DIR adds another checkout's eager call to the same loop
"$PY" -m bench.interleaved ${BASELINE:+--baseline "$BASELINE"} 2>&1 | tee "$OUT/interleaved.md"
test "${PIPESTATUS[0]}" -eq 0 || status=1
echo "bench/gpu.sh finished with status $status; results in $OUT"
exit "$status"
