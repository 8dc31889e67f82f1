"""The configuration schema: one frozen dataclass per YAML section.

The loader (`sbc.config.loader`) is driven entirely by these classes: it reads each
field's type annotation and its `spec(...)` metadata, so adding a section means adding
a dataclass here and a field for it on its parent, nothing in the loader.

Types the loader understands in annotations:

- `bool`, `int`, `float`, `str`, `pathlib.Path`, `IPAddress`, `IPNetwork`;
- an `enum.Enum` whose values are strings (the YAML value is the enum value);
- `X | None` (null allowed), `tuple[X, ...]` (a YAML list);
- another `Section` dataclass (a YAML mapping; null or a missing key means all
  defaults when the field has a default).

A field without a default is a required key. Relative paths (in the YAML or in a
default) are resolved by the loader against the configuration file's directory.

Cross-field rules live in each section's `check()`; it only runs when every field of
the section is valid, and yields `(key path, reason)` pairs that the loader turns into
`file:line: key path: reason` problems.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Final

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Key of a field's `FieldSpec` in `dataclasses.Field.metadata`.
SPEC_KEY: Final = "sbc.config"
#: The blacklist's state file in state_dir when firewall.state_file is null.
BLACKLIST_FILE: Final = "firewall-blacklist.json"


@dataclass(frozen=True)
class FieldSpec:
    """Validation and documentation attached to one schema field.

    `expect` overrides the "expected ..." wording of type errors (it replaces the
    generated "an integer MIN..MAX"); `pattern` is a full-match regular expression
    for strings; `secret` keeps the value out of error messages.
    """

    help: str
    min: int | float | None = None
    max: int | float | None = None
    min_items: int = 0
    pattern: str | None = None
    expect: str | None = None
    secret: bool = False


def spec(
    help: str,
    *,
    min: int | float | None = None,
    max: int | float | None = None,
    min_items: int = 0,
    pattern: str | None = None,
    expect: str | None = None,
    secret: bool = False,
) -> Mapping[str, Any]:
    """Field metadata for `dataclasses.field(metadata=...)`."""
    return {
        SPEC_KEY: FieldSpec(
            help=help,
            min=min,
            max=max,
            min_items=min_items,
            pattern=pattern,
            expect=expect,
            secret=secret,
        )
    }


#: (key path, reason) pairs yielded by `Section.check`.
Issue = tuple[str, str]


def key_path(parent: str, key: str) -> str:
    """`parent.key`, or `key` at the top level."""
    return f"{parent}.{key}" if parent else key


class Section:
    """Base of every configuration section."""

    def check(self, path: str) -> Iterator[Issue]:
        """Cross-field rules; `path` is this section's key path ("" for the root)."""
        return iter(())


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class Transport(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"

    @property
    def stream(self) -> bool:
        """True when the listener is a TCP socket (TCP and TLS share the port space)."""
        return self is not Transport.UDP


#: Ports 1..65535; 0 asks the kernel for an ephemeral port (useful in tests only).
PORT_SPEC_EXPECT: Final = "an integer 1..65535"

#: RFC 3261 20.35/20.41: the value goes verbatim into a header, so it must not be able
#: to break the header line: printable ASCII, no leading or trailing space.
USER_AGENT_PATTERN: Final = r"[!-~](?:[ -~]{0,126}[!-~])?"


def _file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file, or None when it is."""
    try:
        if path.is_file():
            return None
    except OSError as exc:  # is_file() raises for ENAMETOOLONG, EACCES ...
        return f"cannot look up {path}: {exc.strerror or exc}"
    return f"no such file: {path}"


def _key_pair_problem(certificate: Path | None, private_key: Path | None) -> str | None:
    """Why a certificate and key do not load as a server identity, or None. A key
    that needs a passphrase is refused (nothing would type it), not asked for."""
    if certificate is None or private_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, private_key, password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"{certificate} and {private_key} do not load as a certificate and its key: {exc}"
    return None


def _ca_problem(bundle: Path) -> str | None:
    """Why a CA bundle does not load, or None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=bundle)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"{bundle} does not load as PEM CA certificates: {exc}"
    return None


