"""The media relay with real UDP packets across network namespaces.

caller (198.51.100.10, .66 the attacker; 2001:db8:1::10) -- sbc (198.51.100.1 |
203.0.113.1; 2001:db8:1::1 | 2001:db8:2::1) -- callee (203.0.113.20; 2001:db8:2::20).
The relay runs in this process with this thread moved into the sbc namespace; the
peers are sockets that live in their own namespaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import pytest

from sbc.media import (
    Direction,
    Endpoint,
    KernelPathEngaged,
    LegOffer,
    MediaConfig,
    MediaTimeout,
    RealmMediaAddress,
    SourceLatched,
    StreamOffer,
)
from sbc.media.kernel import POSTROUTING, PREROUTING
from sbc.media.relay import MediaRelay, new_event_loop
from sbc.media.rtp import RtpHeader
from sbc.media.srtp import SrtpSuite
from tests.netns import Lab, can_run_lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(can_run_lab() is not None, reason=str(can_run_lab())),
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ADDR = {
    4: {
        "caller": "198.51.100.10",
        "attacker": "198.51.100.66",
        "sbc_out": "198.51.100.1",
        "sbc_in": "203.0.113.1",
        "callee": "203.0.113.20",
        "nat_hint": "10.0.0.5",
    },
    6: {
        "caller": "2001:db8:1::10",
        "attacker": "2001:db8:1::66",
        "sbc_out": "2001:db8:1::1",
        "sbc_in": "2001:db8:2::1",
        "callee": "2001:db8:2::20",
        "nat_hint": "fd00::5",
    },
}
#: Packets carried each way once the kernel path is on.
BULK = 1000
#: Packets each side sends before (latching and the switch to the kernel path).
WARMUP = 5


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        for name in ("caller", "sbc", "callee"):
            lab.add(name)
        lab.link(
            "caller",
            "sbc",
            ["198.51.100.10/24", "198.51.100.66/24", "2001:db8:1::10/64", "2001:db8:1::66/64"],
            ["198.51.100.1/24", "2001:db8:1::1/64"],
        )
        lab.link(
            "sbc",
            "callee",
            ["203.0.113.1/24", "2001:db8:2::1/64"],
            ["203.0.113.20/24", "2001:db8:2::20/64"],
        )
        lab.sysctl("sbc", "net.ipv4.ip_forward", 1)
        lab.sysctl("sbc", "net.ipv6.conf.all.forwarding", 1)
        yield lab


def media_config(**overrides: Any) -> MediaConfig:
    values: dict[str, Any] = {
        "realms": (
            RealmMediaAddress("outside", ip_address("198.51.100.1"), ip_address("2001:db8:1::1")),  # type: ignore[arg-type]
            RealmMediaAddress("inside", ip_address("203.0.113.1"), ip_address("2001:db8:2::1")),  # type: ignore[arg-type]
        ),
        "port_min": 20000,
        "port_max": 20199,
        "port_quarantine": 5.0,
        "poll_interval": 0.1,
        "port_seed": 7,
    }
    values.update(overrides)
    return MediaConfig(**values)


def rtp(seq: int, ssrc: int, payload: bytes = b"\xd5" * 160) -> bytes:
    return bytes(RtpHeader(0, seq, seq * 160, ssrc)) + payload


class Peer(asyncio.DatagramProtocol):
    """A UDP endpoint in a lab namespace that records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Endpoint]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self._arrival = asyncio.Event()

    @classmethod
    async def open(cls, lab: Lab, ns: str, address: str, port: int) -> Peer:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = lab.socket(ns, family)
        sock.bind((address, port))
        sock.setblocking(False)
        peer = cls()
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: peer, sock=sock)
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDPTransport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.append((data, Endpoint.from_sockaddr(addr)))
        self._arrival.set()

    async def send(self, packets: list[bytes], to: Endpoint, burst: int = 50) -> None:
        """Send a bounded list of packets, yielding to the loop every ``burst``."""
        assert self.transport is not None
        for i, packet in enumerate(packets):
            self.transport.sendto(packet, to.sockaddr())
            if i % burst == burst - 1:
                await asyncio.sleep(0.002)

    async def wait_count(self, count: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        return len(self.received)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def run(lab: Lab, coro_fn: Any) -> Any:
    """Run ``coro_fn()`` on a (uv)loop with this thread inside the sbc namespace."""
    with lab.inside("sbc"):
        loop = new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro_fn(), 60))
        finally:
            loop.close()


