"""A/B of two trees of the SBC on one call-rate step, alternately, in one session.

    .venv/bin/python tests/bench/b2bua_ab.py --old /tmp/ab-old --rate 300 --rounds 4

``--old`` is a checkout of the tree to compare with (``git worktree add /tmp/ab-old
REV``); the new tree is this one. Each round runs one step of `b2bua_bench` (SIPp
INVITE/180/200/ACK/BYE at ``--rate`` calls/s for ``--seconds``, the SBC pinned to
one CPU, a fresh SBC each step) on the old tree, then on the new, the order swapped
every other round (the machine drifts); ``python -m sbc`` runs with the tree as its
working directory, so each runs its own code on this venv. It prints each step's
calls, failures and CPU per call, then the medians and their ratio (new / old).
``--profile DIR`` runs each SBC under cProfile into DIR (the CPU figures then
include the profiler's). ``--new-workers N`` runs the new tree with ``media.workers:
N`` (pinned to the same CPU, the workers' CPU counted): with ``--old .`` it compares
the in-process relay with the workers on one tree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import b2bua_bench as bench


class TreeSbc(bench.Sbc):
    """The bench's SBC, run from another tree's sources (``python -m sbc``)."""

    def __init__(
        self, run: bench.Bench, tree: Path, profile: Path | None, workers: int = 0
    ) -> None:
        super().__init__(run, media_section=True, media_workers=workers)
        self.tree = tree
        self.profile = profile

    def start(self, callee_port: int, tag: str) -> bench.Target:
        path, target = self.write_config(callee_port, tag)
        python = str(bench.VENV_BIN / "python")
        args = [python, "-m", "sbc", "run", "--config", str(path)]
        if self.profile is not None:
            output = self.profile / f"{self.tree.name}-{tag}-{time.strftime('%H%M%S')}.prof"
            args = [python, "-m", "cProfile", "-o", str(output), *args[1:]]
        self._spawn(args, tag, nofile=bench.SBC_NOFILE, cwd=self.tree)
        bench.wait_until(self._healthy, 30.0, "sbc")
        return target


def one_step(
    tree: Path, rate: int, seconds: float, profile: Path | None, workers: int = 0
) -> bench.Step:
    plan = bench.Plan(seconds, 100, 3200, 1, 3200, 1000, 200, 3.0, 100)
    workdir = bench.BUILD / time.strftime(f"ab-%Y%m%d-%H%M%S-{tree.name}")
    workdir.mkdir(parents=True)
    run = bench.Bench(plan, bench.Pinning.choose(1, 0), workdir)
    try:
        return run.step(TreeSbc(run, tree, profile, workers), bench.Kind.CALLS, rate)
    finally:
        run.processes.stop_all()


def _median(values: list[float]) -> float:
    """The median of the steps whose CPU was read (one that was not is NaN)."""
    read = [value for value in values if math.isfinite(value)]
    return statistics.median(read) if read else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the other tree")
    parser.add_argument("--rate", type=int, default=300, help="calls/s (default 300)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile", type=Path, help="cProfile each SBC into this folder")
    parser.add_argument("--new-workers", type=int, default=0, help="media.workers of the new tree")
    args = parser.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": bench.ROOT}
    if not (trees["old"] / "sbc" / "__main__.py").is_file():
        parser.error(f"{args.old}: not a tree of the SBC")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(args.rounds):
        order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
        for name in order:
            workers = args.new_workers if name == "new" else 0
            step = one_step(trees[name], args.rate, args.seconds, args.profile, workers)
            cpu[name].append(step.sut_cpu_ms_per_call)
            print(
                f"{name} round {round_ + 1}: {step.successful} ok, {step.failed} failed,"
                f" {step.sut_cpu_ms_per_call:.3f} ms CPU a call",
                flush=True,
            )
    old, new = (_median(cpu[name]) for name in ("old", "new"))
    print(f"medians: old {old:.3f} ms, new {new:.3f} ms a call: new/old {new / old:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
