#!/usr/bin/env bash
# The real run of issue 7 on two NVIDIA GPUs: examples/torchrun_capture.py under torchrun with NCCL
# (capture.record and verify on CUDA tensors, verify's cost measured), then `cpinspect analyze` on
# the capture, a clean job and one with a bug on rank 1, and the CUDA-only tests if pytest exists.
#
# Run from the repository root on a machine with >= 2 GPUs:
#     OUT=/path/for/results bash bench/nccl_capture.sh      # OUT defaults to bench/results
# Needs python3 with torch (CUDA build), typer, rich, safetensors and numpy. Everything it writes
# goes to $OUT/nccl_capture/; it prints the GPU model and the torch version first.
set -euo pipefail

PY="${PYTHON:-python3}"
BACKEND="${BACKEND:-nccl}"  # gloo only to rehearse this script on a machine without GPUs
OUT="${OUT:-bench/results}"
DEST="$OUT/nccl_capture"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$DEST"
mkdir -p "$DEST"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
    "$PY" - "$BACKEND" <<'EOF'
import platform
import sys

import torch

print("python:", platform.python_version())
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
print("torch:", torch.__version__, "| cuda:", torch.version.cuda, "| nccl:", nccl)
for index in range(torch.cuda.device_count()):
    print(f"gpu {index}:", torch.cuda.get_device_name(index))
if sys.argv[1] == "nccl" and torch.cuda.device_count() < 2:
    raise SystemExit("this benchmark needs two CUDA devices")
EOF
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} 2>&1 | tee "$DEST/environment.txt"

job() {  # job NAME [extra args]: one torchrun job, its log, and the analysis of its capture
    local name="$1"
    shift
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 examples/torchrun_capture.py \
        --out "$DEST/$name" --backend "$BACKEND" --steps 3 --repeats 200 "$@" 2>&1 | tee "$DEST/$name.log"
    set +e
    "$PY" -m cpinspect analyze "$DEST/$name" --no-color > "$DEST/$name.analyze.txt" 2>&1
    local code=$?
    "$PY" -m cpinspect analyze "$DEST/$name" --json > "$DEST/$name.analyze.json" 2>/dev/null
    set -e
    cat "$DEST/$name.analyze.txt"
    echo "cpinspect analyze $name: exit $code" | tee -a "$DEST/exit_codes.txt"
}

echo "== clean job: verify passes on every rank, analyze exits 0"
job clean
echo "== rank 1 rolls its rows at step 2: verify raises on both ranks together, analyze exits 1 and names it"
job bug --bug-step 2

if "$PY" -c "import pytest" 2>/dev/null; then
    echo "== CUDA and NCCL tests"
    set +e
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/capability/test_capture.py tests/capability/test_verify.py tests/process/test_torchrun.py \
        -k "cuda or nccl" 2>&1 | tee "$DEST/pytest_cuda.txt"
    set -e
else
    echo "pytest is not installed: CUDA tests skipped" | tee "$DEST/pytest_cuda.txt"
fi

echo "== summary"
"$PY" - "$DEST" <<'EOF' | tee "$DEST/summary.txt"
import json
import sys
from pathlib import Path

dest = Path(sys.argv[1])
run = json.loads((dest / "clean" / "run.json").read_text())
print(f"GPU: {run.get('gpu')} x {len(run.get('gpus', []))} | torch {run['torch']} | CUDA {run['cuda']} | NCCL {run.get('nccl')}")
for batch, cost in run["verify_cost"].items():
    print(f"{batch} batch: cp 2, {cost['segments']} segments, {cost['local_tokens']} local tokens per rank")
    for name in ("verify", "selection", "bare_all_gather"):
        timing = cost[name]
        print(f"  {name:>16}: median {timing['median_us']} us, p90 {timing['p90_us']} us ({timing['repeats']} calls)")
for name in ("clean", "bug"):
    outcomes = [json.loads((dest / name / f"verify-rank{r}.json").read_text()) for r in range(2)]
    said = [[("ok" if s["ok"] else "+".join(s["codes"])) for s in steps] for steps in outcomes]
    print(f"{name}: verify per step on rank 0 {said[0]}, rank 1 {said[1]}")
print((dest / "exit_codes.txt").read_text().strip())
EOF
