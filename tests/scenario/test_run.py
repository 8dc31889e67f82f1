"""`sbc run` as a real process: SIP over UDP, TCP and TLS, health, torture
messages, reload and stop."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbc.sip.message import Response
from tests.scenario.sbcproc import (
    Ports,
    SbcProcess,
    config_text,
    free_port,
    options,
    stream_exchange,
    stream_socket,
    udp_exchange,
)
from tests.torture import load_verdicts

VERDICTS = load_verdicts()

#: Over a stream, a Content-Length larger than the data means "wait for more"
#: (RFC 4475 3.1.2.2): no answer, and the connection is closed at EOF.
#: RFC 3261 18.3: Content-Length is mandatory on a stream (inv2543 has none), and
#: a header section without its blank line (baddn) is a message still arriving.
TCP_ANSWERS = {"rfc4475/clerr.dat": None, "rfc4475/inv2543.dat": 400, "rfc4475/baddn.dat": None}


@pytest.fixture(scope="module")
def sbc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SbcProcess]:
    workdir = tmp_path_factory.mktemp("sbc")
    ports = Ports.pick()
    config = workdir / "sbc.yaml"
    config.write_text(config_text(ports, workdir / "state"))
    process = SbcProcess(workdir, config, ports).start()
    try:
        yield process
    finally:
        process.stop()


def assert_options_ok(response: Response | None) -> None:
    assert response is not None
    assert response.status == 200
    assert "INVITE" in response.tokens("Allow") and "OPTIONS" in response.tokens("Allow")
    assert response.headers.get("Accept") == "application/sdp, multipart/mixed"
    assert "timer" in response.tokens("Supported")
    assert response.to.tag


def test_options_over_udp_tcp_and_tls(sbc: SbcProcess) -> None:
    assert_options_ok(udp_exchange(sbc.ports.sip, options()))
    with stream_socket(sbc.ports.sip) as s:
        assert_options_ok(stream_exchange(s, options(transport="TCP"))[0])
        # The connection stays open for the next request (connection reuse).
        assert_options_ok(stream_exchange(s, options(transport="TCP"))[0])
    with stream_socket(sbc.ports.tls, tls=True) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
        assert_options_ok(stream_exchange(s, options(transport="TLS"))[0])


def test_unknown_method_gets_501_and_malformed_gets_400(sbc: SbcProcess) -> None:
    response = udp_exchange(sbc.ports.sip, options("FROBNICATE"))
    assert response is not None and response.status == 501
    assert "OPTIONS" in response.tokens("Allow")
    bad = options().replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS")
    response = udp_exchange(sbc.ports.sip, bad)
    assert response is not None and response.status == 400
    assert "bad CSeq" in response.reason or response.reason == "Bad Request"


def test_crlf_keepalive_is_answered(sbc: SbcProcess) -> None:
    with stream_socket(sbc.ports.sip) as s:
        s.sendall(b"\r\n\r\n")
        s.settimeout(2)
        assert s.recv(16) == b"\r\n"


def test_health_reports_bound_transports(sbc: SbcProcess) -> None:
    status, body = sbc.health()
    assert status == 200
    assert body["sip_bound"] is True and body["loop_responsive"] is True


_TOP_VIA = re.compile(
    rb"(?im)^(?:via|v)[ \t]*:[ \t]*SIP[ \t]*/[ \t]*[\d.]+[ \t]*/[ \t]*\w+[ \t]+([^;,\r\n]+)"
)


_BRANCH = re.compile(rb"branch[ \t]*=[ \t]*([^;,\s]+)")


def via_port(data: bytes) -> int:
    """The port a response to this request goes to when it has no rport."""
    match = _TOP_VIA.search(data)
    if match is None:
        return 0
    sent_by = match.group(1).strip().decode()
    host_end = sent_by.rfind("]") + 1
    _, colon, port = sent_by[host_end:].rpartition(":")
    return int(port) if colon and port.strip().isdigit() else 5060


def _udp_answer(data: bytes, answer: int | None, port: int) -> int | None:
    response = udp_exchange(
        port, data, timeout=0.3 if answer is None else 2.0, bind_port=via_port(data)
    )
    return None if response is None else response.status


def _tcp_answer(data: bytes, answer: int | None, port: int) -> int | None:
    with stream_socket(port) as s:
        # Half-close only when no answer is due: EOF is what ends the wait for a
        # body that never comes (clerr), and it would race an answer otherwise.
        response, _ = stream_exchange(
            s, data, timeout=0.4 if answer is None else 2.0, half_close=answer is None
        )
    return None if response is None else response.status


def _renamed(data: bytes, tag: str) -> bytes:
    """The same message with a new branch and Call-ID: a new request, same verdict."""
    data = data.replace(b"branch=z9hG4bK", f"branch=z9hG4bK{tag}.".encode())
    return re.sub(rb"(?im)^((?:call-id|i)[ \t]*:[ \t]*)", rb"\g<1>" + tag.encode() + b".", data)


def _send_all_torture(
    sbc: SbcProcess, round_tag: str | None = None
) -> dict[str, tuple[int | None, int | None]]:
    """Every vector over TCP, then over UDP; (udp answer, tcp answer) per file.

    The TCP copies get their own branch and Call-ID: the same bytes over UDP within
    Timer H or J (32 s) are a retransmission of the same transaction (RFC 3261
    17.2.3), answered where the first copy came from. ``round_tag`` renames the UDP
    copies too, so that a later round is new requests as well.
    """
    port = sbc.ports.sip
    tcp_tag = f"{round_tag or ''}tcp"
    answers = {}
    branches: set[bytes] = set()
    for name, verdict in sorted(VERDICTS.items()):
        udp_data = verdict.data if round_tag is None else _renamed(verdict.data, round_tag)
        branch = _BRANCH.search(udp_data)
        if branch is not None and branch.group(1) in branches:
            # RFC 4475's files reuse branches: a second file with the same branch,
            # sent-by and method would be a retransmission of the first.
            udp_data = _renamed(udp_data, Path(name).stem)
        elif branch is not None:
            branches.add(branch.group(1))
        tcp_expected = TCP_ANSWERS.get(name, verdict.answer)
        tcp = _tcp_answer(_renamed(verdict.data, tcp_tag), tcp_expected, port)
        answers[name] = (_udp_answer(udp_data, verdict.answer, port), tcp)
    return answers


@pytest.mark.timeout(300)
def test_every_torture_message_gets_its_answer_and_nothing_leaks(sbc: SbcProcess) -> None:
    got = _send_all_torture(sbc)
    expected = {
        name: (v.answer, TCP_ANSWERS.get(name, v.answer)) for name, v in sorted(VERDICTS.items())
    }
    assert got == expected
    assert_options_ok(udp_exchange(sbc.ports.sip, options()))

    # Memory: after warm-up rounds, six more rounds of all 62 messages (new
    # branches and Call-IDs each round) over both transports must not make the
    # process grow.
    # Live transactions are compared at the same level: unanswered UDP INVITE
    # transactions rightly live 32 s (Timer H), so wait for them to drain.
    for n in range(2):
        _send_all_torture(sbc, round_tag=f"warm{n}")
    assert _wait_for(lambda: sbc.health()[1].get("transactions") == 0, timeout=45)
    before = sbc.rss_kib()
    for n in range(6):
        assert _send_all_torture(sbc, round_tag=f"r{n}") == expected
    assert _wait_for(lambda: sbc.health()[1].get("transactions") == 0, timeout=45)
    after = sbc.rss_kib()
    assert after - before < 2048, f"RSS grew from {before} KiB to {after} KiB"
    assert_options_ok(udp_exchange(sbc.ports.sip, options()))
    assert sbc.health()[0] == 200


def test_udp_retransmission_gets_the_same_response(sbc: SbcProcess) -> None:
    data = options()
    client_port = free_port(socket.SOCK_DGRAM)
    first = udp_exchange(sbc.ports.sip, data, bind_port=client_port)
    again = udp_exchange(sbc.ports.sip, data, bind_port=client_port)
    assert first is not None and again is not None
    # The server transaction absorbs the retransmission and resends its response.
    assert first.to.tag == again.to.tag


def test_check_config_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sip:\n  listen:\n    - {transport: udp, address: 127.0.0.1, port: abc}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sbc", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"{bad}:3: sip.listen[0].port: expected an integer" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("log: {level: debug}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sbc", "check-config", str(good)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_bad_config_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lgo: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sbc", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{bad}:1: unknown key 'lgo' (did you mean 'log'?)" in result.stderr


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_sighup_reload_refuses_bad_config_and_applies_good(tmp_path: Path) -> None:
    ports = Ports.pick()
    config = tmp_path / "sbc.yaml"
    config.write_text(config_text(ports, tmp_path / "state", user_agent="first"))
    sbc = SbcProcess(tmp_path, config, ports).start()
    try:

        def server_header() -> str | None:
            response = udp_exchange(ports.sip, options())
            return None if response is None else response.headers.get("Server")

        assert server_header() == "first"
        # A broken file: refused with file:line, the running config stays.
        broken = config_text(ports, tmp_path / "state") + "bogus: 1\n"
        config.write_text(broken)
        sbc.signal(signal.SIGHUP)
        assert _wait_for(lambda: "reload refused" in sbc.log())
        line = len(broken.splitlines())
        assert f"{config}:{line}: unknown key 'bogus'" in sbc.log()
        assert server_header() == "first"
        # A good file with a new User-Agent and a new SIP port is applied.
        new_ports = Ports(Ports.pick().sip, ports.tls, ports.mgmt)
        config.write_text(config_text(new_ports, tmp_path / "state", user_agent="second"))
        sbc.signal(signal.SIGHUP)
        assert _wait_for(lambda: "configuration reloaded" in sbc.log())
        response = udp_exchange(new_ports.sip, options())
        assert response is not None and response.headers.get("Server") == "second"
        assert udp_exchange(ports.sip, options(), timeout=0.5) is None
        assert sbc.health()[0] == 200
    finally:
        assert sbc.stop() == 0
    assert "stopped" in sbc.log()


def test_sigterm_stops_gracefully_and_releases_ports(tmp_path: Path) -> None:
    ports = Ports.pick()
    config = tmp_path / "sbc.yaml"
    config.write_text(config_text(ports, tmp_path / "state"))
    sbc = SbcProcess(tmp_path, config, ports).start()
    assert sbc.stop(timeout=10) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", ports.sip))  # free again


def _default_ports_free() -> bool:
    for kind, port in (
        (socket.SOCK_DGRAM, 5060),
        (socket.SOCK_STREAM, 5060),
        (socket.SOCK_STREAM, 5061),
        (socket.SOCK_STREAM, 8080),
    ):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_embedded_default_serves_the_documented_ports(tmp_path: Path) -> None:
    """What `make run` starts: 5060 UDP/TCP, 5061 TLS (self-signed), 8080 health."""
    if not _default_ports_free():
        pytest.skip("ports 5060/5061/8080 are taken on this machine")
    sbc = SbcProcess(tmp_path, None, Ports(5060, 5061, 8080)).start()
    try:
        assert_options_ok(udp_exchange(5060, options()))
        with stream_socket(5060) as s:
            assert_options_ok(stream_exchange(s, options(transport="TCP"))[0])
        with stream_socket(5061, tls=True) as s:
            assert_options_ok(stream_exchange(s, options(transport="TLS"))[0])
        key = tmp_path / "state" / "tls" / "sbc-selfsigned.key"
        assert key.exists() and key.stat().st_mode & 0o077 == 0
    finally:
        assert sbc.stop() == 0
