"""Where routes point: registered contacts and trunks' gateways, as call targets.

``Directory`` is the controller's ``TargetSource``. A registered user's targets are
its unexpired bindings, each reached at the address its REGISTER came from (the
phone may be behind a NAT: RFC 3261 10.3 lets the registrar record where it
really is, RFC 5626 and Kamailio's nathelper do the same), with the registered
Contact as Request-URI. A trunk's targets are its usable gateways in failover
order (``TrunkState.candidates``), host names resolved by the app beforehand
(``resolved``: RFC 3263 results by gateway key) since the controller never waits;
a TLS gateway's name rides on its Destination for the certificate check (RFC 5922 4).

A named gateway's health is per address (``TrunkState.track_addresses``): the
Directory hands each state the addresses ``resolved`` holds before it plans a call,
takes a call's result or lists the probes due, so DNS changes reach health there;
a DOWN or held address is left out of a plan while another of the name is usable,
and every address is probed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace

from sbc.b2bua.controller import Target, TrunkPlan
from sbc.b2bua.routing import uri_user_host
from sbc.b2bua.trunks import Gateway, HealthChange, TrunkState, TrunkTable, address_key
from sbc.registrar.location import LocationService
from sbc.sip.uri import Uri, escape_user, format_host, service_urn
from sbc.transport.base import Destination, Transport, normalize_host
from sbc.transport.resolver import SrvRecord, order_srv_records

logger = logging.getLogger(__name__)


def gateway_uri(gateway: Gateway, user: str | None) -> str:
    """``sip:user@host:port;transport=x`` of a gateway for a call to ``user``."""
    scheme = "sips" if gateway.transport is Transport.TLS else "sip"
    userinfo = f"{escape_user(user)}@" if user else ""
    port = "" if gateway.port is None else f":{gateway.port}"
    param = ";transport=tcp" if gateway.transport is Transport.TCP else ""
    return f"{scheme}:{userinfo}{format_host(gateway.host)}{port}{param}"


def weighted_order(
    found: tuple[Destination, ...], records: tuple[SrvRecord | None, ...], rng: random.Random
) -> tuple[Destination, ...]:
    """``found`` (each address beside the SRV record it came from, a record's
    addresses together) with the records ordered again by RFC 2782: priority, then a
    weighted random draw within a priority. Addresses without a record keep ``found``."""
    runs: list[tuple[SrvRecord, list[Destination]]] = []
    for destination, record in zip(found, records, strict=True):
        if record is None:
            return found
        if runs and runs[-1][0] is record:
            runs[-1][1].append(destination)
        else:
            runs.append((record, [destination]))
    if len({record.priority for record, _ in runs}) == len(runs):
        return found  # one record per priority: nothing to draw
    ordered: list[Destination] = []
    for record in order_srv_records([record for record, _ in runs], rng):
        index = next(i for i, run in enumerate(runs) if run[0] is record)
        ordered.extend(runs.pop(index)[1])
    return tuple(ordered)


class Directory:
    """Registered users (location service) and trunks (health state), for routing."""

    def __init__(
        self,
        trunks: TrunkTable | None = None,
        location: LocationService | None = None,
        *,
        user_exists: Callable[[str], bool] | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.trunks = trunks or TrunkTable()
        self.location = location
        #: Location services of registration relays: tokens of the SBC's upstream
        #: Contacts, mapped to the phones behind them.
        self.relayed: list[LocationService] = []
        self.user_exists = user_exists
        self.wall = wall
        self.rng = rng or random.Random()
        #: RFC 3263 results for gateways with a host name, by gateway key: every
        #: address of the gateway's transport, in the order to try them (4.3).
        self.resolved: dict[str, tuple[Destination, ...]] = {}
        #: The SRV record each of ``resolved``'s addresses came from (same order),
        #: for gateways whose name has SRV records: their weighted order is drawn
        #: again for every call (RFC 2782), not once per lookup.
        self.resolved_srv: dict[str, tuple[SrvRecord | None, ...]] = {}

    def destination(self, gateway: Gateway) -> Destination | None:
        """A gateway's first address of the last lookup (not drawn per call); None
        while its name is unresolved. Where a gateway given by IP is probed; a
        resolved name's probes go to each of its addresses (``due_probes``)."""
        found = self._addresses(gateway)
        return found[0] if found else None

    def destinations(self, gateway: Gateway) -> tuple[Destination, ...]:
        """Every address of a gateway in RFC 3263 order for one call: it fails over
        from one to the next (4.3) before the next gateway; empty while the name is
        unresolved. SRV records of one priority are ordered by RFC 2782's weighted
        selection for each call, so calls share out by weight.

        A TLS gateway given by name carries that name as ``tls_name``: RFC 5922 4,
        its certificate must name the SIP domain the request was routed to (the
        configured host), not the address (or SRV target) it resolved to.
        """
        found = self._addresses(gateway)
        records = self.resolved_srv.get(gateway.key)
        if records is None or len(records) != len(found):
            return found
        return weighted_order(found, records, self.rng)

    def _probed(self, gateway: Gateway, address: str | None) -> Destination | None:
        """Where the probe of ``address`` of a gateway's name goes (None: the gateway's
        own, ``destination``); None while unresolved."""
        if address is None:
            return self.destination(gateway)
        return next((d for d in self._addresses(gateway) if address_key(d) == address), None)

    def _track(self, state: TrunkState, now: float, gateway: Gateway | None = None) -> None:
        """Give ``state`` the addresses its named gateways (or ``gateway``) resolve to
        now: health per address follows DNS (new ones start, gone ones are forgotten)."""
        for named in state.trunk.gateways if gateway is None else (gateway,):
            if named.static_destination is None:
                found = (address_key(d) for d in self._addresses(named))
                self._log(state.track_addresses(named.key, found, now))

    def _addresses(self, gateway: Gateway) -> tuple[Destination, ...]:
        """A gateway's addresses in the order of its last lookup."""
        static = gateway.static_destination
        if static is not None:
            return (static,)
        found = self.resolved.get(gateway.key, ())
        if all(d.transport is not Transport.TLS or d.tls_name is not None for d in found):
            return found
        name = normalize_host(gateway.host)
        named = tuple(
            replace(d, tls_name=name) if d.transport is Transport.TLS else d for d in found
        )
        # Kept, so the next call to this gateway reuses them (until the next lookup).
        self.resolved[gateway.key] = named
        return named

    # -- TargetSource ---------------------------------------------------------------------

    def registered(self, uri: Uri, realm: str | None, now: float) -> list[Target]:
        locations = [*([self.location] if self.location is not None else []), *self.relayed]
        out = []
        wall = self.wall()
        bindings = [b for location in locations for b in location.lookup(uri, wall)]
        for binding in bindings:
            if realm is not None and binding.realm != realm:
                continue
            # RFC 3327 5.3: through the proxies the REGISTER came by (its Path); the
            # q-value orders the contacts for the controller (RFC 3261 16.6).
            target = Target(binding.realm, binding.received, binding.contact, route=binding.path)
            out.append(target if binding.q is None else replace(target, q=binding.q))
        return out

    def registered_from(self, source: Destination, realm: str) -> list[str]:
        """The users of the phones of ``realm`` whose REGISTER came from ``source``
        (transport, address and port), sorted: one phone may register several. The
        embedded registrar's only: a relay's bindings are its tokens, not users."""
        location = self.location
        if location is None:
            return []
        users = {
            binding.aor.rpartition("@")[0] if location.domains else binding.aor
            for binding in location.registered_from(source, self.wall())
            if binding.realm == realm
        }
        return sorted(users)

    def user_known(self, uri: Uri) -> bool:
        user, _ = uri_user_host(uri)
        if user is None or self.user_exists is None:
            return False
        return self.user_exists(user)

    def trunk(self, name: str, uri: Uri, now: float) -> TrunkPlan | None:
        state = self.trunks.get(name)
        if state is None:
            return None
        user, _ = uri_user_host(uri)
        # A service URN (RFC 5031) stays the Request-URI: an emergency service
        # routes on it; the request still goes to each gateway.
        urn = service_urn(uri)
        targets: list[Target] = []
        tried: set[tuple[Transport, str, int]] = set()
        self._track(state, now)
        # Every usable gateway in order, each address of its name in turn (RFC 3263
        # 4.3), unresolved ones left out before the plan is cut to max_attempts: a
        # name DNS has not answered yet uses up no attempt.
        for gateway in state.ordered(self.rng, now):
            usable = state.usable_addresses(gateway.key, now)
            for destination in self.destinations(gateway):
                if usable is not None and address_key(destination) not in usable:
                    # Down or held while another address of the name is not: a call
                    # must not wait for a dead server's timeout (Timer B, 32 s) first.
                    continue
                # Two gateways that reach one address (two names of one host, a port
                # given and left to the default): a failover to the same server after
                # its 503 or timeout gets the same answer (RFC 3263 4.3: the next
                # server), and would use up an attempt.
                address = (destination.transport, destination.host, destination.port)
                if address in tried:
                    continue
                tried.add(address)
                request_uri = urn or gateway_uri(gateway, user)
                targets.append(Target(state.trunk.realm, destination, request_uri, gateway.key))
        # None: every address of every gateway (Trunk.max_attempts), the controller's
        # cap aside.
        attempts = state.trunk.max_attempts or len(targets)
        return TrunkPlan(
            state.trunk.realm,
            tuple(targets[:attempts]),
            attempts,
            state.trunk.failover_statuses,
        )

    def call_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        destination: Destination | None = None,
    ) -> None:
        """Passive health: how a gateway answered a call (None: it never did); a 503's
        ``retry_after`` holds the gateway back from calls (``TrunkState.call_result``).
        Both are about ``destination``, the address the call went to, for a gateway
        given by name."""
        state = self._state_of(trunk, gateway)
        if state is None:
            return
        self._track(state, now, state.gateway(gateway))
        address = None if destination is None else address_key(destination)
        self._log(state.call_result(gateway, status, now, retry_after, address))

    # -- probing --------------------------------------------------------------------------

    def due_probes(self, now: float) -> list[tuple[str, Gateway, Destination]]:
        """Gateways to probe now, each address of a name's (timed-out probes counted
        as failures first): the destination says which address a probe is about."""
        for state in self.trunks:
            self._track(state, now)
        for change in self.trunks.expire_probes(now):
            self._log(change)
        out = []
        for state, gateway, address in self.trunks.due_addresses(now):
            destination = self._probed(gateway, address)
            if destination is None:
                # Not now, nor at every timer until DNS answers: one interval later.
                state.probe_skipped(gateway.key, now, address)
                continue
            out.append((state.trunk.name, gateway, destination))
        return out

    def probe_sent(
        self, trunk: str, gateway: str, now: float, destination: Destination | None = None
    ) -> None:
        state = self._state_of(trunk, gateway)
        if state is not None:
            address = None if destination is None else address_key(destination)
            state.probe_sent(gateway, now, address)

    def probe_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        destination: Destination | None = None,
    ) -> None:
        state = self._state_of(trunk, gateway)
        if state is not None:
            address = None if destination is None else address_key(destination)
            self._log(state.probe_result(gateway, status, now, address))

    def _state_of(self, trunk: str, gateway: str) -> TrunkState | None:
        """The trunk's state if it still has ``gateway``: a reload may have removed
        either while a call or probe to it was in flight (its outcome is then moot)."""
        state = self.trunks.get(trunk)
        if state is None or not state.has_gateway(gateway):
            return None
        return state

    def next_probe(self) -> float | None:
        return self.trunks.next_deadline()

    @staticmethod
    def _log(change: HealthChange | None) -> None:
        # TrunkState logs each flip itself (down as a warning, up as info).
        if change is not None:
            logger.debug("- %s", change)

    def trunk_realm(self, trunk: str) -> str | None:
        """The realm a trunk's calls and probes leave through."""
        state = self.trunks.get(trunk)
        return None if state is None else state.trunk.realm