def nft_media_objects(lab: Lab) -> dict[str, list[Any]]:
    """The media forwards now in table inet sbc of the sbc namespace: the elements of
    the counted sets (one per forward, with its counter), every element of the media
    sets and maps, and the media chains."""
    result = lab.run("sbc", "nft", "-j", "list", "table", "inet", "sbc", check=False)
    found: dict[str, list[Any]] = {"forwards": [], "chains": [], "elements": []}
    if result.returncode != 0:
        return found
    for item in json.loads(result.stdout)["nftables"]:
        if "chain" in item and item["chain"]["name"].startswith("media_"):
            found["chains"].append(item["chain"]["name"])
        for kind in ("set", "map"):
            body = item.get(kind)
            if body and body["name"].startswith("media_"):
                found["elements"] += body.get("elem", [])
                if body["name"].startswith("media_fwd_"):
                    found["forwards"] += body.get("elem", [])
    return found


async def event_of(relay: MediaRelay, kind: type, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        event = await relay.next_event(max(0.01, deadline - time.monotonic()))
        if isinstance(event, kind):
            return event


@dataclass
class Call:
    relay: MediaRelay
    session_id: str
    a_local: Endpoint
    b_local: Endpoint
    caller: Peer
    callee: Peer


async def setup_call(lab: Lab, relay: MediaRelay, family: int, caller_port: int = 34000) -> Call:
    """A call whose caller sits behind a NAT: its SDP says 10.0.0.5:4000, its packets
    come from 198.51.100.10:34000."""
    addr = ADDR[family]
    session = await relay.allocate(
        "call-1",
        [
            StreamOffer(
                a=LegOffer("outside", family, Endpoint.of(addr["nat_hint"], 4000)),
                b=LegOffer("inside", family),
            )
        ],
    )
    # The callee's answer: its SDP address is right (no NAT inside).
    session = await relay.update(
        session.session_id,
        [
            StreamOffer(
                a=LegOffer("outside", family, Endpoint.of(addr["nat_hint"], 4000)),
                b=LegOffer("inside", family, Endpoint.of(addr["callee"], 5000)),
            )
        ],
    )
    stream = session.streams[0]
    caller = await Peer.open(lab, "caller", addr["caller"], caller_port)
    callee = await Peer.open(lab, "callee", addr["callee"], 5000)
    return Call(relay, session.session_id, stream.a.local, stream.b.local, caller, callee)


async def warm_up(call: Call, family: int) -> None:
    """Caller speaks first (latched behind its NAT), then the callee."""
    await call.caller.send([rtp(i, 0xA) for i in range(WARMUP)], call.a_local)
    assert await call.callee.wait_count(WARMUP) == WARMUP
    latched = await event_of(call.relay, SourceLatched)
    assert latched.source == Endpoint.of(ADDR[family]["caller"], 34000)
    await call.callee.send([rtp(i, 0xB) for i in range(WARMUP)], call.b_local)
    # The callee's media reaches the caller's real (NATed) source, not its SDP address.
    assert await call.caller.wait_count(WARMUP) == WARMUP


@pytest.mark.parametrize("family", [4, 6])
def test_kernel_path_carries_the_stream_after_latching(lab: Lab, family: int) -> None:
    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config()) as relay:
            assert relay.kernel_enabled, relay.kernel_unavailable
            call = await setup_call(lab, relay, family)
            await warm_up(call, family)
            await event_of(relay, KernelPathEngaged)
            during = nft_media_objects(lab)

            await call.caller.send([rtp(WARMUP + i, 0xA) for i in range(BULK)], call.a_local)
            await call.callee.send([rtp(WARMUP + i, 0xB) for i in range(BULK)], call.b_local)
            got_callee = await call.callee.wait_count(WARMUP + BULK)
            got_caller = await call.caller.wait_count(WARMUP + BULK)
            stats = await relay.stats(call.session_id)
            final = await relay.delete(call.session_id)
            after = nft_media_objects(lab)

            # Late packets to the old ports after teardown reach nobody.
            before_late = len(call.callee.received)
            await call.caller.send([rtp(9000 + i, 0xA) for i in range(10)], call.a_local)
            await asyncio.sleep(0.2)
            late = len(call.callee.received) - before_late
            # The pair rests in quarantine: the next call gets other ports.
            nxt = await relay.allocate(
                "call-2", [StreamOffer(LegOffer("outside", family), LegOffer("inside", family))]
            )
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    a, b = r["stats"].streams[0].a, r["stats"].streams[0].b
    print(
        f"IPv{family}: caller->callee userspace={a.counters.packets} "
        f"kernel={a.counters.kernel_packets}; callee->caller userspace={b.counters.packets} "
        f"kernel={b.counters.kernel_packets}"
    )
    assert r["got_callee"] == WARMUP + BULK
    assert r["got_caller"] == WARMUP + BULK
    # User space relayed only the warm-up packets; the kernel carried the rest.
    assert (a.counters.packets, a.counters.kernel_packets) == (WARMUP, BULK)
    assert (b.counters.packets, b.counters.kernel_packets) == (WARMUP, BULK)
    assert r["stats"].streams[0].kernel
    # Topology hiding holds on both paths: each peer only ever sees the SBC's port.
    assert {src for _, src in r["call"].callee.received} == {r["call"].b_local}
    assert {src for _, src in r["call"].caller.received} == {r["call"].a_local}
    # One counted tuple per direction, and its four rewrite map entries.
    assert len(r["during"]["forwards"]) == 2 and len(r["during"]["elements"]) == 10
    assert all("counter" in f["elem"] for f in r["during"]["forwards"])
    assert r["after"]["forwards"] == [] and r["after"]["elements"] == []
    assert r["after"]["chains"] == [PREROUTING, POSTROUTING]
    assert r["final"].streams[0].a.counters.kernel_packets == BULK
    assert r["late"] == 0
    assert r["nxt"].streams[0].a.local.port != r["call"].a_local.port


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "userspace"])
def test_rtp_bleed_attack_fails(lab: Lab, kernel: bool) -> None:
    """A stranger sprays the caller-side port: it gets no media and injects none."""

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config(kernel_path=kernel)) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            if kernel:
                await event_of(relay, KernelPathEngaged)
            attacker = await Peer.open(lab, "caller", ADDR[4]["attacker"], 34000)
            # The bleed probe: RTP with a fresh SSRC from another source, as the
            # attack tools send to every port of a range.
            await attacker.send([rtp(i, 0xBAD) for i in range(50)], call.a_local)
            await asyncio.sleep(0.2)
            await call.callee.send([rtp(100 + i, 0xB) for i in range(20)], call.b_local)
            await call.caller.wait_count(WARMUP + 20)
            await asyncio.sleep(0.2)
            stats = await relay.stats(call.session_id)
            attacker.close()
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    a = r["stats"].streams[0].a
    assert r["attacker"].received == []  # nothing bled
    assert len(r["call"].caller.received) == WARMUP + 20  # the caller still hears the call
    ssrcs = {RtpHeader.parse(data).ssrc for data, _ in r["call"].callee.received}
    assert ssrcs == {0xA}  # nothing injected
    assert a.counters.dropped_source == 50
    assert a.rtp_latch.source == Endpoint.of(ADDR[4]["caller"], 34000)


