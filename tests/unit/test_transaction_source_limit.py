"""The transaction layer's per-source share: ``sip.max_transactions_per_source``.

One peer address (a scanner, or a PBX sending OPTIONS or REGISTER in a loop, each
transaction lingering 32 s for Timer J) could fill the whole table, and every other
peer then got the global limit's 503 too. A source host now holds at most its share of
live server transactions; beyond it its new requests get the same stateless 503 with
Retry-After, while the others are served. The sources are transport Flows, counted by
remote host (every port of an address is one source).

The clock is fake: timers are stepped deadline by deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.app import SbcNode
from sbc.config.loader import load_config_text
from sbc.config.schema import SipConfig
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import (
    MAX_TRANSACTIONS,
    MAX_TRANSACTIONS_PER_SOURCE,
    AckReceived,
    CancelReceived,
    RequestReceived,
    RequestRefused,
    ServerTransaction,
    TransactionLayer,
)
from sbc.transport.base import Flow, Transport
from tests.unit.test_config import errors, load
from tests.unit.test_transaction import PEER, invite, options
from tests.unit.test_transaction_review import run_layer, statuses
from tests.unit.test_transaction_review2 import cancel_of

SCANNER = "198.51.100.7"
NEIGHBOUR = "203.0.113.5"
SHARE = 3
REQUEST_LINE = "OPTIONS sip:carol@chicago.example.com SIP/2.0"


def flow(host: str, port: int = 5060, transport: Transport = Transport.UDP) -> Flow:
    """What the transport layer hands in with a request from ``host``:``port``."""
    return Flow(transport, "192.0.2.1", 5060, host, port)


def layer(share: int = SHARE) -> TransactionLayer:
    return TransactionLayer(max_transactions=100, max_transactions_per_source=share)


def accept(
    layer: TransactionLayer, request: Request, source: object, now: float, *, reliable: bool = False
) -> ServerTransaction:
    (event,) = layer.receive(request, source, now, reliable=reliable).events
    assert isinstance(event, RequestReceived)
    return event.transaction


def fill(layer: TransactionLayer, host: str, now: float = 0.0) -> list[ServerTransaction]:
    """Take ``host``'s whole share with OPTIONS, each from another port."""
    return [
        accept(layer, options(f"z9hG4bKfill{host}-{i}"), flow(host, 5060 + i), now)
        for i in range(layer.max_transactions_per_source)
    ]


def answer(layer: TransactionLayer, tx: ServerTransaction, status: int, now: float) -> None:
    layer.send_response(tx, make_response(tx.request, status, to_tag="srv1"), now)


def held(layer: TransactionLayer) -> dict[str, int]:
    """Live server transactions per source host, counted from the table itself."""
    return dict(
        Counter(
            tx.destination.remote_host
            for tx in layer._server.values()
            if isinstance(tx.destination, Flow)
        )
    )


# -- the share -------------------------------------------------------------------------


def test_a_source_past_its_share_gets_503_while_another_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sbc.sip.transaction")
    table = layer()
    fill(table, SCANNER)
    # Another port of the same address is the same source.
    excess = options("z9hG4bKexcess")
    source = flow(SCANNER, 40000)
    out = table.receive(excess, source, 1.0, reliable=False)
    assert out.events == (RequestRefused(excess, source, 503),)
    (item,) = out.messages
    assert item.destination == source
    refusal = parse_message(item.data)
    assert isinstance(refusal, Response)
    assert (refusal.status, refusal.headers.get("Retry-After")) == (503, "5")
    assert refusal.to.tag
    assert len(table) == SHARE
    assert table.held_by(SCANNER) == SHARE
    # The neighbour's request is taken: the table itself is far from full.
    accept(table, options("z9hG4bKneighbour"), flow(NEIGHBOUR), 1.1)
    assert table.held_by(NEIGHBOUR) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"x per-source transaction limit of {SHARE} reached: refused 1 request(s) in 0 s,"
        f" the last {REQUEST_LINE} from {SCANNER}"
    ]