def _endpoint(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}"


@dataclass(frozen=True)
class LogConfig(Section):
    level: LogLevel = field(default=LogLevel.INFO, metadata=spec("Lowest level logged."))
    format: LogFormat = field(
        default=LogFormat.TEXT, metadata=spec("text for humans, json for journald/collectors.")
    )


@dataclass(frozen=True)
class SipListener(Section):
    transport: Transport = field(metadata=spec("udp, tcp or tls."))
    address: IPAddress = field(metadata=spec("IPv4 or IPv6 literal to bind to."))
    port: int = field(
        metadata=spec(
            "Port to bind to; 0 binds an ephemeral port (tests).",
            min=0,
            max=65535,
            expect=PORT_SPEC_EXPECT,
        )
    )

    def __str__(self) -> str:
        return f"{self.transport} {_endpoint(self.address, self.port)}"


DEFAULT_SIP_LISTENERS: Final = (
    SipListener(Transport.UDP, IPv4Address("127.0.0.1"), 5060),
    SipListener(Transport.TCP, IPv4Address("127.0.0.1"), 5060),
    SipListener(Transport.TLS, IPv4Address("127.0.0.1"), 5061),
)


class MutualTls(enum.StrEnum):
    # Not "off": YAML 1.1 reads a bare off as false.
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRE = "require"


#: A SHA-256 certificate fingerprint, hex pairs with or without colons.
FINGERPRINT_PATTERN: Final = r"(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}"

#: A TLS server name (RFC 6066 3), optionally with a left-most "*." wildcard.
SERVER_NAME_PATTERN: Final = r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?"


@dataclass(frozen=True)
class TrustedClient(Section):
    """A client certificate admitted by mutual TLS; its name identifies the trunk."""

    name: str = field(
        metadata=spec(
            "Name of the peer (trunk) on its connections.",
            pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}",
        )
    )
    fingerprint: str = field(
        metadata=spec(
            "SHA-256 fingerprint (openssl x509 -noout -fingerprint -sha256).",
            pattern=FINGERPRINT_PATTERN,
            expect="64 hex digits, colons allowed",
        )
    )


@dataclass(frozen=True)
class SniCertificate(Section):
    """A certificate served to clients that ask for ``server_name`` (SNI)."""

    server_name: str = field(
        metadata=spec("Server name, or *.domain for one label.", pattern=SERVER_NAME_PATTERN)
    )
    certificate: Path = field(metadata=spec("PEM certificate chain."))
    private_key: Path = field(metadata=spec("PEM private key of the certificate."))


