"""A TCP/TLS connection a phone registered over is left open by the idle sweep while
its registration lasts (the phone is reached over it only, RFC 5626 3.3)."""

from __future__ import annotations

import asyncio

from sbc.registrar.registrar import registered_for
from sbc.sip.message import Response
from sbc.sip.parser import parse_message
from sbc.transport.base import Stat
from tests.unit.test_transport import async_test, close_writer, read_until_closed
from tests.unit.test_transport_closed import TCP, phone, running


def response(status: int, method: str, *headers: str) -> Response:
    text = (
        f"SIP/2.0 {status} X\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKr\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>;tag=2\r\n"
        f"Call-ID: c\r\nCSeq: 2 {method}\r\n"
        + "".join(f"{h}\r\n" for h in headers)
        + "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Response)
    return message


def test_registered_for_is_the_longest_binding() -> None:
    ok = response(
        200,
        "REGISTER",
        "Contact: <sip:a@192.0.2.1:5060;transport=tcp>;expires=300, <sip:a@192.0.2.2>;expires=60",
        "Contact: <sip:a@192.0.2.3>",
        "Expires: 120",
    )
    assert registered_for(ok) == 300
    assert registered_for(response(200, "REGISTER", "Contact: <sip:a@h>", "Expires: 90")) == 90
    # No binding left (an unregister, a fetch of nothing), a failure, another method.
    assert registered_for(response(200, "REGISTER")) is None
    assert registered_for(response(200, "REGISTER", "Contact: <sip:a@h>;expires=0")) is None
    assert registered_for(response(401, "REGISTER", "Contact: <sip:a@h>;expires=60")) is None
    assert registered_for(response(200, "OPTIONS", "Contact: <sip:a@h>;expires=60")) is None
    # An expires that is not a number holds nothing.
    assert registered_for(response(200, "REGISTER", "Contact: <sip:a@h>;expires=soon")) is None


@async_test
async def test_a_held_connection_outlives_the_idle_timeout_then_goes() -> None:
    loop = asyncio.get_running_loop()
    async with running(TCP, idle_timeout=30) as (layer, recorder, closed):
        reader, writer, flow = await phone(layer, recorder, "held1")
        _, other_writer, other = await phone(layer, recorder, "held2")
        assert flow.connection_id is not None
        layer.hold_open(flow.connection_id, 600)
        layer.hold_open(flow.connection_id, 100)  # a shorter hold does not cut it
        now = loop.time()
        # The other connection goes at the idle timeout; the held one stays.
        assert layer.close_idle(now + 31) == 1
        await asyncio.sleep(0.05)
        assert closed.ids == [other.connection_id]
        assert layer.close_idle(now + 599) == 0
        # After the hold, idle time counts as before (it has been idle since).
        assert layer.close_idle(now + 601) == 1
        assert await read_until_closed(reader) == b""
        assert layer.stats[Stat.IDLE_CLOSED] == 2
        layer.hold_open(flow.connection_id, 60)  # gone: nothing to hold
        await close_writer(writer)
        await close_writer(other_writer)