def test_an_invite_past_the_share_is_refused_an_ack_still_passes() -> None:
    table = layer()
    fill(table, SCANNER)
    request = invite("z9hG4bKlate")
    assert statuses(table.receive(request, flow(SCANNER), 1.0, reliable=False)) == [503]
    # An ACK makes no transaction: the dialog's, whatever the source holds.
    ack = invite("z9hG4bKack2xx")
    ack.method = "ACK"
    out = table.receive(ack, flow(SCANNER), 1.1, reliable=False)
    assert [type(event) for event in out.events] == [AckReceived]
    assert out.messages == ()
    assert table.held_by(SCANNER) == SHARE


def test_a_retransmission_from_a_full_source_is_absorbed_by_its_transaction() -> None:
    table = layer()
    first, *_ = fill(table, SCANNER)
    answer(table, first, 200, 0.5)
    out = table.receive(options(f"z9hG4bKfill{SCANNER}-0"), flow(SCANNER), 1.0, reliable=False)
    assert out.events == ()
    assert statuses(out) == [200]  # 17.2.2: the last response again, not a 503
    assert len(table) == SHARE
    assert table.held_by(SCANNER) == SHARE


def test_a_source_is_served_again_once_timer_j_has_ended_its_transactions() -> None:
    table = layer()
    for tx in fill(table, SCANNER):
        answer(table, tx, 200, 0.5)
    # RFC 3261 17.2.2: answered over UDP they linger in Completed for Timer J (64*T1).
    early = table.receive(options("z9hG4bKearly"), flow(SCANNER), 30.0, reliable=False)
    assert statuses(early) == [503]
    run_layer(table, 40.0)
    assert len(table) == 0
    assert table.held_by(SCANNER) == 0
    accept(table, options("z9hG4bKagain"), flow(SCANNER), 40.0)
    assert table.held_by(SCANNER) == 1


def test_a_reliable_transaction_frees_its_place_with_its_final_response() -> None:
    # RFC 3261 17.2.2: over TCP Timer J is zero, the transaction ends on its response.
    table = layer()
    source = flow(SCANNER, transport=Transport.TCP)
    txs = [
        accept(table, options(f"z9hG4bKtcp{i}", "TCP"), source, 0.0, reliable=True)
        for i in range(SHARE)
    ]
    excess = table.receive(options("z9hG4bKtcpx", "TCP"), source, 0.1, reliable=True)
    assert statuses(excess) == [503]
    answer(table, txs[0], 404, 0.2)
    assert table.held_by(SCANNER) == SHARE - 1
    accept(table, options("z9hG4bKtcpy", "TCP"), source, 0.3, reliable=True)


def test_every_way_out_of_the_table_gives_the_place_back() -> None:
    table = layer(share=4)
    ringing = accept(table, invite("z9hG4bKinv1"), flow(SCANNER), 0.0)
    answered = accept(table, invite("z9hG4bKinv2"), flow(SCANNER), 0.0)
    failed = accept(table, options("z9hG4bKopt1"), flow(SCANNER), 0.0)
    lingering = accept(table, options("z9hG4bKopt2"), flow(SCANNER), 0.0)
    answer(table, ringing, 486, 0.1)  # Completed: Timer H ends it with no ACK
    answer(table, answered, 200, 0.1)  # RFC 6026 Accepted: Timer L ends it
    answer(table, failed, 200, 0.1)
    table.transport_error(failed, 0.2)  # 17.2.4: a non-INVITE transaction ends at once
    assert table.held_by(SCANNER) == 3
    # Forgotten already: nothing is given back twice, whatever the TU still does with it.
    table.transport_error(failed, 0.3)
    answer(table, failed, 500, 0.3)
    assert table.held_by(SCANNER) == 3
    # Its retransmission is a new transaction under the same key; the old one's
    # leftovers must not take the new one out.
    again = accept(table, failed.request, flow(SCANNER), 0.4)
    answer(table, failed, 500, 0.5)
    assert table.find_server(failed.request) is again
    assert table.held_by(SCANNER) == 4
    answer(table, again, 200, 0.5)
    answer(table, lingering, 200, 0.1)
    run_layer(table, 100.0)
    assert len(table) == 0
    assert table.held_by(SCANNER) == 0
    assert table._per_source == {}  # no entry left behind for a source that went away