def test_relatch_on_new_ssrc_is_what_bleed_exploits(lab: Lab) -> None:
    """With the (default-off) knob on, the same attack steals the media: this is why
    strict source is the default, and shows the test above can fail."""

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config(kernel_path=False, relatch_on_new_ssrc=True)) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            attacker = await Peer.open(lab, "caller", ADDR[4]["attacker"], 34000)
            await attacker.send([rtp(i, 0xBAD) for i in range(5)], call.a_local)
            await asyncio.sleep(0.2)
            await call.callee.send([rtp(100 + i, 0xB) for i in range(20)], call.b_local)
            await attacker.wait_count(20, timeout=2)
            attacker.close()
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    assert len(r["attacker"].received) == 20


def test_media_timeout_counts_kernel_packets_and_waits_longer_on_hold(lab: Lab) -> None:
    async def scenario() -> dict[str, Any]:
        config = media_config(media_timeout=0.6, hold_timeout=1.5, poll_interval=0.05)
        async with MediaRelay(config) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            await event_of(relay, KernelPathEngaged)
            # 1.5 s of kernel-path media, 20 packets every 0.1 s: no timeout although
            # user space sees none of it.
            started = time.monotonic()
            for burst in range(15):
                await call.caller.send(
                    [rtp(1000 + burst * 20 + i, 0xA) for i in range(20)], call.a_local
                )
                await asyncio.sleep(0.1)
            events_during = []
            while not relay._events.empty():
                events_during.append(relay._events.get_nowait())
            kernel_only = (await relay.stats(call.session_id)).streams[0].a.counters
            silent_from = time.monotonic()
            timeout = await event_of(relay, MediaTimeout, timeout=3)
            waited = time.monotonic() - silent_from
            # On hold (a re-INVITE with sendonly) the limit is the hold timeout.
            await relay.update(
                call.session_id,
                [
                    StreamOffer(
                        LegOffer(
                            "outside",
                            4,
                            Endpoint.of(ADDR[4]["nat_hint"], 4000),
                            direction=Direction.SENDONLY,
                        ),
                        LegOffer(
                            "inside",
                            4,
                            Endpoint.of(ADDR[4]["callee"], 5000),
                            direction=Direction.RECVONLY,
                        ),
                    )
                ],
            )
            held_from = time.monotonic()
            hold_timeout = await event_of(relay, MediaTimeout, timeout=4)
            held = time.monotonic() - held_from
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    assert [e for e in r["events_during"] if isinstance(e, MediaTimeout)] == []
    assert r["kernel_only"].kernel_packets == 300 and r["kernel_only"].packets == WARMUP
    assert r["timeout"].call_id == "call-1" and not r["timeout"].on_hold
    assert 0.5 <= r["waited"] <= 1.2
    assert r["hold_timeout"].on_hold
    assert 1.4 <= r["held"] <= 2.2


