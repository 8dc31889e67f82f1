"""TLS material: a self-signed certificate made on first start, and SSL contexts.

An appliance must answer TLS out of the box; until an operator installs a real
certificate, the SBC generates a self-signed one into its state directory (key
readable by the owner only) and reuses it on later starts.

``ServerTls`` is what a TLS listener serves: the certificate chain and key (PEM),
more of them chosen by SNI (RFC 6066 3), and optionally mutual TLS, where a client
certificate must chain to a configured CA bundle and, if fingerprints are listed,
be one of them; the name of the fingerprint it matched is how a trunk is known.
``reload()`` builds fresh contexts from the files and swaps them in: handshakes
after it use the new ones, established connections keep theirs.

``client_context`` is the other direction, the SBC connecting to trunks: it
verifies their certificates against a configured CA bundle (or the system's) and
presents the SBC's own certificate to servers that ask for one.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sbc.transport.base import PeerCertificate

logger = logging.getLogger(__name__)

SELF_SIGNED_CERT = "tls/sbc-selfsigned.crt"
SELF_SIGNED_KEY = "tls/sbc-selfsigned.key"
SELF_SIGNED_DAYS = 825

#: TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are fixed by
#: OpenSSL and all acceptable.
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


@dataclass(frozen=True, slots=True)
class CertificatePaths:
    certificate: Path
    private_key: Path


def ensure_self_signed(
    state_dir: Path, hostnames: tuple[str, ...] = ("localhost",)
) -> CertificatePaths:
    """The state directory's self-signed certificate, generated if it is missing."""
    paths = CertificatePaths(state_dir / SELF_SIGNED_CERT, state_dir / SELF_SIGNED_KEY)
    if paths.certificate.exists() and paths.private_key.exists():
        return paths
    paths.certificate.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Write the key with owner-only permissions from the start, never world-readable.
    fd = os.open(paths.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    paths.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    logger.info("- generated a self-signed TLS certificate at %s", paths.certificate)
    return paths


class ClientAuth(enum.Enum):
    """Mutual TLS: whether a TLS listener asks its clients for a certificate."""

    OFF = "off"
    #: Asked for; a client without one is admitted, one with a bad one is not.
    OPTIONAL = "optional"
    REQUIRE = "require"


_VERIFY_MODES: Final = {
    ClientAuth.OFF: ssl.CERT_NONE,
    ClientAuth.OPTIONAL: ssl.CERT_OPTIONAL,
    ClientAuth.REQUIRE: ssl.CERT_REQUIRED,
}

_FINGERPRINT: Final = re.compile(r"(?:[0-9A-F]{2}:?){31}[0-9A-F]{2}")


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as openssl prints it; accepts hex with or without colons.

    Raises ValueError for anything else.
    """
    compact = text.strip().upper().removeprefix("SHA256:").replace(":", "")
    if not _FINGERPRINT.fullmatch(compact):
        raise ValueError(f"not a SHA-256 fingerprint: {text!r}")
    return ":".join(compact[i : i + 2] for i in range(0, 64, 2))


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as openssl prints it."""
    return normalize_fingerprint(hashlib.sha256(der).hexdigest())


def peer_certificate(der: bytes, names: Mapping[str, str] | None = None) -> PeerCertificate:
    """What a peer's DER certificate says about it; ``names`` maps fingerprints to names."""
    digest = fingerprint(der)
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = ""
    return PeerCertificate(digest, subject, (names or {}).get(digest))


@dataclass(frozen=True, slots=True)
class SniCertificate:
    """The certificate served to clients asking for ``server_name`` (``*.`` wildcards)."""

    server_name: str
    paths: CertificatePaths


@dataclass(frozen=True, slots=True)
class ServerTlsSettings:
    """Everything a TLS listener serves: identity, SNI identities and mutual TLS."""

    identity: CertificatePaths
    client_auth: ClientAuth = ClientAuth.OFF
    #: PEM bundle client certificates must chain to: CAs, or the trunks' own
    #: (self-signed or not) certificates, which are accepted as trust anchors.
    client_ca: Path | None = None
    #: SHA-256 fingerprint -> name; non-empty: only these client certificates pass.
    trusted_clients: Mapping[str, str] = field(default_factory=dict)
    sni: tuple[SniCertificate, ...] = ()

    def __post_init__(self) -> None:
        if self.client_auth is not ClientAuth.OFF and self.client_ca is None:
            raise ValueError("mutual TLS needs a client CA bundle")
        trusted = {normalize_fingerprint(fp): name for fp, name in self.trusted_clients.items()}
        object.__setattr__(self, "trusted_clients", trusted)


def server_context(
    paths: CertificatePaths,
    client_auth: ClientAuth = ClientAuth.OFF,
    client_ca: Path | None = None,
) -> ssl.SSLContext:
    """A server context: TLS 1.2 and 1.3 only, modern ciphers, no compression,
    no renegotiation; with ``client_auth``, client certificates verified against
    ``client_ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MODERN_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.load_cert_chain(paths.certificate, paths.private_key)
    if client_auth is not ClientAuth.OFF:
        if client_ca is None:
            raise ValueError("mutual TLS needs a client CA bundle")
        context.load_verify_locations(cafile=client_ca)
        # A pinned trunk certificate in the bundle is a trust anchor by itself.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = _VERIFY_MODES[client_auth]
    return context


def _matches(pattern: str, name: str) -> bool:
    # RFC 6125 6.4.3: a wildcard stands for exactly one left-most label.
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == name


class ServerTls:
    """The live SSL contexts of TLS listeners: a default one and one per SNI name."""

    def __init__(self, settings: ServerTlsSettings) -> None:
        """Load every file; raises OSError, ssl.SSLError or ValueError if one is bad."""
        self.settings: ServerTlsSettings | None = settings
        self._context = self._build(settings)

    @classmethod
    def fixed(cls, context: ssl.SSLContext) -> ServerTls:
        """Serve a context made elsewhere; ``reload`` leaves it as it is."""
        tls = cls.__new__(cls)
        tls.settings = None
        tls._context = context
        return tls

    @property
    def context(self) -> ssl.SSLContext:
        """The context a new handshake starts with."""
        return self._context

    @property
    def client_auth(self) -> ClientAuth:
        return ClientAuth.OFF if self.settings is None else self.settings.client_auth

    def reload(self) -> None:
        """Re-read every file into new contexts for the handshakes to come.

        Raises (keeping the current contexts) if a file cannot be loaded.
        """
        if self.settings is not None:
            self._context = self._build(self.settings)

    def identify(self, der: bytes | None) -> PeerCertificate | None:
        """The identity of a client that presented ``der`` (None: no certificate)."""
        if der is None:
            return None
        names = self.settings.trusted_clients if self.settings is not None else None
        return peer_certificate(der, names)

    def admits(self, peer: PeerCertificate | None) -> bool:
        """Whether a client that completed the handshake with ``peer`` may stay.

        OpenSSL already verified the chain; this adds the fingerprint pinning.
        """
        settings = self.settings
        if settings is None or settings.client_auth is ClientAuth.OFF:
            return True
        if peer is None:
            return settings.client_auth is ClientAuth.OPTIONAL
        return not settings.trusted_clients or peer.name is not None

    @staticmethod
    def _build(settings: ServerTlsSettings) -> ssl.SSLContext:
        def make(paths: CertificatePaths) -> ssl.SSLContext:
            return server_context(paths, settings.client_auth, settings.client_ca)

        default = make(settings.identity)
        by_name = [(sni.server_name.lower().rstrip("."), make(sni.paths)) for sni in settings.sni]
        if by_name:

            def select(
                sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
            ) -> None:
                # RFC 6066 3: no name, or one we do not know, gets the default.
                if server_name is None:
                    return
                name = server_name.lower().rstrip(".")
                for pattern, context in by_name:
                    if _matches(pattern, name):
                        sslobj.context = context
                        return

            default.sni_callback = select
        return default


def client_context(
    cafile: Path | None = None,
    *,
    verify: bool = True,
    certificate: CertificatePaths | None = None,
) -> ssl.SSLContext:
    """A client context for outgoing TLS (to trunks): TLS 1.2 and 1.3 only.

    The server's certificate must chain to ``cafile`` (a PEM bundle of CAs or of
    the servers' own certificates, each a trust anchor by itself), else to the
    system's CAs, and match the name the connection asks for (RFC 5922 4 and 7.3:
    the SIP domain the request was routed to, passed as ``server_hostname``).
    ``verify=False`` skips both, only for lab peers. ``certificate`` is presented
    to servers that ask for one (mutual TLS, RFC 5922 5). Raises OSError,
    ssl.SSLError or ValueError for a file that cannot be loaded.
    """
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None:
        # As for client_ca: a pinned trunk certificate in the bundle is enough.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if certificate is not None:
        context.load_cert_chain(certificate.certificate, certificate.private_key)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