# -- what is let in past the share -----------------------------------------------------


def test_the_cancel_of_a_live_invite_from_a_full_source_is_let_in() -> None:
    # RFC 3261 9.2, as at the global limit: one CANCEL per INVITE transaction at most, so
    # the excess is bounded, and the caller's hang-up must reach the callee.
    table = layer()
    request = invite("z9hG4bKcalling")
    call = accept(table, request, flow(SCANNER), 0.0)
    for i in range(SHARE - 1):
        accept(table, options(f"z9hG4bKo{i}"), flow(SCANNER), 0.0)
    out = table.receive(cancel_of(request), flow(SCANNER), 1.0, reliable=False)
    assert statuses(out) == []
    (event,) = out.events
    assert isinstance(event, CancelReceived)
    assert event.invite is call
    assert table.held_by(SCANNER) == SHARE + 1
    # A CANCEL that matches nothing is a new request like any other.
    stray = cancel_of(invite("z9hG4bKnothere"))
    assert table.receive(stray, flow(SCANNER), 1.1, reliable=False).events == (
        RequestRefused(stray, flow(SCANNER), 503),
    )


def test_the_cancel_of_a_live_non_invite_from_a_full_source_is_answered() -> None:
    table = layer()
    first, *_ = fill(table, SCANNER)
    out = table.receive(cancel_of(first.request), flow(SCANNER), 1.0, reliable=False)
    assert statuses(out) == [200]
    assert table.held_by(SCANNER) == SHARE + 1


def test_a_source_with_no_address_is_not_counted() -> None:
    # Only a transport Flow names a remote host; anything else is left to the global
    # limit rather than guessed at.
    table = layer(share=1)
    accept(table, options("z9hG4bKa"), PEER, 0.0)
    accept(table, options("z9hG4bKb"), PEER, 0.0)
    assert len(table) == 2
    assert table._per_source == {}


def test_the_global_limit_still_applies_below_every_share() -> None:
    table = TransactionLayer(max_transactions=2, max_transactions_per_source=10)
    accept(table, options("z9hG4bKg1"), flow(SCANNER), 0.0)
    accept(table, options("z9hG4bKg2"), flow(NEIGHBOUR), 0.0)
    full = table.receive(options("z9hG4bKg3"), flow("192.0.2.99"), 0.0, reliable=False)
    assert statuses(full) == [503]
    assert table.held_by("192.0.2.99") == 0


# -- the count never leaks -------------------------------------------------------------

HOSTS = (SCANNER, NEIGHBOUR, "2001:db8::7")
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["new", "new", "retransmit", "cancel", "answer", "error", "tick"]),
        st.integers(0, 1000),
        st.sampled_from([100, 180, 200, 404, 486]),
        st.booleans(),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ACTIONS)
