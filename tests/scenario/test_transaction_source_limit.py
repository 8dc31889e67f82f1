"""One source address cannot take the whole transaction table.

    source 127.0.0.1 (a flood of OPTIONS) -> SBC <- source 127.0.0.2 (one OPTIONS)

With ``sip.max_transactions_per_source: 10``, the first 10 OPTIONS from 127.0.0.1
are answered (200, each transaction lingers 32 s, Timer J) and the next ones get
503 with Retry-After at once, while 127.0.0.2, another address on loopback, is
still answered; 127.0.0.3, a peer a route names, and 127.0.0.5, in a route's source
network, are not held to the share.
Loopback only; a real `sbc run`.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.test_b2bua_flows import sbc_config
from tests.scenario.test_register_storm import answers

SHARE = 10
FLOOD = 30


def options(sbc_port: int, local: tuple[str, int], n: int) -> bytes:
    host, port = local
    return (
        f"OPTIONS sip:127.0.0.1:{sbc_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bKshare{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:scan@{host}>;tag=share{n}\r\n"
        "To: <sip:127.0.0.1>\r\n"
        f"Call-ID: share-{n}@{host}\r\n"
        "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_one_source_fills_only_its_share_of_the_transaction_table(tmp_path: Path) -> None:
    ports = Ports(free_port(also_udp=True), 0, free_port())
    config = tmp_path / "sbc.yaml"
    # 127.0.0.3 is a peer the configuration names (a PBX a route sends calls to).
    body = f"""\
realms:
  - name: inside
    listen: [{{transport: udp, address: 127.0.0.1, port: {free_port(also_udp=True)}}}]
    media_address: 127.0.0.1
routes:
  - {{name: pbx, action: trunk, realm: inside, host: 127.0.0.3, port: 5060}}
  - {{name: did-in, source: [127.0.0.4/30], action: trunk, realm: inside,
      host: 127.0.0.3, port: 5060}}
"""
    text = sbc_config(tmp_path, ports.mgmt, ports.sip, body)
    config.write_text(text.replace("sip:\n", f"sip:\n  max_transactions_per_source: {SHARE}\n", 1))
    sbc = SbcProcess(tmp_path, config, ports)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.1", 0))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.3", 0))
    carrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    carrier.bind(("127.0.0.5", 0))
    try:
        sbc.start()
        for n in range(FLOOD):
            flood.sendto(options(ports.sip, flood.getsockname(), n), ("127.0.0.1", ports.sip))
        got = answers(flood, FLOOD, 5.0)
        assert len(got) == FLOOD, (got, sbc.log()[-2000:])
        answered = [cid for cid, (status, _) in got.items() if status == 200]
        refused = [cid for cid, (status, wait) in got.items() if status == 503 and wait]
        assert (len(answered), len(refused)) == (SHARE, FLOOD - SHARE), got
        # The first ten in order took the share; the flood's retransmission of one
        # of them is absorbed by its transaction (200 again, not 503).
        assert answered == [f"share-{n}@127.0.0.1" for n in range(SHARE)]
        flood.sendto(options(ports.sip, flood.getsockname(), 0), ("127.0.0.1", ports.sip))
        assert answers(flood, 1, 5.0) == {"share-0@127.0.0.1": (200, "")}
        # Another address is still served.
        other.sendto(options(ports.sip, other.getsockname(), 99), ("127.0.0.1", ports.sip))
        assert answers(other, 1, 5.0) == {"share-99@127.0.0.2": (200, "")}
        assert "x per-source transaction limit of 10 reached" in sbc.log()
        # The configured peer is not held to the share: its flood is all answered.
        for n in range(FLOOD):
            peer.sendto(options(ports.sip, peer.getsockname(), 100 + n), ("127.0.0.1", ports.sip))
        got = answers(peer, FLOOD, 5.0)
        assert {status for status, _ in got.values()} == {200} and len(got) == FLOOD, got
        # Nor is a carrier that only sends calls in, named by a route's source network.
        for n in range(FLOOD):
            carrier.sendto(
                options(ports.sip, carrier.getsockname(), 200 + n), ("127.0.0.1", ports.sip)
            )
        got = answers(carrier, FLOOD, 5.0)
        assert {status for status, _ in got.values()} == {200} and len(got) == FLOOD, got
    finally:
        carrier.close()
        flood.close()
        other.close()
        peer.close()
        sbc.stop()
