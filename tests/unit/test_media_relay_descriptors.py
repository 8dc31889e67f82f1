"""The relay out of file descriptors: no retries, a 503 for the call, one log line a burst.

EMFILE (the process) and ENFILE (the host) fail every port the same way: the relay
gives the pair back, refuses the session at once (``DescriptorsExhausted``) and logs
the first refusal of a burst, then a count per interval. Sessions that would eat into
the descriptors left to the rest of the process are refused the same way, without a
bind. The bind is faked: nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sbc.app import SbcNode
from sbc.b2bua.controller import AllocateMedia
from sbc.burst import BurstLog
from sbc.config.loader import load_config
from sbc.media import relay as relay_module
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.control import MediaError
from sbc.media.relay import (
    BIND_ATTEMPTS,
    DESCRIPTOR_LOG_INTERVAL,
    DescriptorsExhausted,
    MediaRelay,
    descriptor_budget,
)
from sbc.media.session import LegOffer, StreamOffer
from sbc.sip.message import Response
from sbc.sip.parser import parse_message
from sbc.transport.base import Flow, Transport

OUTSIDE = IPv4Address("198.51.100.1")
OFFER = (StreamOffer(LegOffer("outside", 4), LegOffer("inside", 4)),)
LOGGER = "sbc.media.relay"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def relay_failing_with(code: int) -> tuple[MediaRelay, list[int], Clock]:
    """A relay whose every bind fails with ``code``; the ports it tried; its clock."""
    relay = MediaRelay(
        MediaConfig(
            realms=(
                RealmMediaAddress("outside", ipv4=OUTSIDE),
                RealmMediaAddress("inside", ipv4=IPv4Address("203.0.113.1")),
            ),
            port_min=20000,
            port_max=20999,
            kernel_path=False,
        )
    )
    relay.descriptor_budget = None
    tried: list[int] = []
    clock = Clock()

    async def bind(leg: object) -> None:
        tried.append(leg.pair.rtp)  # type: ignore[attr-defined]
        raise OSError(code, "faked")

    relay._bind = bind  # type: ignore[method-assign]
    relay._now = clock  # type: ignore[method-assign]
    return relay, tried, clock


def allocate(relay: MediaRelay) -> BaseException:
    async def run() -> None:
        await relay.allocate("call", OFFER)

    with pytest.raises(MediaError) as caught:
        asyncio.run(run())
    return caught.value


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_fails_at_once_and_gives_the_pair_back(code: int) -> None:
    relay, tried, _ = relay_failing_with(code)
    error = allocate(relay)
    assert isinstance(error, DescriptorsExhausted)
    assert str(error) == f"out of file descriptors ([Errno {code}] faked)"
    assert len(tried) == 1  # no retry on other ports
    assert relay._ports.in_use(OUTSIDE) == 0
    assert relay.sessions() == ()


def test_a_busy_port_is_still_retried() -> None:
    relay, tried, _ = relay_failing_with(errno.EADDRINUSE)
    error = allocate(relay)
    assert not isinstance(error, DescriptorsExhausted)
    assert str(error) == f"no bindable port pair on {OUTSIDE} after {BIND_ATTEMPTS} attempts"
    assert len(tried) == BIND_ATTEMPTS and len(set(tried)) == BIND_ATTEMPTS


def test_one_log_line_per_burst_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    relay, tried, clock = relay_failing_with(errno.EMFILE)
    first = "x media: out of file descriptors ([Errno 24] faked): new calls get 503"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(50):
            allocate(relay)
            clock.now += 0.1  # 5 s of a burst
        assert refusals(caplog) == [first]
        assert len(tried) == 50
        clock.now += DESCRIPTOR_LOG_INTERVAL
        allocate(relay)
    assert refusals(caplog) == [first, first + "; 49 more refused since the last report"]
    # Not a single "port pair busy" warning for a process out of descriptors.
    assert not [r for r in caplog.records if "busy" in r.getMessage()]


def test_the_reserve_left_to_the_process_refuses_before_any_bind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay, tried, _ = relay_failing_with(errno.EADDRINUSE)
    relay.descriptor_budget = 10
    relay._sockets = 7  # a stream needs 4
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        error = allocate(relay)
    assert isinstance(error, DescriptorsExhausted)
    assert tried == []
    assert refusals(caplog) == [
        "x media: out of file descriptors (7 media sockets open, 10 allowed by the open-files"
        " limit): new calls get 503"
    ]


def test_burst_log_counts_what_it_kept_quiet() -> None:
    log = BurstLog(10.0)
    assert log.hit(0.0) == 0
    assert [log.hit(t) for t in (1.0, 5.0, 9.9)] == [None, None, None]
    assert log.hit(10.0) == 3
    assert log.hit(30.0) == 0


@pytest.mark.parametrize(
    ("soft", "budget"),
    [(1024, 1024 - 128), (20000, 20000 - 256), (relay_module.resource.RLIM_INFINITY, None)],
)
def test_descriptor_budget_leaves_a_reserve(
    monkeypatch: pytest.MonkeyPatch, soft: int, budget: int | None
) -> None:
    monkeypatch.setattr(relay_module.resource, "getrlimit", lambda _: (soft, soft))
    assert descriptor_budget() == budget


# -- the call gets 503 ---------------------------------------------------------------

CONFIG = """\
state_dir: {state}
log: {{level: info}}
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: 0}}
management:
  listen: {{address: 127.0.0.1, port: 0}}
cdr: {{enabled: false}}
realms:
  - name: outside
    listen: [{{transport: udp, address: 198.51.100.1, port: 5060}}]
    media_address: 198.51.100.1
  - name: inside
    listen: [{{transport: udp, address: 203.0.113.1, port: 5060}}]
    media_address: 203.0.113.1
routes:
  - {{name: core, from_realm: outside, action: trunk, realm: inside,
      host: 203.0.113.5, port: 5060, transport: udp}}
"""

CALLER = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 5099)
SDP = (
    "v=0\r\no=a 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\n"
)
INVITE = (
    "INVITE sip:1000@198.51.100.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKfd1;rport\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=a1\r\nTo: <sip:1000@198.51.100.1>\r\n"
    "Call-ID: fd-call\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@198.51.100.9:5099>\r\n"
    f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
)


class Sent:
    """The transport layer, as far as responses go."""

    def __init__(self) -> None:
        self.responses: list[Response] = []

    def send_response_nowait(
        self, response: Response, flow: Flow, on_failure: object = None
    ) -> None:
        self.responses.append(response)


class RelayOutOfDescriptors:
    async def allocate(self, call_id: str, streams: object) -> None:
        raise DescriptorsExhausted("out of file descriptors ([Errno 24] faked)")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SbcNode]:
    path = tmp_path / "sbc.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    yield SbcNode(load_config(path), path)


def test_the_call_gets_503_and_no_error_line_of_its_own(
    node: SbcNode, caplog: pytest.LogCaptureFixture
) -> None:
    sent = Sent()
    node.transport = sent  # type: ignore[assignment]
    node.media = RelayOutOfDescriptors()  # type: ignore[assignment]

    async def call() -> None:
        node._on_message(parse_message(INVITE.encode()), CALLER)
        command = node._media_queue.get_nowait()
        assert isinstance(command, AllocateMedia)
        await node._media_command(command)

    with caplog.at_level(logging.INFO):
        asyncio.run(call())
    assert [r.status for r in sent.responses] == [100, 503]
    assert len(node.calls) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("ended (503, transport-error)" in r.getMessage() for r in caplog.records)
