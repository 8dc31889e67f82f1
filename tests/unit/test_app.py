"""`sbc.app` helpers that need no sockets: the firewall section as `sbc run` uses it."""

from __future__ import annotations

import asyncio
import textwrap
import time
from ipaddress import ip_network
from pathlib import Path

import pytest

from sbc import app
from sbc.app import FirewallUnavailableError, SbcNode, firewall_config
from sbc.b2bua.admission import RefusalReason, Refused
from sbc.b2bua.controller import DeleteMedia, MediaCommand, Step, UpdateMedia
from sbc.config.loader import ConfigError, load_config_text
from sbc.firewall.config import SipPorts
from sbc.firewall.nft import NftError

BASE = Path("/etc/sbc")


def load(text: str):  # type: ignore[no-untyped-def]
    return load_config_text(textwrap.dedent(text), "sbc.yaml", BASE)


def test_firewall_is_off_by_default_and_its_state_file_resolves() -> None:
    config = load("{}")
    assert config.firewall.enabled is False and config.firewall.required is False
    assert config.firewall.state_file == BASE / "state" / "firewall-blacklist.json"


def test_firewall_section_loads() -> None:
    config = load(
        """\
        firewall:
          enabled: true
          required: true
          trusted: [203.0.113.0/24, "2001:db8:1::/48"]
          udp: {rate: 50, burst: 100}
          state_file: bl.json
        """
    )
    section = config.firewall
    assert section.enabled and section.required
    assert section.trusted == (ip_network("203.0.113.0/24"), ip_network("2001:db8:1::/48"))
    assert (section.udp.rate, section.udp.burst) == (50, 100)
    assert section.state_file == BASE / "bl.json"


def test_firewall_sip_ports_default_to_the_listeners() -> None:
    config = load(
        """\
        sip:
          listen:
            - {transport: udp, address: 198.51.100.1, port: 5070}
            - {transport: tcp, address: 198.51.100.1, port: 5070}
            - {transport: tls, address: 198.51.100.1, port: 0}
        realms:
          - name: inside
            listen: [{transport: udp, address: 203.0.113.1, port: 5080}]
            media_address: 203.0.113.1
        firewall: {enabled: true}
        """
    )
    # Ephemeral port 0 is unknown before binding: not metered.
    assert firewall_config(config).sip_ports == SipPorts(udp=(5070, 5080), tcp=(5070,), tls=())


def test_firewall_sip_ports_given_are_kept() -> None:
    config = load(
        """\
        firewall:
          sip_ports: {udp: [5090], tcp: [], tls: [5091]}
        """
    )
    assert firewall_config(config).sip_ports == SipPorts(udp=(5090,), tcp=(), tls=(5091,))


def _refuse(section: object) -> object:
    raise NftError("apply", "Operation not permitted")


def test_firewall_that_cannot_be_installed_is_skipped_unless_required(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app, "_started_firewall", _refuse)

    async def start(required: bool) -> SbcNode:
        node = SbcNode(load(f"firewall: {{enabled: true, required: {str(required).lower()}}}"))
        await node._start_firewall(node.config)
        return node

    node = asyncio.run(start(required=False))
    assert node.firewall is None
    assert node.health()["firewall"] == {"enabled": False, "bans": 0}
    assert "x firewall not installed (needs CAP_NET_ADMIN and libnftables)" in caplog.text
    with pytest.raises(FirewallUnavailableError, match="Operation not permitted"):
        asyncio.run(start(required=True))


class _TableGone:
    """A firewall stand-in whose kernel has lost table inet sbc."""

    def __init__(self, node: SbcNode, reload_meanwhile: bool) -> None:
        self.kernel = self
        self.node = node
        self.reload_meanwhile = reload_meanwhile
        self.started = 0
        self.flushed = 0

    def table_present(self) -> bool:
        if self.reload_meanwhile:
            self.node.firewall = None  # a reload turned the firewall off meanwhile
        return False

    def flush(self) -> None:
        self.flushed += 1

    def start(self) -> None:
        self.started += 1


@pytest.mark.parametrize("reload_meanwhile", [False, True])
def test_a_vanished_table_is_put_back_unless_a_reload_stopped_the_firewall(
    reload_meanwhile: bool, caplog: pytest.LogCaptureFixture
) -> None:
    node = SbcNode(load("firewall: {enabled: true}"))
    gone = _TableGone(node, reload_meanwhile)
    node.firewall = node._nft_rounds.firewall = gone  # type: ignore[assignment]

    async def check() -> bool:
        try:
            return await node._restore_table()
        finally:
            node._nft_rounds.close()

    assert asyncio.run(check()) is not reload_meanwhile
    assert (gone.flushed, gone.started) == ((0, 0) if reload_meanwhile else (1, 1))
    assert ("table inet sbc is gone" in caplog.text) is not reload_meanwhile
    table = node.health()["nft_table"]
    assert table["restores"] == (0 if reload_meanwhile else 1)  # type: ignore[index]
    assert 0 <= table["checked_s_ago"] < 5  # type: ignore[index]


def test_health_says_no_table_check_before_the_first() -> None:
    node = SbcNode(load("{}"))
    assert node.health()["nft_table"] == {"checked_s_ago": None, "restores": 0}


def test_new_calls_are_refused_while_the_media_backlog_is_full() -> None:
    node = SbcNode(load("calls: {max_setup_backlog: 2}"))
    busy = node.admission.busy
    assert busy is not None and not busy()
    node._media_queue.put_nowait(DeleteMedia("c1", "s1"))
    assert not busy() and node.health()["media_backlog"] == 1
    node._media_queue.put_nowait(DeleteMedia("c2", "s2"))
    assert busy()
    refusal = node.admission.admit(["outside"], None, 0.0)
    assert isinstance(refusal, Refused) and refusal.reason is RefusalReason.BUSY
    node._media_queue.get_nowait()
    assert not busy()


