"""TLS material: a self-signed certificate made on first start, and SSL contexts.

An appliance must answer TLS out of the box; until an operator installs a real
certificate, the SBC generates a self-signed one into its state directory (key
readable by the owner only) and reuses it on later starts.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def server_context(paths: CertificatePaths) -> ssl.SSLContext:
    """A server context: TLS 1.2 and 1.3 only, modern ciphers, no compression."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MODERN_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(paths.certificate, paths.private_key)
    return context


def client_context(cafile: Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client context for outgoing TLS; ``verify=False`` only for lab peers."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
