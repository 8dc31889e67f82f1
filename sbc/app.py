"""The SBC process: configuration, SIP transports, transactions, management.

``SbcNode`` wires the pieces together on one asyncio loop: the transport layer
hands parsed messages to the transaction layer, whose events go to the
transaction user (today the LocalResponder); the transaction layer's outputs go
back to the transport layer and its next deadline becomes one loop timer.

With ``firewall.enabled``, the edge firewall (nftables table ``inet sbc``) is
installed before SIP binds and removed after it stops; every request received and
every message that fails to parse is fed to its detectors.

Signals: SIGTERM and SIGINT stop gracefully; SIGHUP reloads the configuration
file. A file that does not load is refused with its problems logged, and the
running configuration stays in force; so does the old one when the new
listeners cannot be bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Coroutine, Iterable
from dataclasses import replace
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from aiohttp import web

from sbc import assembly, gc_tuning
from sbc.b2bua.call import Call
from sbc.b2bua.controller import (
    AllocateMedia,
    AuthFailure,
    CallController,
    DeleteMedia,
    MediaCommand,
    Step,
)
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Hop, Realm, RealmTable
from sbc.b2bua.routing import RouteAction, Router, RouteRule
from sbc.b2bua.targets import Directory
from sbc.b2bua.topology import sip_uri_for, via_for
from sbc.b2bua.trunk_auth import TrunkAuth
from sbc.b2bua.trunk_register import TrunkRegistrations
from sbc.b2bua.trunks import TrunkTable
from sbc.cdr.from_call import cdr_record
from sbc.cdr.record import CdrError
from sbc.cdr.store import CdrSink, CdrStore, JsonLinesCdrStore
from sbc.cli import setup_logging
from sbc.config.b2bua import CdrFormat
from sbc.config.loader import ConfigError, default_config, load_config
from sbc.config.schema import Config, MutualTls, TlsConfig
from sbc.firewall.bans import IPAddress
from sbc.firewall.blacklist import TrustedTargetError
from sbc.firewall.config import FirewallConfig, SipPorts
from sbc.firewall.detectors import AuthFailed, Event
from sbc.firewall.firewall import Firewall
from sbc.firewall.nft import NftError
from sbc.firewall.rounds import FirewallRounds
from sbc.firewall.sip_events import malformed_event, request_event
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.control import MediaError, MediaLost, MediaTimeout
from sbc.media.relay import DescriptorsExhausted, MediaRelay
from sbc.media.session import MediaSession
from sbc.media.workers import MediaWorkers, WorkersUnavailable
from sbc.registrar.credentials import CredentialStoreError, SqliteCredentials
from sbc.registrar.location import Binding
from sbc.registrar.registrar import KEEPALIVE_CALL_ID_PREFIX, registered_for
from sbc.sip.errors import ParseError
from sbc.sip.message import Headers, Request, Response, new_branch, new_tag
from sbc.sip.transaction import Outgoing, Output, TimerConfig, TransactionLayer
from sbc.transport.base import (
    Destination,
    Flow,
    HandshakeLimit,
    ListenAddress,
    Transport,
    TransportConfig,
    TransportError,
    ip_literal,
    is_reliable,
    normalize_host,
)
from sbc.transport.certificates import (
    CertificatePaths,
    ClientAuth,
    ServerTls,
    ServerTlsSettings,
    SniCertificate,
    client_context,
    ensure_self_signed,
)
from sbc.transport.layer import TransportLayer
from sbc.transport.resolver import ResolutionError, SipResolver, SipTarget
from sbc.transport.resolver import Transport as ResolverTransport
from sbc.transport.udp import UdpListener
from sbc.web.app import LoopMonitor, create_app

logger = logging.getLogger(__name__)


def _listen_addresses(config: Config) -> tuple[ListenAddress, ...]:
    """``sip.listen`` then every realm's listeners, in configuration order."""
    listeners = [*config.sip.listen]
    for realm in config.realms:
        listeners.extend(realm.listen)
    return tuple(
        ListenAddress(Transport(listener.transport.value), str(listener.address), listener.port)
        for listener in listeners
    )


def transport_config(config: Config) -> TransportConfig:
    return TransportConfig(
        listen=_listen_addresses(config),
        idle_timeout=float(config.sip.tcp_idle_timeout),
        message_timeout=float(config.sip.tcp_message_timeout),
        max_connections=config.sip.max_connections,
    )


def realm_table(config: Config, bound: tuple[ListenAddress, ...] | None = None) -> RealmTable:
    """The configured realms; ``bound`` (the started listeners, in ``transport_config``
    order) replaces ephemeral port 0 with the port really bound."""
    addresses = list(bound if bound is not None else _listen_addresses(config))
    index = len(config.sip.listen)
    realms = []
    manipulation = assembly.RealmManipulation(assembly.header_rules(config))
    for realm in config.realms:
        listen = addresses[index : index + len(realm.listen)]
        index += len(realm.listen)
        keep = (*realm.keep_headers, *manipulation.kept_headers(realm.name))
        realms.append(Realm.build(realm.name, listen, realm.media_address, keep))
    return RealmTable(realms)


def router(config: Config) -> Router:
    rules = []
    for route in config.routes:
        destination = None
        if route.host is not None:
            destination = Destination(
                Transport(route.transport.value), normalize_host(str(route.host)), route.port
            )
        rules.append(
            RouteRule(
                name=route.name,
                action=RouteAction(route.action.value),
                from_realm=route.from_realm,
                user_prefix=route.user_prefix,
                domain=route.domain,
                realm=route.realm,
                destination=destination,
                trunk=route.trunk,
                status=route.status,
                source=route.source,
                from_user=None if route.from_user is None else re.compile(route.from_user),
                header=route.header,
                header_pattern=(
                    None if route.header_pattern is None else re.compile(route.header_pattern)
                ),
                follow_redirects=route.follow_redirects,
                emergency=route.emergency,
            )
        )
    return Router(rules)


def media_config(config: Config) -> MediaConfig:
    """The relay's realms (one media address per SBC realm), ports, path and timeouts."""
    realms = tuple(
        RealmMediaAddress(
            realm.name,
            ipv4=realm.media_address if realm.media_address.version == 4 else None,
            ipv6=realm.media_address if realm.media_address.version == 6 else None,
        )
        for realm in config.realms
    )
    media = config.media
    return MediaConfig(
        realms=realms,
        port_min=media.port_min,
        port_max=media.port_max,
        kernel_path=media.kernel_path,
        media_timeout=media.timeout,
        hold_timeout=media.hold_timeout,
        relatch_after_silence=media.relatch_after_silence,
    )