def _child_spec(kernel: bool = True) -> dict[str, Any]:
    return {
        "config": {
            "realms": [
                {"realm": "outside", "ipv4": "198.51.100.1"},
                {"realm": "inside", "ipv4": "203.0.113.1"},
            ],
            "port_min": 20000,
            "port_max": 20199,
            "poll_interval": 0.1,
            "kernel_path": kernel,
        },
        "calls": [
            {
                "call_id": "call-x",
                "streams": [
                    {
                        "a": {"realm": "outside", "remote": {"address": "10.0.0.5", "port": 4000}},
                        "b": {
                            "realm": "inside",
                            "remote": {"address": "203.0.113.20", "port": 5000},
                        },
                    }
                ],
            }
        ],
    }


#: Lines of each relay process's stdout, read by a thread of its own (by PID).
_LINES: dict[int, queue.Queue[bytes]] = {}


def _read_json_line(process: subprocess.Popen[bytes], timeout: float = 10) -> dict[str, Any]:
    """The process's next stdout line as JSON.

    A reader thread hands lines over: waiting on the pipe for readability and then
    calling readline() lost a second line that arrived with the first (it sat in
    the file object's buffer while the next wait watched the empty pipe).
    """
    stdout = process.stdout
    assert stdout is not None
    lines = _LINES.get(process.pid)
    if lines is None:
        lines = _LINES[process.pid] = queue.Queue()

        def pump(sink: queue.Queue[bytes] = lines) -> None:
            for line in stdout:
                sink.put(line)
            sink.put(b"")

        threading.Thread(target=pump, name=f"stdout {process.pid}", daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError("no line from the relay process") from None
    if not line:
        raise RuntimeError(f"relay process ended (rc {process.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def _blocking_exchange(
    lab: Lab, a_local: Endpoint, b_local: Endpoint, count: int
) -> tuple[int, int]:
    """Each peer sends ``count`` packets; how many each received (blocking sockets)."""
    caller = lab.socket("caller")
    callee = lab.socket("callee")
    try:
        caller.bind(("198.51.100.10", 34000))
        callee.bind(("203.0.113.20", 5000))
        for s in (caller, callee):
            s.settimeout(0.5)
        got = [0, 0]
        for i in range(count):
            caller.sendto(rtp(i, 0xA), a_local.sockaddr())
            time.sleep(0.002)
            callee.sendto(rtp(i, 0xB), b_local.sockaddr())
            time.sleep(0.002)
        for index, sock in ((0, callee), (1, caller)):
            while got[index] < count:
                try:
                    sock.recvfrom(2048)
                except TimeoutError:
                    break
                got[index] += 1
        return got[0], got[1]
    finally:
        caller.close()
        callee.close()


def test_unprivileged_relay_falls_back_to_userspace(lab: Lab) -> None:
    process = lab.spawn(
        "sbc",
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            sys.executable,
            "-m",
            "sbc.media",
            json.dumps(_child_spec()),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    status = _read_json_line(process)
    session = _read_json_line(process)["session"]
    stream = session["streams"][0]
    a_local = Endpoint.from_dict(stream["a"]["local"])
    b_local = Endpoint.from_dict(stream["b"]["local"])
    got = _blocking_exchange(lab, a_local, b_local, 20)
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    log = stderr.decode()
    assert status["kernel"] is False
    assert "Operation not permitted" in status["reason"]
    assert got == (20, 20)  # both ways, all in user space
    assert log.count("kernel fast path unavailable") == 1
    assert nft_media_objects(lab) == {"forwards": [], "chains": [], "elements": []}


def test_crash_restart_leaves_no_stale_rules_and_takeover_reinstalls(lab: Lab) -> None:
    process = lab.spawn(
        "sbc",
        [sys.executable, "-m", "sbc.media", json.dumps(_child_spec())],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert _read_json_line(process)["kernel"] is True
    stream = _read_json_line(process)["session"]["streams"][0]
    a_local = Endpoint.from_dict(stream["a"]["local"])
    b_local = Endpoint.from_dict(stream["b"]["local"])
    assert _blocking_exchange(lab, a_local, b_local, 5) == (5, 5)
    replicated = None
    for _ in range(10):
        line = _read_json_line(process)
        if line["event"] == "KernelPathEngaged":
            replicated = line["session"]
            break
    assert replicated is not None
    os.kill(process.pid, 9)  # a crash: no cleanup runs
    process.wait(timeout=5)
    stale = nft_media_objects(lab)

    from sbc.media.session import MediaSession

    async def restart() -> dict[str, Any]:
        relay = MediaRelay(media_config())
        await relay.start()
        try:
            after_start = nft_media_objects(lab)
            # HA takeover: the standby rebuilds the session from the replicated state.
            restored = await relay.restore(MediaSession.from_dict(replicated))
            reinstalled = nft_media_objects(lab)
            loop = asyncio.get_running_loop()
            got = await loop.run_in_executor(None, _blocking_exchange, lab, a_local, b_local, 50)
            stats = await relay.stats(restored.session_id)
        finally:
            await relay.close()
        return locals()

    r = run(lab, restart)
    assert len(stale["forwards"]) == 2 and len(stale["elements"]) == 10  # the crash left them
    assert r["after_start"]["forwards"] == [] and r["after_start"]["elements"] == []
    assert len(r["reinstalled"]["forwards"]) == 2 and len(r["reinstalled"]["elements"]) == 10
    assert r["got"] == (50, 50)
    a = r["stats"].streams[0].a.counters
    assert a.kernel_packets == 50  # straight through the kernel, no re-latching
    assert nft_media_objects(lab)["forwards"] == []


def test_rtcp_mux_dtmf_and_quality_through_the_kernel_path(lab: Lab) -> None:
    """Caller with rtcp-mux, callee with RTCP on RTP+1. In the kernel path RTP and
    RFC 4733 events pass byte for byte; RTCP stays in user space and yields loss,
    jitter and round-trip time."""
    from sbc.media.rtcp import ReceiverReport, ReportBlock, SenderReport

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config()) as relay:
            session = await relay.allocate(
                "call-m",
                [
                    StreamOffer(
                        LegOffer("outside", 4, Endpoint.of("10.0.0.5", 4000), rtcp_mux=True),
                        LegOffer("inside", 4, Endpoint.of(ADDR[4]["callee"], 5000)),
                    )
                ],
            )
            a_local, b_local = session.streams[0].a.local, session.streams[0].b.local
            caller = await Peer.open(lab, "caller", ADDR[4]["caller"], 34000)
            callee = await Peer.open(lab, "callee", ADDR[4]["callee"], 5000)
            callee_rtcp = await Peer.open(lab, "callee", ADDR[4]["callee"], 5001)
            await caller.send([rtp(i, 0xA) for i in range(3)], a_local)
            await callee.wait_count(3)
            await callee.send([rtp(i, 0xB) for i in range(3)], b_local)
            await event_of(relay, KernelPathEngaged)
            # DTMF '5', RFC 4733: PT 101, marker on the first packet, end bit last.
            dtmf = [
                bytes(RtpHeader(101, 10 + i, 8000, 0xA, marker=i == 0))
                + bytes([5, 0x80 if i == 2 else 0])
                + (160 * (i + 1)).to_bytes(2, "big")
                for i in range(3)
            ]
            await caller.send(dtmf, a_local)
            await callee.wait_count(6)
            # The callee's SR on its RTCP port, then the caller's RR on its mux port.
            sr = SenderReport(0xB, 0xE8A1B2C3, 0x80000000, 480, 3, 480)
            await callee_rtcp.send([bytes(sr)], Endpoint(b_local.address, b_local.port + 1))
            await caller.wait_count(4)
            await asyncio.sleep(0.05)
            rr = ReceiverReport(0xA, (ReportBlock(0xB, 64, 1, 3, 40, sr.ntp_middle, 0),))
            await caller.send([bytes(rr)], a_local)
            await callee_rtcp.wait_count(1)
            stats = await relay.stats(session.session_id)
            for peer in (caller, callee, callee_rtcp):
                peer.close()
            return locals()

    r = run(lab, scenario)
    a = r["stats"].streams[0].a
    assert [data for data, _ in r["callee"].received[3:]] == r["dtmf"]  # untouched
    assert a.counters.kernel_packets == 3  # the DTMF went through the kernel
    assert a.counters.rtcp_packets == 1  # the RR was spared for user space
    assert r["callee_rtcp"].received[0][0] == bytes(r["rr"])
    assert r["callee_rtcp"].received[0][1] == Endpoint(r["b_local"].address, r["b_local"].port + 1)
    assert r["caller"].received[3][0] == bytes(r["sr"])  # SR reached the mux port
    assert a.quality.fraction_lost == 0.25 and a.quality.jitter == 40
    assert a.quality.rtt is not None and 0.04 <= a.quality.rtt < 1.0


@pytest.mark.parametrize("suite", [s.value for s in SrtpSuite])
def test_srtp_to_rtp_both_directions(
    lab: Lab, suite: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Caller on SRTP (SDES), callee on plain RTP: the relay terminates SRTP, drops and
    counts forged packets, keeps the stream in user space and never logs a key."""
    from sbc.media.srtp import SdesCrypto, SrtpSuite, SrtpTransform

    caplog.set_level("DEBUG", logger="sbc.media")
    srtp_suite = SrtpSuite(suite)
    caller_key = SdesCrypto.generate(srtp_suite)

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config()) as relay:
            session = await relay.allocate(
                "call-s",
                [
                    StreamOffer(
                        LegOffer(
                            "outside",
                            4,
                            Endpoint.of(ADDR[4]["caller"], 34000),
                            srtp=srtp_suite,
                            crypto=caller_key,
                        ),
                        LegOffer("inside", 4, Endpoint.of(ADDR[4]["callee"], 5000)),
                    )
                ],
            )
            a = session.streams[0].a
            relay_key = a.local_crypto
            assert relay_key is not None and relay_key.suite is srtp_suite
            caller_tx = SrtpTransform(caller_key, outbound=True)
            caller_rx = SrtpTransform(relay_key, outbound=False)
            caller = await Peer.open(lab, "caller", ADDR[4]["caller"], 34000)
            callee = await Peer.open(lab, "callee", ADDR[4]["callee"], 5000)
            plain_up = [rtp(i, 0xA, bytes([i]) * 160) for i in range(20)]
            await caller.send([caller_tx.protect(p, False) for p in plain_up], a.local)
            # Forged: right header, garbage tag; and a replayed copy of a real packet.
            forged = [
                caller_tx.protect(rtp(100 + i, 0xA), False)[:-4] + b"\0\0\0\0" for i in range(5)
            ]
            replay = [caller_tx.protect(rtp(200, 0xA), False)] * 2
            await caller.send(forged + replay, a.local)
            await callee.wait_count(21)
            plain_down = [rtp(i, 0xB, bytes([255 - i]) * 160) for i in range(20)]
            await callee.send(plain_down, session.streams[0].b.local)
            await caller.wait_count(20)
            stats = await relay.stats(session.session_id)
            for peer in (caller, callee):
                peer.close()
            return locals()

    r = run(lab, scenario)
    assert [d for d, _ in r["callee"].received[:20]] == r["plain_up"]  # decrypted
    assert len(r["callee"].received) == 21  # + one copy of the replayed packet
    received_down = [r["caller_rx"].unprotect(d, False) for d, _ in r["caller"].received]
    assert received_down == r["plain_down"]  # encrypted with the relay's key
    assert all(d not in r["plain_down"] for d, _ in r["caller"].received)
    a = r["stats"].streams[0].a
    assert a.counters.dropped_auth == 6  # 5 forged + 1 replay
    assert a.counters.packets == 21
    assert not r["stats"].streams[0].kernel
    logged = caplog.text
    for key in (r["caller_key"], r["relay_key"]):
        assert str(key).split("inline:")[1] not in logged


def test_kernel_path_comes_back_after_a_ruleset_flush(lab: Lab) -> None:
    """`nft flush ruleset` takes the relay's table with its forwards: the stream's
    RTP reaches user space, which relays it; `reopen_kernel` (what `sbc run` does
    when its table check finds the table gone) puts the base objects and the
    stream's forwards back, and the kernel carries the stream again."""

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config()) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            await event_of(relay, KernelPathEngaged)
            present_before = await relay.kernel_table_present()
            lab.run("sbc", "nft", "flush", "ruleset")
            present_after_flush = await relay.kernel_table_present()
            # Meanwhile: no rules, the packets reach the relay's sockets.
            await call.caller.send([rtp(WARMUP + i, 0xA) for i in range(5)], call.a_local)
            got_meanwhile = await call.callee.wait_count(WARMUP + 5)
            streams = await relay.reopen_kernel()
            present_again = await relay.kernel_table_present()
            objects = nft_media_objects(lab)
            await call.caller.send([rtp(100 + i, 0xA) for i in range(BULK)], call.a_local)
            got = await call.callee.wait_count(WARMUP + 5 + BULK)
            stats = await relay.stats(call.session_id)
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    assert (r["present_before"], r["present_after_flush"], r["present_again"]) == (
        True,
        False,
        True,
    )
    assert r["got_meanwhile"] == WARMUP + 5
    assert r["streams"] == 1
    assert r["objects"]["chains"] == [PREROUTING, POSTROUTING]
    assert len(r["objects"]["forwards"]) == 2
    assert r["got"] == WARMUP + 5 + BULK
    a = r["stats"].streams[0].a
    assert r["stats"].streams[0].kernel
    # The kernel counted the stream's packets after the reopen; user space the rest.
    assert a.counters.kernel_packets == BULK, a.counters


def test_a_relatch_in_the_kernel_path_keeps_the_counts(lab: Lab) -> None:
    """A source that moves while its stream is in the kernel path (new port and
    SSRC, relatch_on_new_ssrc) gets new forwards, whose counters start at zero:
    what the old ones counted stays in the leg's totals."""

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config(relatch_on_new_ssrc=True)) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            await event_of(relay, KernelPathEngaged)
            await call.caller.send([rtp(WARMUP + i, 0xA) for i in range(BULK)], call.a_local)
            assert await call.callee.wait_count(WARMUP + BULK) == WARMUP + BULK
            await relay.stats(call.session_id)  # the kernel's count read once
            moved = await Peer.open(lab, "caller", ADDR[4]["caller"], 34002)
            await moved.send([rtp(i, 0xC) for i in range(3)], call.a_local)
            await event_of(relay, KernelPathEngaged)
            await moved.send([rtp(3 + i, 0xC) for i in range(100)], call.a_local)
            got = await call.callee.wait_count(WARMUP + BULK + 103)
            stats = await relay.stats(call.session_id)
            moved.close()
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    assert r["got"] == WARMUP + BULK + 103
    a = r["stats"].streams[0].a.counters
    assert a.packets + a.kernel_packets == WARMUP + BULK + 103, a
    assert a.kernel_packets == 100, a


@pytest.mark.parametrize("kernel", [False, True], ids=["userspace", "kernel"])
def test_a_caller_whose_nat_binding_moved_is_heard_again_after_its_silence(
    lab: Lab, kernel: bool
) -> None:
    """relatch_after_silence: the caller's NAT gives it a new port mid-call. While
    the old one is heard, the new one is dropped (strict source holds); once the old
    one has been silent long enough, three packets in a row from the new one move
    the latch, and the callee's media follows it there."""

    async def scenario() -> dict[str, Any]:
        config = media_config(kernel_path=kernel, relatch_after_silence=0.5, poll_interval=0.05)
        async with MediaRelay(config) as relay:
            call = await setup_call(lab, relay, 4)
            await warm_up(call, 4)
            if kernel:
                await event_of(relay, KernelPathEngaged)
            moved = await Peer.open(lab, "caller", ADDR[4]["caller"], 34002)
            await call.caller.send([rtp(WARMUP + i, 0xA) for i in range(10)], call.a_local)
            await moved.send([rtp(100 + i, 0xA) for i in range(5)], call.a_local)
            while_heard = await call.callee.wait_count(WARMUP + 11, timeout=0.5)
            await asyncio.sleep(0.8)  # the old binding falls silent
            await moved.send([rtp(200 + i, 0xA) for i in range(3)], call.a_local)
            relatched = await event_of(relay, SourceLatched)
            while not relatched.relatched:  # the warm-up's latches come first
                relatched = await event_of(relay, SourceLatched)
            if kernel:
                await event_of(relay, KernelPathEngaged)
            await moved.send([rtp(300 + i, 0xA) for i in range(20)], call.a_local)
            got = await call.callee.wait_count(WARMUP + 10 + 21)
            await call.callee.send([rtp(WARMUP + i, 0xB) for i in range(10)], call.b_local)
            heard_back = await moved.wait_count(10)
            await asyncio.sleep(0.1)
            stats = await relay.stats(call.session_id)
            moved.close()
            call.caller.close()
            call.callee.close()
            return locals()

    r = run(lab, scenario)
    assert r["while_heard"] == WARMUP + 10  # the new port's packets were dropped
    assert r["relatched"].relatched and r["relatched"].source == Endpoint.of(
        ADDR[4]["caller"], 34002
    )
    # The third packet in a row moved the latch and went through; the two before not.
    assert r["got"] == WARMUP + 10 + 21
    seqs = [RtpHeader.parse(data).sequence for data, _ in r["call"].callee.received]
    assert 200 not in seqs and 201 not in seqs and 202 in seqs
    assert r["heard_back"] == 10
    assert len(r["call"].caller.received) == WARMUP  # nothing more to the old binding
    a = r["stats"].streams[0].a
    assert a.rtp_latch.source == Endpoint.of(ADDR[4]["caller"], 34002)
    assert a.counters.dropped_source == 5 + 2
    assert r["stats"].streams[0].kernel is kernel
