"""The configuration turned into the B2BUA's collaborators (values, no I/O).

Realm policies, admission limits, trunks, header manipulation and call timers come
from the YAML sections of ``sbc.config.b2bua``; ``sbc.app`` calls these on start and
on every reload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Final

from sbc.b2bua.admission import AdmissionControl, Limits
from sbc.b2bua.controller import (
    AuthVerdict,
    CallTimers,
    RealmPolicy,
    RegisterForward,
    RegisterOutcome,
)
from sbc.b2bua.identity import is_anonymous
from sbc.b2bua.manipulation import Direction, HeaderManipulator
from sbc.b2bua.realm import Hop, RealmTable
from sbc.b2bua.trunk_auth import TrunkCredentials
from sbc.b2bua.trunk_register import TrunkRegistration
from sbc.b2bua.trunks import Gateway, ProbePolicy, Trunk
from sbc.config.b2bua import (
    AdmissionLimits,
    CdrFormat,
    KeepaliveMethod,
    OptionsPolicy,
    ReferPolicy,
)
from sbc.config.schema import Config
from sbc.registrar.credentials import CredentialBackend, CredentialStoreError
from sbc.registrar.registrar import Registrar, RegistrarPolicy
from sbc.registrar.relay import Forward, RegistrationRelay, RelayPolicy
from sbc.sip.auth import (
    DigestAlgorithm,
    DigestServer,
    DigestServerConfig,
    PasswordGuessLimiter,
)
from sbc.sip.errors import ParseError
from sbc.sip.message import Message, Request, Response, make_response, new_tag
from sbc.sip.uri import SipUri, format_host
from sbc.transport.base import (
    Destination,
    Flow,
    ListenAddress,
    Transport,
    ip_literal,
    normalize_host,
)

logger = logging.getLogger(__name__)


def _limits(section: AdmissionLimits) -> Limits | None:
    if section.max_calls is None and section.calls_per_second is None:
        return None
    return Limits(section.max_calls, section.calls_per_second, section.burst)


def admission_limits(
    config: Config,
) -> tuple[dict[str, Limits], dict[str, Limits], dict[str, Limits]]:
    """Limits by realm, by trunk and by route (those without any are unlimited)."""
    realms = {r.name: limits for r in config.realms if (limits := _limits(r.limits))}
    trunks = {t.name: limits for t in config.trunks if (limits := _limits(t.limits))}
    routes = {r.name: limits for r in config.routes if (limits := _limits(r.limits))}
    return realms, trunks, routes


def admission(config: Config) -> AdmissionControl:
    realms, trunks, routes = admission_limits(config)
    return AdmissionControl(realms, trunks, retry_after=config.calls.retry_after, routes=routes)


def reconfigure_admission(
    control: AdmissionControl, config: Config, *, now: float | None = None
) -> None:
    """New limits; ``now`` (monotonic): the buckets are filled at the old rates up
    to the reload, so the time before it is credited as it was earned."""
    realms, trunks, routes = admission_limits(config)
    control.reconfigure(realms, trunks, config.calls.retry_after, routes=routes, now=now)


def realm_policies(config: Config) -> dict[str, RealmPolicy]:
    return {
        realm.name: RealmPolicy(
            registrar=realm.registrar,
            authenticate=frozenset(realm.authenticate),
            refer_relay=realm.refer is ReferPolicy.RELAY,
            options_relay=realm.options is OptionsPolicy.RELAY,
            large_requests_over_tcp=realm.large_requests_over_tcp,
            from_host=realm.from_host,
            to_host=realm.to_host,
            request_uri_host=realm.request_uri_host,
            srtp=realm.srtp,
            registers_per_second=realm.registers_per_second,
            codecs=frozenset(name.lower() for name in realm.codecs),
            trust_identity=realm.trust_identity,
            registered_only=realm.registered_only,
        )
        for realm in config.realms
    }


def call_timers(config: Config) -> CallTimers:
    calls = config.calls
    return CallTimers(
        max_duration=float(calls.max_duration),
        no_answer_timeout=float(calls.no_answer_timeout),
        timer_c=float(calls.timer_c),
        progress_timeout=float(calls.progress_timeout),
        sequential_ring_timeout=float(calls.sequential_ring_timeout),
        session_expires=float(calls.session_expires),
        min_se=float(calls.min_se),
    )


def configured_peers(config: Config) -> frozenset[IPv4Address | IPv6Address]:
    """The addresses the configuration names as peers: static routes' hosts, trunk
    gateways given by address, upstream registrars. (Gateways given by name count
    by what they resolve to: ``SbcNode._trusted_source``.)"""
    peers: set[IPv4Address | IPv6Address] = set()
    for route in config.routes:
        if route.host is not None:
            peers.add(route.host)
    for trunk in config.trunks:
        for gateway in trunk.gateways:
            address = ip_literal(gateway.host)
            if address is not None:
                peers.add(address)
    for realm in config.realms:
        if realm.register_relay is not None:
            peers.add(realm.register_relay.host)
    return frozenset(peers)


#: The widest route ``source`` network (prefix length) that names a peer, not a
#: population: at most 256 IPv4 addresses, or one IPv6 subnet.
PEER_NETWORK_PREFIX: Final = {4: 24, 6: 64}


def configured_peer_networks(config: Config) -> tuple[IPv4Network | IPv6Network, ...]:
    """Routes' ``source`` networks no wider than :data:`PEER_NETWORK_PREFIX`: a
    carrier that only sends calls in is named this way, by the addresses it sends
    from. Wider networks (``0.0.0.0/0``, a LAN of phones) name no one peer."""
    networks: dict[IPv4Network | IPv6Network, None] = {}
    for route in config.routes:
        for network in route.source:
            if network.prefixlen >= PEER_NETWORK_PREFIX[network.version]:
                networks[network] = None
    return tuple(networks)


def trunks(config: Config) -> list[Trunk]:
    out = []
    for trunk in config.trunks:
        gateways = tuple(
            Gateway(
                name=f"{trunk.name}/{index}",
                host=gateway.host,
                port=gateway.port,
                transport=Transport(gateway.transport.value),
                priority=gateway.priority,
                weight=gateway.weight,
            )
            for index, gateway in enumerate(trunk.gateways)
        )
        probe = trunk.probe
        out.append(
            Trunk(
                name=trunk.name,
                realm=trunk.realm,
                gateways=gateways,
                probe=ProbePolicy(
                    enabled=probe.enabled,
                    interval=probe.interval,
                    timeout=probe.timeout,
                    down_after=probe.down_after,
                    up_after=probe.up_after,
                ),
                max_attempts=trunk.max_attempts,
                try_when_all_down=trunk.try_when_all_down,
            )
        )
    return out


def trunk_credentials(config: Config) -> dict[str, TrunkCredentials]:
    """The accounts the SBC has at its trunks' carriers, by trunk."""
    return {
        trunk.name: TrunkCredentials(trunk.auth.username, trunk.auth.password, trunk.auth.realm)
        for trunk in config.trunks
        if trunk.auth is not None
    }


