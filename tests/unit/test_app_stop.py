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

from sbc.app import SbcNode
from sbc.config.loader import load_config
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.relay import MediaRelay
from sbc.media.session import LegOffer, MediaSession, StreamOffer

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
