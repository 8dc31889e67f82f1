"""Trunks: named groups of gateways, ordered for failover and probed with OPTIONS.

Pure: no sockets, no clock. The controller asks ``TrunkState.candidates(rng)`` for the
gateways to try for a new call, in order, and fails over to the next one when
``Trunk.should_failover(status)`` says so. The asyncio side asks ``next_deadline()``
when to wake up, sends ``probe_request`` to each gateway ``due_probes(now)`` lists and
feeds the outcome back through ``probe_result``; health flips (``HealthChange``) are
the events it logs and exports.

Choices, each a knob where operators disagree:

* Order: lowest priority first; within one priority RFC 2782's weighted random
  selection, except that weight-0 gateways come after every weighted one (in random
  order among themselves) instead of having "a very small chance" of going first.
* Health: UNKNOWN until probed and usable meanwhile. Any response to a probe proves
  the gateway alive, as Oracle's and Ribbon's SBCs see it; ``ProbePolicy.down_statuses``
  lists responses that count as failures instead (typically ``{503}``). Hysteresis:
  ``down_after`` consecutive failures take a gateway down, ``up_after`` consecutive
  successes bring it back, so alternating results never flap. An UNKNOWN gateway is
  UP after one success (it was usable already, nothing flaps).
* Passive health (``ProbePolicy.passive``): a call the gateway never answered counts
  like a failed probe, any response to a call like a successful one. Only while
  probing is enabled: without probes nothing would ever bring a gateway back.
* A gateway's 503 with Retry-After (``call_result``): not tried for that long,
  at most ``MAX_RETRY_AFTER`` seconds (RFC 3261 21.5.4, 20.33; RFC 3263 4.3). It
  counts as down meanwhile for choosing gateways, without changing its health.
* A gateway given by host name has health per address of its name (``track_addresses``,
  fed by the app's RFC 3263 lookups): probes go to every address on its own schedule,
  calls' results and 503 holds apply to the address that answered, and a DOWN (or
  held) address is left out while another of the name is usable. The gateway as a
  whole is DOWN only when every address is, UP when any is, else UNKNOWN. An address
  DNS no longer gives is forgotten; a new one starts UNKNOWN (untested: usable, up
  after one answer), not with the gateway's or a vanished address's state, as a
  newly configured gateway does. A gateway given by IP has one address: its own
  record, as before.
* All gateways down: fail fast (the controller answers 503 at once, as Kamailio's
  dispatcher does when no destination is active). ``Trunk.try_when_all_down`` tries
  them all anyway, in priority order, for trunks with nowhere else to go.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Final

from sbc.b2bua.topology import contact_for, sip_uri_for, via_for
from sbc.sip.errors import ParseError
from sbc.sip.message import MAGIC_COOKIE, Headers, Request
from sbc.sip.uri import format_host, parse_host
from sbc.transport.base import (
    Destination,
    ListenAddress,
    Transport,
    format_hostport,
    ip_literal,
    normalize_host,
)

logger = logging.getLogger(__name__)

#: RFC 3261 8.1.1.6: Max-Forwards of a request the SBC originates.
PROBE_MAX_FORWARDS: Final = 70

#: Version of the ``to_dict`` layouts, checked by ``from_dict``/``restore``.
TRUNK_STATE_DICT_VERSION: Final = 1

#: RFC 3261 8.1.3.1: a timeout is a 408 and a transport error a 503 to the TU, and
#: RFC 3263 4.3 tries the next server on 503; every other 5xx is the server's own
#: failure too. 4xx (486 Busy, 404, 480) speak for the callee, not the gateway, and
#: 6xx are global (RFC 3261 21.6): another gateway would reach the same answer.
DEFAULT_FAILOVER_STATUSES: Final = frozenset({408, *range(500, 600)})

#: Longest a gateway's 503 Retry-After keeps it out of the call rotation (seconds):
#: a gateway asking for a day must not be lost for a day because of one answer.
MAX_RETRY_AFTER: Final = 3600.0

#: Where a never-probed gateway's probe is due: any monotonic clock is past it.
_DUE_AT_ONCE: Final = 0.0


def address_key(destination: Destination) -> str:
    """How an address of a gateway's name is known in its health: ``host:port``
    (the transport is the gateway's)."""
    return format_hostport(destination.host, destination.port)


class TrunkStateError(ValueError):
    """A trunk state dict that cannot be read back; the message names the field."""


class Health(enum.Enum):
    """What the SBC believes about a gateway."""

    UP = "up"
    DOWN = "down"
    #: Not probed yet (or probing is off): usable until proven down.
    UNKNOWN = "unknown"

    @property
    def usable(self) -> bool:
        return self is not Health.DOWN


@dataclass(frozen=True, slots=True)
class Gateway:
    """One peer of a trunk.

    ``port`` None leaves the port to RFC 3263 (SRV for a host name, else the
    transport's default). ``priority``: lower is tried first; ``weight`` shares the
    load inside one priority (RFC 2782), 0 meaning "only when the others failed".
    """

    name: str
    host: str
    port: int | None = None
    transport: Transport = Transport.UDP
    priority: int = 0
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a gateway needs a name")
        try:
            parse_host(format_host(self.host), f"host of gateway {self.name}")
        except ParseError as exc:
            raise ValueError(str(exc)) from None
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"gateway {self.name}: port {self.port} is not 1..65535")
        if self.priority < 0 or self.weight < 0:
            raise ValueError(f"gateway {self.name}: priority and weight must not be negative")

    @property
    def key(self) -> str:
        """Identity across reconfigurations: transport, host and port as configured.

        Renaming a gateway or changing its priority or weight keeps its health.
        """
        hostport = format_host(normalize_host(self.host))
        if self.port is not None:
            hostport = f"{hostport}:{self.port}"
        return f"{self.transport.value}:{hostport}"

    @property
    def uri(self) -> str:
        """The gateway's SIP URI (sips for TLS, as the SBC's own URIs are)."""
        scheme = "sips" if self.transport is Transport.TLS else "sip"
        port = "" if self.port is None else f":{self.port}"
        param = ";transport=tcp" if self.transport is Transport.TCP else ""
        return f"{scheme}:{format_host(self.host)}{port}{param}"

    @property
    def static_destination(self) -> Destination | None:
        """Where to send without a DNS lookup: an IP literal host; None for a name."""
        if ip_literal(self.host) is None:
            return None
        port = self.transport.default_port if self.port is None else self.port
        return Destination(self.transport, normalize_host(self.host), port)


