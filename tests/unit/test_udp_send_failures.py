"""A UDP send the kernel refuses is counted and logged, once per burst.

asyncio reports such a failure to the datagram protocol (``error_received``), not
to the code that sent: before, it reached only the debug log, so an operator saw
calls time out with no hint that the host would not send (a firewall's EPERM, no
route, a datagram over 64 KiB). Real sockets on loopback.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from sbc.transport.base import ListenAddress, Stat, Transport
from sbc.transport.layer import TransportLayer
from sbc.transport.udp import UdpListener
from tests.unit.test_transport import V4, async_test, running, wait_until

#: Larger than any UDP datagram: sendto() fails with EMSGSIZE at once.
TOO_LARGE = b"x" * 70_000


def udp_listener(layer: TransportLayer) -> UdpListener:
    (listener,) = [item for item in layer.listeners if isinstance(item, UdpListener)]
    return listener


@async_test
async def test_send_failures_are_counted_and_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, _):
        listener = udp_listener(layer)
        with caplog.at_level(logging.WARNING, logger="sbc.transport.layer"):
            for _ in range(5):
                listener.send(TOO_LARGE, V4, 9)
            await wait_until(lambda: layer.stats[Stat.SEND_FAILURES] == 5)
            await asyncio.sleep(0.05)
        failures = [r.getMessage() for r in caplog.records if "a send failed" in r.getMessage()]
        assert len(failures) == 1, failures
        assert f"udp {V4}:{listener.port}" in failures[0]
        assert "too long" in failures[0].lower()
        assert layer.bound  # the listener carries on