def trunk_registrations(config: Config) -> list[TrunkRegistration]:
    """The registrations the SBC keeps at its trunks' carriers."""
    out = []
    for trunk in config.trunks:
        register = trunk.register
        if register is None:
            continue
        username = register.username or (trunk.auth.username if trunk.auth else None)
        if username is None:
            continue  # refused at load
        first = min(trunk.gateways, key=lambda gateway: gateway.priority)
        domain = register.domain or format_host(first.host)
        if first.port is not None and register.domain is None:
            domain = f"{domain}:{first.port}"
        out.append(TrunkRegistration(trunk.name, username, domain, register.expires))
    return out


def header_rules(config: Config) -> dict[str, HeaderManipulator]:
    """Each realm's header manipulation (realms without rules are left out)."""
    out = {}
    for realm in config.realms:
        if not realm.header_rules:
            continue
        rules = [rule.rule() for rule in realm.header_rules]
        out[realm.name] = HeaderManipulator(rules)
    return out


class RealmManipulation:
    """The controller's ``ManipulationPort``: each realm's rules, by direction."""

    def __init__(self, manipulators: Mapping[str, HeaderManipulator]) -> None:
        self.manipulators = dict(manipulators)

    def kept_headers(self, realm: str) -> frozenset[str]:
        manipulator = self.manipulators.get(realm)
        return frozenset() if manipulator is None else manipulator.kept_headers()

    def inbound(self, message: Message, realm: str) -> None:
        self._apply(message, Direction.INBOUND, realm)

    def outbound(self, message: Message, realm: str) -> None:
        self._apply(message, Direction.OUTBOUND, realm)

    def _apply(self, message: Message, direction: Direction, realm: str) -> None:
        manipulator = self.manipulators.get(realm)
        if manipulator is not None and isinstance(message, Request | Response):
            manipulator.apply(message, direction, realm)


