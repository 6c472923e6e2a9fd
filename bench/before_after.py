"""The row map of another checkout next to this one's, in one run: time and operators per call.

    git archive <commit> | tar -x -C /tmp/old
    python -m bench.before_after --baseline /tmp/old

The baseline's ``cpinspect/core/selection.py`` and ``selection_plan.py`` are loaded as separate
modules (the selection's other imports resolve to this checkout, so only the two differ). Both go
through the same replay group on rank 0 and are checked against the oracle first; the calls take
turns in blocks. On CUDA both ``cu_seqlens`` forms are timed: int32 pinned on the host and int32
on the device, as ``bench/selection.py`` does.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.kernels import count_per_call
from bench.modes import cu_forms, time_modes
from bench.replay import ReplayGroup
from bench.selection import CONFIGS, QUICK_CONFIGS, build_case, machine
from cpinspect.core import selection


def load_baseline(root: Path) -> ModuleType:
    """The baseline's selection module, importing the baseline's ``selection_plan`` (when it has one)."""
    plan_name, current_plan = "cpinspect.core.selection_plan", sys.modules.get("cpinspect.core.selection_plan")
    if (root / "cpinspect/core/selection_plan.py").exists():
        sys.modules[plan_name] = _load(root / "cpinspect/core/selection_plan.py", "baseline_selection_plan")
    try:
        return _load(root / "cpinspect/core/selection.py", "baseline_selection")
    finally:
        if current_plan is not None:
            sys.modules[plan_name] = current_plan


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.exists():
        raise SystemExit(f"no {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row_map_call(module: ModuleType, mask: torch.Tensor, cu: torch.Tensor, group: ReplayGroup) -> Callable[[], Any]:
    return lambda: module.local_vision_row_map(mask, cu, cp_group=group).row_of_position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="root of the other checkout")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = load_baseline(args.baseline)
    print(f"# bench/before_after.py: local_vision_row_map(...).row_of_position, rank 0; {machine(args.device)}")
    print("| shape | version | ms / call | ops / call | speed-up |")
    print("|---|---|---|---|---|")
    for tokens, segments, cp in QUICK_CONFIGS if args.quick else CONFIGS:
        case = build_case(tokens, segments, cp, args.device)
        group = ReplayGroup(0, case.gathered, check_inputs=True)
        mask = case.masks[0]
        calls = {}
        for name, cu in cu_forms(case, args.device).items():
            form = f", {name}" if name else ""
            calls["before" + form] = _row_map_call(old, mask, cu, group)
            calls["after" + form] = _row_map_call(selection, mask, cu, group)
        for name, fn in calls.items():
            if not torch.equal(fn().cpu()[mask.cpu()], case.expected[0]):
                raise AssertionError(f"{name} differs from the oracle on {case.label}")
        group.check_inputs = False
        timed = time_modes(calls, args.device, args.budget)
        for name, fn in calls.items():
            ops, kernels, _ = count_per_call(fn, args.device)
            ops_text = f"{ops:g}" if kernels is None else f"{ops:g} ops, {kernels:g} kernels"
            ratio = timed[name.replace("after", "before")][0] / timed[name][0]
            print(f"| {case.label} | {name} | {timed[name][0] * 1e3:.3f} | {ops_text} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