def test_the_count_per_source_matches_the_table_after_any_sequence(
    actions: list[tuple[str, int, int, bool]],
) -> None:
    # Whatever arrives, is answered, fails or times out: each source's count is the
    # number of its live server transactions, never negative, never left at zero, and
    # nothing new (but a CANCEL) is taken past the share.
    table = layer(share=4)
    sent: list[tuple[Request, Flow, bool]] = []
    created: list[ServerTransaction] = []  # live or not: a TU may answer either
    now = 0.0
    for kind, pick, status, reliable in actions:
        now += 0.01
        if kind == "new":
            host = HOSTS[pick % len(HOSTS)]
            make = invite if pick % 2 else options
            transport = "TCP" if reliable else "UDP"
            request = make(f"z9hG4bKr{len(sent)}", transport)
            source = flow(host, transport=Transport.TCP if reliable else Transport.UDP)
            sent.append((request, source, reliable))
            if table.held_by(host) >= 4:
                out = table.receive(request, source, now, reliable=reliable)
                assert out.events == (RequestRefused(request, source, 503),)
            else:
                created.append(accept(table, request, source, now, reliable=reliable))
        elif kind == "tick":
            now += pick / 10
            table.handle_timers(now)
        elif sent:
            request, source, reliable = sent[pick % len(sent)]
            tx = table.find_server(request)
            if kind == "retransmit":
                # Absorbed by its transaction; or, once that ended, a new request.
                before = table.held_by(source.remote_host)
                out = table.receive(request, source, now, reliable=reliable)
                for event in out.events:
                    if isinstance(event, RequestReceived):
                        assert tx is None and before < 4
                        created.append(event.transaction)
            elif kind == "cancel":
                table.receive(cancel_of(request), source, now, reliable=reliable)
            elif created and kind == "answer":
                answer(table, created[pick % len(created)], status, now)
            elif created and kind == "error":
                table.transport_error(created[pick % len(created)], now)
        assert table._per_source == held(table)
    # The TU answers what is left; every timer runs out; nothing is held any more.
    for tx in list(table._server.values()):
        answer(table, tx, 500, now)
    run_layer(table, now + 1000.0)
    assert len(table) == 0
    assert table._per_source == {}
    assert all(table.held_by(host) == 0 for host in HOSTS)


def test_a_long_random_flood_from_many_sources_leaves_nothing_behind() -> None:
    # The same invariant over a long run, as a scanner and a few phones would send it.
    rng = random.Random(3261)
    table = TransactionLayer(max_transactions=600, max_transactions_per_source=60)
    hosts = [f"198.18.0.{i}" for i in range(8)]
    now = 0.0
    refused = Counter[str]()
    for i in range(5000):
        # Some 16 requests/s for 300 s, 70 % of them from the first host: it would hold
        # about 360 transactions at once (each 32 s), the others about 20 each.
        now += rng.expovariate(16.0)
        host = hosts[0] if rng.random() < 0.7 else rng.choice(hosts)
        out = table.receive(options(f"z9hG4bKflood{i}"), flow(host), now, reliable=False)
        for event in out.events:
            if isinstance(event, RequestRefused):
                refused[host] += 1
            elif isinstance(event, RequestReceived):
                answer(table, event.transaction, 200, now)
                if rng.random() < 0.05:
                    table.transport_error(event.transaction, now)
        table.handle_timers(now)
        assert table.held_by(hosts[0]) <= 60
    assert table._per_source == held(table)
    assert refused[hosts[0]] > 0
    assert sum(refused[h] for h in hosts[1:]) == 0  # the others were never crowded out
    for tx in list(table._server.values()):
        answer(table, tx, 200, now)
    run_layer(table, now + 100.0)
    assert len(table) == 0
    assert table._per_source == {}


# -- the setting -----------------------------------------------------------------------


def test_the_share_defaults_to_a_tenth_of_the_table() -> None:
    assert MAX_TRANSACTIONS_PER_SOURCE == MAX_TRANSACTIONS // 10 == 5_000
    assert TransactionLayer().max_transactions_per_source == 5_000
    assert SipConfig().max_transactions_per_source == 5_000
    assert load("{}").sip.max_transactions_per_source == 5_000
    assert load("sip: {max_transactions_per_source: 10}").sip.max_transactions_per_source == 10
    high = load("sip: {max_transactions_per_source: 1000000}")
    assert high.sip.max_transactions_per_source == 1_000_000


@pytest.mark.parametrize("value", ["0", "9", "1_000_001", "-1"])
def test_a_share_out_of_range_is_refused_with_file_and_line(value: str) -> None:
    text = f"sip:\n  max_transactions: 50000\n  max_transactions_per_source: {value}\n"
    assert errors(text) == [
        f"sbc.yaml:3: sip.max_transactions_per_source: expected an integer 10..1000000, got {value}"
    ]