def firewall_config(config: Config) -> FirewallConfig:
    """``firewall:``, its SIP ports taken from the listeners when left at the defaults.

    Ephemeral listeners (port 0) are not metered: their port is unknown until bound,
    and the ruleset goes in before SIP binds.
    """
    section = config.firewall
    if section.sip_ports != SipPorts():
        return section
    listeners = _listen_addresses(config)

    def ports(transport: Transport) -> tuple[int, ...]:
        return tuple(sorted({a.port for a in listeners if a.transport is transport and a.port}))

    derived = SipPorts(udp=ports(Transport.UDP), tcp=ports(Transport.TCP), tls=ports(Transport.TLS))
    return replace(section, sip_ports=derived)


class FirewallUnavailableError(RuntimeError):
    """``firewall.required`` is set and the ruleset could not be installed."""


#: Seconds between blacklist flushes to the state file (bans are in the kernel at once).
FIREWALL_FLUSH_INTERVAL = 1.0

#: Seconds between checks that table inet sbc is still in the kernel: `nft flush
#: ruleset` (what a restart of nftables.service runs) removes it under the SBC.
TABLE_CHECK_INTERVAL = 5.0

#: Seconds before the B2BUA's and transactions' timers run again after they failed.
TIMER_RETRY = 1.0

#: Seconds a stop waits for the media commands queued (then for those running) to
#: finish: the deletions read the final counters the CDRs carry.
MEDIA_STOP_WAIT = 5.0


def _started_firewall(section: FirewallConfig) -> Firewall:
    """A Firewall with its ruleset installed (blocks on netlink: run in an executor)."""
    firewall = Firewall(section)
    firewall.start()
    return firewall