@dataclass(frozen=True, slots=True)
class ProbePolicy:
    """How a trunk's gateways are probed with OPTIONS (RFC 3261 11)."""

    enabled: bool = True
    #: Seconds from one probe of a gateway to the next.
    interval: float = 30.0
    #: Seconds without a response before a probe counts as failed.
    timeout: float = 5.0
    #: Consecutive failures that take a gateway down.
    down_after: int = 3
    #: Consecutive successes that bring a down gateway back up.
    up_after: int = 2
    #: Responses that count as failures. Empty (the default): any response proves
    #: the gateway alive; ``{503}`` takes overloaded gateways out of rotation.
    down_statuses: frozenset[int] = frozenset()
    #: Calls count too: one the gateway never answered is a failure.
    passive: bool = True

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("probe interval and timeout must be positive")
        if self.down_after < 1 or self.up_after < 1:
            raise ValueError("probe down_after and up_after must be at least 1")
        if any(not 100 <= status <= 699 for status in self.down_statuses):
            raise ValueError("probe down_statuses must be SIP statuses 100..699")

    def is_alive(self, status: int | None) -> bool:
        """Whether a response ``status`` (None: timeout or transport error) proves life."""
        return status is not None and status not in self.down_statuses


@dataclass(frozen=True, slots=True)
class Trunk:
    """Gateways in one realm that a route sends calls to."""

    name: str
    realm: str
    gateways: tuple[Gateway, ...]
    probe: ProbePolicy = ProbePolicy()
    #: Final statuses after which the next gateway is tried (300..599 only).
    failover_statuses: frozenset[int] = DEFAULT_FAILOVER_STATUSES
    #: Gateways tried for one call, at most; None: every candidate.
    max_attempts: int | None = None
    #: With every gateway down, try them all anyway instead of failing at once.
    try_when_all_down: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.realm:
            raise ValueError("a trunk needs a name and a realm")
        if not self.gateways:
            raise ValueError(f"trunk {self.name} has no gateways")
        names = [gateway.name for gateway in self.gateways]
        if len(set(names)) != len(names):
            raise ValueError(f"trunk {self.name}: gateway names repeat")
        keys = [gateway.key for gateway in self.gateways]
        if len(set(keys)) != len(keys):
            raise ValueError(f"trunk {self.name}: the same gateway address appears twice")
        if any(not 300 <= status <= 599 for status in self.failover_statuses):
            raise ValueError(f"trunk {self.name}: failover statuses must be 300..599")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"trunk {self.name}: max_attempts must be at least 1")

    def should_failover(self, status: int) -> bool:
        """Whether a call's final ``status`` from one gateway sends it to the next.

        A call that timed out is a 408, one that could not be sent a 503
        (RFC 3261 8.1.3.1). 6xx never fails over (RFC 3261 21.6: a global failure;
        ``__post_init__`` refuses it in ``failover_statuses``).
        Only before the caller saw an answer: that is the controller's to check.
        """
        return status in self.failover_statuses


