"""A phone registered over TCP hangs up its connection: calls to it are answered 480.

    phone alice (TCP) -> SBC realm "phones" (embedded registrar) <- caller (UDP)

Alice registers over TCP with digest credentials; a first call reaches her over
that very connection (she answers 486). Then she closes it. The binding's flow is
gone (RFC 5626 5.3, 6): it pointed at her ephemeral port, where nothing of hers
listens any more. A trap now listens on that port: a second call must be answered
480 (a known user without bindings) at once, and nothing must reach the trap.
Loopback only; a real `sbc run`.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from pathlib import Path

from sbc.sip.auth import DigestClient
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import (
    Ports,
    SbcProcess,
    free_port,
    lenient_response,
    stream_exchange,
    stream_messages,
    wait_until,
)
from tests.scenario.test_b2bua_flows import add_user
from tests.scenario.test_b2bua_flows import sbc_config as flows_config

PASSWORD = "alice-tcp-secret-1"
SDP = (
    "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\n"
)
#: What "at once" means for the 480: no transaction timer, no connect attempt.
PROMPT = 2.0


def sbc_config(workdir: Path, ports: Ports, phones: int) -> str:
    """Realm "phones" (UDP and TCP) with the embedded registrar; calls among them."""
    body = f"""\
registrar:
  nat_keepalive: 0
realms:
  - name: phones
    listen:
      - {{transport: udp, address: 127.0.0.1, port: {phones}}}
      - {{transport: tcp, address: 127.0.0.1, port: {phones}}}
    media_address: 127.0.0.1
    registrar: true
routes:
  - {{name: users, from_realm: phones, action: registered}}
"""
    return flows_config(workdir, ports.mgmt, ports.sip, body)


def register(phones: int, local: int, cseq: int, authorization: str | None = None) -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return (
        f"REGISTER sip:127.0.0.1:{phones};transport=tcp SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{local};branch=z9hG4bKtcpreg{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@127.0.0.1>;tag=alice-reg\r\n"
        "To: <sip:alice@127.0.0.1>\r\n"
        "Call-ID: alice-tcp-reg@127.0.0.1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:alice@127.0.0.1:{local};transport=tcp>\r\n"
        f"Expires: 600\r\n{auth}Content-Length: 0\r\n\r\n"
    ).encode()


def registered_phone(phones: int) -> socket.socket:
    """Alice's TCP connection, over which she has registered (401, then 200)."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Its port stays in TIME_WAIT after the close: the trap may bind it only if both
    # sockets allow it (Linux).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    conn.bind(("127.0.0.1", 0))
    conn.settimeout(5)
    conn.connect(("127.0.0.1", phones))
    local = conn.getsockname()[1]
    challenge, closed = stream_exchange(conn, register(phones, local, 1), timeout=5)
    assert challenge is not None and challenge.status == 401, (challenge, closed)
    client = DigestClient("alice", PASSWORD)
    authorization = client.respond(
        challenge.headers.values("WWW-Authenticate"),
        method="REGISTER",
        uri=f"sip:127.0.0.1:{phones};transport=tcp",
    )
    ok, closed = stream_exchange(conn, register(phones, local, 2, authorization), timeout=5)
    assert ok is not None and ok.status == 200, (ok, closed)
    return conn


def invite(phones: int, caller: int, n: int) -> bytes:
    return (
        f"INVITE sip:alice@127.0.0.1:{phones} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{caller};branch=z9hG4bKcall{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:bob@127.0.0.1>;tag=bob{n}\r\n"
        f"To: <sip:alice@127.0.0.1:{phones}>\r\n"
        f"Call-ID: to-alice-{n}@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:bob@127.0.0.1:{caller}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def final_response(sock: socket.socket, call_id: str, timeout: float) -> Response | None:
    """The first final response to ``call_id`` on the caller's UDP socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return None
        if call_id.encode() not in data:
            continue
        response = lenient_response(data)
        if response.status >= 200:
            return response
    return None


def ack(phones: int, caller: int, n: int, response: Response) -> bytes:
    """The caller's ACK of a final non-2xx (RFC 3261 17.1.1.3), so the SBC stops
    retransmitting it."""
    to = response.headers.get("To")
    return (
        f"ACK sip:alice@127.0.0.1:{phones} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{caller};branch=z9hG4bKcall{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:bob@127.0.0.1>;tag=bob{n}\r\nTo: {to}\r\n"
        f"Call-ID: to-alice-{n}@127.0.0.1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def answer_busy(conn: socket.socket) -> Request | None:
    """Alice's side of the first call: the INVITE over her connection, 486 back."""
    stop = threading.Event()
    for data in stream_messages(conn, stop, seconds=5):
        message = parse_message(data)
        if isinstance(message, Request) and message.method == "INVITE":
            conn.sendall(bytes(make_response(message, 486, to_tag="alice")))
            return message
    return None


def test_a_call_to_a_phone_whose_tcp_connection_closed_gets_480_at_once(
    tmp_path: Path,
) -> None:
    add_user(tmp_path / "state", "alice", PASSWORD)
    ports = Ports(free_port(also_udp=True), 0, free_port())
    phones = free_port(also_udp=True)
    config = tmp_path / "sbc.yaml"
    config.write_text(sbc_config(tmp_path, ports, phones))
    sbc = SbcProcess(tmp_path, config, ports)
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind(("127.0.0.1", 0))
    caller_port = caller.getsockname()[1]
    trap: socket.socket | None = None
    try:
        sbc.start()
        alice = registered_phone(phones)
        old_port = alice.getsockname()[1]
        # The first call reaches alice over the connection she registered on.
        caller.sendto(invite(phones, caller_port, 1), ("127.0.0.1", phones))
        assert answer_busy(alice) is not None, f"no INVITE reached alice\n{sbc.log()}"
        busy = final_response(caller, "to-alice-1", 5)
        assert busy is not None and busy.status == 486, sbc.log()
        caller.sendto(ack(phones, caller_port, 1, busy), ("127.0.0.1", phones))

        alice.close()
        # Where the dead flow pointed, someone else listens now (the port was hers).
        trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        trap.bind(("127.0.0.1", old_port))
        trap.listen(4)
        # The SBC learns of the close from the kernel, at once; bounded all the same.
        wait_until(lambda: "binding(s) removed" in sbc.log(), 5, interval=0.05)

        sent_at = time.monotonic()
        caller.sendto(invite(phones, caller_port, 2), ("127.0.0.1", phones))
        final = final_response(caller, "to-alice-2", PROMPT + 3)
        elapsed = time.monotonic() - sent_at
        assert final is not None, f"no final answer to the second call\n{sbc.log()}"
        assert final.status == 480, f"{final.status} {final.reason}\n{sbc.log()}"
        assert elapsed < PROMPT, elapsed
        caller.sendto(ack(phones, caller_port, 2, final), ("127.0.0.1", phones))
        readable, _, _ = select.select([trap], [], [], 0.2)
        assert not readable, "the SBC connected to the closed flow's port"
        assert re.search(r"connection #\d+ closed: 1 binding\(s\) removed", sbc.log())
    finally:
        sbc.stop()
        caller.close()
        if trap is not None:
            trap.close()