@dataclass(frozen=True)
class TlsConfig(Section):
    certificate: Path | None = field(
        default=None,
        metadata=spec("PEM certificate chain; null = self-signed, generated into state_dir."),
    )
    private_key: Path | None = field(
        default=None, metadata=spec("PEM private key of the certificate; null with it.")
    )
    mtls: MutualTls = field(
        default=MutualTls.NONE,
        metadata=spec("Client certificates: none, optional (asked for) or require."),
    )
    client_ca: Path | None = field(
        default=None,
        metadata=spec("PEM bundle client certificates must chain to (CAs or the peers' own)."),
    )
    trusted_clients: tuple[TrustedClient, ...] = field(
        default=(),
        metadata=spec("Client certificates admitted by fingerprint; empty = any from client_ca."),
    )
    sni: tuple[SniCertificate, ...] = field(
        default=(), metadata=spec("Certificates chosen by the server name a client asks for.")
    )
    handshakes_per_source: int = field(
        default=16,
        metadata=spec(
            "TLS handshakes in progress at once per source address; 0 = no limit.",
            min=0,
            max=100_000,
        ),
    )
    handshake_rate: float = field(
        default=10.0,
        metadata=spec(
            "New TLS handshakes per second per source address; 0 = no limit.", min=0, max=100_000
        ),
    )
    handshake_burst: int = field(
        default=20,
        metadata=spec(
            "TLS handshakes a source may start at once above the rate.", min=1, max=100_000
        ),
    )
    server_ca: Path | None = field(
        default=None,
        metadata=spec(
            "PEM bundle the certificates of TLS servers the SBC connects to (trunks) must "
            "chain to (CAs or the servers' own); null = the system's CAs."
        ),
    )
    present_certificate: bool = field(
        default=True,
        metadata=spec(
            "Present the configured certificate/private_key (never the generated "
            "self-signed one) to TLS servers that ask for one (mutual TLS; a certificate "
            "with extended key usages needs clientAuth among them)."
        ),
    )
    verify_server: bool = field(
        default=True,
        metadata=spec("Verify TLS servers' certificates and names; false only for lab peers."),
    )

    def check(self, path: str) -> Iterator[Issue]:
        # Refused here, not at start-up or the first call: `sbc check-config` and a
        # reload see it, and name the key (the TLS library's error names no file).
        files: list[tuple[str, Path | None]] = [
            ("certificate", self.certificate),
            ("private_key", self.private_key),
            ("client_ca", self.client_ca),
            ("server_ca", self.server_ca),
        ]
        for index, sni in enumerate(self.sni):
            files.append((f"sni[{index}].certificate", sni.certificate))
            files.append((f"sni[{index}].private_key", sni.private_key))
        missing = False
        for key, file in files:
            problem = None if file is None else _file_problem(file)
            if problem is not None:
                missing = True
                yield key_path(path, key), problem
        if not missing:
            # Loaded as the listeners will: a file that is not PEM, or a key that is
            # not its certificate's, is named here (OpenSSL's error names no file).
            pairs = [("private_key", self.certificate, self.private_key)]
            pairs += [
                (f"sni[{i}].private_key", sni.certificate, sni.private_key)
                for i, sni in enumerate(self.sni)
            ]
            for key, certificate, private_key in pairs:
                problem = _key_pair_problem(certificate, private_key)
                if problem is not None:
                    yield key_path(path, key), problem
            for key, bundle in (("client_ca", self.client_ca), ("server_ca", self.server_ca)):
                problem = None if bundle is None else _ca_problem(bundle)
                if problem is not None:
                    yield key_path(path, key), problem
        if self.mtls is not MutualTls.NONE and self.client_ca is None:
            yield key_path(path, "client_ca"), f"mtls {self.mtls} needs client_ca"
        if self.trusted_clients and self.mtls is MutualTls.NONE:
            yield key_path(path, "trusted_clients"), "trusted_clients need mtls optional or require"
        prints: set[str] = set()
        for index, client in enumerate(self.trusted_clients):
            value = client.fingerprint.replace(":", "").upper()
            if value not in prints:
                prints.add(value)
            else:
                yield (
                    key_path(path, f"trusted_clients[{index}].fingerprint"),
                    "duplicate fingerprint",
                )
        # Half a key pair cannot work, and silently falling back to a self-signed
        # certificate would hide the mistake until a peer refuses the handshake.
        if (self.certificate is None) != (self.private_key is None):
            present, absent = (
                ("certificate", "private_key")
                if self.private_key is None
                else ("private_key", "certificate")
            )
            yield (
                path,
                f"{present} is set but {absent} is not: set both, "
                "or neither for a generated self-signed certificate",
            )


