"""TLS hardening against a real `sbc run`: protocol versions (openssl s_client),
mutual TLS, SNI, certificate reload on SIGHUP, per-source handshake limit."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scenario.sbcproc import Ports, SbcProcess, options, stream_exchange
from tests.tls_pki import Authority, Issued, self_signed

OPENSSL = shutil.which("openssl")
HANDSHAKES_PER_SOURCE = 4


@dataclass
class Lab:
    sbc: SbcProcess
    ca: Authority
    server: Issued
    alt: Issued
    known: Issued
    unlisted: Issued
    rogue: Issued


def tls_config(ports: Ports, workdir: Path, tls: str) -> str:
    return f"""\
state_dir: {workdir / "state"}
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: {ports.sip}}}
    - {{transport: tls, address: 127.0.0.1, port: {ports.tls}}}
  tls:
{tls}
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("sbc-tls")
    ca = Authority(workdir / "pki", "trusted-ca")
    rogue_ca = Authority(workdir / "rogue", "rogue-ca")
    server = ca.issue("sbc.test", "sbc.test", "127.0.0.1")
    alt = ca.issue("voice.example")
    known = ca.issue("carrier-a", client=True)
    unlisted = ca.issue("carrier-b", client=True)
    rogue = rogue_ca.issue("intruder", client=True)
    ports = Ports.pick()
    config = workdir / "sbc.yaml"
    config.write_text(
        tls_config(
            ports,
            workdir,
            f"""\
    certificate: {server.cert}
    private_key: {server.key}
    mtls: optional
    client_ca: {ca.path}
    trusted_clients:
      - {{name: carrier-a, fingerprint: "{known.fingerprint}"}}
    sni:
      - {{server_name: voice.example, certificate: {alt.cert}, private_key: {alt.key}}}
    handshakes_per_source: {HANDSHAKES_PER_SOURCE}
    handshake_rate: 1000
    handshake_burst: 1000""",
        )
    )
    process = SbcProcess(workdir, config, ports).start()
    try:
        yield Lab(process, ca, server, alt, known, unlisted, rogue)
    finally:
        process.stop()


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    ("flag", "accepted"),
    [("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)],
)
def test_only_tls_1_2_and_1_3_handshake(lab: Lab, flag: str, accepted: bool) -> None:
    # SECLEVEL=0 lets the client offer TLS 1.0/1.1: the refusal must be the server's.
    result = s_client(lab.sbc.ports.tls, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    output = result.stdout + result.stderr
    if accepted:
        assert result.returncode == 0, output
        version = {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]
        assert f"Protocol version: {version}" in output
    else:
        assert result.returncode != 0, output
        assert "Protocol version" not in output
        # The client did offer the version (it did not refuse it itself); the server
        # ended the handshake (asyncio closes without flushing the alert).
        assert "no protocols available" not in output
        assert "unexpected eof" in output or "alert protocol version" in output, output


def tls_socket(
    port: int,
    client: Issued | None = None,
    server_name: str | None = None,
    ca: Path | None = None,
) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=ca)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        return context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def served_fingerprint(port: int, server_name: str | None = None) -> str:
    with tls_socket(port, server_name=server_name) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def options_status(s: ssl.SSLSocket) -> int | None:
    response, _ = stream_exchange(s, options(transport="TLS"))
    return None if response is None else response.status


def test_mutual_tls_accepts_the_known_client_certificate(lab: Lab) -> None:
    with tls_socket(lab.sbc.ports.tls, lab.known, "sbc.test", lab.ca.path) as s:
        assert options_status(s) == 200
        assert options_status(s) == 200


@pytest.mark.parametrize("who", ["rogue", "unlisted"])
def test_mutual_tls_rejects_an_unknown_client_certificate(lab: Lab, who: str) -> None:
    client = lab.rogue if who == "rogue" else lab.unlisted
    try:
        s = tls_socket(lab.sbc.ports.tls, client, "sbc.test", lab.ca.path)
    except (OSError, ssl.SSLError):
        return  # refused during the handshake (TLS 1.2, or a chain that does not verify)
    with s:
        # TLS 1.3: the client's handshake ends first; the refusal arrives on reading.
        response, closed = stream_exchange(s, options(transport="TLS"))
        assert response is None and closed


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_mutual_tls_with_openssl_client_certificates(lab: Lab) -> None:
    port = lab.sbc.ports.tls
    ok = s_client(port, "-cert", str(lab.known.cert), "-key", str(lab.known.key))
    assert ok.returncode == 0, ok.stderr
    bad = s_client(port, "-tls1_2", "-cert", str(lab.rogue.cert), "-key", str(lab.rogue.key))
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "Protocol version" not in output  # -brief prints it once a handshake completes


def test_sni_selects_the_configured_certificate(lab: Lab) -> None:
    port = lab.sbc.ports.tls
    assert served_fingerprint(port, "voice.example") == lab.alt.fingerprint
    assert served_fingerprint(port, "sbc.test") == lab.server.fingerprint
    assert served_fingerprint(port) == lab.server.fingerprint
    with tls_socket(port, server_name="voice.example", ca=lab.ca.path) as s:
        assert options_status(s) == 200


def test_excess_concurrent_handshakes_from_one_source_are_refused(lab: Lab) -> None:
    port = lab.sbc.ports.tls
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=3)]
    try:
        # Connections that never send a ClientHello hold handshakes open.
        for _ in range(HANDSHAKES_PER_SOURCE - 1):
            stalled.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        time.sleep(0.3)  # let the SBC accept them all
        refused = 0
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=3) as extra:
                extra.settimeout(3)
                try:
                    refused += extra.recv(1) == b""
                except ConnectionResetError:
                    refused += 1
        assert refused == 3
    finally:
        for s in stalled:
            s.close()
    # Once the stalled handshakes end the source is welcome again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with tls_socket(port) as s:
                assert options_status(s) == 200
                break
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    else:
        pytest.fail("the source stayed refused after its handshakes ended")
    assert "refusing a TLS handshake" not in lab.sbc.log()  # debug only: no log flood


