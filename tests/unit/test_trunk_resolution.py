"""A trunk gateway given by name: every address RFC 3263 finds is a failover target.

RFC 3263 4.3: when a server fails (a timeout, a 503), the client tries the next
one of the list that resolution produced: the next address of the name, the next
SRV target by priority and weight. The app kept only the first address of each
gateway name, so a name with two SRV targets (or two A records) failed over to
nothing, or to the next gateway only.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sbc import app
from sbc.app import SbcNode
from sbc.b2bua.targets import Directory, weighted_order
from sbc.b2bua.trunks import Gateway, Trunk, TrunkTable
from sbc.config.loader import load_config_text
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Transport
from sbc.transport.resolver import DnsAnswer, RecordType, SipResolver, SrvRecord
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


# -- RFC 2782 weights per call, and DNS TTLs ---------------------------------------------

WEIGHTED = FakeDns(
    {
        ("_sip._udp.lb.carrier.example", RecordType.SRV): (
            SrvRecord(10, 1, 5060, "w1.carrier.example"),
            SrvRecord(10, 1, 5060, "w2.carrier.example"),
            SrvRecord(20, 1, 5060, "backup.carrier.example"),
        ),
        ("w1.carrier.example", RecordType.A): ("192.0.2.41", "192.0.2.42"),
        ("w2.carrier.example", RecordType.A): ("192.0.2.43",),
        ("backup.carrier.example", RecordType.A): ("192.0.2.44",),
    }
)


class ShortTtlDns(FakeDns):
    """Answers that live ``ttl`` seconds."""

    def __init__(self, records: dict[tuple[str, RecordType], tuple[Any, ...]], ttl: float):
        super().__init__(records)
        self.ttl = ttl

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        answer = await super().query(name, rdtype)
        return DnsAnswer(name, rdtype, answer.records, self.ttl)


def run_resolver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dns: FakeDns, rounds: int = 1
) -> tuple[SbcNode, list[float]]:
    """A node whose RFC 3263 task ran ``rounds`` lookups; the pauses it took between."""
    text = CONFIG.replace("STATE", str(tmp_path / "state")).replace(
        "gateways: [{host: edge.carrier.example}]", "gateways: [{host: lb.carrier.example}]"
    )
    text = text[: text.index("  - name: tls\n")]  # only the SRV trunk
    node = SbcNode(load_config_text(text, "sbc.yaml", tmp_path))
    monkeypatch.setattr(app, "SipResolver", lambda: SipResolver(lookup=dns))
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        if delay:
            pauses.append(delay)
        return await real_sleep(0, result)

    async def main() -> None:
        monkeypatch.setattr(asyncio, "sleep", sleep)
        task = asyncio.create_task(node._run_resolver())
        for _ in range(1000):
            if len(pauses) >= rounds:
                break
            await real_sleep(0)
        task.cancel()
        monkeypatch.setattr(asyncio, "sleep", real_sleep)

    asyncio.run(main())
    return node, pauses


def srv_gateway(node: SbcNode) -> Gateway:
    (state,) = [s for s in node.trunks if s.trunk.name == "srv"]
    (gateway,) = state.trunk.gateways
    return gateway


def test_srv_weights_are_drawn_for_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 2782: equal weights share the calls. Drawn once per lookup (a minute),
    every call of that minute went to one server."""
    node, _ = run_resolver(tmp_path, monkeypatch, WEIGHTED)
    gateway = srv_gateway(node)
    firsts: Counter[str] = Counter()
    for _ in range(400):
        order = node.directory.destinations(gateway)
        firsts[order[0].host] += 1
        # A record's addresses stay together, the lower priority's last.
        hosts = [d.host for d in order]
        assert hosts in (
            ["192.0.2.41", "192.0.2.42", "192.0.2.43", "192.0.2.44"],
            ["192.0.2.43", "192.0.2.41", "192.0.2.42", "192.0.2.44"],
        )
    assert set(firsts) == {"192.0.2.41", "192.0.2.43"}
    assert min(firsts.values()) > 120, firsts


def test_probes_keep_to_one_address_between_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, _ = run_resolver(tmp_path, monkeypatch, WEIGHTED)
    gateway = srv_gateway(node)
    assert len({node.directory.destination(gateway) for _ in range(50)}) == 1


def test_weighted_order_follows_the_weights() -> None:
    heavy, light = SrvRecord(10, 9, 5060, "heavy"), SrvRecord(10, 1, 5060, "light")
    found = (
        Destination(Transport.UDP, "192.0.2.51", 5060),
        Destination(Transport.UDP, "192.0.2.52", 5060),
    )
    rng = random.Random(7)
    firsts = Counter(weighted_order(found, (heavy, light), rng)[0].host for _ in range(1000))
    assert 850 <= firsts["192.0.2.51"] <= 950, firsts
    # Without SRV (A records, a static address) the lookup's order stands.
    assert weighted_order(found, (None, None), rng) == found
    # One record per priority: nothing to draw.
    low = SrvRecord(20, 1, 5060, "low")
    assert all(weighted_order(found, (heavy, low), rng) == found for _ in range(20))


def test_names_are_looked_up_again_when_their_ttl_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A carrier moving its gateway with a 10 s TTL waited up to a minute."""
    dns = ShortTtlDns(dict(WEIGHTED.records), ttl=10.0)
    _, pauses = run_resolver(tmp_path, monkeypatch, dns, rounds=2)
    assert 5.0 <= pauses[0] <= 10.0, pauses
    # A TTL of 0 or 1 s does not turn into a lookup loop.
    _, pauses = run_resolver(tmp_path, monkeypatch, ShortTtlDns(dict(WEIGHTED.records), 1.0))
    assert pauses[0] == 5.0
    # A long TTL: the empty AAAA answers are kept the resolver's negative TTL (30 s).
    _, pauses = run_resolver(tmp_path, monkeypatch, ShortTtlDns(dict(WEIGHTED.records), 3600))
    assert 25.0 <= pauses[0] <= 30.0, pauses


def test_a_lasting_failure_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sbc.app")
    run_resolver(tmp_path, monkeypatch, FakeDns({}), rounds=3)
    logged = [r for r in caplog.records if "trunk gateway lb.carrier.example" in r.message]
    assert len(logged) == 1, [r.message for r in logged]
