"""KernelBatcher: kernel-path work of many streams in few libnftables calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import Any

import pytest

from sbc.media.batcher import KernelBatcher
from sbc.media.kernel import KernelCounter, KernelForward, KernelPathUnavailable
from sbc.media.values import Endpoint


def forward(name: str, port: int = 5000) -> KernelForward:
    return KernelForward(
        f"media_{name}",
        Endpoint(IPv4Address("198.51.100.10"), port),
        Endpoint(IPv4Address("198.51.100.1"), 30000),
        Endpoint(IPv4Address("203.0.113.1"), 30002),
        Endpoint(IPv4Address("203.0.113.20"), 40000),
    )


class FakeTable:
    """Each call takes ``delay`` seconds on the caller's thread, as libnftables does;
    installs with a forward named ``media_bad*`` are refused."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.installed: dict[str, KernelForward] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail_counters = False
        self.thread: set[str] = set()

    def _call(self, kind: str, detail: Any) -> None:
        self.thread.add(threading.current_thread().name)
        self.calls.append((kind, detail))
        time.sleep(self.delay)

    def _check(self, forwards: Sequence[KernelForward]) -> None:
        bad = [f.name for f in forwards if f.name.startswith("media_bad")]
        if bad:
            raise KernelPathUnavailable(f"refused {bad}")

    def apply(self, remove: Sequence[str], install: Sequence[KernelForward]) -> None:
        self._call("apply", (tuple(remove), tuple(f.name for f in install)))
        self._check(install)
        for name in remove:
            self.installed.pop(name, None)
        self.installed.update((f.name, f) for f in install)

    def remove(self, names: Sequence[str]) -> None:
        self._call("remove", tuple(names))
        for name in names:
            self.installed.pop(name, None)

    def install(self, forwards: Sequence[KernelForward]) -> None:
        self._call("install", tuple(f.name for f in forwards))
        self._check(forwards)
        self.installed.update((f.name, f) for f in forwards)

    def counters(self) -> dict[str, KernelCounter]:
        self._call("counters", None)
        if self.fail_counters:
            raise KernelPathUnavailable("list counters failed")
        return {name: KernelCounter(len(name), 100 * len(name)) for name in self.installed}

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def with_batcher(table: FakeTable, scenario: Any) -> Any:
    """Run ``scenario(batcher)`` with the batcher's work on one thread of its own."""

    async def main() -> Any:
        with ThreadPoolExecutor(1, thread_name_prefix="nft") as executor:
            loop = asyncio.get_running_loop()

            async def run(call: Any, *args: Any) -> Any:
                return await loop.run_in_executor(executor, call, *args)

            batcher = KernelBatcher(table, run)
            result = await scenario(batcher)
            await batcher.drain()
            return result, batcher.rounds

    return asyncio.run(main())


def test_many_streams_at_once_take_one_transaction() -> None:
    table = FakeTable()

    async def scenario(batcher: KernelBatcher) -> None:
        await asyncio.gather(*(batcher.install([forward(f"s{n}")]) for n in range(50)))

    _, rounds = with_batcher(table, scenario)
    assert rounds == 1 and table.kinds() == ["apply"]
    assert len(table.installed) == 50
    assert table.thread == {"nft_0"}


def test_work_queued_during_a_round_goes_into_the_next_one() -> None:
    table = FakeTable(delay=0.05)

    async def scenario(batcher: KernelBatcher) -> None:
        first = asyncio.ensure_future(batcher.install([forward("first")]))
        await asyncio.sleep(0.01)  # the first round is on the thread now
        later = [batcher.install([forward(f"s{n}")]) for n in range(30)]
        await asyncio.gather(first, *later)

    _, rounds = with_batcher(table, scenario)
    assert rounds == 2 and table.kinds() == ["apply", "apply"]
    assert len(table.installed) == 31


