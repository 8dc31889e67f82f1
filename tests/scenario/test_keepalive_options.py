"""OPTIONS keepalives remove a UDP phone that is gone; one that answers stays.

    alice, bob (UDP sockets) -> SBC realm "phones" (embedded registrar,
                                 keepalive: options every second)

A real ``sbc run``. Both phones register with digest credentials. Alice answers
every OPTIONS the SBC sends her; bob answers nothing (unplugged). After two
unanswered pings bob's binding is removed, and a call to him gets 480 at once;
alice is still registered, and every ping she answered came from the realm's
listener with the keepalive Call-ID. Loopback only.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from sbc.sip.auth import DigestClient
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import Ports, SbcProcess, free_port, lenient_response, wait_until
from tests.scenario.test_b2bua_flows import add_user
from tests.scenario.test_registrar_tcp_close import sbc_config as tcp_close_config

PASSWORDS = {"alice": "alice-ka-secret-1", "bob": "bob-ka-secret-2"}


def sbc_config(workdir: Path, ports: Ports, phones: int) -> str:
    """The TCP-close scenario's SBC (realm "phones" with the registrar), pinging
    every second with OPTIONS."""
    text = tcp_close_config(workdir, ports, phones)
    keepalive = "  nat_keepalive: 1\n  keepalive: options\n  keepalive_failures: 2\n"
    assert "  nat_keepalive: 0\n" in text
    return text.replace("  nat_keepalive: 0\n", keepalive)


def register(user: str, phones: int, local: int, cseq: int, authorization: str = "") -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return (
        f"REGISTER sip:127.0.0.1:{phones} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{user}reg{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@127.0.0.1>;tag={user}-reg\r\nTo: <sip:{user}@127.0.0.1>\r\n"
        f"Call-ID: {user}-ka-reg@127.0.0.1\r\nCSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.1:{local}>\r\nExpires: 600\r\n"
        f"{auth}Content-Length: 0\r\n\r\n"
    ).encode()


def response_to(sock: socket.socket, method: str, timeout: float = 3.0) -> Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65535)
        if data.startswith(b"SIP/2.0") and f" {method}\r\n".encode() in data:
            return lenient_response(data)
    raise AssertionError(f"no response to {method}")


def registered_phone(user: str, phones: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    local = sock.getsockname()[1]
    sock.sendto(register(user, phones, local, 1), ("127.0.0.1", phones))
    challenge = response_to(sock, "REGISTER")
    assert challenge.status == 401, challenge.status
    authorization = DigestClient(user, PASSWORDS[user]).respond(
        challenge.headers.values("WWW-Authenticate"),
        method="REGISTER",
        uri=f"sip:127.0.0.1:{phones}",
    )
    sock.sendto(register(user, phones, local, 2, authorization), ("127.0.0.1", phones))
    assert response_to(sock, "REGISTER").status == 200
    return sock


def answer_pings(sock: socket.socket, stop: threading.Event, seen: list[Request]) -> None:
    """Alice: 200 to every OPTIONS, until ``stop``."""
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            continue
        message = parse_message(data)
        if isinstance(message, Request) and message.method == "OPTIONS":
            seen.append(message)
            sock.sendto(bytes(make_response(message, 200, to_tag="alice")), source)


def test_a_phone_that_answers_no_options_keepalive_is_unregistered(tmp_path: Path) -> None:
    for user, password in PASSWORDS.items():
        add_user(tmp_path / "state", user, password)
    ports = Ports(free_port(also_udp=True), 0, free_port())
    phones = free_port(also_udp=True)
    config = tmp_path / "sbc.yaml"
    config.write_text(sbc_config(tmp_path, ports, phones))
    sbc = SbcProcess(tmp_path, config, ports)
    stop = threading.Event()
    pings: list[Request] = []
    sockets: list[socket.socket] = []
    answerer: threading.Thread | None = None
    try:
        sbc.start()
        alice = registered_phone("alice", phones)
        bob = registered_phone("bob", phones)
        sockets += [alice, bob]
        answerer = threading.Thread(target=answer_pings, args=(alice, stop, pings), daemon=True)
        answerer.start()
        # Pings every second; bob's binding goes at the third round (two unanswered).
        assert wait_until(lambda: "keepalives to" in sbc.log(), 8, interval=0.1), sbc.log()
        assert "binding of bob removed: 2 keepalives" in sbc.log(), sbc.log()
        time.sleep(1.5)
        assert "binding of alice removed" not in sbc.log(), sbc.log()
        assert len(pings) >= 3, len(pings)
        assert all(p.call_id.startswith("sbc-keepalive-") for p in pings)
        assert all(p.raw_uri.startswith("sip:alice@127.0.0.1:") for p in pings)
        # A call to bob: no binding left, 480 (his socket hears nothing of it).
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(caller)
        caller.bind(("127.0.0.1", 0))
        port = caller.getsockname()[1]
        caller.sendto(
            (
                f"INVITE sip:bob@127.0.0.1:{phones} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKkacall;rport\r\n"
                "Max-Forwards: 70\r\nFrom: <sip:carol@127.0.0.1>;tag=c1\r\n"
                f"To: <sip:bob@127.0.0.1>\r\nCall-ID: ka-call@127.0.0.1\r\n"
                f"CSeq: 1 INVITE\r\nContact: <sip:carol@127.0.0.1:{port}>\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            ("127.0.0.1", phones),
        )
        final = response_to(caller, "INVITE")
        while final.status < 200:
            final = response_to(caller, "INVITE")
        assert final.status == 480, sbc.log()
    finally:
        stop.set()
        if answerer is not None:
            answerer.join(timeout=2)
        sbc.stop()
        for sock in sockets:
            sock.close()