class EmbeddedRegistrar:
    """The controller's ``RegistrarPort`` over the embedded registrar.

    The registrar keeps wall-clock times (bindings are replicated to the standby);
    the controller's monotonic ``now`` is replaced by ``wall()``. A request a
    registered user sends to be relayed (INVITE, MESSAGE ...) is challenged with
    407, and the authenticated user must be the From user (403 otherwise), so one
    account cannot call as another; or the From is anonymous (RFC 3323).
    """

    def __init__(self, registrar: Registrar, wall: Callable[[], float] = time.time) -> None:
        self.registrar = registrar
        self.wall = wall

    def register(
        self, request: Request, flow: Flow, realm: str, listen: ListenAddress, now: float
    ) -> RegisterOutcome:
        result = self.registrar.register(request, flow, realm, listen, self.wall())
        failure = result.auth_failure
        return RegisterOutcome(
            result.response,
            auth_failed=failure is not None,
            failed_user=None if failure is None else failure.username,
        )

    def answers_challenge(self, request: Request, now: float) -> bool:
        return self.registrar.answers_challenge(request, self.wall())

    def authenticate(
        self, request: Request, now: float, *, source: str | None = None
    ) -> AuthVerdict:
        check = self.registrar.check_credentials(request, self.wall(), proxy=True, source=source)
        if check.response is not None:
            failure = check.failure
            return AuthVerdict(
                check.response,
                user=None if failure is None else failure.username,
                auth_failed=failure is not None,
            )
        assert check.result is not None
        user = check.result.username
        try:
            from_user = (
                request.from_.uri.user_unescaped if isinstance(request.from_.uri, SipUri) else None
            )
        except ParseError:
            from_user = None
        if user is None or (from_user != user and not is_anonymous(request)):
            # An anonymous From (RFC 3323) is the user's to send: the SBC asserts who
            # it is where that may be said (sbc.b2bua.identity).
            response = make_response(request, 403, "Forbidden: not your identity", to_tag=new_tag())
            return AuthVerdict(response, user=user, auth_failed=False)
        return AuthVerdict(None, user=user)

    def user_exists(self, user: str) -> bool:
        try:
            return self.registrar.credentials.lookup(user, self.registrar.policy.realm) is not None
        except CredentialStoreError:
            return False