@dataclass(frozen=True)
class SipConfig(Section):
    listen: tuple[SipListener, ...] = field(
        default=DEFAULT_SIP_LISTENERS,
        metadata=spec("SIP listeners outside any realm (local answers only)."),
    )
    tls: TlsConfig = field(default_factory=TlsConfig, metadata=spec("TLS listeners' identity."))
    tcp_idle_timeout: int = field(
        default=600,
        metadata=spec(
            "Seconds an idle TCP/TLS connection is kept; one a phone registered over is"
            " kept while the registration lasts.",
            min=1,
            max=86400,
        ),
    )
    max_connections: int = field(
        default=1024,
        metadata=spec("Most TCP/TLS connections open at once.", min=1, max=1_000_000),
    )
    tcp_message_timeout: int = field(
        default=32,
        metadata=spec(
            "Seconds a TCP/TLS message may take from its first byte to its last; a"
            " connection that sends slower is closed (slowloris).",
            min=1,
            max=3600,
        ),
    )
    max_transactions: int = field(
        default=50_000,
        metadata=spec(
            "Most SIP transactions alive at once (incoming and the SBC's own); beyond,"
            " new requests get 503 with Retry-After. A UDP non-INVITE transaction lives"
            " 32 s (Timer J), so this bounds the sustained request rate to about a 32nd"
            " of it (50,000: some 1,500 requests/s); each costs about 8.5 KiB.",
            min=100,
            max=1_000_000,
        ),
    )
    max_transactions_per_source: int = field(
        default=5_000,
        metadata=spec(
            "Most SIP transactions one source IP address holds at once (the requests it"
            " sent, from any port); beyond, its new requests get 503 with Retry-After"
            " while other peers are still served, so one scanner or looping PBX cannot"
            " fill max_transactions. Phones behind one NAT address share it. The peers"
            " the configuration names (trunk gateways, also by what their names"
            " resolve to; static routes' hosts; upstream registrars; the addresses in"
            " a route's source networks of at most a /24, IPv6 /64) are exempt: one"
            " carrier address may carry most of the calls.",
            min=10,
            max=1_000_000,
        ),
    )
    t1_ms: int = field(
        default=500,
        metadata=spec(
            "RFC 3261 T1, the round-trip estimate, in ms: the first retransmission"
            " interval, and a 64th of the transaction timeouts (Timers B, F, H). Raise"
            " it for high-latency trunks (satellite).",
            min=100,
            max=4000,
        ),
    )
    user_agent: str = field(
        default="sbc",
        metadata=spec(
            "Server/User-Agent header value.",
            pattern=USER_AGENT_PATTERN,
            expect="1..128 printable ASCII characters, not starting or ending with a space",
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        # TCP and TLS listeners both bind TCP sockets, so they share one port space.
        # Port 0 is exempt: every ephemeral bind gets its own port.
        seen: dict[tuple[bool, IPAddress, int], int] = {}
        for index, listener in enumerate(self.listen):
            if listener.port == 0:
                continue
            socket = (listener.transport.stream, listener.address, listener.port)
            first = seen.setdefault(socket, index)
            if first == index:
                continue
            other = self.listen[first]
            here = key_path(path, f"listen[{index}]")
            there = key_path(path, f"listen[{first}]")
            if other.transport is listener.transport:
                yield here, f"duplicate listener {listener} (same as {there})"
            else:
                yield here, f"{listener} uses the same TCP port as {there} ({other})"


@dataclass(frozen=True)
class ManagementListen(Section):
    address: IPAddress = field(
        default=IPv4Address("127.0.0.1"), metadata=spec("Address of the admin UI and API.")
    )
    port: int = field(
        default=8080,
        metadata=spec(
            "Port of the admin UI and API; 0 = ephemeral (tests).",
            min=0,
            max=65535,
            expect=PORT_SPEC_EXPECT,
        ),
    )

    def __str__(self) -> str:
        return _endpoint(self.address, self.port)


@dataclass(frozen=True)
class ManagementConfig(Section):
    listen: ManagementListen = field(
        default_factory=ManagementListen, metadata=spec("Where the admin UI and API listen.")
    )


# A module import, not `from ... import`: sbc.firewall.config builds on the Section and
# spec above, and this line runs while it is half-imported when it is imported first.
import sbc.config.b2bua as _b2bua  # noqa: E402
import sbc.firewall.config as _firewall  # noqa: E402


@dataclass(frozen=True)
class Config(Section):
    """The whole configuration: what `sbc run` runs with."""

    state_dir: Path = field(
        default=Path("state"),
        metadata=spec("Generated TLS certificate, SQLite databases and other state."),
    )
    log: LogConfig = field(default_factory=LogConfig, metadata=spec("Logging."))
    sip: SipConfig = field(default_factory=SipConfig, metadata=spec("SIP signalling."))
    management: ManagementConfig = field(
        default_factory=ManagementConfig, metadata=spec("Admin UI and REST API.")
    )
    realms: tuple[_b2bua.RealmConfig, ...] = field(
        default=(), metadata=spec("Realms: listeners with their own policy (B2BUA).")
    )
    routes: tuple[_b2bua.RouteConfig, ...] = field(
        default=(), metadata=spec("Routing rules for new calls, in order.")
    )
    trunks: tuple[_b2bua.TrunkConfig, ...] = field(
        default=(), metadata=spec("Trunks: gateways tried by priority and weight, probed.")
    )
    registrar: _b2bua.RegistrarConfig = field(
        default_factory=lambda: _b2bua.RegistrarConfig(),
        metadata=spec("The embedded registrar of realms with registrar: true."),
    )
    calls: _b2bua.CallsConfig = field(
        default_factory=lambda: _b2bua.CallsConfig(),
        metadata=spec("Call limits and timers: duration, session timers, admission."),
    )
    media: _b2bua.MediaSection = field(
        default_factory=lambda: _b2bua.MediaSection(),
        metadata=spec("Media relay: port range, kernel fast path, timeouts."),
    )
    cdr: _b2bua.CdrConfig = field(
        default_factory=lambda: _b2bua.CdrConfig(),
        metadata=spec("Call detail records."),
    )
    firewall: _firewall.FirewallConfig = field(
        default_factory=lambda: _firewall.FirewallConfig(),
        metadata=spec("Edge defence: nftables table inet sbc and its detectors."),
    )

    def __post_init__(self) -> None:
        # The blacklist lives with the rest of the state unless the file says otherwise
        # (a path relative to the configuration file would land in /etc/sbc, read-only
        # to the service on the appliance).
        if self.firewall.state_file is None:
            firewall = replace(self.firewall, state_file=self.state_dir / BLACKLIST_FILE)
            object.__setattr__(self, "firewall", firewall)

    def check(self, path: str) -> Iterator[Issue]:
        yield from self._check_realms(path)
        yield from self._check_wildcards(path)
        yield from self._check_media_ports(path)
        mgmt = self.management.listen
        if mgmt.port == 0:
            return
        listeners = [(f"sip.listen[{i}]", s) for i, s in enumerate(self.sip.listen)]
        for index, realm in enumerate(self.realms):
            listeners += [(f"realms[{index}].listen[{j}]", s) for j, s in enumerate(realm.listen)]
        for where, listener in listeners:
            if (
                listener.transport.stream
                and listener.address == mgmt.address
                and listener.port == mgmt.port
            ):
                yield (
                    key_path(path, "management.listen"),
                    f"{mgmt} is already used by {key_path(path, where)} ({listener})",
                )
                return

    def _sip_listeners(self) -> list[tuple[str, SipListener]]:
        """Every SIP listener with its key path, sip.listen first."""
        listeners = [(f"sip.listen[{i}]", s) for i, s in enumerate(self.sip.listen)]
        for index, realm in enumerate(self.realms):
            listeners += [(f"realms[{index}].listen[{j}]", s) for j, s in enumerate(realm.listen)]
        return listeners

    def _check_wildcards(self, path: str) -> Iterator[Issue]:
        """Listeners that differ in address but still cannot both bind: a wildcard
        (0.0.0.0, ::) takes its port on every address of its family, and a UDP ::
        socket (dual-stack: the transport does not set IPV6_V6ONLY on it) on IPv4
        addresses too. Identical listeners are reported by the other checks."""
        # (stream, port, kind) -> the first listener of that kind, by its key path and
        # address; kind is "4"/"6" for any address of the family, "4*"/"6*" for the
        # wildcard, "46*" for a dual-stack UDP ::.
        first: dict[tuple[bool, int, str], tuple[str, IPAddress]] = {}
        mgmt = self.management.listen
        sockets: list[tuple[str, bool, IPAddress, int]] = [
            (where, s.transport.stream, s.address, s.port) for where, s in self._sip_listeners()
        ]
        sockets.append(("management.listen", True, mgmt.address, mgmt.port))
        for where, stream, address, port in sockets:
            if port == 0:
                continue
            family = str(address.version)
            kinds = [family]
            # What an earlier listener of this kind clashes with.
            clashes = [f"{family}*"]
            if address.is_unspecified:
                kinds.append(f"{family}*")
                clashes.append(family)
                if not stream and address.version == 6:
                    kinds.append("46*")
                    clashes.append("4")
            if address.version == 4 and not stream:
                clashes.append("46*")
            for kind in clashes:
                other = first.get((stream, port, kind))
                if other is not None and other[1] != address:
                    protocol = "TCP" if stream else "UDP"
                    yield (
                        key_path(path, where),
                        f"{protocol} port {port} on {address} cannot be bound beside"
                        f" {key_path(path, other[0])} on {other[1]}",
                    )
                    break
            for kind in kinds:
                first.setdefault((stream, port, kind), (where, address))

    def _check_media_ports(self, path: str) -> Iterator[Issue]:
        """A UDP SIP listener inside the media port range, on an address the media
        relay binds its ports on: calls would fail to get that port pair, or the
        listener would not bind while the relay holds it."""
        if not self.realms:
            return  # no realm, no media relay
        media = self.media
        addresses = {realm.media_address for realm in self.realms}
        versions = {address.version for address in addresses}
        for where, listener in self._sip_listeners():
            address = listener.address
            if listener.transport.stream or not media.port_min <= listener.port <= media.port_max:
                continue
            shared = address in addresses or (
                address.is_unspecified and (address.version in versions or address.version == 6)
            )
            if shared:
                yield (
                    key_path(path, where),
                    f"{listener} is inside the media port range"
                    f" media.port_min..port_max ({media.port_min}..{media.port_max})",
                )

    def _check_realms(self, path: str) -> Iterator[Issue]:
        # Sets, not list scans: aliases can make the lists long (up to loader.MAX_NODES).
        names: set[str] = set()
        for index, realm in enumerate(self.realms):
            if realm.name in names:
                yield key_path(path, f"realms[{index}].name"), f"duplicate realm {realm.name!r}"
            names.add(realm.name)
        sockets = {(s.transport.stream, s.address, s.port) for s in self.sip.listen if s.port}
        for index, realm in enumerate(self.realms):
            for j, listener in enumerate(realm.listen):
                socket = (listener.transport.stream, listener.address, listener.port)
                if listener.port and socket in sockets:
                    yield (
                        key_path(path, f"realms[{index}].listen[{j}]"),
                        f"{listener} is already used by another listener",
                    )
                sockets.add(socket)
        for index, realm in enumerate(self.realms):
            relay = realm.register_relay
            if relay is not None and relay.realm not in names:
                yield (
                    key_path(path, f"realms[{index}].register_relay.realm"),
                    f"unknown realm {relay.realm!r}",
                )
        if not self.sip.listen and not any(realm.listen for realm in self.realms):
            yield key_path(path, "sip.listen"), "no SIP listener at all (here or in a realm)"
        trunks: set[str] = set()
        for index, trunk in enumerate(self.trunks):
            if trunk.name in trunks:
                yield key_path(path, f"trunks[{index}].name"), f"duplicate trunk {trunk.name!r}"
            trunks.add(trunk.name)
        for index, trunk in enumerate(self.trunks):
            if trunk.realm not in names:
                yield key_path(path, f"trunks[{index}].realm"), f"unknown realm {trunk.realm!r}"
        routes: set[str] = set()
        for index, route in enumerate(self.routes):
            # The name is what CDRs, logs and metrics say a call took.
            if route.name in routes:
                yield key_path(path, f"routes[{index}].name"), f"duplicate route {route.name!r}"
            routes.add(route.name)
            for key in ("from_realm", "realm"):
                value = getattr(route, key)
                if value is not None and value not in names:
                    yield key_path(path, f"routes[{index}].{key}"), f"unknown realm {value!r}"
            if route.trunk is not None and route.trunk not in trunks:
                yield key_path(path, f"routes[{index}].trunk"), f"unknown trunk {route.trunk!r}"
