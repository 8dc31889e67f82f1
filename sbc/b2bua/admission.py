"""Call admission control: concurrent-call and calls-per-second limits per realm, trunk
and route.

Pure: no I/O, no clock. The B2BUA asks :meth:`AdmissionControl.admit` before it
creates a call, passing the current time (seconds, monotonic) as ``now``; when the
call ends it hands the ticket back to :meth:`AdmissionControl.release`.

A call counts against every scope it touches: each realm of its two legs (once,
even when both legs share a realm), the trunk it was routed to and the route that
sent it there. Admission is
all-or-nothing: if any scope refuses, no scope is charged, so a call refused by its
realm does not spend its trunk's rate token.

A refused call is answered ``503 Service Unavailable`` (RFC 3261 21.5.4) with a
``Retry-After`` (RFC 3261 20.33): for a rate refusal, the seconds until the scope
has a token again; for a concurrency refusal, the configured value (when a call
ends cannot be known). When several scopes refuse, the longest of their waits.

Before any scope, the node itself: while its ``busy`` check says it cannot set up
more calls in time (the SBC's media set-up queue is full), every new call is
refused the same way, scope ``node``. Offered more calls than it can carry, the
SBC then sets up the calls it takes in a fraction of a second; without the check
each call waited behind all the others, for seconds, and many callers gave up
(docs/performance.md, "Overload").

An emergency route's calls (112, 911) are never refused by the realms, the trunk or
the node: only by the limits of their own route, which bound a flood of false
emergency calls (TDoS) without letting ordinary traffic crowd genuine ones out.

Scope names come from configuration (realm, trunk and route names), never from the wire,
so the per-scope tables are bounded by the configuration the node has had.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "NODE",
    "REFUSAL_STATUS",
    "AdmissionControl",
    "AdmissionScope",
    "AdmissionTicket",
    "Admitted",
    "Decision",
    "Limits",
    "RefusalReason",
    "Refused",
]

logger = logging.getLogger(__name__)

#: RFC 3261 21.5.4: the answer to a call refused for lack of capacity.
REFUSAL_STATUS: Final = 503
#: Seconds in the Retry-After of a concurrency refusal unless configured otherwise.
DEFAULT_RETRY_AFTER: Final = 5
#: What counts as a whole token: refilling 0.1 s at 10 calls/s must give one even
#: when the subtraction of two float times rounds down.
_WHOLE_TOKEN: Final = 1.0 - 1e-9

# Tickets are numbered across all controllers of the process, so a ticket from
# another controller (or an earlier one) never releases a call it does not name.
_serials = itertools.count(1)


class AdmissionScope(enum.StrEnum):
    """What a limit applies to; the values are the names used in counters."""

    REALM = "realm"
    TRUNK = "trunk"
    ROUTE = "route"
    #: The SBC as a whole (its one name is ``NODE``).
    NODE = "node"


class RefusalReason(enum.Enum):
    """Why a scope refused a call."""

    #: The scope already holds ``max_calls`` calls.
    CONCURRENT = "concurrent"
    #: The scope's token bucket is empty (``calls_per_second`` exceeded).
    RATE = "rate"
    #: The node cannot set up more calls in time (its ``busy`` check).
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one realm or trunk; an unset limit does not apply.

    ``burst`` is how many calls may start back to back once the bucket is full; it
    defaults to ``max(1, ceil(calls_per_second))`` (one second's worth of calls) and
    is only meaningful with ``calls_per_second``.
    """

    max_calls: int | None = None
    calls_per_second: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.max_calls is not None and (not _is_int(self.max_calls) or self.max_calls < 0):
            raise ValueError(f"max_calls must be an integer >= 0, not {self.max_calls!r}")
        cps = self.calls_per_second
        if cps is not None and (
            isinstance(cps, bool)
            or not isinstance(cps, int | float)
            or not math.isfinite(cps)
            or cps <= 0
        ):
            raise ValueError(f"calls_per_second must be a finite number > 0, not {cps!r}")
        if self.burst is not None:
            if cps is None:
                raise ValueError("burst needs calls_per_second")
            if not _is_int(self.burst) or self.burst < 1:
                raise ValueError(f"burst must be an integer >= 1, not {self.burst!r}")
        elif cps is not None:
            object.__setattr__(self, "burst", max(1, math.ceil(cps)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_retry_after(retry_after: int) -> int:
    if not _is_int(retry_after) or retry_after < 1:
        raise ValueError(f"retry_after must be an integer >= 1, not {retry_after!r}")
    return retry_after


@dataclass(frozen=True, slots=True)
class AdmissionTicket:
    """The scopes an admitted call holds; give it back to ``release`` when the call ends.

    Opaque to the caller except for logging and replication: ``serial`` tells two
    calls over the same scopes apart.
    """

    serial: int
    realms: tuple[str, ...]
    trunk: str | None
    route: str | None = None

    @property
    def scopes(self) -> tuple[tuple[AdmissionScope, str], ...]:
        """Every (scope, name) the call is counted against."""
        held = tuple((AdmissionScope.REALM, realm) for realm in self.realms)
        if self.trunk is not None:
            held += ((AdmissionScope.TRUNK, self.trunk),)
        if self.route is not None:
            held += ((AdmissionScope.ROUTE, self.route),)
        return held


@dataclass(frozen=True, slots=True)
class Admitted:
    """The call may proceed; ``ticket`` holds its slots until released."""

    ticket: AdmissionTicket


@dataclass(frozen=True, slots=True)
class Refused:
    """The call must be refused: ``scope`` ``name`` is full or too fast."""

    scope: AdmissionScope
    name: str
    reason: RefusalReason
    #: Seconds for the Retry-After header (RFC 3261 20.33), >= 1.
    retry_after: int

    @property
    def status(self) -> int:
        """The status to answer the INVITE with (RFC 3261 21.5.4)."""
        return REFUSAL_STATUS

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Extra header fields for that response, as ``make_response`` takes them."""
        return (("Retry-After", str(self.retry_after)),)


Decision = Admitted | Refused


@dataclass(slots=True)
class _ScopeState:
    """Mutable bookkeeping of one (scope, name); never leaves this module."""

    active: int = 0
    admitted: int = 0
    refused_concurrent: int = 0
    refused_rate: int = 0
    refused_busy: int = 0
    #: Token bucket: tokens left at ``updated``; None before the first rate check.
    tokens: float = 0.0
    updated: float | None = None


class AdmissionControl:
    """Per-realm, per-trunk and per-route admission of new calls, driven by the
    caller's ``now``.

    A scope without ``Limits`` (an unknown realm, trunk or route) is unlimited, but its
    calls are still counted, so limits configured later see the calls in flight.
    """

    def __init__(
        self,
        realms: Mapping[str, Limits],
        trunks: Mapping[str, Limits],
        *,
        retry_after: int = DEFAULT_RETRY_AFTER,
        routes: Mapping[str, Limits] | None = None,
    ) -> None:
        self._limits: dict[tuple[AdmissionScope, str], Limits] = {}
        self._retry_after = DEFAULT_RETRY_AFTER
        self._states: dict[tuple[AdmissionScope, str], _ScopeState] = {}
        self._outstanding: set[AdmissionTicket] = set()
        #: Asked before any scope: True while the node can take no call in time
        #: (the SBC sets it to its media set-up backlog check).
        self.busy: Callable[[], bool] | None = None
        self._configure(realms, trunks, retry_after, routes or {})

    # -- decisions ---------------------------------------------------------------------

    def admit(
        self,
        realms: Iterable[str],
        trunk: str | None,
        now: float,
        *,
        route: str | None = None,
        replacing: bool = False,
        emergency: bool = False,
    ) -> Decision:
        """Admit a new call touching ``realms`` (both legs'), ``trunk`` and ``route``
        at ``now``.

        The node's ``busy`` check comes first, then the scopes in order (realms as
        given, the trunk, the route), concurrency before rate; the first refusal is
        returned, with the longest Retry-After of every scope that refuses, and
        nothing is charged. When every scope agrees, each holds one more call and
        spends one rate token.

        ``replacing``: the call replaces one the SBC holds (an INVITE with Replaces,
        RFC 3891: an attended transfer), which ends once it is answered. It adds no
        concurrent call, so only the rate limits apply; it is counted as usual, and
        for the moment both are up a scope holds one call over its limit.

        ``emergency``: a call of an emergency route is refused by that route's own
        limits only (not by the realms, the trunk or the node's ``busy``): it is
        counted and charged like any other, and may take those over their limits.
        """
        if not emergency and self.busy is not None and self.busy():
            self._state(_NODE).refused_busy += 1
            return Refused(AdmissionScope.NODE, NODE, RefusalReason.BUSY, self._retry_after)
        ticket = self._ticket(realms, trunk, route)
        keys = ticket.scopes
        if emergency:
            # Its route's own limits, the last scope of the ticket (if any).
            keys = keys[-1:] if route is not None else ()
        for index, key in enumerate(keys):
            refusal = self._check(key, now, concurrent=not replacing)
            if refusal is None:
                continue
            state = self._state(key)
            if refusal.reason is RefusalReason.CONCURRENT:
                state.refused_concurrent += 1
            else:
                state.refused_rate += 1
            # The first refusal names the scope; the wait is the longest of every
            # scope that refuses now, so a caller that honours Retry-After is not
            # refused again by the next one (the realm had a token, the trunk not).
            later = (
                self._check(other, now, concurrent=not replacing) for other in keys[index + 1 :]
            )
            wait = max([refusal.retry_after, *(r.retry_after for r in later if r is not None)])
            refusal = replace(refusal, retry_after=wait)
            logger.debug(
                "x call refused by %s %s: %s, retry after %d s",
                refusal.scope.value,
                refusal.name,
                refusal.reason.value,
                refusal.retry_after,
            )
            return refusal
        return self._charge(ticket)

    def _charge(self, ticket: AdmissionTicket) -> Admitted:
        """Each scope of ``ticket`` holds one more call and spends one rate token."""
        for key in ticket.scopes:
            state = self._state(key)
            if self._limits.get(key, _UNLIMITED).calls_per_second is not None:
                # _WHOLE_TOKEN admits at 0.999...; never go below empty.
                state.tokens = max(0.0, state.tokens - 1.0)
            state.active += 1
            state.admitted += 1
        self._outstanding.add(ticket)
        return Admitted(ticket)

    def release(self, ticket: AdmissionTicket) -> None:
        """The call holding ``ticket`` ended; a second release of it does nothing."""
        if ticket not in self._outstanding:
            return
        self._outstanding.discard(ticket)
        for key in ticket.scopes:
            state = self._states.get(key)
            # States are never dropped (not even when reconfiguration removes the
            # scope), so a ticket always finds its counts; the floor is a backstop.
            if state is not None and state.active > 0:
                state.active -= 1

    def restore(self, calls: Iterable[tuple[Iterable[str], str | None]]) -> list[AdmissionTicket]:
        """Count calls this node already holds (after an HA takeover); their tickets.

        Each item is a call's (realms, trunk). No limit is checked and no token
        spent: the calls exist whatever the limits say, and were admitted (and
        counted as admitted) by the node that created them.
        """
        tickets = []
        for realms, trunk in calls:
            ticket = self._ticket(realms, trunk)
            for key in ticket.scopes:
                self._state(key).active += 1
            self._outstanding.add(ticket)
            tickets.append(ticket)
        if tickets:
            logger.info("- restored %d calls into admission counts", len(tickets))
        return tickets

    # -- configuration -----------------------------------------------------------------

    def reconfigure(
        self,
        realms: Mapping[str, Limits],
        trunks: Mapping[str, Limits],
        retry_after: int = DEFAULT_RETRY_AFTER,
        *,
        routes: Mapping[str, Limits] | None = None,
        now: float | None = None,
    ) -> None:
        """New limits for new calls; calls in progress stay counted and releasable.

        A bucket keeps its tokens (capped at the new burst); a scope that gains a
        rate limit starts with a full bucket. With ``now`` (the time of the reload)
        each bucket is first filled up to ``now`` at its old rate: without it, the
        time since the bucket's last call is filled at the new rate, so lowering a
        rate would also take back tokens earned under the old one.
        """
        if now is not None:
            for key, state in self._states.items():
                self._refill(state, self._limits.get(key, _UNLIMITED), now)
        routes = routes or {}
        self._configure(realms, trunks, retry_after, routes)
        logger.info(
            "- admission limits: %d realms, %d trunks, %d routes, retry after %d s",
            len(realms),
            len(trunks),
            len(routes),
            self._retry_after,
        )

    def _configure(
        self,
        realms: Mapping[str, Limits],
        trunks: Mapping[str, Limits],
        retry_after: int,
        routes: Mapping[str, Limits],
    ) -> None:
        limits = {(AdmissionScope.REALM, name): value for name, value in realms.items()}
        limits.update({(AdmissionScope.TRUNK, name): value for name, value in trunks.items()})
        limits.update({(AdmissionScope.ROUTE, name): value for name, value in routes.items()})
        for key, value in limits.items():
            if not isinstance(value, Limits):
                raise TypeError(f"{key[0].value} {key[1]}: limits must be Limits, not {value!r}")
        retry_after = _check_retry_after(retry_after)
        for key, state in self._states.items():
            new = limits.get(key, _UNLIMITED)
            if new.burst is None:
                state.updated = None
            elif state.updated is not None:
                state.tokens = min(state.tokens, float(new.burst))
        self._limits = limits
        self._retry_after = retry_after

    # -- observation -------------------------------------------------------------------

    def active(self, scope: AdmissionScope | str, name: str) -> int:
        """Calls ``scope`` ``name`` holds now (``scope``: "realm", "trunk", "route")."""
        state = self._states.get((AdmissionScope(scope), name))
        return 0 if state is None else state.active

    def counters(self) -> dict[str, dict[str, dict[str, int]]]:
        """Plain counts for metrics: ``{scope: {name: {counter: value}}}``.

        Every configured scope appears (zeros until used), and every scope that has
        seen a call, configured or not. ``admitted`` and the ``refused_*`` counters
        only grow; ``active`` is the calls held now.
        """
        out: dict[str, dict[str, dict[str, int]]] = {scope.value: {} for scope in AdmissionScope}
        for scope, name in sorted({*self._limits, *self._states}):
            state = self._states.get((scope, name), _ScopeState())
            out[scope.value][name] = {
                "admitted": state.admitted,
                "refused_concurrent": state.refused_concurrent,
                "refused_rate": state.refused_rate,
                "refused_busy": state.refused_busy,
                "active": state.active,
            }
        return out

    # -- internals ---------------------------------------------------------------------

    def _ticket(
        self, realms: Iterable[str], trunk: str | None, route: str | None = None
    ) -> AdmissionTicket:
        if isinstance(realms, str):
            # A bare string would be read as one realm per character.
            raise TypeError("realms must be an iterable of realm names, not a string")
        return AdmissionTicket(next(_serials), tuple(dict.fromkeys(realms)), trunk, route)

    def _state(self, key: tuple[AdmissionScope, str]) -> _ScopeState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _ScopeState()
        return state

    def _check(
        self, key: tuple[AdmissionScope, str], now: float, *, concurrent: bool = True
    ) -> Refused | None:
        """The refusal ``key`` gives a new call at ``now``, or None; charges nothing.
        ``concurrent``: the concurrent-call limit applies too."""
        limits = self._limits.get(key)
        if limits is None:
            return None
        state = self._state(key)
        scope, name = key
        if concurrent and limits.max_calls is not None and state.active >= limits.max_calls:
            return Refused(scope, name, RefusalReason.CONCURRENT, self._retry_after)
        rate, burst = limits.calls_per_second, limits.burst
        if rate is None or burst is None:
            return None
        if state.updated is None:
            state.tokens, state.updated = float(burst), now
        else:
            # Refilling is not charging: the bucket is brought to ``now`` either way.
            self._refill(state, limits, now)
        # One threshold for both answers, so a caller retrying after ``retry_after``
        # seconds is admitted and one retrying a second earlier is not.
        if state.tokens >= _WHOLE_TOKEN:
            return None
        retry_after = max(1, math.ceil((_WHOLE_TOKEN - state.tokens) / rate))
        return Refused(scope, name, RefusalReason.RATE, retry_after)

    @staticmethod
    def _refill(state: _ScopeState, limits: Limits, now: float) -> None:
        """Bring a started bucket to ``now`` at ``limits``' rate; a clock that went
        back refills nothing (and moves nothing back)."""
        rate, burst = limits.calls_per_second, limits.burst
        if rate is None or burst is None or state.updated is None or now <= state.updated:
            return
        state.tokens = min(float(burst), state.tokens + (now - state.updated) * rate)
        state.updated = now


_UNLIMITED: Final = Limits()
#: The name of the one ``node`` scope.
NODE: Final = "sbc"
_NODE: Final = (AdmissionScope.NODE, NODE)
