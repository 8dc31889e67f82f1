"""Stopping on loopback: a failing step does not keep the process up.

Real listeners (UDP and the management HTTP server on ephemeral loopback ports),
a real CDR store in a temporary directory; one step is made to fail.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from pathlib import Path

import pytest

import sbc.app
from sbc.app import SbcNode
from sbc.b2bua.controller import AllocateMedia, DeleteMedia
from sbc.cdr import CdrStore
from sbc.config.loader import load_config
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.relay import MediaRelay
from sbc.media.session import LegOffer, MediaSession, StreamOffer
from tests.unit.test_cdr import ended_call

CONFIG = """\
state_dir: {state}
log: {{level: info}}
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: 0}}
management:
  listen: {{address: 127.0.0.1, port: 0}}
media: {{port_min: 41000, port_max: 41999, kernel_path: false}}
"""


def _node(tmp_path: Path) -> SbcNode:
    path = tmp_path / "sbc.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    return SbcNode(load_config(path), path)


def test_a_failing_step_is_logged_and_the_later_steps_still_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node(tmp_path)

    async def run() -> None:
        await node.start()
        assert node.cdr is not None and node.transport is not None

        async def broken() -> None:
            raise RuntimeError("listener close failed")

        node.transport.stop = broken  # type: ignore[method-assign]
        await asyncio.wait_for(node.stop(), 10)

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert node.stopped.is_set()
    assert "x stop: _stop_listening failed, going on" in caplog.text
    assert "RuntimeError: listener close failed" in caplog.text
    # The steps after the failed one ran: the CDR store is closed, the relay too.
    assert node.cdr is None
    assert "- stopped" in caplog.text


def test_a_second_signal_ends_a_stop_that_hangs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node(tmp_path)

    async def run() -> bool:
        await node.start()
        hang = asyncio.Event()

        async def hanging() -> None:
            await hang.wait()

        node._stop_media = hanging  # type: ignore[method-assign]
        node.signal_stop()
        await asyncio.sleep(0.3)
        waiting = not node.stopped.is_set()
        node.signal_stop()
        await asyncio.wait_for(node.stopped.wait(), 1)
        hang.set()
        assert node._stop_task is not None
        await asyncio.wait_for(node._stop_task, 10)
        return waiting

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()), "the first signal's stop should still be waiting"
    assert "x stop requested again" in caplog.text


def test_relay_close_skips_a_session_deleted_beside_it() -> None:
    """A deletion task still running when the stop closes the relay takes a session
    out of the relay's list mid-close: close carries on (it used to raise and
    leave the stop half done)."""
    loopback = IPv4Address("127.0.0.1")
    relay = MediaRelay(
        MediaConfig(
            realms=(
                RealmMediaAddress("outside", ipv4=loopback),
                RealmMediaAddress("inside", ipv4=loopback),
            ),
            port_min=42000,
            port_max=42999,
            kernel_path=False,
        )
    )
    offer = (StreamOffer(LegOffer("outside", 4), LegOffer("inside", 4)),)

    async def run() -> None:
        await relay.start()
        first = await relay.allocate("call-1", offer)
        second = await relay.allocate("call-2", offer)
        delete = relay.delete

        async def delete_and_another(session_id: str) -> MediaSession:
            if session_id == first.session_id:
                # The task beside the stop deletes the other session meanwhile.
                await delete(second.session_id)
            return await delete(session_id)

        relay.delete = delete_and_another  # type: ignore[method-assign]
        await relay.close()
        assert relay.sessions() == ()

    asyncio.run(asyncio.wait_for(run(), 10))


def test_media_commands_unfinished_at_the_stop_still_leave_their_cdrs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deletion that hangs past the stop's wait (running beside the queue) and one
    still queued behind an allocation that hangs: both calls get a CDR, without
    media counters; before, both were lost."""
    monkeypatch.setattr(sbc.app, "MEDIA_STOP_WAIT", 0.2)
    path = tmp_path / "sbc.yaml"
    path.write_text(
        CONFIG.format(state=tmp_path / "state")
        + "realms:\n"
        + "  - name: inside\n"
        + "    listen: [{transport: udp, address: 127.0.0.1, port: 0}]\n"
        + "    media_address: 127.0.0.1\n"
    )
    node = SbcNode(load_config(path), path)
    hang = asyncio.Event()

    async def stuck(*args: object) -> MediaSession:
        await hang.wait()
        raise AssertionError("never released")

    async def run() -> None:
        await node.start()
        assert node.media is not None
        node.media.delete = stuck  # type: ignore[method-assign,assignment]
        node.media.allocate = stuck  # type: ignore[method-assign,assignment]
        queue = node._media_queue
        queue.put_nowait(DeleteMedia("running", "s1", ended_call("inside", call_ref="running")))
        queue.put_nowait(AllocateMedia("setting-up", "cid", ()))
        queue.put_nowait(DeleteMedia("queued", "s2", ended_call("inside", call_ref="queued")))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(node.stop(), 10)

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    records = {r.call_ref: r for r in CdrStore(tmp_path / "state" / "cdr.sqlite").recent()}
    assert set(records) == {"running", "queued"}
    assert all(r.a_to_b_packets == 0 and r.b_to_a_packets == 0 for r in records.values())
    assert "x stop: 2 media command(s) unfinished" in caplog.text