def test_a_failing_media_command_does_not_stop_the_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug raised by one command is logged; the commands after it still run (before,
    the queue's task ended and every later call waited for its media for ever)."""
    node = SbcNode(load("{}"))
    ran: list[str] = []

    async def command(cmd: MediaCommand) -> None:
        ran.append(cmd.call_ref)
        if cmd.call_ref == "bad":
            raise ValueError("a bug")

    node._media_command = command  # type: ignore[method-assign,assignment]

    async def scenario() -> None:
        runner = asyncio.create_task(node._run_media())
        for ref in ("bad", "good"):
            node._media_queue.put_nowait(UpdateMedia(ref, f"s-{ref}", ()))
        await asyncio.wait_for(node._media_queue.join(), 5)
        assert not runner.done()
        runner.cancel()

    asyncio.run(scenario())
    assert ran == ["bad", "good"]
    assert "x call bad: media UpdateMedia failed" in caplog.text


def test_timers_run_again_after_a_failure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raised while timers run is logged and the timers are tried again a
    moment later (before, nothing armed them until the next message came)."""
    monkeypatch.setattr(app, "TIMER_RETRY", 0.05)
    node = SbcNode(load("{}"))
    runs: list[float] = []
    handle = node.calls.handle_timers

    def flaky(now: float) -> Step:
        runs.append(now)
        if len(runs) == 1:
            raise ValueError("a bug")
        return handle(now)

    node.calls.handle_timers = flaky  # type: ignore[method-assign]

    async def scenario() -> None:
        node._on_timer()
        await asyncio.sleep(0.3)
        if node._timer is not None:
            node._timer.cancel()

    asyncio.run(scenario())
    assert len(runs) == 2
    assert "x timers failed; trying again in 0 s" in caplog.text


def test_a_failing_keepalive_round_does_not_end_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NAT keepalives and the registration relay's expiry run once a second; a bug in
    one round is logged and the next round runs (two rounds: about 2 s)."""
    node = SbcNode(load("{}"))
    rounds: list[int] = []

    def round_() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise ValueError("a bug")

    node._keepalive_round = round_  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(node._run_keepalives())
        await asyncio.sleep(2.4)
        assert not task.done()
        task.cancel()

    asyncio.run(scenario())
    assert len(rounds) == 2
    assert "x NAT keepalive round failed" in caplog.text


def test_a_reload_arms_the_timer_for_a_sooner_probe(tmp_path: Path) -> None:
    """A reload that shortens a trunk's probe interval brings the next probe forward:
    the timer is armed for it at once, not when the old (later) one fires."""
    realms = """\
        state_dir: {state}
        realms:
          - name: inside
            media_address: 203.0.113.1
            listen: [{{transport: udp, address: 127.0.0.1, port: 5999}}]
        trunks:
          - name: pstn
            realm: inside
            gateways: [{{host: 127.0.0.1, port: 5998}}]
            probe: {{interval: {interval}, timeout: 5}}
        """
    path = tmp_path / "sbc.yaml"
    path.write_text(textwrap.dedent(realms.format(state=tmp_path, interval=3600)))
    node = SbcNode(load_config_text(path.read_text(), str(path), tmp_path), path)

    async def scenario() -> float | None:
        now = time.monotonic()
        targets = node.directory
        state = node.trunks.get("pstn")
        assert state is not None
        key = state.trunk.gateways[0].key
        targets.probe_sent("pstn", key, now)
        targets.probe_result("pstn", key, 200, now)  # alive: next probe in an hour
        node._arm_timer()
        assert node._timer_at is not None and node._timer_at > now + 3000
        path.write_text(textwrap.dedent(realms.format(state=tmp_path, interval=10)))
        try:
            assert await node.reload()
            return node._timer_at
        finally:
            await node.stop()

    armed = asyncio.run(scenario())
    assert armed is not None and armed < time.monotonic() + 11


def test_transaction_limit_and_t1_come_from_the_config_and_reload_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "state_dir: {state}\nsip: {{max_transactions: {limit}, t1_ms: {t1}}}\n"
    path = tmp_path / "sbc.yaml"
    path.write_text(text.format(state=tmp_path, limit=2000, t1=1000))
    node = SbcNode(load_config_text(path.read_text(), str(path), tmp_path), path)
    assert node.transactions.max_transactions == 2000
    assert node.transactions.config.t1 == 1.0

    async def no_restart(new: object, old: object) -> bool:
        raise AssertionError("the SIP listeners were restarted for a transaction setting")

    monkeypatch.setattr(node, "_replace_transport", no_restart)

    async def scenario() -> None:
        path.write_text(text.format(state=tmp_path, limit=100_000, t1=2000))
        try:
            assert await node.reload()
        finally:
            await node.stop()

    asyncio.run(scenario())
    assert node.transactions.max_transactions == 100_000
    assert node.transactions.config.t1 == 2.0
    with pytest.raises(ConfigError) as bad:
        load_config_text("sip: {max_transactions: 10, t1_ms: 50}", "sbc.yaml", tmp_path)
    assert "max_transactions" in str(bad.value) and "t1_ms" in str(bad.value)


def test_the_tcp_message_timeout_comes_from_the_config() -> None:
    # Slowloris: a message that trickles in for longer is closed (transport layer).
    assert app.transport_config(load("{}")).message_timeout == 32.0
    config = load("sip: {tcp_message_timeout: 10}")
    assert app.transport_config(config).message_timeout == 10.0