def test_an_install_removed_later_in_the_round_is_never_made() -> None:
    table = FakeTable()

    async def scenario(batcher: KernelBatcher) -> None:
        # A stream latched, then its call ended before the round ran.
        await asyncio.gather(
            batcher.install([forward("s1")]),
            batcher.remove(["media_s1"]),
            batcher.install([forward("s2")]),
        )

    with_batcher(table, scenario)
    assert table.calls == [("apply", (("media_s1",), ("media_s2",)))]
    assert set(table.installed) == {"media_s2"}


def test_a_removal_then_an_install_of_the_same_name_is_a_relatch() -> None:
    table = FakeTable()
    table.installed["media_s1"] = forward("s1", 5000)

    async def scenario(batcher: KernelBatcher) -> None:
        await asyncio.gather(batcher.remove(["media_s1"]), batcher.install([forward("s1", 5002)]))

    with_batcher(table, scenario)
    assert table.kinds() == ["apply"]
    assert table.installed["media_s1"].source.port == 5002


def test_one_refused_stream_does_not_keep_the_others_out() -> None:
    table = FakeTable()
    table.installed["media_old"] = forward("old")

    async def scenario(batcher: KernelBatcher) -> list[object]:
        results = await asyncio.gather(
            batcher.install([forward("s1")]),
            batcher.install([forward("bad1"), forward("s2")]),
            batcher.install([forward("s3")]),
            batcher.remove(["media_old"]),
            return_exceptions=True,
        )
        return list(results)

    results, _ = with_batcher(table, scenario)
    assert results[0] is None and results[2] is None and results[3] is None
    assert isinstance(results[1], KernelPathUnavailable)
    # The transaction failed as a whole; then each part went on its own.
    assert table.kinds() == ["apply", "remove", "install", "install", "install"]
    assert set(table.installed) == {"media_s1", "media_s3"}


def test_counter_readers_share_one_listing_taken_before_the_removals() -> None:
    table = FakeTable()
    table.installed.update({"media_s1": forward("s1"), "media_s22": forward("s22")})

    async def scenario(batcher: KernelBatcher) -> tuple[Any, ...]:
        return tuple(
            await asyncio.gather(
                batcher.counters(),
                batcher.remove(["media_s22"], counters=True),
                batcher.counters(),
                batcher.remove(["media_s1"]),
            )
        )

    (first, removed, second, plain), rounds = with_batcher(table, scenario)
    assert rounds == 1 and table.kinds() == ["counters", "apply"]
    # The session being deleted gets its counter, read before its forward went.
    assert removed["media_s22"] == KernelCounter(9, 900)  # len("media_s22")
    assert first == second == removed and plain is None
    assert table.installed == {}


def test_a_failed_counter_read_fails_its_readers_only() -> None:
    table = FakeTable()
    table.installed["media_s1"] = forward("s1")
    table.fail_counters = True

    async def scenario(batcher: KernelBatcher) -> list[object]:
        results = await asyncio.gather(
            batcher.counters(),
            batcher.remove(["media_s1"], counters=True),
            batcher.install([forward("s2")]),
            return_exceptions=True,
        )
        return list(results)

    results, _ = with_batcher(table, scenario)
    assert isinstance(results[0], KernelPathUnavailable)
    assert isinstance(results[1], KernelPathUnavailable)  # no figures for its CDR
    assert results[2] is None
    assert set(table.installed) == {"media_s2"}  # the removal was made all the same


def test_a_crash_of_the_thread_reaches_every_waiter() -> None:
    table = FakeTable()

    def boom(*_: object) -> None:
        raise RuntimeError("thread gone")

    table.apply = boom  # type: ignore[method-assign,assignment]

    async def scenario(batcher: KernelBatcher) -> None:
        with pytest.raises(RuntimeError, match="thread gone"):
            await batcher.install([forward("s1")])
        # The batcher goes on with the next round.
        table.apply = FakeTable.apply.__get__(table)  # type: ignore[method-assign]
        await batcher.install([forward("s2")])

    with_batcher(table, scenario)
    assert set(table.installed) == {"media_s2"}