def test_sighup_reloads_certificates_without_dropping_connections(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "pki", "ca")
    first, second = ca.issue("first.test"), ca.issue("second.test")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copyfile(first.cert, live_cert)
    shutil.copyfile(first.key, live_key)
    ports = Ports.pick()
    config = tmp_path / "sbc.yaml"
    config.write_text(
        tls_config(ports, tmp_path, f"    certificate: {live_cert}\n    private_key: {live_key}")
    )
    sbc = SbcProcess(tmp_path, config, ports).start()
    try:
        assert served_fingerprint(ports.tls) == first.fingerprint
        with tls_socket(ports.tls) as old:
            assert options_status(old) == 200
            shutil.copyfile(second.cert, live_cert)
            shutil.copyfile(second.key, live_key)
            sbc.signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "TLS certificates reloaded" not in sbc.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "TLS certificates reloaded" in sbc.log()
            assert served_fingerprint(ports.tls) == second.fingerprint
            # The connection from before the reload still carries requests.
            assert options_status(old) == 200
        # A broken key is refused (the reload's config check names it, with its
        # file and line); the renewed certificate stays in service.
        live_key.write_text("not a key\n")
        sbc.signal(signal.SIGHUP)
        refused = "sip.tls.private_key"
        deadline = time.monotonic() + 5
        while refused not in sbc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"x reload refused: {config}:" in sbc.log()
        assert "do not load as a certificate and its key" in sbc.log()
        assert "the running configuration stays in force" in sbc.log()
        assert served_fingerprint(ports.tls) == second.fingerprint
        assert sbc.health()[0] == 200
    finally:
        assert sbc.stop() == 0
    assert "BEGIN" not in sbc.log()  # no key material in the log


def test_self_signed_trunk_certificate_pinned_by_fingerprint(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "pki", "ca")
    server = ca.issue("sbc.test", "sbc.test")
    trunk = self_signed(tmp_path / "trunk", "trunk-z")
    ports = Ports.pick()
    config = tmp_path / "sbc.yaml"
    config.write_text(
        tls_config(
            ports,
            tmp_path,
            f"""\
    certificate: {server.cert}
    private_key: {server.key}
    mtls: require
    client_ca: {trunk.cert}
    trusted_clients: [{{name: trunk-z, fingerprint: "{trunk.fingerprint}"}}]""",
        )
    )
    sbc = SbcProcess(tmp_path, config, ports).start()
    try:
        with tls_socket(ports.tls, trunk) as s:
            assert options_status(s) == 200
        # Without a client certificate there is no way in.
        try:
            s = tls_socket(ports.tls)
        except (OSError, ssl.SSLError):
            pass
        else:
            with s:
                response, closed = stream_exchange(s, options(transport="TLS"))
                assert response is None and closed
    finally:
        assert sbc.stop() == 0
