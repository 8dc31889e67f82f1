"""Userspace detectors that feed the kernel blacklist. Pure: no I/O, no clock.

Each detector takes `observe(event, now)` and returns the `BanDecision`s the event
caused; `now` is a monotonic time in seconds. `Guard` runs them all, keeps trusted
sources out of them entirely (a trusted peer is never banned, and does not even
occupy detector memory) and does not repeat a decision for a target that was just
decided. Escalation (how long a ban lasts) is decided later, by the blacklist, which
remembers earlier offences across restarts.

Every table is capped (`MAX_TRACKED`): a flood of spoofed sources evicts the oldest
entries instead of growing memory without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from typing import Final, Generic, Protocol, TypeVar

from sbc.firewall.bans import BanTarget, IPAddress, ban_target
from sbc.firewall.config import (
    MAX_USERS_PER_SOURCE,
    AuthFailureDetector,
    Detectors,
    MalformedDetector,
    RatePeakDetector,
    ScannerDetector,
)

#: Most keys (sources, users) any one detector table remembers.
MAX_TRACKED: Final = 65_536
#: Seconds during which `Guard` does not repeat a decision for the same target.
DECISION_HOLDOFF: Final = 5.0


class BanReason(StrEnum):
    RATE_PEAK = "rate-peak"
    AUTH_FAILURES = "auth-failures"
    AUTH_FAILURES_USER = "auth-failures-user"
    SCANNER_USER_AGENT = "scanner-user-agent"
    SCANNER_SWEEP = "scanner-sweep"
    MALFORMED = "malformed"
    OPERATOR = "operator"


# --- events ------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSeen:
    """A SIP request parsed from `source`. `target_user` is the user part probed."""

    source: IPAddress
    method: str
    user_agent: str | None = None
    target_user: str | None = None


@dataclass(frozen=True)
class AuthFailed:
    """Digest credentials from `source` for `user` were wrong (not merely stale)."""

    source: IPAddress
    user: str


@dataclass(frozen=True)
class MalformedMessage:
    """Bytes from `source` that did not parse as SIP."""

    source: IPAddress
    reason: str = ""


Event = RequestSeen | AuthFailed | MalformedMessage


@dataclass(frozen=True)
class BanDecision:
    """A detector's verdict: ban `target`, because `reason`; `detail` is for humans."""

    target: BanTarget
    reason: BanReason
    detail: str

    def describe(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


class Detector(Protocol):
    def observe(self, event: Event, now: float) -> list[BanDecision]: ...


# --- bounded windows ---------------------------------------------------------

K = TypeVar("K")


class _Window:
    __slots__ = ("count", "fired", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.fired = False


class WindowCounter(Generic[K]):
    """Counts per key over fixed windows of `window` seconds, in a bounded table."""

    def __init__(self, window: float, limit: int = MAX_TRACKED) -> None:
        self.window = window
        self.limit = limit
        self._table: OrderedDict[K, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def hit(self, key: K, now: float) -> _Window:
        entry = self._table.get(key)
        if entry is None or now - entry.start >= self.window:
            entry = _Window(now)
            self._table[key] = entry
            if len(self._table) > self.limit:
                self._table.popitem(last=False)
        self._table.move_to_end(key)
        entry.count += 1
        return entry


def _key(source: IPAddress, prefix: int) -> BanTarget:
    return ban_target(source, prefix)


# --- detectors ---------------------------------------------------------------


class RatePeak:
    """Kamailio's pike: more than `max_requests` requests from a source per window."""

    def __init__(self, config: RatePeakDetector, ipv6_prefix_length: int = 64) -> None:
        self.config = config
        self.prefix = ipv6_prefix_length
        self._counts: WindowCounter[BanTarget] = WindowCounter(config.window)

    def observe(self, event: Event, now: float) -> list[BanDecision]:
        if not isinstance(event, RequestSeen):
            return []
        target = _key(event.source, self.prefix)
        window = self._counts.hit(target, now)
        if window.count > self.config.max_requests and not window.fired:
            window.fired = True
            return [
                BanDecision(
                    target,
                    BanReason.RATE_PEAK,
                    f"more than {self.config.max_requests} requests in {self.config.window:g} s",
                )
            ]
        return []


class AuthFailures:
    """Digest failures per source, and per user across sources (distributed guessing)."""

    def __init__(self, config: AuthFailureDetector, ipv6_prefix_length: int = 64) -> None:
        self.config = config
        self.prefix = ipv6_prefix_length
        self._per_source: WindowCounter[BanTarget] = WindowCounter(config.window)
        self._per_user: WindowCounter[str] = WindowCounter(config.window)
        # Which sources failed against a user in the user's current window.
        self._user_sources: dict[str, tuple[float, set[BanTarget]]] = {}

    def observe(self, event: Event, now: float) -> list[BanDecision]:
        if not isinstance(event, AuthFailed):
            return []
        decisions: list[BanDecision] = []
        target = _key(event.source, self.prefix)
        source_window = self._per_source.hit(target, now)
        if source_window.count >= self.config.per_source and not source_window.fired:
            source_window.fired = True
            decisions.append(
                BanDecision(
                    target,
                    BanReason.AUTH_FAILURES,
                    f"{source_window.count} digest failures in {self.config.window:g} s "
                    f"(last user {event.user!r})",
                )
            )
        user_window = self._per_user.hit(event.user, now)
        start, sources = self._user_sources.get(event.user, (user_window.start, set()))
        if start != user_window.start:
            sources = set()
        if len(sources) < MAX_USERS_PER_SOURCE:
            sources.add(target)
        self._user_sources[event.user] = (user_window.start, sources)
        if len(self._user_sources) > MAX_TRACKED:
            self._user_sources.pop(next(iter(self._user_sources)))
        if user_window.count >= self.config.per_user:
            # Once the user's threshold is crossed, every source still guessing its
            # password in this window is banned, including ones that join later.
            newly = sources if not user_window.fired else {target}
            user_window.fired = True
            already = {d.target for d in decisions}
            decisions.extend(
                BanDecision(
                    t,
                    BanReason.AUTH_FAILURES_USER,
                    f"{user_window.count} digest failures for user {event.user!r} "
                    f"in {self.config.window:g} s",
                )
                for t in sorted(newly, key=str)
                if t not in already
            )
        return decisions


class Scanner:
    """Scanner User-Agents (banned at first sight) and sweeps across many users."""

    #: Methods whose target user a sweep (svwar, svmap) walks through.
    SWEEP_METHODS: Final = frozenset({"OPTIONS", "REGISTER", "INVITE"})

    def __init__(self, config: ScannerDetector, ipv6_prefix_length: int = 64) -> None:
        self.config = config
        self.prefix = ipv6_prefix_length
        self._needles = tuple(ua.lower() for ua in config.user_agents if ua)
        self._sweeps: WindowCounter[BanTarget] = WindowCounter(config.sweep_window)
        self._users: dict[BanTarget, tuple[float, set[str]]] = {}

    def fingerprint(self, user_agent: str | None) -> str | None:
        """The scanner substring found in `user_agent`, if any."""
        if not user_agent:
            return None
        lowered = user_agent.lower()
        return next((n for n in self._needles if n in lowered), None)

    def observe(self, event: Event, now: float) -> list[BanDecision]:
        if not isinstance(event, RequestSeen):
            return []
        target = _key(event.source, self.prefix)
        needle = self.fingerprint(event.user_agent)
        if needle is not None:
            return [
                BanDecision(
                    target,
                    BanReason.SCANNER_USER_AGENT,
                    f"User-Agent {event.user_agent[:60]!r} matches {needle!r}"
                    if event.user_agent
                    else needle,
                )
            ]
        if event.method not in self.SWEEP_METHODS or not event.target_user:
            return []
        window = self._sweeps.hit(target, now)
        start, users = self._users.get(target, (window.start, set()))
        if start != window.start:
            users = set()
        if len(users) < MAX_USERS_PER_SOURCE:
            users.add(event.target_user)
        self._users[target] = (window.start, users)
        if len(self._users) > MAX_TRACKED:
            self._users.pop(next(iter(self._users)))
        if len(users) >= self.config.sweep_users and not window.fired:
            window.fired = True
            return [
                BanDecision(
                    target,
                    BanReason.SCANNER_SWEEP,
                    f"{len(users)} distinct users probed in {self.config.sweep_window:g} s",
                )
            ]
        return []


class Malformed:
    """More than `max_messages` unparsable messages from a source per window."""

    def __init__(self, config: MalformedDetector, ipv6_prefix_length: int = 64) -> None:
        self.config = config
        self.prefix = ipv6_prefix_length
        self._counts: WindowCounter[BanTarget] = WindowCounter(config.window)

    def observe(self, event: Event, now: float) -> list[BanDecision]:
        if not isinstance(event, MalformedMessage):
            return []
        target = _key(event.source, self.prefix)
        window = self._counts.hit(target, now)
        if window.count > self.config.max_messages and not window.fired:
            window.fired = True
            return [
                BanDecision(
                    target,
                    BanReason.MALFORMED,
                    f"more than {self.config.max_messages} malformed messages "
                    f"in {self.config.window:g} s",
                )
            ]
        return []


# --- the guard ---------------------------------------------------------------


def _networks_contain(networks: tuple[IPv4Network | IPv6Network, ...], address: IPAddress) -> bool:
    return any(address.version == n.version and address in n for n in networks)


class Guard:
    """All detectors behind one `observe`, with trusted sources kept out."""

    def __init__(
        self,
        config: Detectors,
        trusted: Iterable[IPv4Network | IPv6Network] = (),
        ipv6_prefix_length: int = 64,
    ) -> None:
        self.trusted = tuple(trusted)
        self.detectors: list[Detector] = []
        if config.rate.enabled:
            self.detectors.append(RatePeak(config.rate, ipv6_prefix_length))
        if config.auth.enabled:
            self.detectors.append(AuthFailures(config.auth, ipv6_prefix_length))
        if config.scanner.enabled:
            self.detectors.append(Scanner(config.scanner, ipv6_prefix_length))
        if config.malformed.enabled:
            self.detectors.append(Malformed(config.malformed, ipv6_prefix_length))
        self._recent: OrderedDict[BanTarget, float] = OrderedDict()
        #: Decisions made, per reason; and events ignored because the source is trusted.
        self.decisions: dict[BanReason, int] = dict.fromkeys(BanReason, 0)
        self.trusted_events = 0

    def is_trusted(self, address: IPAddress) -> bool:
        return _networks_contain(self.trusted, address)

    def _trusted_target(self, target: BanTarget) -> bool:
        # A /64 ban must not cover a trusted address either.
        return any(target.version == n.version and target.overlaps(n) for n in self.trusted)

    def observe(self, event: Event, now: float) -> list[BanDecision]:
        if self.is_trusted(event.source):
            self.trusted_events += 1
            return []
        out: list[BanDecision] = []
        for detector in self.detectors:
            for decision in detector.observe(event, now):
                if self._trusted_target(decision.target):
                    continue
                last = self._recent.get(decision.target)
                if last is not None and now - last < DECISION_HOLDOFF:
                    continue
                self._recent[decision.target] = now
                self._recent.move_to_end(decision.target)
                if len(self._recent) > MAX_TRACKED:
                    self._recent.popitem(last=False)
                self.decisions[decision.reason] += 1
                out.append(decision)
        return out

    def observe_all(self, events: Iterable[Event], now: float) -> Iterator[BanDecision]:
        for event in events:
            yield from self.observe(event, now)


__all__ = [
    "MAX_USERS_PER_SOURCE",
    "AuthFailed",
    "AuthFailures",
    "BanDecision",
    "BanReason",
    "Detector",
    "Event",
    "Guard",
    "Malformed",
    "MalformedMessage",
    "RatePeak",
    "RequestSeen",
    "Scanner",
    "WindowCounter",
]
