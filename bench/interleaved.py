"""Issue 16's eager and graph-replay targets, with every shape and form timed in one interleaved loop.

    python -m bench.interleaved            # CUDA (graph replay needs it); CPU: eager only
    python -m bench.interleaved --baseline /tmp/old   # and another checkout's eager call, in the same loop

``bench/selection.py`` times one shape after the other, so a machine whose speed drifts during
the run (shared VMs: the same call measured 0.2 or 0.5 ms minutes apart) gives each shape a
different phase. Here the calls of both shapes and both ``cu_seqlens`` forms take turns in
blocks of about 10 ms (:func:`bench.modes.time_modes`), so a slow phase lands on all of them
alike. Each call is checked against the oracle first (:func:`bench.modes.verify_modes`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.before_after import load_baseline
from bench.modes import captured, cu_forms, time_modes, verify_modes
from bench.replay import ReplayGroup
from bench.selection import CONFIGS, QUICK_CONFIGS, build_case, machine
from cpinspect.core.selection import local_vision_row_map

TARGETS_MS = {"eager": 0.3, "baseline eager": 0.3, "graph replay": 0.05}  # host ms per call, issue 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing in all")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baseline", type=Path, help="root of another checkout: its eager call joins the loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = load_baseline(args.baseline) if args.baseline else None
    calls, labels = {}, {}
    for tokens, segments, cp in QUICK_CONFIGS if args.quick else CONFIGS:
        case = build_case(tokens, segments, cp, args.device)
        group, mask = ReplayGroup(0, case.gathered), case.masks[0]
        mine = {}
        for form, cu in cu_forms(case, args.device).items():
            def eager(cu: torch.Tensor = cu, group: ReplayGroup = group, mask: torch.Tensor = mask) -> torch.Tensor:
                return local_vision_row_map(mask, cu, cp_group=group).row_of_position

            mine[("eager", form)] = eager
            if old is not None:
                mine[("baseline eager", form)] = (lambda cu=cu, group=group, mask=mask:
                                                  old.local_vision_row_map(mask, cu, cp_group=group).row_of_position)
            if args.device == "cuda":
                mine[("graph replay", form)] = captured(eager)
        named = {f"{mode}, {form}": fn for (mode, form), fn in mine.items()}
        failed = verify_modes(case, named)
        if failed:
            raise SystemExit(f"{case.label}: {failed}")
        for (mode, form), fn in mine.items():
            calls[(case.label, mode, form)] = fn
            labels[(case.label, mode, form)] = f"{case.label} | {mode}{', ' + form if form else ''}"
    timed = time_modes(calls, args.device, args.budget)
    print(f"# bench/interleaved.py: rank 0's row map, all shapes and forms interleaved; {machine(args.device)}")
    print("| shape | mode | host ms / call | device ms / call | target host ms | met |")
    print("|---|---|---|---|---|---|")
    for key, (host, dev) in timed.items():
        target = TARGETS_MS[key[1]]
        if key[1] == "baseline eager":  # how much faster this checkout's eager call is, same loop
            host_now = timed[(key[0], "eager", key[2])][0]
            labels[key] += f" (this checkout {host / host_now:.2f}x faster)"
        dev_text = "" if dev is None else f"{dev * 1e3:.3f}"
        met = "yes" if host * 1e3 <= target else "no"
        print(f"| {labels[key]} | {host * 1e3:.3f} | {dev_text} | {target} | {met} |")


if __name__ == "__main__":
    main()