def test_the_share_comes_from_the_config_and_reloads_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "state_dir: {state}\nsip: {{max_transactions_per_source: {share}}}\n"
    path = tmp_path / "sbc.yaml"
    path.write_text(text.format(state=tmp_path, share=200))
    node = SbcNode(load_config_text(path.read_text(), str(path), tmp_path), path)
    assert node.transactions.max_transactions_per_source == 200

    async def no_restart(new: object, old: object) -> bool:
        raise AssertionError("the SIP listeners were restarted for a transaction setting")

    monkeypatch.setattr(node, "_replace_transport", no_restart)

    async def scenario() -> None:
        path.write_text(text.format(state=tmp_path, share=300))
        try:
            assert await node.reload()
        finally:
            await node.stop()

    asyncio.run(scenario())
    assert node.transactions.max_transactions_per_source == 300


# -- configured peers ------------------------------------------------------------------


def test_a_trusted_source_is_not_held_to_its_share_but_still_counted() -> None:
    table = layer()
    table.trusted = lambda host: host == NEIGHBOUR
    for i in range(SHARE * 3):
        accept(table, options(f"z9hG4bKcarrier{i}"), flow(NEIGHBOUR, 5060), 0.0)
    assert table.held_by(NEIGHBOUR) == SHARE * 3 == held(table)[NEIGHBOUR]
    # The others still are, and the global limit holds for everyone.
    fill(table, SCANNER)
    out = table.receive(options("z9hG4bKexcess"), flow(SCANNER), 1.0, reliable=False)
    assert [type(e) for e in out.events] == [RequestRefused]


PEERS = """\
state_dir: {state}
realms:
  - name: outside
    listen: [{{transport: udp, address: 127.0.0.1, port: 0}}]
    media_address: 127.0.0.1
  - name: inside
    listen: [{{transport: udp, address: 127.0.0.1, port: 0}}]
    media_address: 127.0.0.1
    register_relay: {{realm: inside, host: 203.0.113.40, port: 5060}}
routes:
  - {{name: pbx, action: trunk, realm: inside, host: 203.0.113.30, port: 5060}}
  - {{name: carrier, action: trunk, trunk: carrier}}
  - {{name: did-in, from_realm: outside, source: [192.0.2.0/28, "2001:db8:5::/64"],
      action: trunk, realm: inside, host: 203.0.113.30, port: 5060}}
  - {{name: lan, from_realm: inside, source: [10.0.0.0/16, "2001:db8:6::/48"],
      action: trunk, trunk: carrier}}
trunks:
  - name: carrier
    realm: outside
    gateways:
      - {{host: 198.51.100.20, port: 5060}}
      - {{host: "2001:db8::20"}}
      - {{host: sip.carrier.example}}
    probe: {{enabled: false}}
"""


def test_the_peers_the_configuration_names_are_trusted(tmp_path: Path) -> None:
    from sbc.b2bua.trunks import Gateway
    from sbc.transport.base import Destination

    path = tmp_path / "sbc.yaml"
    path.write_text(PEERS.format(state=tmp_path))
    node = SbcNode(load_config_text(path.read_text(), str(path), tmp_path), path)
    node._reconfigure_calls(node.config)
    assert node.transactions.trusted is not None
    trusted = node.transactions.trusted
    for host in ("203.0.113.30", "203.0.113.40", "198.51.100.20", "2001:db8::20"):
        assert trusted(host), host
    # A gateway given by name: by what it resolved to.
    assert not trusted("198.51.100.21")
    key = Gateway("carrier/2", "sip.carrier.example").key
    node.directory.resolved[key] = (Destination(Transport.UDP, "198.51.100.21", 5060),)
    assert trusted("198.51.100.21")
    # A carrier that only sends calls in, named by a route's narrow source network;
    # a wide one (a LAN of phones) names no one peer.
    for host in ("192.0.2.1", "192.0.2.15", "2001:db8:5::7"):
        assert trusted(host), host
    for host in ("192.0.2.16", "10.0.0.1", "2001:db8:6::1", "2001:db8:5:1::7"):
        assert not trusted(host), host
    for host in (SCANNER, "127.0.0.1", "not-an-address"):
        assert not trusted(host), host