def registrar(config: Config, credentials: CredentialBackend, key: bytes) -> Registrar:
    """The embedded registrar from ``registrar:``, its digest nonces keyed by ``key``."""
    section = config.registrar
    policy = RegistrarPolicy(
        realm=section.realm,
        domains=section.domains,
        min_expires=section.min_expires,
        max_expires=section.max_expires,
        default_expires=section.default_expires,
        max_contacts=section.max_contacts,
        max_aors=section.max_users,
        nat_keepalive=section.nat_keepalive > 0,
        keepalive_interval=float(section.nat_keepalive or 25),
        keepalive_options=section.keepalive is KeepaliveMethod.OPTIONS,
        keepalive_failures=section.keepalive_failures,
    )
    algorithms = tuple(
        DigestAlgorithm.from_token(name.value) for name in section.digest_algorithms
    ) or (DigestAlgorithm.MD5,)
    digest = DigestServer(DigestServerConfig(realm=section.realm, key=key, algorithms=algorithms))
    limits = section.guessing
    per_user = limits.per_user
    auth = config.firewall.detectors.auth
    if config.firewall.enabled and auth.enabled:
        # A locked-out guess is not reported to the firewall: below its per-user
        # detector, the firewall would never see enough to ban by user.
        per_user = max(per_user, auth.per_user)
    guesses = PasswordGuessLimiter(
        per_source=limits.per_source,
        per_user=per_user,
        window=float(limits.window),
        lockout=float(limits.lockout),
        ipv6_prefix=config.firewall.ipv6_prefix_length,
    )
    return Registrar(policy, credentials, policy.new_location(), digest, guesses)


def users_db(config: Config) -> Path:
    return config.registrar.users_db or config.state_dir / "users.sqlite"


def cdr_path(config: Config) -> Path:
    if config.cdr.path is not None:
        return config.cdr.path
    suffix = "sqlite" if config.cdr.format is CdrFormat.SQLITE else "jsonl"
    return config.state_dir / f"cdr.{suffix}"


class RegisterRelayPort:
    """The controller's view of one realm's registration relay (wall-clock inside)."""

    def __init__(self, relay: RegistrationRelay, wall: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.wall = wall

    @property
    def hop(self) -> Hop:
        policy = self.relay.policy
        return Hop(policy.realm, policy.local, policy.upstream)

    def register(
        self, request: Request, flow: Flow, realm: str, listen: ListenAddress, now: float
    ) -> Response | Forward:
        return self.relay.register(request, flow, realm, listen, self.wall())

    def upstream_response(
        self, forward: RegisterForward, phone_request: Request, response: Response, now: float
    ) -> Response:
        assert isinstance(forward, Forward)
        return self.relay.upstream_response(forward, phone_request, response, self.wall())

    def upstream_failed(self, forward: RegisterForward, phone_request: Request) -> Response:
        assert isinstance(forward, Forward)
        return self.relay.upstream_failed(forward, phone_request)

    def expire(self) -> None:
        self.relay.expire(self.wall())


def register_relays(
    config: Config, realms: RealmTable, previous: Mapping[str, RegisterRelayPort] | None = None
) -> dict[str, RegisterRelayPort]:
    """One relay per realm with ``register_relay`` (bound listeners from ``realms``);
    relays whose settings did not change keep their bindings."""
    out: dict[str, RegisterRelayPort] = {}
    for realm in config.realms:
        section = realm.register_relay
        if section is None:
            continue
        inside = realms.get(section.realm)
        upstream = Destination(
            Transport(section.transport.value), normalize_host(str(section.host)), section.port
        )
        local = None if inside is None else inside.listener(upstream.transport, upstream.host)
        if local is None:
            logger.error(
                "x realm %s: register_relay needs a %s listener in realm %s",
                realm.name,
                upstream.transport.value,
                section.realm,
            )
            continue
        policy = RelayPolicy(
            section.realm,
            upstream,
            local,
            upstream_domain=section.domain,
            upstream_expires=section.upstream_expires,
            phone_expires=section.phone_expires,
            max_contacts=section.max_contacts,
        )
        old = (previous or {}).get(realm.name)
        if old is not None and old.relay.policy == policy:
            out[realm.name] = old
        else:
            out[realm.name] = RegisterRelayPort(RegistrationRelay(policy))
    return out
