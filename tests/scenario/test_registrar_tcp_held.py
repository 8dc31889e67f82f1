"""A phone registered over TCP stays reachable while it says nothing.

    phone alice (TCP) -> SBC realm "phones" (embedded registrar) <- caller (UDP)

The SBC closes TCP/TLS connections idle for ``sip.tcp_idle_timeout``. A phone
registered over one is reached only over it (RFC 5626 3.3, RFC 3261 18.2.2), and
many phones send nothing between registrations: the idle sweep must leave that
connection open while the registration lasts, or calls to the phone fail (and,
with closed flows dropping their bindings, the phone is gone until it registers
again). Here the idle timeout is 2 s: a connection that registered nothing is
closed within seconds, alice's is still there 5 s later and a call reaches her
over it. Loopback only; a real `sbc run`.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.scenario.sbcproc import Ports, SbcProcess, free_port, wait_until
from tests.scenario.test_b2bua_flows import add_user
from tests.scenario.test_registrar_tcp_close import (
    PASSWORD,
    ack,
    answer_busy,
    final_response,
    invite,
    registered_phone,
    sbc_config,
)

IDLE_TIMEOUT = 2


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_the_idle_sweep_keeps_a_registered_connection_open(tmp_path: Path) -> None:
    add_user(tmp_path / "state", "alice", PASSWORD)
    ports = Ports(free_port(also_udp=True), 0, free_port())
    phones = free_port(also_udp=True)
    config = tmp_path / "sbc.yaml"
    text = sbc_config(tmp_path, ports, phones).replace(
        "sip:\n", f"sip:\n  tcp_idle_timeout: {IDLE_TIMEOUT}\n", 1
    )
    config.write_text(text)
    sbc = SbcProcess(tmp_path, config, ports)
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind(("127.0.0.1", 0))
    caller_port = caller.getsockname()[1]
    idle: socket.socket | None = None
    alice: socket.socket | None = None
    try:
        sbc.start()
        alice = registered_phone(phones)
        quiet = idle = socket.create_connection(("127.0.0.1", phones), timeout=5)
        # A connection that registered nothing goes with the idle sweep.
        wait_until(lambda: closed_by_peer(quiet), IDLE_TIMEOUT + 5, interval=0.1)
        time.sleep(IDLE_TIMEOUT + 1.5)  # alice has been quiet for over twice the timeout
        assert not closed_by_peer(alice), f"alice's connection was closed\n{sbc.log()}"
        caller.sendto(invite(phones, caller_port, 1), ("127.0.0.1", phones))
        assert answer_busy(alice) is not None, f"no INVITE reached alice\n{sbc.log()}"
        busy = final_response(caller, "to-alice-1", 5)
        assert busy is not None and busy.status == 486, sbc.log()
        caller.sendto(ack(phones, caller_port, 1, busy), ("127.0.0.1", phones))
        assert "binding(s) removed" not in sbc.log()
    finally:
        sbc.stop()
        caller.close()
        if idle is not None:
            idle.close()
        if alice is not None:
            alice.close()
