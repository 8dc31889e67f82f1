"""The running firewall's kernel work, off the event loop, in rounds.

Every libnftables call fetches what it touches into its cache first, so its
cost grows with the table: 25-90 ms a ban or pinhole change at 10,000 media
forwards when each forward had chains of its own, ~1 ms since (sets and maps),
and more again with a blacklist of many thousand sources. None of it belongs on
the event loop: bans and media pinholes go to one thread of their own, and what
waits when a round starts goes in it: the bans of all waiting decisions in one
transaction, then the pinhole changes of all waiting media sessions in another.

A ban must hold from the moment it is decided, not from the moment the kernel
has it: until its round is done the source is `banning`, and the SBC drops what
that source sends in userspace and holds the answer that earned the ban (see
`SbcNode._execute`).

Pinholes are reconciled, not replayed: the sessions say which ports they hold,
each round brings the kernel's set from what it is known to have to what they
hold, and a round that fails leaves the kernel's side as it was, so a later
round (the next change, or a retry a few seconds on) does it again.

Bans the kernel refused are carried by the rounds after the same way, for as
long as they run and stay in the blacklist (an operator may lift one meanwhile);
their sources stay `banning` until then, so the SBC goes on dropping them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sbc.burst import BurstLog
from sbc.firewall.bans import Ban, BanTarget, IPAddress, ban_target
from sbc.firewall.firewall import Firewall, pinhole_commands
from sbc.firewall.nft import NftError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds after a failed pinhole change or ban before a round tries it again
#: (while nothing else starts one).
RETRY = 5.0

#: While the kernel keeps refusing, one log line per kind of failure in this many
#: seconds (with the count of those not logged).
FAILURE_LOG_INTERVAL = 60.0


@dataclass
class _Waiting:
    bans: list[Ban] = field(default_factory=list)
    #: Pinholes to close, then to open: filled when the round starts.
    closing: set[int] = field(default_factory=set)
    opening: set[int] = field(default_factory=set)
    done: list[asyncio.Future[None]] = field(default_factory=list)


class FirewallRounds:
    """Bans and pinholes of one `Firewall`, applied on a worker thread.

    `firewall` is None while the SBC runs without one (nothing to do then).
    Other kernel work of the firewall while it runs (a reload) goes through
    `exclusive`, on the same thread, so it never interleaves with a round.
    """

    def __init__(self) -> None:
        self.firewall: Firewall | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sbc-nft")
        self._waiting = _Waiting()
        self._task: asyncio.Task[None] | None = None
        #: Targets decided but not yet in the kernel, with how many rounds carry them.
        self._banning: dict[BanTarget, int] = {}
        #: Media ports held open -> how many sessions hold them.
        self._holders: dict[int, int] = {}
        #: Sessions -> the ports they hold.
        self._held: dict[str, frozenset[int]] = {}
        #: The ports the kernel's pinhole set is known to have.
        self._open: set[int] = set()
        #: Bans the kernel refused, for the next round (still counted in `_banning`).
        self._refused: list[Ban] = []
        self._retry: asyncio.TimerHandle | None = None
        #: Used on the rounds' thread only.
        self._ban_failures = BurstLog(FAILURE_LOG_INTERVAL)
        self._pinhole_failures = BurstLog(FAILURE_LOG_INTERVAL)
        self._closed = False
        self.rounds = 0

    # --- callers ---------------------------------------------------------------

    def ban(self, bans: Iterable[Ban]) -> asyncio.Future[None]:
        """Queue bans for the kernel; done when their round is (failed or not)."""
        bans = list(bans)
        done = self._queue()
        self._waiting.bans += bans
        for ban in bans:
            self._banning[ban.target] = self._banning.get(ban.target, 0) + 1
        return done

    async def hold(self, holder: str, ports: Iterable[int]) -> None:
        """`holder` (a media session) needs exactly `ports` open now: the new ones
        open, those it no longer has close. Returns when their round is done.

        A pinhole is a port number, and the relay's addresses (one per realm)
        each have their own ports: two sessions can hold one number at once. A
        port is open while anybody holds it.

        With no firewall nothing is noted: a firewall started later asks the relay
        for what its live sessions hold (`restart`)."""
        if self.firewall is not None and self._note(holder, ports):
            await self._queue()

    async def release(self, holder: str) -> None:
        """`holder` ended: close the ports nobody else holds."""
        await self.hold(holder, ())

    def restart(self, holds: Mapping[str, Iterable[int]]) -> None:
        """A new firewall, its pinhole set empty: the holds are `holds` (the live
        media sessions' ports), opened by a round queued here when any."""
        self.forget()
        for holder, ports in holds.items():
            self._note(holder, ports)
        if self._holders and self.firewall is not None:
            self._queue()

    def forget(self) -> None:
        """No firewall any more: nothing is held, nothing is open, no refused ban
        waits (a new firewall restores the bans from its state file)."""
        self._holders.clear()
        self._held.clear()
        self._open.clear()
        for ban in self._refused:
            self._done_banning(ban)
        self._refused.clear()

    def _note(self, holder: str, ports: Iterable[int]) -> bool:
        """Record `holder`'s ports; True when the set of held ports changed."""
        before = self._held.pop(holder, frozenset())
        after = frozenset(ports)
        if after:
            self._held[holder] = after
        changed = False
        holders = self._holders
        for port in after - before:
            count = holders.get(port, 0)
            holders[port] = count + 1
            changed |= not count
        for port in before - after:
            count = holders.pop(port, 1) - 1
            if count > 0:
                holders[port] = count
            else:
                changed = True
        return changed

    @property
    def pinholes(self) -> frozenset[int]:
        """The ports the kernel's pinhole set is known to have."""
        return frozenset(self._open)

    async def exclusive(self, work: Callable[..., T], *args: Any) -> T:
        """Run blocking kernel work on the rounds' thread, between rounds (on
        another thread once `close` stopped it: no round runs then)."""
        loop = asyncio.get_running_loop()
        if self._closed:
            return await loop.run_in_executor(None, work, *args)
        return await loop.run_in_executor(self._thread, work, *args)

    def banning(self, address: IPAddress) -> bool:
        """True while a ban covering `address` is on its way to the kernel."""
        if not self._banning:
            return False
        prefix = 64 if self.firewall is None else self.firewall.config.ipv6_prefix_length
        return ban_target(address, prefix) in self._banning

    @property
    def banning_any(self) -> bool:
        """True while any ban is on its way (the cheap test before `banning`)."""
        return bool(self._banning)

    @property
    def idle(self) -> bool:
        return self._task is None or self._task.done()

    def close(self) -> None:
        """Wait for the round in progress on the thread, then stop the thread."""
        if self._retry is not None:
            self._retry.cancel()
        self._closed = True
        self._thread.shutdown(wait=True)

    # --- rounds ----------------------------------------------------------------

    def _refused_bans(self) -> list[Ban]:
        """The refused bans to try again: those still running and still in the
        blacklist as they were. The others stop being `banning`."""
        refused, self._refused = self._refused, []
        firewall = self.firewall
        again: list[Ban] = []
        now = 0.0 if firewall is None else firewall.clock()
        for ban in refused:
            if firewall is not None and ban.remaining(now) > 0 and firewall.blacklist.has(ban):
                again.append(ban)
            else:
                self._done_banning(ban)
        return again

    def _done_banning(self, ban: Ban) -> None:
        left = self._banning.pop(ban.target, 1) - 1
        if left > 0:
            self._banning[ban.target] = left

    def _queue(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.done.append(done)
        if self.idle:
            self._task = loop.create_task(self._run(), name="sbc-nft-rounds")
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting.done:
            batch, self._waiting = self._waiting, _Waiting()
            if self._refused:
                batch.bans[:0] = self._refused_bans()
            # Rounds run one after the other: what the last one did is known here.
            wanted = self._holders.keys()
            batch.closing = self._open - wanted
            batch.opening = wanted - self._open
            bans_done = pinholes_done = False
            try:
                bans_done, pinholes_done = await loop.run_in_executor(
                    self._thread, self._apply, self.firewall, batch
                )
            except RuntimeError as exc:  # the thread is stopping
                log.warning("x firewall round not run: %s", exc)
            finally:
                self.rounds += 1
                if pinholes_done:
                    self._open -= batch.closing
                    self._open |= batch.opening
                elif batch.closing or batch.opening:
                    self._retry_later(loop)
                if bans_done or self.firewall is None or self._closed:
                    for ban in batch.bans:
                        self._done_banning(ban)
                elif batch.bans:
                    self._refused += batch.bans
                    self._retry_later(loop)
                for done in batch.done:
                    if not done.done():
                        done.set_result(None)

    def _retry_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry is None:
            self._retry = loop.call_later(RETRY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.firewall is not None and (self._refused or self._open != self._holders.keys()):
            self._queue()

    def _apply(self, firewall: Firewall | None, batch: _Waiting) -> tuple[bool, bool]:
        """On the thread: the round's two transactions, failures logged. Whether
        the bans are done (in the kernel, or only in the state file when the
        table is not installed: the next start restores them), and whether the
        pinhole set is as the round wanted it."""
        if firewall is None:
            return False, False
        bans_done = True
        if batch.bans:
            try:
                firewall.apply_bans(batch.bans)
            except NftError as exc:
                bans_done = False
                quiet = self._ban_failures.hit(time.monotonic())
                if quiet is not None:
                    log.error(
                        "x firewall: %d bans not in the kernel, retried in %.0f s: %s%s",
                        len(batch.bans),
                        RETRY,
                        exc,
                        _not_logged(quiet),
                    )
        text = pinhole_commands([(False, batch.closing), (True, batch.opening)])
        if text:
            try:
                firewall.kernel.run(text)
            except NftError as exc:
                quiet = self._pinhole_failures.hit(time.monotonic())
                if quiet is not None:
                    log.warning(
                        "x firewall pinholes not changed (%d ports), retried in %.0f s: %s%s",
                        len(batch.closing) + len(batch.opening),
                        RETRY,
                        exc,
                        _not_logged(quiet),
                    )
                return bans_done, False
        return bans_done, True


def _not_logged(quiet: int) -> str:
    return f" ({quiet} more failures since the last line)" if quiet else ""
