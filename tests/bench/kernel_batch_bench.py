"""How the kernel path's nftables work scales with the calls in it (needs root).

In a network namespace of its own, installs ``--forwards`` media forwards in
table inet sbc, then ends ``--calls`` calls (final counters, then removal) and
starts as many streams at once, through `KernelBatcher` (rounds), and after that
a few call ends one at a time (one counter listing and one removal each: what the
relay did before the batcher). Prints both, with the CPU they took.

    .venv/bin/python tests/bench/kernel_batch_bench.py --forwards 10000 --calls 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import Any

from sbc.media.batcher import KernelBatcher
from sbc.media.kernel import KernelForward, KernelMediaTable
from sbc.media.values import Endpoint

#: Call ends measured one at a time (each costs a full fetch of the table).
SERIAL_SAMPLE = 10


def forward(i: int) -> KernelForward:
    peer, port = divmod(i, 250)
    return KernelForward(
        f"media_s{i}_0_a",
        Endpoint(IPv4Address(f"198.51.100.{1 + port}"), 10000 + peer),
        Endpoint(IPv4Address("203.0.113.1"), 20000 + i % 30000),
        Endpoint(IPv4Address("203.0.113.2"), 20000 + i % 30000),
        Endpoint(IPv4Address("203.0.113.9"), 30000 + i % 30000),
    )


async def measure(table: KernelMediaTable, forwards: int, calls: int) -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="nft") as executor:
        loop = asyncio.get_running_loop()

        async def run(call: Any, *args: Any) -> Any:
            return await loop.run_in_executor(executor, call, *args)

        batcher = KernelBatcher(table, run)
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(
            *(batcher.remove([f"media_s{i}_0_a"], counters=True) for i in range(calls)),
            *(batcher.install([forward(forwards + i)]) for i in range(calls)),
        )
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        print(
            f"batched: {calls} call ends (counters, removal) and {calls} stream installs at"
            f" {forwards} forwards: {wall:.2f} s wall, {cpu:.2f} s CPU, {batcher.rounds} round(s)"
        )
        wall = time.monotonic()
        for i in range(calls, calls + SERIAL_SAMPLE):
            await run(table.counters)
            await run(table.remove, [f"media_s{i}_0_a"])
        each = (time.monotonic() - wall) / SERIAL_SAMPLE
        print(
            f"one at a time: {1000 * each:.0f} ms per call end,"
            f" so {calls} call ends alone take ~{each * calls:.0f} s"
        )


def inside(forwards: int, calls: int) -> None:
    table = KernelMediaTable()
    table.open()
    try:
        started = time.monotonic()
        for first in range(0, forwards, 1000):
            table.install([forward(i) for i in range(first, min(forwards, first + 1000))])
        print(f"{forwards} forwards installed in {time.monotonic() - started:.1f} s")
        asyncio.run(measure(table, forwards, calls))
    finally:
        table.teardown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.forwards, args.calls)
        return 0
    if os.geteuid() != 0:
        print("needs root (a network namespace and nftables)", file=sys.stderr)
        return 2
    namespace = f"sbc-kbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        command = [sys.executable, __file__, "--inside", f"--forwards={args.forwards}"]
        command.append(f"--calls={args.calls}")
        return subprocess.run(["ip", "netns", "exec", namespace, *command], timeout=600).returncode
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    sys.exit(main())
