"""Kernel-path work of many streams in one libnftables call per round.

Every libnftables call first fetches what it touches into its cache: a removal
or a counter listing costs O(forwards in the kernel), about 10 ms and 0.2 s at
10,000 forwards (5,000 audio calls) on the development machine (0.1 s and 0.5 s
when each forward had its own chains and counter). One call per stream set-up,
call end and counter read made the relay's nftables thread the ceiling of the
kernel path: a few call ends a second at a few thousand calls.

`KernelBatcher` queues that work and runs it in rounds, one at a time on the
relay's nftables thread. A round takes everything queued since the last one:

1. when someone asked for counters (a session ending, stats, the poll), every
   media counter is listed once, before anything is removed (a removed forward's
   counter is gone);
2. the removals, then the installs, in one transaction. An install whose forwards
   a later request of the same round removes is not made. When the transaction
   fails, the removals are tried alone and each install on its own, so one stream
   the kernel refuses does not keep the others in user space.

Work queued while a round runs goes into the next one; so at any size the
thread makes a bounded number of calls per second, however many streams start
and end in it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sbc.media.kernel import KernelCounter, KernelForward, KernelPathUnavailable

#: Runs a blocking call on the relay's nftables thread.
Runner = Callable[..., Awaitable[Any]]


class KernelTable(Protocol):
    """What `KernelBatcher` needs of `sbc.media.kernel.KernelMediaTable`."""

    def apply(self, remove: Sequence[str], install: Sequence[KernelForward]) -> None: ...

    def remove(self, names: Sequence[str]) -> None: ...

    def install(self, forwards: Sequence[KernelForward]) -> None: ...

    def counters(self) -> dict[str, KernelCounter]: ...


@dataclass
class _Request:
    seq: int
    future: asyncio.Future[Any]
    install: Sequence[KernelForward] = ()
    remove: Sequence[str] = ()
    read: bool = False


@dataclass
class _Outcome:
    """What the nftables thread reports for one round."""

    counters: dict[str, KernelCounter] | Exception | None = None
    removal: Exception | None = None
    installs: dict[int, Exception | None] = field(default_factory=dict)


class KernelBatcher:
    """Install, remove and counter reads of the kernel path, batched in rounds."""

    def __init__(self, table: KernelTable, run: Runner) -> None:
        self._table = table
        self._run = run
        self._queue: list[_Request] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        #: Rounds and libnftables transactions made (for tests and metrics).
        self.rounds = 0

    async def install(self, forwards: Sequence[KernelForward]) -> None:
        """Add ``forwards`` (one stream's, all or nothing); KernelPathUnavailable
        when the kernel refuses them."""
        await self._submit(install=tuple(forwards))

    async def remove(self, names: Sequence[str], *, counters: bool = False) -> Any:
        """Delete the named forwards; with ``counters``, return every media counter as
        it was just before (the removed ones included)."""
        return await self._submit(remove=tuple(names), read=counters)

    async def counters(self) -> dict[str, KernelCounter]:
        """Every media counter, read in the next round."""
        result: dict[str, KernelCounter] = await self._submit(read=True)
        return result

    async def drain(self) -> None:
        """Wait until everything queued so far is done."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _submit(self, **request: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(next(self._seq), future, **request))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rounds(), name="sbc-media-nft-rounds")
        return await future

    async def _rounds(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            await self._round(batch)

    async def _round(self, batch: list[_Request]) -> None:
        self.rounds += 1
        read = any(r.read for r in batch)
        removes = [r for r in batch if r.remove]
        # An install a later request of this round removes again is not made.
        last_removal = {name: r.seq for r in removes for name in r.remove}
        installs: list[_Request] = []
        for request in batch:
            if request.install and not any(
                last_removal.get(f.name, -1) > request.seq for f in request.install
            ):
                installs.append(request)
            elif request.install:
                request.future.set_result(None)
        names = list(dict.fromkeys(n for r in removes for n in r.remove))
        groups = {r.seq: r.install for r in installs}
        try:
            outcome: _Outcome = await self._run(_work, self._table, read, names, groups)
        except Exception as exc:  # the thread itself failed: everyone hears of it
            outcome = _Outcome(exc, exc, dict.fromkeys(groups, exc))
        for request in batch:
            if request.future.done():
                continue
            error: Exception | None = None
            if request.install:
                error = outcome.installs.get(request.seq)
            elif request.remove:
                error = outcome.removal
            if error is None and request.read and isinstance(outcome.counters, Exception):
                error = outcome.counters
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(outcome.counters if request.read else None)


def _work(
    table: KernelTable,
    read: bool,
    names: list[str],
    groups: dict[int, Sequence[KernelForward]],
) -> _Outcome:
    """One round, on the nftables thread."""
    outcome = _Outcome()
    if read:
        try:
            outcome.counters = table.counters()
        except KernelPathUnavailable as exc:
            outcome.counters = exc
    if not names and not groups:
        return outcome
    try:
        table.apply(names, [f for group in groups.values() for f in group])
        outcome.installs = dict.fromkeys(groups)
        return outcome
    except KernelPathUnavailable:
        pass
    # Something in the transaction was refused: each part on its own.
    if names:
        try:
            table.remove(names)
        except KernelPathUnavailable as exc:
            outcome.removal = exc
    for seq, group in groups.items():
        try:
            table.install(group)
            outcome.installs[seq] = None
        except KernelPathUnavailable as exc:
            outcome.installs[seq] = exc
    return outcome
