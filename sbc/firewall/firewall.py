"""The firewall at run time: installs the ruleset, feeds bans, opens pinholes.

This is the I/O shell around the pure parts (`ruleset`, `detectors`): it reads the
table, renders, checks (`nft -c` through libnftables' dry run), applies in one
transaction, and on stop persists the blacklist and removes its own objects.
Calls block on netlink (~1 ms for a ban, ~150 ms for a full apply, more as the
table grows); an asyncio caller runs `start`/`stop` in an executor, and bans,
pinholes and the kernel half of a reload through `sbc.firewall.rounds`, for
which `decide`/`apply_bans` and `reconfigure`/`apply_ruleset` split the work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sbc.firewall.bans import Ban
from sbc.firewall.blacklist import Blacklist, ban_commands, is_table_missing
from sbc.firewall.config import FirewallConfig
from sbc.firewall.detectors import BanReason, Event, Guard
from sbc.firewall.nft import CounterValue, Kernel, NftBackend, NftError
from sbc.firewall.ruleset import (
    SET_PINHOLES,
    TABLE,
    TableInventory,
    is_owned,
    render_apply,
    render_teardown,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirewallStats:
    """Kernel counters (packets/bytes per named counter) and userspace decisions."""

    counters: dict[str, CounterValue]
    decisions: dict[BanReason, int]
    trusted_events: int


class Firewall:
    """Table `inet sbc`'s firewall objects, the blacklist and the detectors."""

    def __init__(
        self,
        config: FirewallConfig,
        kernel: Kernel | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kernel: Kernel = kernel if kernel is not None else NftBackend()
        self.clock = clock
        self.monotonic = monotonic
        self.blacklist = self._blacklist(config)
        self.guard = Guard(config.detectors, config.trusted, config.ipv6_prefix_length)

    def _blacklist(self, config: FirewallConfig) -> Blacklist:
        blacklist = Blacklist.from_config(config, self.kernel, clock=self.clock)
        blacklist.deferred = True
        return blacklist

    def flush(self) -> None:
        """Persist bans made since the last call; the owner calls this every second or so."""
        self.blacklist.flush()

    # --- lifecycle -----------------------------------------------------------

    def _apply(self, restore: Iterable[Ban], *, close_pinholes: bool = False) -> None:
        inventory = TableInventory.from_json(self.kernel.list_table())
        text = render_apply(
            self.config, inventory, restore, self.clock(), close_pinholes=close_pinholes
        )
        self.kernel.run(text, check=True)
        self.kernel.run(text)

    def start(self) -> None:
        """Install the ruleset and restore the persisted bans, in one transaction.
        Media pinholes left by an earlier process (a crash) are closed: the
        sessions of this one open theirs (`FirewallRounds.restart`)."""
        restore = self.blacklist.restorable()
        started = time.monotonic()
        self._apply(restore, close_pinholes=True)
        log.info(
            "- firewall installed in table %s (%d bans restored, %.0f ms)",
            TABLE,
            len(restore),
            (time.monotonic() - started) * 1000,
        )

    def reconfigure(self, config: FirewallConfig) -> list[Ban]:
        """The userspace half of a reload (rules, meters and trusted sets replaced;
        bans and pinholes stay): the new detectors and blacklist policy (counts
        kept), the pending bans saved. Returns the bans to restore, for
        `apply_ruleset`; the detectors may go on deciding in between."""
        self.config = config
        self.blacklist.flush()
        self.blacklist = self._blacklist(config)
        previous = self.guard
        self.guard = Guard(config.detectors, config.trusted, config.ipv6_prefix_length)
        self.guard.decisions = previous.decisions
        self.guard.trusted_events = previous.trusted_events
        return self.blacklist.restorable()

    def apply_ruleset(self, restore: Iterable[Ban]) -> None:
        """The kernel half of a reload (blocks on netlink): the ruleset of the
        current configuration, with `restore` in the blacklist sets."""
        self._apply(restore)
        log.info("- firewall reloaded")

    def stop(self) -> None:
        """Persist the blacklist, then remove the firewall's objects (not the relay's)."""
        self.blacklist.persist_from_kernel()
        inventory = TableInventory.from_json(self.kernel.list_table())
        text = render_teardown(inventory)
        if text:
            self.kernel.run(text, check=True)
            self.kernel.run(text)
        log.info("- firewall removed (%d objects of others kept)", len(inventory.foreign))

    # --- detectors -> blacklist ----------------------------------------------

    def observe(self, event: Event, now: float | None = None) -> list[Ban]:
        """Feed one event to the detectors; ban what they decide. Returns new bans."""
        bans = self.decide(event, now)
        if bans:
            self.apply_bans(bans)
        return bans

    def decide(self, event: Event, now: float | None = None) -> list[Ban]:
        """Feed one event to the detectors and record the bans they decide, without
        the kernel: the caller passes them to `apply_bans`, on its nft thread."""
        decisions = self.guard.observe(event, self.monotonic() if now is None else now)
        bans: list[Ban] = []
        for decision in decisions:
            ban = self.blacklist.add(decision.target, decision.describe(), kernel=False)
            if ban is not None:
                bans.append(ban)
        return bans

    def apply_bans(self, bans: Iterable[Ban]) -> bool:
        """Put bans in the kernel in one transaction (blocks on netlink). False when
        the table is not installed: the state file keeps them, a restart restores."""
        bans = list(bans)
        try:
            self.kernel.run(ban_commands(bans, self.clock()))
        except NftError as exc:
            if not is_table_missing(exc):
                raise
            log.warning("x %d bans in the state file only: table not installed", len(bans))
            return False
        return True

    # --- media pinholes --------------------------------------------------------

    def open_pinholes(self, ports: Iterable[int]) -> None:
        """Let RTP/RTCP in on `ports` (the relay calls this when it allocates them)."""
        self.kernel.run(pinhole_commands([(True, ports)]))

    def close_pinholes(self, ports: Iterable[int]) -> None:
        """Close `ports` again; closing a port that is not open is not an error."""
        self.kernel.run(pinhole_commands([(False, ports)]))

    # --- operations ------------------------------------------------------------

    def stats(self) -> FirewallStats:
        counters = {n: v for n, v in self.kernel.counters().items() if is_owned(n)}
        return FirewallStats(counters, dict(self.guard.decisions), self.guard.trusted_events)


def pinhole_commands(changes: Iterable[tuple[bool, Iterable[int]]]) -> str:
    """One transaction opening (True) or closing (False) media ports, in order.

    Closing adds, then deletes: `delete` of a missing element would fail the batch.
    """
    lines: list[str] = []
    for open_, ports in changes:
        items = ", ".join(str(p) for p in sorted(set(ports)))
        if not items:
            continue
        lines.append(f"add element {TABLE} {SET_PINHOLES} {{ {items} }}")
        if not open_:
            lines.append(f"delete element {TABLE} {SET_PINHOLES} {{ {items} }}")
    return "\n".join(lines)
