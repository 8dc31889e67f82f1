"""A trunk gateway given by name: every address RFC 3263 finds is a failover target.

RFC 3263 4.3: when a server fails (a timeout, a 503), the client tries the next
one of the list that resolution produced: the next address of the name, the next
SRV target by priority and weight. The app kept only the first address of each
gateway name, so a name with two SRV targets (or two A records) failed over to
nothing, or to the next gateway only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sbc import app
from sbc.app import SbcNode
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import Gateway, Trunk, TrunkTable
from sbc.config.loader import load_config_text
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Transport
from sbc.transport.resolver import RecordType, SipResolver, SrvRecord
from tests.unit.test_tls_client import FakeDns

URI = parse_uri("sip:100@198.51.100.1")

DNS = FakeDns(
    {
        ("_sip._udp.edge.carrier.example", RecordType.SRV): (
            SrvRecord(10, 1, 5060, "a.carrier.example"),
            SrvRecord(20, 1, 5070, "b.carrier.example"),
        ),
        ("a.carrier.example", RecordType.A): ("192.0.2.21", "192.0.2.22"),
        ("b.carrier.example", RecordType.A): ("192.0.2.23",),
        ("_sips._tcp.tls.carrier.example", RecordType.SRV): (
            SrvRecord(10, 1, 5061, "t1.carrier.example"),
            SrvRecord(20, 1, 5061, "t2.carrier.example"),
        ),
        ("t1.carrier.example", RecordType.A): ("192.0.2.31",),
        ("t2.carrier.example", RecordType.A): ("192.0.2.32",),
    }
)

CONFIG = """\
state_dir: STATE
sip:
  listen: [{transport: udp, address: 127.0.0.1, port: 0}]
realms:
  - name: carrier
    listen:
      - {transport: udp, address: 203.0.113.1, port: 5060}
      - {transport: tls, address: 203.0.113.1, port: 5061}
    media_address: 203.0.113.1
routes:
  - {name: srv, action: trunk, trunk: srv}
trunks:
  - name: srv
    realm: carrier
    gateways: [{host: edge.carrier.example}]
  - name: tls
    realm: carrier
    gateways: [{host: tls.carrier.example, transport: tls}]
"""


def resolved_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SbcNode:
    """A node whose RFC 3263 task ran once against ``DNS``."""
    text = CONFIG.replace("STATE", str(tmp_path / "state"))
    node = SbcNode(load_config_text(text, "sbc.yaml", tmp_path))
    monkeypatch.setattr(app, "SipResolver", lambda: SipResolver(lookup=DNS))

    async def main() -> None:
        task = asyncio.create_task(node._run_resolver())
        for _ in range(500):
            if len(node.directory.resolved) == 2:
                break
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(main())
    return node


def destinations(directory: Directory, trunk: str) -> list[Destination]:
    plan = directory.trunk(trunk, URI, 0.0)
    assert plan is not None
    return [target.destination for target in plan.targets]


def test_every_address_of_a_gateway_name_is_a_failover_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = resolved_node(tmp_path, monkeypatch)
    # RFC 3263 4.3 order: SRV priority, then each target's addresses in turn.
    assert destinations(node.directory, "srv") == [
        Destination(Transport.UDP, "192.0.2.21", 5060),
        Destination(Transport.UDP, "192.0.2.22", 5060),
        Destination(Transport.UDP, "192.0.2.23", 5070),
    ]
    plan = node.directory.trunk("srv", URI, 0.0)
    assert plan is not None and {t.gateway for t in plan.targets} == {"udp:edge.carrier.example"}


def test_each_tls_address_is_verified_by_the_configured_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = resolved_node(tmp_path, monkeypatch)
    assert destinations(node.directory, "tls") == [
        Destination(Transport.TLS, "192.0.2.31", 5061, "tls.carrier.example"),
        Destination(Transport.TLS, "192.0.2.32", 5061, "tls.carrier.example"),
    ]


def test_max_attempts_counts_addresses() -> None:
    named = Gateway("edge.carrier.example", "edge.carrier.example")
    other = Gateway("gw2", "203.0.113.50", priority=2)
    directory = Directory(TrunkTable([Trunk("t", "carrier", (named, other), max_attempts=2)]))
    directory.resolved[named.key] = (
        Destination(Transport.UDP, "192.0.2.21", 5060),
        Destination(Transport.UDP, "192.0.2.22", 5060),
    )
    assert destinations(directory, "t") == [
        Destination(Transport.UDP, "192.0.2.21", 5060),
        Destination(Transport.UDP, "192.0.2.22", 5060),
    ]