@dataclass(frozen=True, slots=True)
class HealthChange:
    """A gateway's health flipped at ``at`` (with ``address``: one of its name's)."""

    trunk: str
    gateway: Gateway
    old: Health
    new: Health
    at: float = field(default=0.0, compare=False)
    #: The address (``address_key``) of a gateway given by name whose health flipped;
    #: None: the gateway's as a whole.
    address: str | None = None
    #: The gateway's own flip this address's caused (its last usable address went
    #: down, or its first came back), if any.
    gateway_change: HealthChange | None = None

    def __str__(self) -> str:
        where = self.gateway.key
        if self.address is not None:
            where = f"{where} address {self.address}"
        text = f"trunk {self.trunk}: gateway {where} {self.old.value} -> {self.new.value}"
        if self.gateway_change is not None:
            change = self.gateway_change
            text += f" (the gateway {change.old.value} -> {change.new.value})"
        return text


class _Record:
    """One gateway's (or one address of its name's) health, hysteresis counters and
    probe timers."""

    __slots__ = (
        "address",
        "addresses",
        "failures",
        "gateway",
        "health",
        "held_until",
        "named",
        "next_probe",
        "probe_deadline",
        "successes",
    )

    def __init__(self, gateway: Gateway, address: str | None = None) -> None:
        self.gateway = gateway
        #: The ``address_key`` this record is about; None: the gateway.
        self.address = address
        #: Given by host name: its health may be per address.
        self.named = gateway.static_destination is None
        self.health = Health.UNKNOWN
        self.failures = 0
        self.successes = 0
        self.next_probe = _DUE_AT_ONCE
        #: When the probe in flight times out; None: none in flight.
        self.probe_deadline: float | None = None
        #: Not tried for calls before this (a 503's Retry-After); 0: not held.
        self.held_until = 0.0
        #: A named gateway's addresses as last resolved, in lookup order. While there
        #: are any they carry the probes and results, and ``health`` is theirs summed
        #: up (``_overall``); empty: ``health`` is the gateway's own (a static IP, or
        #: a name not resolved yet).
        self.addresses: dict[str, _Record] = {}

    def timed(self) -> Iterator[_Record]:
        """The records whose probes run: the addresses', else the gateway's own."""
        if self.addresses:
            yield from self.addresses.values()
        else:
            yield self

    def available(self, now: float | None) -> bool:
        """Whether calls may go here at ``now`` (None: holds aside)."""
        if not self.health.usable or (now is not None and self.held_until > now):
            return False
        return not self.addresses or any(a.available(now) for a in self.addresses.values())

    def carry(self, old: _Record, before: ProbePolicy, policy: ProbePolicy) -> None:
        """Health, counters and timers of ``old`` (of a trunk probing by ``before``),
        timers following ``policy`` (see ``TrunkState.adopt``)."""
        self.health = old.health
        self.failures = old.failures
        self.successes = old.successes
        self.next_probe = old.next_probe
        if old.next_probe != _DUE_AT_ONCE:
            # probe_sent set next_probe to sent + interval: the send time is known
            # without a clock, and sent + the new interval is no later than now + it.
            sent = old.next_probe - before.interval
            self.next_probe = min(old.next_probe, sent + policy.interval)
        self.probe_deadline = old.probe_deadline
        if old.probe_deadline is not None:
            sent = old.probe_deadline - before.timeout
            self.probe_deadline = min(old.probe_deadline, sent + policy.timeout)

    def counters(self) -> dict[str, Any]:
        return {"health": self.health.value, "failures": self.failures, "successes": self.successes}

    def where(self) -> str:
        """The record in log lines: gateway name and key, and the address if any."""
        text = f"{self.gateway.name} ({self.gateway.key})"
        return text if self.address is None else f"{text} address {self.address}"


