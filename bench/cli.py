"""Wall time and peak memory of the CLI against bare torch, as ratios measured side by side.

    python -m bench.cli              # 3 rounds (a few minutes on 2 cores)
    python -m bench.cli --rounds 5
    python -m bench.cli --baseline /path/to/older/checkout   # also time its simulate, interleaved

Every command runs as its own process (the way a user runs it; ``python -m cpinspect`` is what
the ``cpinspect`` script runs), in round-robin order so that other load on the machine lands on
all of them alike. Each ratio divides the fastest run of one command by the fastest run of the
other (noise only ever adds time); medians are shown too. Peak memory is the child's maximum
resident set, from ``wait4``. Batches are generated into a temporary directory: 1,048,576
tokens in 1,024 segments and 4,194,304 tokens in 4,096 segments, ~40% vision, every segment a
multiple of 128 so that cp 64 divides it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Command:
    """One command line and what its runs measured."""

    label: str
    argv: list[str]
    cwd: Path = ROOT
    seconds: list[float] = field(default_factory=list)
    peak_kb: list[int] = field(default_factory=list)
    stdout_bytes: int = 0
    exit_code: int = 0

    def run(self, scratch: Path) -> None:
        out_path, err_path = scratch / "stdout", scratch / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            self.seconds.append(time.perf_counter() - start)
        proc.returncode = self.exit_code = os.waitstatus_to_exitcode(status)
        self.peak_kb.append(usage.ru_maxrss)
        self.stdout_bytes = out_path.stat().st_size
        if self.exit_code not in (0, 1):
            raise RuntimeError(f"{self.label} exited {self.exit_code}: {err_path.read_text()[-2000:]}")

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_mb(self) -> float:
        return max(self.peak_kb) / 1024


def make_batches(directory: Path) -> tuple[Path, Path]:
    """The 1M- and 4M-token batch files, written by a child process (seeded).

    The parent never imports torch: a forked child's peak resident set starts from the parent's
    size before ``exec``, so a heavy parent would inflate every measured peak.
    """
    one, four = directory / "batch_1m.pt", directory / "batch_4m.pt"
    code = ("import torch; from bench.batches import packed_batch; "
            f"torch.save(packed_batch(1 << 20, 1024, multiple=128, seed=1), {str(one)!r}); "
            f"torch.save(packed_batch(1 << 22, 4096, multiple=128, seed=4), {str(four)!r})")
    subprocess.run([PY, "-c", code], cwd=ROOT, check=True)
    return one, four


SIMULATIONS = (  # (label, batch, cp, extra options)
    ("simulate 1M cp 16", "1M", 16, ()),
    ("simulate 1M cp 8", "1M", 8, ()),
    ("simulate 1M cp 64", "1M", 64, ()),
    ("simulate 4M cp 16", "4M", 16, ()),
    ("simulate 1M cp 16 --json", "1M", 16, ("--json",)),
    ("simulate 4M cp 64 --json", "4M", 64, ("--json",)),
)


def commands(one: Path, four: Path, baseline: Path | None) -> dict[str, Command]:
    """Every command of the run; with ``baseline``, each simulation once more from that checkout."""
    batches = {"1M": one, "4M": four}
    table = [
        Command("import torch", [PY, "-c", "import torch"]),
        Command("cpinspect --help", [PY, "-m", "cpinspect", "--help"]),
        Command("torch.load 1M", [PY, "-c", f"import torch; torch.load({str(one)!r})"]),
    ]
    for label, batch, cp, extra in SIMULATIONS:
        argv = [PY, "-m", "cpinspect", "simulate", "--cp", str(cp), str(batches[batch]), "--no-color", *extra]
        table.append(Command(label, argv))
        if baseline is not None:
            table.append(Command(f"{label} (baseline)", argv, cwd=baseline))
    return {c.label: c for c in table}


RATIOS = (  # (what, numerator, denominator, target, kind)
    ("--help vs import torch", "cpinspect --help", "import torch", 0.25, "time"),
    ("simulate 1M cp 16 vs torch.load", "simulate 1M cp 16", "torch.load 1M", 2.5, "time"),
    ("simulate cp 64 vs cp 8 (1M)", "simulate 1M cp 64", "simulate 1M cp 8", 2.0, "time"),
    ("simulate 4M vs 1M (cp 16)", "simulate 4M cp 16", "simulate 1M cp 16", 4.5, "time"),
    ("peak memory: simulate 1M cp 16 vs torch.load", "simulate 1M cp 16", "torch.load 1M", 3.0, "memory"),
)


def report(cmds: dict[str, Command]) -> bool:
    """Print the per-command table and the ratio table; True when every target is met."""
    print("| command | best s | median s | peak MB | stdout bytes |")
    print("|---|---|---|---|---|")
    for c in cmds.values():
        print(f"| `{c.label}` | {c.best:.2f} | {c.median:.2f} | {c.peak_mb:.0f} | {c.stdout_bytes:,} |")
    print("\n| ratio | best | median | target | met |")
    print("|---|---|---|---|---|")
    met_all = True
    for what, num, den, target, kind in RATIOS:
        if kind == "time":
            best, median = cmds[num].best / cmds[den].best, cmds[num].median / cmds[den].median
        else:
            best = median = cmds[num].peak_mb / cmds[den].peak_mb
        met = best <= target
        met_all &= met
        print(f"| {what} | {best:.2f} | {median:.2f} | <= {target:g} | {'yes' if met else 'NO'} |")
    compared = [(c, cmds[f"{c.label} (baseline)"]) for c in cmds.values() if f"{c.label} (baseline)" in cmds]
    if compared:
        print("\n| simulate | baseline best s | now best s | speed-up | baseline peak MB | now peak MB |")
        print("|---|---|---|---|---|---|")
        for now, before in compared:
            print(f"| `{now.label}` | {before.best:.2f} | {now.best:.2f} | {before.best / now.best:.2f}x | "
                  f"{before.peak_mb:.0f} | {now.peak_mb:.0f} |")
    return met_all


def machine() -> str:
    torch_version = subprocess.run([PY, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True, check=True).stdout.strip()
    return (f"{platform.node()}: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
            f"torch {torch_version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every command, round-robin")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout whose simulate commands run alongside (before/after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpinspect-bench-") as tmp:
        scratch = Path(tmp)
        cmds = commands(*make_batches(scratch), args.baseline)
        for _ in range(args.rounds):
            for command in cmds.values():
                command.run(scratch)
    print("# bench/cli.py: CLI wall time and peak memory vs bare torch")
    print(f"{machine()}; {args.rounds} round(s), round-robin; ratios from the best run of each command")
    if args.baseline is not None:
        print(f"baseline: the same simulate commands run from {args.baseline}")
    print()
    ok = report(cmds)
    print(f"\nall targets {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
