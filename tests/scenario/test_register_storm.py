"""A registration storm against a realm with ``registers_per_second``.

    60 phones (one UDP socket, distinct users) -> SBC realm "phones" (embedded registrar)

All 60 REGISTERs arrive within a few milliseconds at a realm that takes 5 a second:
about 5 reach the registrar (its 401 challenge), the others get 503 at once with a
Retry-After of 10-60 s, spread so they do not come back together; /healthz counts
them. The phones that were challenged answer at once, with the bucket empty: their
answers are not shed (they complete what the bucket let start); they leave it in debt,
and a while later the realm takes REGISTERs again. Loopback only; a real `sbc run`.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from sbc.registrar.credentials import SqliteCredentials
from sbc.sip.auth import DigestClient
from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.test_b2bua_flows import sbc_config

RATE = 5
PHONES = 60


PASSWORD = "storm-password-1"


def register(phones: int, local: int, n: int, authorization: str = "") -> bytes:
    cseq, branch = (2, f"answer{n}") if authorization else (1, f"storm{n}")
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return (
        f"REGISTER sip:127.0.0.1:{phones} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:u{n}@127.0.0.1>;tag=storm{n}\r\n"
        f"To: <sip:u{n}@127.0.0.1>\r\n"
        f"Call-ID: storm-{n}@127.0.0.1\r\n"
        f"CSeq: {cseq} REGISTER\r\n{auth}"
        f"Contact: <sip:u{n}@127.0.0.1:{local}>\r\n"
        "Expires: 600\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def answers(
    sock: socket.socket, count: int, timeout: float, challenges: dict[str, list[str]] | None = None
) -> dict[str, tuple[int, str]]:
    """Status and Retry-After of each answer, by Call-ID, until ``count`` came;
    ``challenges`` collects the WWW-Authenticate values of each 401."""
    out: dict[str, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535).decode()
        except TimeoutError:
            break
        call_id = re.search(r"^Call-ID: *(\S+)", data, re.M | re.I)
        status = re.match(r"SIP/2\.0 (\d{3})", data)
        wait = re.search(r"^Retry-After: *(\d+)", data, re.M | re.I)
        assert call_id and status, data
        out[call_id[1]] = (int(status[1]), wait[1] if wait else "")
        if challenges is not None and status[1] == "401":
            found = re.findall(r"^WWW-Authenticate: *(.+?)\r?$", data, re.M | re.I)
            challenges[call_id[1]] = found
    return out


def test_a_registration_storm_is_shed_with_spread_retry_afters(tmp_path: Path) -> None:
    ports = Ports(free_port(also_udp=True), 0, free_port())
    phones = free_port(also_udp=True)
    body = f"""\
registrar:
  nat_keepalive: 0
realms:
  - name: phones
    listen: [{{transport: udp, address: 127.0.0.1, port: {phones}}}]
    media_address: 127.0.0.1
    registrar: true
    registers_per_second: {RATE}
routes:
  - {{name: users, from_realm: phones, action: registered}}
"""
    (tmp_path / "state").mkdir()
    with SqliteCredentials(tmp_path / "state" / "users.sqlite", "sbc") as store:
        for n in range(PHONES + 1):
            store.add(f"u{n}", PASSWORD)
    config = tmp_path / "sbc.yaml"
    config.write_text(sbc_config(tmp_path, ports.mgmt, ports.sip, body))
    sbc = SbcProcess(tmp_path, config, ports)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    local = sock.getsockname()[1]
    try:
        sbc.start()
        started = time.monotonic()
        for n in range(PHONES):
            sock.sendto(register(phones, local, n), ("127.0.0.1", phones))
        sent_in = time.monotonic() - started
        challenges: dict[str, list[str]] = {}
        got = answers(sock, PHONES, 10.0, challenges)
        assert len(got) == PHONES, (len(got), sbc.log()[-3000:])
        challenged = [cid for cid, (status, _) in got.items() if status == 401]
        shed = {cid: wait for cid, (status, wait) in got.items() if status == 503}
        assert len(challenged) + len(shed) == PHONES, got
        # One second's worth at once, plus what the rate earned while they arrived.
        assert RATE <= len(challenged) <= RATE + int(RATE * sent_in) + 2, (sent_in, challenged)
        waits = [int(wait) for wait in shed.values()]
        assert all(10 <= wait <= 60 for wait in waits), waits
        assert len(set(waits)) > 10, waits  # spread, not one instant for all
        status, health = sbc.health()
        assert status == 200 and health["registers_refused"] == {"phones": len(shed)}, health
        assert "x realm phones: over 5 REGISTERs a second, refusing with 503" in sbc.log()
        # The challenged phones answer at once, the bucket empty: none is shed.
        for call_id in challenged:
            n = int(call_id.split("-")[1].split("@")[0])
            authorization = DigestClient(f"u{n}", PASSWORD).respond(
                challenges[call_id], method="REGISTER", uri=f"sip:127.0.0.1:{phones}"
            )
            sock.sendto(register(phones, local, n, authorization), ("127.0.0.1", phones))
        registered = answers(sock, len(challenged), 5.0)
        assert {cid: status for cid, (status, _) in registered.items()} == dict.fromkeys(
            challenged, 200
        ), registered
        status, health = sbc.health()
        assert health["registers_refused"] == {"phones": len(shed)}, health
        # The bucket refills once their debt is paid: a phone then reaches the registrar.
        time.sleep(1.0 + len(challenged) / RATE)
        sock.sendto(register(phones, local, PHONES), ("127.0.0.1", phones))
        assert answers(sock, 1, 5.0) == {f"storm-{PHONES}@127.0.0.1": (401, "")}
    finally:
        sock.close()
        sbc.stop()