def _overall(addresses: Iterable[_Record]) -> Health:
    """A named gateway's health from its addresses': UP if any is, DOWN if all are."""
    healths = {record.health for record in addresses}
    if Health.UP in healths:
        return Health.UP
    return Health.DOWN if healths == {Health.DOWN} else Health.UNKNOWN


def _weighted_order(group: list[Gateway], rng: random.Random) -> list[Gateway]:
    """RFC 2782's weighted selection, repeated until the group is ordered.

    Each pick is gateway ``g`` with probability weight(g) / sum of the weights not yet
    picked. Weight 0 goes after all weighted gateways, shuffled.
    """
    weighted = [gateway for gateway in group if gateway.weight > 0]
    zero = [gateway for gateway in group if gateway.weight == 0]
    total = sum(gateway.weight for gateway in weighted)
    ordered: list[Gateway] = []
    while weighted:
        pick = rng.randrange(total)
        # The first gateway whose running sum of weights exceeds the pick.
        index, running = 0, weighted[0].weight
        while running <= pick:
            index += 1
            running += weighted[index].weight
        picked = weighted.pop(index)
        ordered.append(picked)
        total -= picked.weight
    rng.shuffle(zero)
    return ordered + zero


class TrunkState:
    """The mutable side of one trunk: gateway health and probe timers.

    Times are the caller's monotonic ``now``. ``to_dict`` carries health and counters
    only: timers are of this node's clock, so a standby restoring them probes every
    gateway at once.
    """

    def __init__(self, trunk: Trunk) -> None:
        self._trunk = trunk
        self._records = {gateway.key: _Record(gateway) for gateway in trunk.gateways}

    @property
    def trunk(self) -> Trunk:
        return self._trunk

    def _record(self, key: str) -> _Record:
        try:
            return self._records[key]
        except KeyError:
            raise KeyError(f"trunk {self._trunk.name} has no gateway {key}") from None

    def gateway_health(self, key: str, address: str | None = None) -> Health:
        """The health of the gateway with ``key`` (KeyError if the trunk has none), or
        with ``address`` of one address of its name (KeyError if not resolved to it)."""
        record = self._record(key)
        if address is None:
            return record.health
        try:
            return record.addresses[address].health
        except KeyError:
            raise KeyError(f"gateway {key} has no address {address}") from None

    def gateway(self, key: str) -> Gateway:
        """The gateway with ``key`` (KeyError if the trunk has none)."""
        return self._record(key).gateway

    def address_health(self, key: str) -> dict[str, Health]:
        """The health of each address of a named gateway (``address_key``: health), in
        the order first resolved; empty for a gateway given by IP or not resolved."""
        return {address: r.health for address, r in self._record(key).addresses.items()}

    def has_gateway(self, key: str) -> bool:
        """Whether the trunk (as configured now) has a gateway with ``key``."""
        return key in self._records

    def track_addresses(
        self, key: str, addresses: Iterable[str], now: float
    ) -> HealthChange | None:
        """The addresses (``address_key``) a named gateway's name resolves to now.

        Addresses no longer listed are forgotten with their health and holds; new
        ones start UNKNOWN (untested, as a newly configured gateway), their first
        probe due at once (the name's first addresses: when the gateway's is, one
        interval after a probe skipped while the name was unresolved). Returns the
        gateway's flip this caused (its last usable address gone, say). Ignored for a
        gateway given by IP: its one address is the gateway.
        """
        record = self._record(key)
        wanted = list(dict.fromkeys(addresses))
        if not record.named or record.addresses.keys() == set(wanted):
            return None
        for address in record.addresses.keys() - set(wanted):
            logger.info(
                "- trunk %s gateway %s: address %s no longer resolved, forgotten",
                self._trunk.name,
                record.where(),
                address,
            )
        first = not record.addresses
        tracked: dict[str, _Record] = {}
        for address in wanted:
            known = record.addresses.get(address)
            if known is None:
                known = _Record(record.gateway, address)
                known.next_probe = record.next_probe if first else _DUE_AT_ONCE
            tracked[address] = known
        record.addresses = tracked
        # The gateway's own probe timers stop while its addresses' run (``timed``).
        record.probe_deadline = None
        return self._summarize(record, now)

    def candidates(self, rng: random.Random, now: float | None = None) -> list[Gateway]:
        """The gateways to try for one call, in order, at most ``max_attempts``.

        Usable ones (not DOWN, and at ``now`` not held by a 503's Retry-After; for a
        name, with some address so) by priority, weighted random inside a priority.
        With none usable: none (fail fast), or with ``try_when_all_down`` all of them
        in the same order.
        """
        limit = self._trunk.max_attempts
        ordered = self.ordered(rng, now)
        return ordered if limit is None else ordered[:limit]

    def ordered(self, rng: random.Random, now: float | None = None) -> list[Gateway]:
        """Every gateway ``candidates`` would choose from, in order, not truncated."""
        usable = [r.gateway for r in self._records.values() if r.available(now)]
        if not usable and self._trunk.try_when_all_down:
            usable = [r.gateway for r in self._records.values()]
        usable.sort(key=lambda gateway: gateway.priority)
        ordered: list[Gateway] = []
        for _, group in groupby(usable, key=lambda gateway: gateway.priority):
            ordered.extend(_weighted_order(list(group), rng))
        return ordered

    def usable_addresses(self, key: str, now: float | None = None) -> frozenset[str] | None:
        """The addresses of a named gateway a call may go to at ``now`` (neither DOWN
        nor held), the others left out; None: every address (a gateway given by IP,
        a name not resolved yet, or one tried while none of its addresses is usable)."""
        record = self._record(key)
        usable = frozenset(a for a, r in record.addresses.items() if r.available(now))
        return usable or None

    # -- probing --------------------------------------------------------------------

    def due_probes(self, now: float) -> list[Gateway]:
        """Gateways with a probe due now (of their own or of an address of their name)."""
        return list(dict.fromkeys(gateway for gateway, _ in self.due_addresses(now)))

    def due_addresses(self, now: float) -> list[tuple[Gateway, str | None]]:
        """What to send an OPTIONS to now: due, and no probe of its in flight. Each
        address of a resolved name on its own; None for the gateway's own probe (a
        static IP, or a name not resolved yet)."""
        if not self._trunk.probe.enabled:
            return []
        return [
            (record.gateway, timed.address)
            for record in self._records.values()
            for timed in record.timed()
            if timed.probe_deadline is None and timed.next_probe <= now
        ]

    def probe_skipped(self, key: str, now: float, address: str | None = None) -> None:
        """The gateway's probe was due but could not be sent (its name unresolved):
        the next one is due one ``interval`` later, so the due probe does not keep
        ``next_deadline`` in the past (a timer firing at once, again and again)."""
        record = self._target(key, address)
        if record is not None and record.probe_deadline is None:
            record.next_probe = now + self._trunk.probe.interval

    def probe_sent(self, key: str, now: float, address: str | None = None) -> None:
        """An OPTIONS to the gateway (``address`` of its name) left at ``now``: its
        timeout and next probe start."""
        record = self._target(key, address)
        if record is None:
            return
        policy = self._trunk.probe
        record.probe_deadline = now + policy.timeout
        record.next_probe = now + policy.interval
        logger.debug("> probe trunk %s gateway %s", self._trunk.name, record.where())

    def probe_result(
        self, key: str, status: int | None, now: float, address: str | None = None
    ) -> HealthChange | None:
        """The probe in flight got a final ``status`` (None: timeout, transport error).

        Returns the health flip it caused, if any. A result with no probe in flight
        (it came after ``expire_probes`` counted it lost, or DNS dropped the address
        meanwhile) is ignored.
        """
        record = self._target(key, address)
        if record is None or record.probe_deadline is None:
            logger.debug("< late probe result trunk %s gateway %s", self._trunk.name, key)
            return None
        record.probe_deadline = None
        logger.debug("< probe trunk %s gateway %s: %s", self._trunk.name, record.where(), status)
        return self._observe(record, self._trunk.probe.is_alive(status), now)

    def expire_probes(self, now: float) -> list[HealthChange]:
        """Count every probe whose timeout passed as failed; the health flips."""
        changes: list[HealthChange] = []
        for gateway in self._records.values():
            for record in gateway.timed():
                if record.probe_deadline is not None and record.probe_deadline <= now:
                    record.probe_deadline = None
                    change = self._observe(record, False, now)
                    if change is not None:
                        changes.append(change)
        return changes

    def call_result(
        self,
        key: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        address: str | None = None,
    ) -> HealthChange | None:
        """Passive health: a call to the gateway got ``status`` from it (None: nothing).

        Pass None only when the gateway never answered (the local 408 of a timeout,
        the 503 of a transport error); a response it sent is passed as is. Ignored
        unless the trunk probes with ``passive`` on. A 503 with ``retry_after``
        (its Retry-After, seconds) holds the gateway back from calls that long
        (RFC 3261 21.5.4, 20.33; RFC 3263 4.3), probing or not. With ``address``
        (the one the call went to) both apply to that address of a named gateway;
        without, a named gateway's addresses learn nothing and the hold is the
        whole gateway's.
        """
        if status == 503 and retry_after is not None and retry_after > 0:
            self.hold(key, now + min(retry_after, MAX_RETRY_AFTER), address)
        policy = self._trunk.probe
        record = self._target(key, address)
        if record is None or not (policy.enabled and policy.passive):
            return None
        return self._observe(record, policy.is_alive(status), now)

    def hold(self, key: str, until: float, address: str | None = None) -> None:
        """Try no call on the gateway (or that address of its name) before ``until``
        (never shortens a hold)."""
        record = self._record(key) if address is None else self._target(key, address)
        if record is not None and until > record.held_until:
            record.held_until = until
            logger.info(
                "- trunk %s gateway %s held back until %.1f",
                self._trunk.name,
                record.where(),
                until,
            )

    def held_until(self, key: str, address: str | None = None) -> float:
        """When the gateway's (that address's) hold by a 503's Retry-After ends (0.0:
        never held)."""
        record = self._record(key) if address is None else self._target(key, address)
        if record is None:
            raise KeyError(f"gateway {key} has no address {address}")
        return record.held_until

    def next_deadline(self) -> float | None:
        """When ``due_probes`` or ``expire_probes`` next has work; None: never."""
        if not self._trunk.probe.enabled:
            return None
        return min(
            (
                r.next_probe if r.probe_deadline is None else r.probe_deadline
                for gateway in self._records.values()
                for r in gateway.timed()
            ),
            default=None,
        )

    def _target(self, key: str, address: str | None) -> _Record | None:
        """The record a probe or result about ``address`` of gateway ``key`` goes to:
        the gateway's while it has no addresses (a static IP's one address is the
        gateway), else that address's; None for an address no longer resolved, or
        none given for a name whose addresses have their own health."""
        record = self._record(key)
        if not record.addresses:
            return record
        return None if address is None else record.addresses.get(address)

    def _observe(self, record: _Record, alive: bool, now: float) -> HealthChange | None:
        policy = self._trunk.probe
        old = record.health
        if alive:
            record.failures = 0
            record.successes += 1
            if old is Health.UNKNOWN or (
                old is Health.DOWN and record.successes >= policy.up_after
            ):
                record.health = Health.UP
        else:
            record.successes = 0
            record.failures += 1
            if old is not Health.DOWN and record.failures >= policy.down_after:
                record.health = Health.DOWN
        if record.health is old:
            return None
        if record.health is Health.DOWN:
            logger.warning(
                "x trunk %s gateway %s down after %d failures",
                self._trunk.name,
                record.where(),
                record.failures,
            )
        else:
            logger.info(
                "- trunk %s gateway %s %s -> up", self._trunk.name, record.where(), old.value
            )
        if record.address is None:
            return HealthChange(self._trunk.name, record.gateway, old, record.health, now)
        gateway = self._records[record.gateway.key]
        return HealthChange(
            self._trunk.name,
            record.gateway,
            old,
            record.health,
            now,
            address=record.address,
            gateway_change=self._summarize(gateway, now),
        )

    def _summarize(self, record: _Record, now: float) -> HealthChange | None:
        """A named gateway's health from its addresses' (``_overall``); its flip."""
        if not record.addresses:
            return None
        old, new = record.health, _overall(record.addresses.values())
        if new is old:
            return None
        record.health = new
        if new is Health.DOWN:
            logger.warning(
                "x trunk %s gateway %s down: every address of its name is",
                self._trunk.name,
                record.where(),
            )
        else:
            logger.info(
                "- trunk %s gateway %s %s -> %s (by its addresses)",
                self._trunk.name,
                record.where(),
                old.value,
                new.value,
            )
        return HealthChange(self._trunk.name, record.gateway, old, new, now)

    # -- reconfiguration and replication ---------------------------------------------

    def adopt(self, previous: TrunkState) -> None:
        """Take over ``previous``'s records for every gateway whose key is unchanged,
        with the addresses of its name and theirs.

        Timers follow the new policy: the next probe is due one new ``interval``
        after the last one was sent (never later than it was already due), and a
        probe in flight times out one new ``timeout`` after it was sent (never
        later than before). A gateway never probed stays due at once.

        Not while this trunk does not probe: nothing would ever change a health
        carried over (a DOWN gateway would stay down for good), so it is UNKNOWN.
        A hold by a 503's Retry-After is carried over either way: it ends by itself.
        """
        policy = self._trunk.probe
        before = previous._trunk.probe
        for key, record in self._records.items():
            old = previous._records.get(key)
            if old is None:
                continue
            record.held_until = old.held_until
            record.addresses = {}
            for address, old_address in old.addresses.items():
                tracked = _Record(record.gateway, address)
                tracked.held_until = old_address.held_until
                if policy.enabled:
                    tracked.carry(old_address, before, policy)
                record.addresses[address] = tracked
            if policy.enabled:
                record.carry(old, before, policy)

    def to_dict(self) -> dict[str, Any]:
        """Health and counters by gateway key, as JSON types; a named gateway's by
        address too (``addresses``, only when it has any)."""
        gateways: dict[str, Any] = {}
        for key, record in self._records.items():
            gateways[key] = record.counters()
            if record.addresses:
                gateways[key]["addresses"] = {
                    address: r.counters() for address, r in record.addresses.items()
                }
        return {
            "version": TRUNK_STATE_DICT_VERSION,
            "trunk": self._trunk.name,
            "gateways": gateways,
        }

    @classmethod
    def from_dict(cls, trunk: Trunk, data: Mapping[str, Any]) -> TrunkState:
        """The state of ``trunk`` as ``to_dict`` left it; gateways it lacks are UNKNOWN.

        Keys of gateways no longer in ``trunk`` are ignored; every probe is due at once.
        A trunk that does not probe keeps every gateway UNKNOWN (see ``adopt``).
        Addresses of a gateway given by IP are ignored (it has none of its own).
        """
        if data.get("version") != TRUNK_STATE_DICT_VERSION:
            raise TrunkStateError(f"unsupported trunk state version: {data.get('version')!r}")
        if data.get("trunk") != trunk.name:
            raise TrunkStateError(f"trunk state of {data.get('trunk')!r}, not {trunk.name!r}")
        state = cls(trunk)
        try:
            for key, entry in data["gateways"].items():
                record = state._records.get(key)
                if record is None:
                    continue
                _restore(record, entry, trunk.probe.enabled)
                addresses = entry.get("addresses", {}) if record.named else {}
                for address, counters in addresses.items():
                    tracked = _Record(record.gateway, str(address))
                    _restore(tracked, counters, trunk.probe.enabled)
                    record.addresses[str(address)] = tracked
                if record.addresses:
                    record.health = _overall(record.addresses.values())
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TrunkStateError(f"bad trunk state of {trunk.name}: {exc!r}") from exc
        return state


