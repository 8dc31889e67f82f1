"""The blacklist: kernel sets `blacklist_v4`/`blacklist_v6` plus the state file.

Used by the running firewall (detector decisions) and by the `sbc ban` commands in
another process: both go through the file's lock, and the kernel element (with its
timeout) is what actually drops packets. When the table is not installed (the SBC is
stopped) a ban lands in the file only, and the next start restores it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from sbc.firewall.bans import Ban, BanTarget, BlacklistStore, StoreState, ban_target
from sbc.firewall.config import BanPolicy, FirewallConfig
from sbc.firewall.nft import Kernel, NftError
from sbc.firewall.ruleset import (
    SET_BLACKLIST_V4,
    SET_BLACKLIST_V6,
    TABLE,
    render_bans,
)

log = logging.getLogger(__name__)


class TrustedTargetError(ValueError):
    """A ban that would cover a trusted network: refused."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class BanListing:
    """A ban as seen now: `in_kernel` is False when only the file holds it."""

    ban: Ban
    in_kernel: bool


class Blacklist:
    """Add, remove and list bans in the kernel and the state file together."""

    def __init__(
        self,
        kernel: Kernel | None,
        store: BlacklistStore,
        policy: BanPolicy,
        *,
        trusted: Iterable[IPv4Network | IPv6Network] = (),
        ipv6_prefix_length: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kernel = kernel
        self.store = store
        self.policy = policy
        self.trusted = tuple(trusted)
        self.ipv6_prefix_length = ipv6_prefix_length
        self.clock = clock
        #: With `deferred`, `add` bans in the kernel at once but persists on `flush()`:
        #: under attack a running SBC must not fsync a file per ban. The CLI writes
        #: through (deferred False).
        self.deferred = False
        self._cache: StoreState | None = None
        self._pending: list[Ban] = []

    @classmethod
    def from_config(
        cls,
        config: FirewallConfig,
        kernel: Kernel | None,
        *,
        trusted: Iterable[IPv4Network | IPv6Network] = (),
        clock: Callable[[], float] = time.time,
    ) -> Blacklist:
        """The blacklist that ``firewall:`` describes: its state file, ban policy, IPv6
        prefix length and trusted networks, plus `trusted`.

        The running firewall and `sbc ban` both build theirs here, so an operator's
        command applies the same policy as the SBC's detectors.
        """
        if config.state_file is None:
            # The full configuration fills it in (state_dir/firewall-blacklist.json).
            raise ValueError("firewall.state_file is not set")
        return cls(
            kernel,
            BlacklistStore(config.state_file),
            config.bans,
            trusted=(*config.trusted, *trusted),
            ipv6_prefix_length=config.ipv6_prefix_length,
            clock=clock,
        )

    def target(self, text: str) -> BanTarget:
        return ban_target(text, self.ipv6_prefix_length)

    def is_trusted(self, target: BanTarget) -> bool:
        return any(target.version == n.version and target.overlaps(n) for n in self.trusted)

    def _kernel_add(self, ban: Ban, now: float) -> bool:
        if self.kernel is None:
            return False
        try:
            self.kernel.run(ban_commands([ban], now))
        except NftError as exc:
            if is_table_missing(exc):
                return False  # table not installed: the file keeps the ban
            raise
        return True

    def _kernel_has(self, target: BanTarget) -> bool:
        assert self.kernel is not None
        elements = self.kernel.list_set(_set_of(target)) or []
        return any(_element_target(e, self.ipv6_prefix_length) == target for e in elements)

    def add(
        self,
        target: BanTarget,
        reason: str,
        *,
        duration: float | None = None,
        kernel: bool = True,
    ) -> Ban | None:
        """Ban `target`; escalated duration unless given. None if already banned.

        A detector's repeat decision for a target that is still banned is ignored;
        an operator's explicit `duration` replaces the running ban. With `kernel`
        False the ban is only recorded: the caller puts `ban_commands` of it in the
        kernel (the running SBC does, off its event loop).
        """
        if self.is_trusted(target):
            raise TrustedTargetError(f"{target} is (inside) a trusted network: not banned")
        now = self.clock()
        with self._state() as state:
            current = state.bans.get(target)
            if current is not None and current.expires > now and duration is None:
                return None
            offence = state.next_offence(target, now, self.policy.forget_after)
            seconds = duration if duration is not None else self.policy.duration(offence)
            ban = Ban(target, reason, now, now + seconds, offence)
            in_kernel = self._kernel_add(ban, now) if kernel else True
            state.record(ban)
            if self.deferred:
                self._pending.append(ban)
        log.warning(
            "x ban %s for %d s until %s (offence %d%s): %s",
            target,
            seconds,
            _iso(ban.expires),
            offence,
            "" if in_kernel else ", file only: table not installed",
            reason,
        )
        return ban

    @contextlib.contextmanager
    def _state(self) -> Iterator[StoreState]:
        if not self.deferred:
            with self.store.update() as state:
                state.prune(self.clock(), self.policy.forget_after)
                yield state
            return
        if self._cache is None:
            self._cache = self.store.read()
        yield self._cache

    def flush(self) -> None:
        """Persist the bans made since the last flush (merging the file's changes)."""
        pending, self._pending = self._pending, []
        with self.store.update() as state:
            for ban in pending:
                state.record(ban)
            state.prune(self.clock(), self.policy.forget_after)
            self._cache = StoreState(dict(state.bans), dict(state.offences))

    def has(self, ban: Ban) -> bool:
        """True while `ban` is its target's ban on record: not lifted, not replaced."""
        state = self._cache if self._cache is not None else self.store.read()
        return state.bans.get(ban.target) == ban

    def remove(self, target: BanTarget) -> bool:
        """Lift a ban. True if it existed in the kernel or in the file."""
        now = self.clock()
        if self.deferred:
            self.flush()
        if self._cache is not None:
            self._cache.bans.pop(target, None)
        with self.store.update() as state:
            in_file = state.bans.pop(target, None) is not None
            state.prune(now, self.policy.forget_after)
            in_kernel = False
            if self.kernel is not None:
                try:
                    in_kernel = self._kernel_has(target)
                    if in_kernel:
                        self.kernel.run(_delete_element(target))
                except NftError as exc:
                    if not is_table_missing(exc):
                        raise
        if in_file or in_kernel:
            log.warning("- unban %s", target)
        return in_file or in_kernel

    def entries(self) -> list[BanListing]:
        """Running bans: the kernel's elements, with reasons and history from the file."""
        now = self.clock()
        state = self.store.read()
        kernel: dict[BanTarget, dict[str, Any]] = {}
        installed = False
        if self.kernel is not None:
            for name in (SET_BLACKLIST_V4, SET_BLACKLIST_V6):
                elements = self.kernel.list_set(name)
                if elements is None:
                    continue
                installed = True
                for element in elements:
                    target = _element_target(element, self.ipv6_prefix_length)
                    if target is not None:
                        kernel[target] = element.get("elem", {})
        listings: list[BanListing] = []
        for target, element in kernel.items():
            known = state.bans.get(target)
            expires = now + float(element.get("expires", 0))
            if known is not None:
                listings.append(
                    BanListing(
                        Ban(target, known.reason, known.created, expires, known.offence), True
                    )
                )
            else:
                timeout = float(element.get("timeout", 0))
                listings.append(
                    BanListing(
                        Ban(target, str(element.get("comment", "")), expires - timeout, expires),
                        True,
                    )
                )
        if not installed:
            listings += [BanListing(b, False) for b in state.active(now)]
        return sorted(listings, key=lambda item: item.ban.expires)

    def restorable(self) -> list[Ban]:
        """Bans in the file that are still running (to re-add on start)."""
        now = self.clock()
        with self.store.update() as state:
            state.prune(now, self.policy.forget_after)
            return state.active(now)

    def persist_from_kernel(self) -> None:
        """Copy the kernel's view into the file (expiries as the kernel has them)."""
        self.flush()
        if self.kernel is None:
            return
        listings = self.entries()
        now = self.clock()
        with self.store.update() as state:
            for item in listings:
                if item.in_kernel:
                    previous = state.bans.get(item.ban.target)
                    state.bans[item.ban.target] = (
                        item.ban
                        if previous is None
                        else Ban(
                            previous.target,
                            previous.reason,
                            previous.created,
                            item.ban.expires,
                            previous.offence,
                        )
                    )
            state.prune(now, self.policy.forget_after)


def ban_commands(bans: Iterable[Ban], now: float) -> str:
    """One transaction putting `bans` in the kernel, replacing running ones.

    `add` keeps an existing element (and its old timeout), and `delete` of a
    missing one fails the batch: add, delete, add again replaces it whether or
    not it was there.
    """
    bans = list(bans)
    lines: list[str] = []
    for ban in bans:
        element = f"{TABLE} {_set_of(ban.target)} {{ {ban.target.network_address} }}"
        lines += [f"add element {element}", f"delete element {element}"]
    return "\n".join([*lines, *render_bans(bans, now)])


def is_table_missing(error: NftError) -> bool:
    """The firewall's table (or set) is not installed: bans can only go to the file."""
    return "No such file or directory" in error.detail


def _set_of(target: BanTarget) -> str:
    return SET_BLACKLIST_V4 if isinstance(target, IPv4Network) else SET_BLACKLIST_V6


def _delete_element(target: BanTarget) -> str:
    return f"delete element {TABLE} {_set_of(target)} {{ {target.network_address} }}"


def _element_target(element: dict[str, Any], prefix: int) -> BanTarget | None:
    value = element.get("elem", {}).get("val") if "elem" in element else element.get("val")
    if value is None and isinstance(element, str):  # pragma: no cover - plain value
        value = element
    if not isinstance(value, str):
        return None
    address = ip_address(value)
    if address.version == 4:
        return IPv4Network(address)
    return ip_network((address, prefix), strict=False)