def _source_address(flow: Flow) -> IPAddress | None:
    try:
        address = ip_address(flow.remote_host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def certificate_paths(config: Config) -> CertificatePaths:
    tls = config.sip.tls
    if tls.certificate is not None and tls.private_key is not None:
        return CertificatePaths(tls.certificate, tls.private_key)
    return ensure_self_signed(config.state_dir, ("localhost", "127.0.0.1", "::1"))


_CLIENT_AUTH = {
    MutualTls.NONE: ClientAuth.OFF,
    MutualTls.OPTIONAL: ClientAuth.OPTIONAL,
    MutualTls.REQUIRE: ClientAuth.REQUIRE,
}


def server_tls_settings(config: Config, identity: CertificatePaths) -> ServerTlsSettings:
    """``sip.tls`` as the TLS listeners' settings."""
    tls = config.sip.tls
    return ServerTlsSettings(
        identity=identity,
        client_auth=_CLIENT_AUTH[tls.mtls],
        client_ca=tls.client_ca,
        trusted_clients={client.fingerprint: client.name for client in tls.trusted_clients},
        sni=tuple(
            SniCertificate(sni.server_name, CertificatePaths(sni.certificate, sni.private_key))
            for sni in tls.sni
        ),
    )


class SbcNode:
    """One running SBC: everything ``sbc run`` starts, stoppable and reloadable."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.transactions = TransactionLayer(
            TimerConfig(t1=config.sip.t1_ms / 1000),
            max_transactions=config.sip.max_transactions,
            max_transactions_per_source=config.sip.max_transactions_per_source,
        )
        self.responder = LocalResponder(server=config.sip.user_agent)
        self.trunks = TrunkTable(assembly.trunks(config))
        self.directory = Directory(self.trunks)
        #: Addresses the configuration names as peers (``_trusted_source``).
        self._peers: frozenset[IPv4Address | IPv6Address] = frozenset()
        #: Route ``source`` networks that name peers (``_trusted_source``).
        self._peer_networks: tuple[IPv4Network | IPv6Network, ...] = ()
        self.admission = assembly.admission(config)
        self.registrar: assembly.EmbeddedRegistrar | None = None
        self.cdr: CdrSink | None = None
        self.calls = CallController(
            self.transactions,
            realm_table(config),
            router(config),
            self.responder,
            user_agent=config.sip.user_agent,
            targets=self.directory,
            admission=self.admission,
            manipulation=assembly.RealmManipulation(assembly.header_rules(config)),
            policies=assembly.realm_policies(config),
            timers=assembly.call_timers(config),
            trunk_auth=TrunkAuth(assembly.trunk_credentials(config)),
            trunk_registrations=TrunkRegistrations(assembly.trunk_registrations(config)),
        )
        self._register_relays: dict[str, assembly.RegisterRelayPort] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.media: MediaRelay | MediaWorkers | None = None
        self._media_queue: asyncio.Queue[MediaCommand] = asyncio.Queue()
        self.admission.busy = self._media_backlogged
        self._media_worker: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        #: Media work running beside the queue: deletions, and allocations waiting
        #: for their firewall pinholes (see _run_media).
        self._media_tasks: set[asyncio.Task[None]] = set()
        #: The firewall's bans and pinholes, applied off the loop (see _pinholes).
        self._nft_rounds = FirewallRounds()
        self.monitor = LoopMonitor()
        #: Full garbage collections and how long the longest stood the loop still.
        self.gc_watch = gc_tuning.GcWatch()
        self.transport: TransportLayer | None = None
        self._server_ssl: ServerTls | None = None
        self._tls_paths: CertificatePaths | None = None
        self._runner: web.AppRunner | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._udp_listeners: dict[tuple[str, int], UdpListener] = {}
        self._udp_listeners_of: TransportLayer | None = None
        self._stopping = False
        self._reload_lock = asyncio.Lock()
        self._stop_task: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        self.firewall: Firewall | None = None
        self._firewall_bans = 0
        #: When the table check last listed the tables, and how often it put ours back.
        self._table_checked: float | None = None
        self._table_restores = 0
        self._firewall_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.monitor.start()
        self._start_registrar(self.config)
        self._start_cdr(self.config)
        await self._start_firewall(self.config)
        await self._start_transport(self.config)
        await self._start_media(self.config)
        await self._start_management(self.config)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run_keepalives(), name="sbc-nat-keepalive"))
        self._tasks.append(loop.create_task(self._run_resolver(), name="sbc-trunk-dns"))
        self._tasks.append(loop.create_task(self._watch_table(), name="sbc-nft-table-watch"))
        self._arm_timer()
        logger.info("- sbc started: %s", ", ".join(self._describe_listeners()))

    async def stop(self) -> None:
        """Stop gracefully; the process ends once ``stopped`` is set.

        Each step runs even when one before it failed (logged): a shutdown that
        raised used to leave the process up, idle, ignoring every later SIGTERM,
        and a step skipped could lose the CDRs still queued.
        """
        if self._stopping:
            return
        self._stopping = True
        logger.info("- stopping")
        try:
            for step in (
                self._end_calls,
                self._stop_listening,
                self._stop_media,
                self._close_cdr,
                self._close_firewall,
                self.monitor.stop,
            ):
                try:
                    await step()
                except Exception:
                    logger.exception("x stop: %s failed, going on", step.__name__)
        finally:
            self.stopped.set()
        logger.info("- stopped")

    def signal_stop(self) -> None:
        """SIGTERM/SIGINT: the first stops gracefully; a second one while that runs
        ends the process at once."""
        if self._stopping:
            logger.warning("x stop requested again: exiting without finishing the stop")
            self.stopped.set()
            return
        # Kept: the loop holds only a weak reference to a task.
        self._stop_task = asyncio.get_running_loop().create_task(self.stop(), name="sbc-stop")

    async def _end_calls(self) -> None:
        if len(self.calls) or self.calls.trunk_registrations.shutdown():
            # Every call ends with a BYE (or 503 and CANCEL while ringing) and a CDR;
            # the SBC's bindings at its trunks' carriers are removed.
            now = time.monotonic()
            self._execute(self.calls.shutdown(now), now)
            await asyncio.sleep(0.2)

    async def _stop_listening(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.transport is not None:
            await self.transport.stop()

    async def _stop_media(self) -> None:
        if self._media_worker is not None:
            # Deletions queued by the shutdown carry the CDRs' media counters.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._media_queue.join(), MEDIA_STOP_WAIT)
            if self._media_tasks:
                await asyncio.wait(self._media_tasks, timeout=MEDIA_STOP_WAIT)
            self._media_worker.cancel()
            await self._abandon_media()
        if self.media is not None:
            await self.media.close()

    async def _abandon_media(self) -> None:
        """The media commands still unfinished at the end of the stop's wait: each
        ended call among them leaves its CDR all the same, without media counters
        (a record with no counters, rather than none)."""
        late = 0
        while not self._media_queue.empty():
            command = self._media_queue.get_nowait()
            self._media_queue.task_done()
            if isinstance(command, DeleteMedia) and command.call is not None:
                self._write_cdr(command.call, None)
                late += 1
        tasks = list(self._media_tasks)
        for task in tasks:
            task.cancel()  # a deletion's own ``finally`` writes its CDR
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if late or tasks:
            logger.warning(
                "x stop: %d media command(s) unfinished after %.0f s: their CDRs carry no"
                " media counters",
                late + len(tasks),
                MEDIA_STOP_WAIT,
            )

    async def _close_cdr(self) -> None:
        if self.cdr is not None:
            cdr, self.cdr = self.cdr, None
            await asyncio.get_running_loop().run_in_executor(None, cdr.close)

    async def _close_firewall(self) -> None:
        self._nft_rounds.close()
        await self._stop_firewall()

    def _describe_listeners(self) -> list[str]:
        out = []
        if self.transport is not None:
            for listener in self.transport.listeners:
                out.append(f"sip {listener.transport.value} {listener.host}:{listener.port}")
        mgmt = self.config.management.listen
        out.append(f"management http://{mgmt.address}:{mgmt.port}")
        return out

    def _start_registrar(self, config: Config) -> None:
        """The embedded registrar, when a realm has ``registrar: true``."""
        if not any(realm.registrar for realm in config.realms):
            return
        try:
            credentials = SqliteCredentials(assembly.users_db(config), config.registrar.realm)
        except (CredentialStoreError, OSError) as exc:
            logger.error("x registrar users database %s: %s", assembly.users_db(config), exc)
            return
        if not credentials.list():
            logger.warning(
                "- registrar: no users yet; add one with: sbc user add NAME%s",
                f" --config {self.config_path}" if self.config_path else "",
            )
        registrar = assembly.registrar(config, credentials, secrets.token_bytes(32))
        if self.registrar is not None:
            # A reload keeps the registered phones.
            registrar.location = self.registrar.registrar.location
        self.registrar = assembly.EmbeddedRegistrar(registrar)
        self.calls.registrar = self.registrar
        self.directory.location = registrar.location
        self.directory.user_exists = self.registrar.user_exists

    def _start_cdr(self, config: Config) -> None:
        if not config.cdr.enabled or self.cdr is not None:
            return
        path = assembly.cdr_path(config)
        sqlite = config.cdr.format is CdrFormat.SQLITE
        self.cdr = CdrStore(path) if sqlite else JsonLinesCdrStore(path)
        logger.info("- cdr: %s (%s)", path, config.cdr.format.value)

    def _write_cdr(self, call: Call, session: MediaSession | None) -> None:
        if self.cdr is None:
            return
        try:
            # The wall clock read now: an NTP step since start-up must not shift CDRs.
            self.cdr.write(cdr_record(call, session, time.time() - time.monotonic()))
        except CdrError as exc:
            logger.warning("x cdr of call %s not written: %s", call.call_ref, exc)

    async def _run_keepalives(self) -> None:
        """NAT keepalives (CRLFCRLF, RFC 5626 4.4.1) to phones registered over UDP."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._keepalive_round()
            except Exception:
                # As in _run_media: a bug in one round must not end the task (and with
                # it keepalives and the registration relay's expiry) for good.
                logger.exception("x NAT keepalive round failed")

    def _keepalive_round(self) -> None:
        for relay in self._register_relays.values():
            relay.expire()
        registrar = self.registrar
        if registrar is None or self.transport is None:
            return
        registrar.registrar.expire(time.time())
        options = registrar.registrar.policy.keepalive_options
        for binding in registrar.registrar.keepalive_targets(time.time()):
            listener = self._udp_listener(binding.local.host, binding.local.port)
            if listener is None:
                continue
            data = b"\r\n\r\n"
            if options:
                call_id = registrar.registrar.keepalive_ping(binding)
                data = keepalive_options(binding, call_id, self.calls.user_agent)
            with contextlib.suppress(OSError):
                listener.send(data, binding.received.host, binding.received.port)

    def _keepalive_answer(self, response: Response) -> bool:
        """A response to one of the registrar's OPTIONS keepalives: the phone is
        there. Taken here: no transaction sent the OPTIONS."""
        registrar = self.registrar
        if registrar is None or not registrar.registrar.policy.keepalive_options:
            return False
        try:
            call_id = response.call_id
        except ParseError:
            return False
        if not call_id.startswith(KEEPALIVE_CALL_ID_PREFIX):
            return False
        registrar.registrar.keepalive_answered(call_id)
        return True

    async def _run_resolver(self) -> None:
        """RFC 3263 for trunk gateways given by name; looked up again when the first
        DNS answer's TTL runs out (within 5 s to 60 s: the resolver's cache answers
        the others), so a carrier's DNS change takes effect within its TTL."""
        resolver: SipResolver | None = None
        failed: dict[str, str] = {}
        while True:
            named = [
                g
                for state in self.trunks
                for g in state.trunk.gateways
                if g.static_destination is None
            ]
            if named:
                resolver = resolver or SipResolver()
                for gateway in named:
                    target = SipTarget(
                        gateway.host,
                        gateway.port,
                        ResolverTransport(gateway.transport.value),
                        secure=gateway.transport is Transport.TLS,
                    )
                    try:
                        found = await resolver.resolve(target)
                    except ResolutionError as exc:
                        # Once per failure, not at every refresh while it lasts.
                        if failed.get(gateway.key) != str(exc):
                            logger.warning("x trunk gateway %s: %s", gateway.host, exc)
                        failed[gateway.key] = str(exc)
                        continue
                    except Exception:
                        # A bug here must not end DNS refresh for every trunk for good.
                        logger.exception("x trunk gateway %s: resolution failed", gateway.host)
                        continue
                    # Every address of the gateway's transport, in RFC 3263 order: a
                    # call fails over from one to the next (4.3).
                    hops = [
                        hop
                        for hop in found
                        if hop.transport.name.lower() == gateway.transport.value
                    ]
                    if not hops:
                        continue
                    failed.pop(gateway.key, None)
                    destinations = tuple(
                        Destination(gateway.transport, normalize_host(hop.address), hop.port)
                        for hop in hops
                    )
                    known = self.directory.resolved.get(gateway.key, ())
                    # Logged when the addresses change, not their order: SRV weights
                    # draw a new order at each lookup (and for each call).
                    if {(d.host, d.port) for d in known} != {
                        (d.host, d.port) for d in destinations
                    }:
                        logger.info(
                            "- trunk gateway %s resolved to %s",
                            gateway.host,
                            ", ".join(f"{d.host} port {d.port}" for d in destinations),
                        )
                    self.directory.resolved[gateway.key] = destinations
                    self.directory.resolved_srv[gateway.key] = tuple(hop.srv for hop in hops)
            expires_in = None if resolver is None else resolver.cache_expires_in()
            await asyncio.sleep(60.0 if expires_in is None else min(60.0, max(5.0, expires_in)))

    def _udp_listener(self, host: str, port: int) -> UdpListener | None:
        transport = self.transport
        if transport is None:
            return None
        # Remembered per transport layer: every request the B2BUA sends asks, and the
        # match normalizes (parses) both addresses. Hops name realm listeners only.
        if self._udp_listeners_of is not transport:
            self._udp_listeners.clear()
            self._udp_listeners_of = transport
        key = (host, port)
        try:
            return self._udp_listeners[key]
        except KeyError:
            pass
        found = None
        wanted = normalize_host(host)
        for listener in transport.listeners:
            if (
                isinstance(listener, UdpListener)
                and listener.port == port
                and normalize_host(listener.host) == wanted
            ):
                found = listener
                break
        if found is not None and len(self._udp_listeners) < 1024:
            self._udp_listeners[key] = found
        return found

    async def _start_transport(self, config: Config) -> None:
        tls = config.sip.tls
        limit = HandshakeLimit(tls.handshakes_per_source, tls.handshake_rate, tls.handshake_burst)
        tcfg = replace(transport_config(config), handshake_limit=limit)
        server_ssl = None
        serves_tls = any(listen.transport is Transport.TLS for listen in tcfg.listen)
        # The identity served is the one presented to trunks; without a TLS listener no
        # self-signed one is generated just for that (no realm could send TLS anyway).
        identity = certificate_paths(config) if serves_tls or tls.certificate is not None else None
        if serves_tls and identity is not None:
            server_ssl = ServerTls(server_tls_settings(config, identity))
        self._tls_paths = identity
        if not tls.verify_server:
            logger.warning("x sip.tls.verify_server is off: TLS servers (trunks) are not verified")
        layer = TransportLayer(
            tcfg,
            self._on_message,
            server_ssl=server_ssl,
            client_ssl=client_context(
                tls.server_ca,
                verify=tls.verify_server,
                certificate=self._client_identity(tls),
            ),
            on_error=self._on_parse_error,
            on_closed=self._connection_closed,
        )
        await layer.start()
        self.transport = layer
        self._server_ssl = server_ssl
        self._reconfigure_calls(config)

    def _connection_closed(self, flow: Flow) -> None:
        """RFC 5626 5.3: what was registered over a closed TCP/TLS connection is not
        reached over it any more (sbc.registrar.registrar, Closed flows)."""
        if flow.connection_id is None:
            return
        wall = time.time()
        if self.registrar is not None:
            self.registrar.registrar.connection_closed(flow.connection_id, wall)
        for port in self._register_relays.values():
            port.relay.connection_closed(flow.connection_id, wall)

    def _reconfigure_calls(self, config: Config) -> None:
        """Realms, routes, trunks, limits, header rules and timers for new calls."""
        self.calls.reconfigure(
            realm_table(config, self._bound()),
            router(config),
            self.responder,
            policies=assembly.realm_policies(config),
            timers=assembly.call_timers(config),
        )
        self.calls.manipulation = assembly.RealmManipulation(assembly.header_rules(config))
        realms = realm_table(config, self._bound())
        relays = assembly.register_relays(config, realms, self._register_relays)
        self._register_relays = relays
        self.calls.register_relays = dict(relays)
        self.directory.relayed = [port.relay.location for port in relays.values()]
        self.trunks.reconfigure(assembly.trunks(config))
        self.calls.trunk_auth.reconfigure(assembly.trunk_credentials(config))
        self.calls.trunk_registrations.reconfigure(assembly.trunk_registrations(config))
        assembly.reconfigure_admission(self.admission, config, now=time.monotonic())
        self._peers = assembly.configured_peers(config)
        self._peer_networks = assembly.configured_peer_networks(config)
        self.transactions.trusted = self._trusted_source

    def _trusted_source(self, host: str) -> bool:
        """Whether ``host`` is a peer the configuration names (a static route's or
        upstream registrar's address, a trunk gateway's or what its name resolved
        to, an address in a route's narrow ``source`` network): such a peer is not
        held to ``sip.max_transactions_per_source``."""
        address = ip_literal(host)
        if address is None:
            return False
        if address in self._peers:
            return True
        if any(address in network for network in self._peer_networks):
            return True
        return any(
            ip_literal(destination.host) == address
            for destinations in self.directory.resolved.values()
            for destination in destinations
        )

    def _bound(self) -> tuple[ListenAddress, ...] | None:
        """The listeners as bound (ephemeral ports resolved), in configuration order."""
        if self.transport is None:
            return None
        return tuple(
            ListenAddress(listener.transport, listener.host, listener.port)
            for listener in self.transport.listeners
        )

    async def _start_media(self, config: Config) -> None:
        """The media relay, when realms exist (calls need it): in this process, or in
        ``media.workers`` worker processes."""
        if self.media is not None or not config.realms:
            return
        relay: MediaRelay | MediaWorkers
        if config.media.workers:
            relay = MediaWorkers(
                media_config(config),
                config.media.workers,
                log_level=config.log.level.value,
                log_format=config.log.format.value,
            )
        else:
            relay = MediaRelay(media_config(config))
        await relay.start()
        self.media = relay
        loop = asyncio.get_running_loop()
        self._media_worker = loop.create_task(self._run_media(), name="sbc-b2bua-media")
        self._tasks.append(loop.create_task(self._run_media_events(), name="sbc-media-events"))

    async def _start_management(self, config: Config) -> None:
        app = create_app(self.health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        listen = config.management.listen
        site = web.TCPSite(runner, str(listen.address), listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    # -- health -------------------------------------------------------------------------

    def health(self) -> dict[str, object]:
        """What /healthz reports: ok only while SIP is bound and the loop is responsive."""
        bound = self.transport is not None and self.transport.bound
        responsive = self.monitor.responsive()
        return {
            "ok": bound and responsive and not self._stopping,
            "sip_bound": bound,
            "loop_responsive": responsive,
            "loop_lag_ms": round(self.monitor.lag * 1000, 1),
            "gc": self.gc_watch.status(),
            "transactions": len(self.transactions),
            "calls": len(self.calls),
            "media_sessions": 0 if self.media is None else len(self.media.sessions()),
            "media_workers": (self.media.status() if isinstance(self.media, MediaWorkers) else []),
            "media_backlog": self._media_queue.qsize(),
            "firewall": {"enabled": self.firewall is not None, "bans": self._firewall_bans},
            # Polled, not watched: a flush shows at the next check (`_restore_table`),
            # up to TABLE_CHECK_INTERVAL later. None: no check yet (or nothing of the
            # SBC's in nftables to check).
            "nft_table": {
                "checked_s_ago": (
                    None
                    if self._table_checked is None
                    else round(time.monotonic() - self._table_checked, 1)
                ),
                "restores": self._table_restores,
            },
            # Refusals are counted where operators can see them (until /metrics).
            "admission": {} if self.calls.admission is None else self.calls.admission.counters(),
            "registers_refused": self.calls.register_rate.refused(),
            "trunk_registrations": self.calls.trunk_registrations.status(time.monotonic()),
        }

    # -- firewall -----------------------------------------------------------------------

    async def _start_firewall(self, config: Config) -> None:
        """Install the firewall when enabled; without it, go on unless it is required."""
        section = firewall_config(config)
        if not section.enabled or self.firewall is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            firewall = await loop.run_in_executor(None, _started_firewall, section)
        except (NftError, OSError, ValueError) as exc:
            if section.required:
                logger.error("x firewall required but not installed: %s", exc)
                raise FirewallUnavailableError(str(exc)) from exc
            logger.error(
                "x firewall not installed (needs CAP_NET_ADMIN and libnftables), "
                "running without it: %s",
                exc,
            )
            return
        self.firewall = self._nft_rounds.firewall = firewall
        # Calls up already (a reload turned the firewall on): their ports open.
        self._nft_rounds.restart({} if self.media is None else self.media.held_ports())
        self._count_bans()
        self._firewall_task = loop.create_task(self._run_firewall(), name="sbc-firewall-flush")

    async def _stop_firewall(self) -> None:
        """Persist the blacklist and remove the firewall's objects from the kernel."""
        firewall, self.firewall = self.firewall, None
        self._nft_rounds.firewall = None
        self._nft_rounds.forget()
        if self._firewall_task is not None:
            self._firewall_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._firewall_task
            self._firewall_task = None
        if firewall is None:
            return
        try:
            # After the round in flight, if any (it may still use the table).
            await self._nft_rounds.exclusive(firewall.stop)
        except (NftError, OSError, ValueError) as exc:
            logger.error("x firewall not removed cleanly: %s", exc)

    async def _reload_firewall(self, config: Config) -> None:
        section = firewall_config(config)
        if self.firewall is None:
            with contextlib.suppress(FirewallUnavailableError):
                await self._start_firewall(config)
            return
        if not section.enabled:
            await self._stop_firewall()
            return
        # The detectors go on; the new ruleset goes in on the firewall's thread,
        # between two rounds of bans and pinholes.
        try:
            restore = self.firewall.reconfigure(section)
            await self._nft_rounds.exclusive(self.firewall.apply_ruleset, restore)
        except (NftError, OSError, ValueError) as exc:
            logger.error("x firewall reload failed, the kernel keeps the previous rules: %s", exc)

    async def _watch_table(self) -> None:
        """Put table inet sbc back when it vanished (see `_restore_table`)."""
        while True:
            await asyncio.sleep(TABLE_CHECK_INTERVAL)
            try:
                await self._restore_table()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch must survive one bad check
                logger.exception("x nftables table check failed")

    def _table_users(self) -> tuple[Firewall | None, MediaRelay | MediaWorkers | None]:
        """The firewall and the media relay when they keep objects in table inet sbc
        (the relay only with its kernel path on)."""
        media = self.media
        return self.firewall, media if media is not None and media.kernel_enabled else None

    async def _restore_table(self) -> bool:
        """When the firewall or the media kernel path is on and table inet sbc is
        gone (`nft flush ruleset`, nftables.service restarted): the firewall's
        ruleset again with the bans of its state file and the live calls'
        pinholes, then the media base objects and the kernel streams' forwards.
        Until then the host has no rate limits, blacklist or fast path. True when
        the table was put back."""
        firewall, media = self._table_users()
        if firewall is not None:
            present = await self._nft_rounds.exclusive(firewall.kernel.table_present)
        elif media is not None:
            present = bool(await media.kernel_table_present())
        else:
            return False
        self._table_checked = time.monotonic()
        # A reload may have stopped either meanwhile (and removed the table itself).
        still = self._table_users()
        firewall = firewall if firewall is still[0] else None
        media = media if media is still[1] else None
        if present or (firewall is None and media is None):
            return False
        logger.error(
            "x nftables table inet sbc is gone (nft flush ruleset? nftables.service "
            "restarted?): putting it back"
        )
        self._table_restores += 1
        if firewall is not None:
            try:
                firewall.flush()  # the bans decided so far: `start` restores the file's
            except (OSError, ValueError) as exc:
                logger.warning("x firewall blacklist not saved: %s", exc)
            await self._nft_rounds.exclusive(firewall.start)
            self._nft_rounds.restart({} if self.media is None else self.media.held_ports())
        if media is not None:
            streams = await media.reopen_kernel()
            logger.info("- media kernel path back (%d streams in it again)", streams)
        return True

    async def _run_firewall(self) -> None:
        """Persist new bans about once a second (the kernel has them at once)."""
        while True:
            await asyncio.sleep(FIREWALL_FLUSH_INTERVAL)
            firewall = self.firewall
            if firewall is None:
                continue
            try:
                firewall.flush()
            except (OSError, ValueError) as exc:
                logger.warning("x firewall blacklist not saved: %s", exc)
            except Exception:
                logger.exception("x firewall blacklist flush failed")
            self._count_bans()

    def _count_bans(self) -> None:
        firewall = self.firewall
        if firewall is None:
            return
        try:
            active = firewall.blacklist.store.read().active(firewall.clock())
        except (OSError, ValueError):
            return
        self._firewall_bans = len(active)

    def _firewall_observe_request(self, request: Request, flow: Flow) -> bool:
        """Feed a request to the detectors; True when it earned its source a ban
        (it gets no answer; what follows is dropped, here until the kernel has
        the ban, then in the kernel)."""
        firewall = self.firewall
        if firewall is None:
            return False
        source = _source_address(flow)
        if source is None:
            return False
        return self._ban(firewall, request_event(request, source)) is not None

    def _firewall_auth_failures(
        self, failures: Iterable[AuthFailure]
    ) -> asyncio.Future[None] | None:
        """Feed digest failures to the detectors; the round that puts the bans
        they earn in the kernel, if any."""
        firewall = self.firewall
        if firewall is None:
            return None
        banned: asyncio.Future[None] | None = None
        for failure in failures:
            try:
                source = ip_address(normalize_host(failure.source))
            except ValueError:
                continue
            if source.version == 6 and source.ipv4_mapped is not None:
                source = source.ipv4_mapped
            banned = self._ban(firewall, AuthFailed(source, failure.user or "")) or banned
        return banned

    def _on_parse_error(self, error: ParseError, flow: Flow) -> None:
        firewall = self.firewall
        if firewall is None:
            return
        source = _source_address(flow)
        if source is not None:
            self._ban(firewall, malformed_event(error, source))

    def _ban(self, firewall: Firewall, event: Event) -> asyncio.Future[None] | None:
        """The detectors' bans for `event`, queued for the kernel: their round."""
        try:
            bans = firewall.decide(event)
        except TrustedTargetError as exc:
            logger.error("x firewall: ban failed: %s", exc)
            return None
        if not bans:
            return None
        self._firewall_bans += len(bans)
        return self._nft_rounds.ban(bans)

    def _from_banning(self, flow: Flow) -> bool:
        source = _source_address(flow)
        return source is not None and self._nft_rounds.banning(source)

    async def _pinholes(self, session: MediaSession, *, open_: bool) -> None:
        """Open a media session's ports in the firewall's closed RTP range (and
        close those it gave up), or close them all when it ended.

        The changes of many sessions go in one transaction, on the firewall's
        thread, while the event loop goes on (see sbc.firewall.rounds); this
        returns when its round is done. Without a firewall nothing is noted: one
        started later asks the relay what the live sessions hold."""
        if self.firewall is None:
            return
        if open_:
            await self._nft_rounds.hold(session.session_id, session.relay_ports())
        else:
            await self._nft_rounds.release(session.session_id)

    # -- signalling ---------------------------------------------------------------------

    def _on_message(self, message: Request | Response, flow: Flow) -> None:
        if self._nft_rounds.banning_any and self._from_banning(flow):
            return  # its ban is on the way to the kernel
        if isinstance(message, Request) and self._firewall_observe_request(message, flow):
            return
        if isinstance(message, Response) and self._keepalive_answer(message):
            return
        now = time.monotonic()
        out = self.transactions.receive(message, flow, now, reliable=is_reliable(flow.transport))
        self._dispatch(out, now)

    def _dispatch(self, out: Output, now: float) -> None:
        self._execute(self.calls.handle(out, now), now)

    def _execute(self, step: Step, now: float) -> None:
        # A source banned by this step gets its answer once the kernel has the
        # ban, so that what it sends next is dropped there.
        banned = self._firewall_auth_failures(step.auth_failures) if step.auth_failures else None
        for outgoing in step.output.messages:
            message, destination = outgoing.message, outgoing.destination
            if isinstance(message, Response) and isinstance(destination, Flow):
                if banned is not None and self._from_banning(destination):
                    banned.add_done_callback(partial(self._send_held, outgoing, destination))
                elif self.transport:
                    self._send_response(outgoing, destination)
            elif isinstance(message, Request) and isinstance(destination, Hop):
                self._send_request(outgoing, destination, now)
        for command in step.media:
            self._media_queue.put_nowait(command)
        for call in step.ended:
            self._write_cdr(call, None)
        self._arm_timer()

    def _send_held(self, outgoing: Outgoing, flow: Flow, _: asyncio.Future[None]) -> None:
        if self.transport:
            self._send_response(outgoing, flow)

    def _send_response(self, outgoing: Outgoing, flow: Flow) -> None:
        """RFC 3261 17.2.4: a response that cannot be sent is its transaction's transport
        error, as a request's is (``_transport_failed``); a stateless one has none."""
        assert self.transport is not None and isinstance(outgoing.message, Response)
        response = outgoing.message
        on_failure = None
        if outgoing.transaction is not None:
            on_failure = partial(self._transport_failed, outgoing)
        if flow.connection_id is not None and response.status < 300:
            # A phone registered over TCP/TLS is reached over that connection only:
            # the idle sweep leaves it open while the registration lasts.
            lifetime = registered_for(response)
            if lifetime is not None:
                self.transport.hold_open(flow.connection_id, lifetime)
        self.transport.send_response_nowait(response, flow, on_failure=on_failure)

    def _send_request(self, outgoing: Outgoing, hop: Hop, now: float) -> None:
        """Send a B2BUA request from its realm's listener (UDP) or over a connection."""
        if self.transport is None:
            return
        if hop.destination.transport is Transport.UDP:
            listener = self._udp_listener(hop.local.host, hop.local.port)
            if listener is None:
                logger.warning("x %r: no listener %s", outgoing.message, hop.local)
                self._transport_failed(outgoing)
                return
            try:
                destination = hop.destination
                listener.send(outgoing.data, destination.host, destination.port)
            except OSError as exc:
                logger.warning("x %r to %s: %s", outgoing.message, hop, exc)
                self._transport_failed(outgoing)
            return
        task = asyncio.get_running_loop().create_task(self._send_stream(outgoing, hop))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_stream(self, outgoing: Outgoing, hop: Hop) -> None:
        assert self.transport is not None and isinstance(outgoing.message, Request)
        try:
            # From the realm's own address: its peers see only that realm's SBC address.
            await self.transport.send_request(
                outgoing.message, hop.destination, local_host=hop.local.host
            )
        except TransportError as exc:
            logger.warning("x %r to %s: %s", outgoing.message, hop, exc)
            self._transport_failed(outgoing)

    def _transport_failed(self, outgoing: Outgoing) -> None:
        if outgoing.transaction is not None:
            now = time.monotonic()
            self._dispatch(self.transactions.transport_error(outgoing.transaction, now), now)

    def _media_backlogged(self) -> bool:
        """Whether new calls would wait too long for their media: refused (503 with
        Retry-After, admission scope ``node``) while ``calls.max_setup_backlog``
        media commands wait. Each call waits for the set-ups queued before its own
        (a few ms apiece on one core); with no limit, offered more calls than it
        carries, the SBC made every call wait seconds and callers gave up."""
        return self._media_queue.qsize() >= self.config.calls.max_setup_backlog

    async def _run_media(self) -> None:
        """Run the B2BUA's media commands one at a time, in the order they were made.

        A deletion runs beside the queue: with calls in the kernel path it waits for
        the relay's next nftables round (its final counters, then the removal), and
        the calls being set up behind it need not. Nothing comes after a deletion
        for the same session. So does an allocation once its ports are bound, while
        it waits for the firewall to open them: nothing comes for its session
        before the B2BUA hears of it."""
        while True:
            command = await self._media_queue.get()
            try:
                if isinstance(command, DeleteMedia):
                    self._beside_queue(self._media_command(command))
                else:
                    await self._media_command(command)
            except Exception:
                # A bug in one command must not end the queue: every call after it
                # would wait for its media for ever.
                logger.exception(
                    "x call %s: media %s failed", command.call_ref, type(command).__name__
                )
            finally:
                self._media_queue.task_done()

    def _beside_queue(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._media_tasks.add(task)
        task.add_done_callback(self._media_tasks.discard)

    async def _allocated(self, command: AllocateMedia, session: MediaSession) -> None:
        try:
            await self._pinholes(session, open_=True)
        finally:
            now = time.monotonic()
            self._execute(self.calls.media_allocated(command.call_ref, session, now), now)

    async def _media_command(self, command: MediaCommand) -> None:
        relay = self.media
        if relay is None:
            if isinstance(command, DeleteMedia) and command.call is not None:
                self._write_cdr(command.call, None)
            return
        try:
            if isinstance(command, AllocateMedia):
                try:
                    session = await relay.allocate(command.call_id, command.streams)
                except (DescriptorsExhausted, WorkersUnavailable) as exc:
                    # The relay logs these once per burst (a worker's loss once);
                    # the call gets 503.
                    logger.debug("x call %s: no media: %s", command.call_ref, exc)
                    session = None
                except MediaError as exc:
                    logger.error("x call %s: no media: %s", command.call_ref, exc)
                    session = None
                if session is not None and self.firewall is not None:
                    # The offer leaves once the ports are open; the next commands
                    # need not wait for that round (their pinholes join it).
                    self._beside_queue(self._allocated(command, session))
                    return
                now = time.monotonic()
                self._execute(self.calls.media_allocated(command.call_ref, session, now), now)
            elif isinstance(command, DeleteMedia):
                final: MediaSession | None = None
                try:
                    final = await relay.delete(command.session_id)
                finally:
                    if command.call is not None:
                        # The CDR carries the session's final counters.
                        self._write_cdr(command.call, final)
                if final is not None:
                    await self._pinholes(final, open_=False)
            else:
                updated = await relay.update(command.session_id, command.streams)
                await self._pinholes(updated, open_=True)
        except (MediaError, OSError) as exc:
            logger.warning("x call %s: media %s: %s", command.call_ref, type(command).__name__, exc)

    async def _run_media_events(self) -> None:
        """Media timeouts and lost sessions (a media worker died) end their calls."""
        while True:
            relay = self.media
            if relay is None:
                await asyncio.sleep(1.0)
                continue
            event = await relay.next_event()
            if isinstance(event, MediaTimeout | MediaLost):
                now = time.monotonic()
                try:
                    if isinstance(event, MediaLost):
                        step = self.calls.media_lost(event.session_id, now)
                    else:
                        step = self.calls.media_timeout(event.session_id, now)
                    self._execute(step, now)
                except Exception:
                    # As in _run_media: one bad event must not end media timeouts.
                    logger.exception("x media event of session %s failed", event.session_id)

    def _arm_timer(self) -> None:
        deadline = self.transactions.next_deadline()
        calls = self.calls.next_deadline()
        if calls is not None and (deadline is None or calls < deadline):
            deadline = calls
        armed = self._timer_at
        if deadline is None or (armed is not None and armed <= deadline):
            # The armed timer fires first (or there is nothing to wait for): it runs
            # what is due then and arms the next one. Most messages move the earliest
            # deadline later, not sooner: no timer is cancelled and re-made for them.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.monotonic())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = time.monotonic()
        try:
            step = self.calls.handle_timers(now)
            self._execute(step + self.calls.handle(self.transactions.handle_timers(now), now), now)
        except Exception:
            # A bug in one timer must not stop the others: nothing would arm them again
            # until the next message, and an idle SBC gets none. Log it, try again soon.
            logger.exception("x timers failed; trying again in %.0f s", TIMER_RETRY)
            if not self._stopping:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(TIMER_RETRY, self._on_timer)
                self._timer_at = now + TIMER_RETRY

    # -- reload -------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file; True if the new one is in force. One at a
        time: two SIGHUPs at once would both replace the same listeners."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        if self._stopping:
            logger.info("- reload ignored: stopping")
            return False
        if self.config_path is None:
            logger.info("- reload: running on the embedded default, nothing to re-read")
            self._reload_certificates()
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                logger.error("x reload refused: %s", line)
            logger.error("x the running configuration stays in force")
            return False
        old = self.config
        if new == old:
            self._reload_certificates()
            logger.info("- reload: configuration unchanged")
            return True
        listeners_changed = _listen_addresses(new) != _listen_addresses(old)
        # The transaction layer's settings and the user agent apply without the
        # listeners; the rest of the sip section is theirs (restarted when it changes).
        transport_settings = replace(
            new.sip,
            max_transactions=old.sip.max_transactions,
            max_transactions_per_source=old.sip.max_transactions_per_source,
            t1_ms=old.sip.t1_ms,
            user_agent=old.sip.user_agent,
        )
        restart = (
            transport_settings != old.sip or new.state_dir != old.state_dir or listeners_changed
        )
        # Listeners first, SIP then management: a reload whose listeners cannot bind
        # is refused before any other part of it is in force.
        if restart and not await self._replace_transport(new, old):
            return False
        if new.management != old.management and not await self._replace_management(new, old):
            if restart:
                await self._replace_transport(old, new)
            return False
        setup_logging(new.log.level.value, new.log.format.value)
        self.responder = LocalResponder(server=new.sip.user_agent)
        self.transactions.max_transactions = new.sip.max_transactions
        self.transactions.max_transactions_per_source = new.sip.max_transactions_per_source
        self.transactions.config = TimerConfig(t1=new.sip.t1_ms / 1000)
        self.calls.user_agent = new.sip.user_agent
        if not restart:
            self._reload_certificates()
        self._reconfigure_calls(new)
        media_changed = new.media.workers != old.media.workers
        if (media_changed or media_config(new) != media_config(old)) and self.media is not None:
            logger.warning("x media settings changed: they apply after a restart")
        if new.registrar != old.registrar or new.realms != old.realms:
            self._start_registrar(new)
        if new.cdr != old.cdr and self.cdr is not None:
            logger.warning("x cdr settings changed: they apply after a restart")
        self._start_cdr(new)
        if firewall_config(new) != firewall_config(old):
            await self._reload_firewall(new)
        await self._start_media(new)
        self.config = new
        # New timers may be due sooner (a shorter probe interval): arm for them now,
        # not when the timer armed for the old ones fires.
        self._arm_timer()
        logger.info("- configuration reloaded from %s", self.config_path)
        return True

    def _client_identity(self, tls: TlsConfig) -> CertificatePaths | None:
        """The certificate shown to TLS servers that ask: the configured one only.

        The generated self-signed certificate is never shown: a trunk that asks for
        a client certificate optionally would refuse the handshake over one it cannot
        verify, where sending none works.
        """
        if not tls.present_certificate or tls.certificate is None:
            return None
        return self._tls_paths

    def _reload_certificates(self) -> None:
        """Load renewed certificate, key, SNI, client and server CA files into new
        contexts: new handshakes use them, established TLS connections keep theirs."""
        if self._server_ssl is not None:
            try:
                self._server_ssl.reload()
            except (OSError, ValueError, ssl.SSLError) as exc:
                logger.error("x TLS certificate reload failed, keeping the old one: %s", exc)
            else:
                logger.info("- TLS certificates reloaded")
        if self.transport is not None:
            # Outgoing connections: the renewed identity and server CA bundle.
            tls = self.config.sip.tls
            try:
                context = client_context(
                    tls.server_ca,
                    verify=tls.verify_server,
                    certificate=self._client_identity(tls),
                )
            except (OSError, ValueError, ssl.SSLError) as exc:
                logger.error("x TLS client context reload failed, keeping the old one: %s", exc)
            else:
                self.transport.set_client_ssl(context)

    async def _replace_transport(self, new: Config, old: Config) -> bool:
        if self.transport is not None:
            await self.transport.stop()
        try:
            await self._start_transport(new)
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.error("x reload refused: cannot start SIP listeners: %s", exc)
            await self._start_transport(old)
            return False
        return True

    async def _replace_management(self, new: Config, old: Config) -> bool:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            await self._start_management(new)
        except OSError as exc:
            logger.error("x reload refused: cannot start management listener: %s", exc)
            await self._start_management(old)
            return False
        return True


async def serve(config: Config, config_path: Path | None) -> int:
    node = SbcNode(config, config_path)
    try:
        await node.start()
    except (OSError, FirewallUnavailableError, MediaError) as exc:
        logger.error("x cannot start: %s", exc)
        await node.stop()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.signal_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(node.reload()))
    # After the handlers: "sbc started" is logged already, and a SIGTERM during the
    # collection must stop the SBC cleanly, not kill it.
    gc_tuning.tune()
    node.gc_watch.install()
    try:
        await node.stopped.wait()
    finally:
        node.gc_watch.uninstall()
    return 0


def run(config_path: Path | None) -> int:
    """``sbc run``: load the configuration (or the embedded default) and serve."""
    try:
        config = load_config(config_path) if config_path else default_config()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print("sbc: configuration refused, not starting", file=sys.stderr)
        return 2
    setup_logging(config.log.level.value, config.log.format.value)
    try:
        import uvloop

        return uvloop.run(serve(config, config_path))
    except ImportError:
        return asyncio.run(serve(config, config_path))


def keepalive_options(binding: Binding, call_id: str, user_agent: str) -> bytes:
    """The OPTIONS keepalive to a UDP binding (``registrar.keepalive: options``),
    from the listener it registered at to its Contact, over its flow. Any answer
    (even 404 or 405) says the phone is there."""
    own = sip_uri_for(binding.local, params=False)
    headers = Headers()
    headers.add("Via", via_for(binding.local, new_branch()))
    headers.add("Max-Forwards", "70")
    headers.add("From", f"<{own}>;tag={new_tag()}")
    headers.add("To", f"<{binding.contact}>")
    headers.add("Call-ID", call_id)
    headers.add("CSeq", "1 OPTIONS")
    headers.add("User-Agent", user_agent)
    headers.add("Content-Length", "0")
    return bytes(Request("OPTIONS", binding.contact, headers))