def _restore(record: _Record, entry: Mapping[str, Any], probing: bool) -> None:
    """Health and counters of a ``to_dict`` entry (validated; kept only when probing)."""
    health = Health(entry["health"])
    failures = int(entry["failures"])
    successes = int(entry["successes"])
    if probing:
        record.health, record.failures, record.successes = health, failures, successes


class TrunkTable:
    """Every trunk's state by trunk name; what the controller and the prober share."""

    def __init__(self, trunks: Iterable[Trunk] = ()) -> None:
        self._states: dict[str, TrunkState] = {}
        self.reconfigure(trunks)

    def reconfigure(self, trunks: Iterable[Trunk]) -> None:
        """Replace the trunks; a gateway whose key is unchanged keeps its health."""
        states: dict[str, TrunkState] = {}
        for trunk in trunks:
            if trunk.name in states:
                raise ValueError(f"trunk {trunk.name} is configured twice")
            state = TrunkState(trunk)
            previous = self._states.get(trunk.name)
            if previous is not None:
                state.adopt(previous)
            states[trunk.name] = state
        removed = self._states.keys() - states.keys()
        if removed:
            logger.info("- trunks removed: %s", ", ".join(sorted(removed)))
        self._states = states

    def get(self, name: str) -> TrunkState | None:
        return self._states.get(name)

    def __getitem__(self, name: str) -> TrunkState:
        return self._states[name]

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def __iter__(self) -> Iterator[TrunkState]:
        return iter(self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def due_probes(self, now: float) -> list[tuple[TrunkState, Gateway]]:
        """Every trunk's gateways with a probe due, with the state to report them to."""
        return [(state, gateway) for state in self for gateway in state.due_probes(now)]

    def due_addresses(self, now: float) -> list[tuple[TrunkState, Gateway, str | None]]:
        """Every trunk's due probes (``TrunkState.due_addresses``), with their state."""
        return [
            (state, gateway, address)
            for state in self
            for gateway, address in state.due_addresses(now)
        ]

    def expire_probes(self, now: float) -> list[HealthChange]:
        return [change for state in self for change in state.expire_probes(now)]

    def next_deadline(self) -> float | None:
        """The earliest deadline of any trunk; None when none probes."""
        deadlines = [d for d in (state.next_deadline() for state in self) if d is not None]
        return min(deadlines, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TRUNK_STATE_DICT_VERSION,
            "trunks": {name: state.to_dict() for name, state in self._states.items()},
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take health from a peer's ``to_dict`` for the trunks both know."""
        if data.get("version") != TRUNK_STATE_DICT_VERSION:
            raise TrunkStateError(f"unsupported trunk table version: {data.get('version')!r}")
        trunks = data.get("trunks")
        if not isinstance(trunks, Mapping):
            raise TrunkStateError("trunk table without trunks")
        restored = {
            name: TrunkState.from_dict(state.trunk, trunks[name])
            for name, state in self._states.items()
            if name in trunks
        }
        self._states.update(restored)


def probe_request(
    gateway: Gateway,
    destination: Destination,
    local: ListenAddress,
    *,
    user_agent: str,
    call_id: str,
    branch: str,
    tag: str,
    now: float,
    cseq: int = 1,
) -> Request:
    """The OPTIONS that probes ``gateway`` (RFC 3261 11.1), sent from ``local``.

    Request-URI and To are the gateway's URI as configured (a host name stays a
    name; ``destination`` is only where the request goes, so its transport must
    be the gateway's and the listener's). Via is the SBC's own with ``rport``
    (RFC 3581), From carries ``tag``, Accept asks for SDP (11.1), and Timestamp
    carries ``now`` so the response's copy can time the round trip (RFC 3261 20.38).
    """
    if not branch.startswith(MAGIC_COOKIE):
        raise ValueError(f"branch {branch!r} lacks the RFC 3261 magic cookie")
    if not (gateway.transport is destination.transport is local.transport):
        raise ValueError(
            f"gateway {gateway.name} is {gateway.transport.value}, destination "
            f"{destination.transport.value}, listener {local.transport.value}"
        )
    uri = gateway.uri
    own = sip_uri_for(local, params=False)
    headers = Headers()
    headers.add("Via", via_for(local, branch))
    headers.add("Max-Forwards", str(PROBE_MAX_FORWARDS))
    headers.add("From", f"<{own}>;tag={tag}")
    headers.add("To", f"<{uri}>")
    headers.add("Call-ID", call_id)
    headers.add("CSeq", f"{cseq} OPTIONS")
    headers.add("Contact", contact_for(local))
    headers.add("Accept", "application/sdp")
    headers.add("User-Agent", user_agent)
    if now >= 0:
        headers.add("Timestamp", f"{now:.3f}")
    headers.add("Content-Length", "0")
    return Request("OPTIONS", uri, headers)
