"""The media relay in worker processes (`sbc.media.workers`): real child processes,
real UDP sockets on loopback.

What an operator relies on: sessions spread over the workers and their media is
relayed; a worker's refusal reaches the B2BUA with its type; a worker that dies or
hangs ends only its own calls (a MediaLost each) and is started again; a close
leaves no process and no bound port behind; the configuration refuses what cannot
work, with the place.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import signal
import socket
import textwrap
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sbc.config.loader import ConfigError, load_config_text
from sbc.media import workers as workers_module
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.control import MediaError, MediaLost
from sbc.media.latching import Latch
from sbc.media.relay import new_event_loop
from sbc.media.rtp import RtpHeader
from sbc.media.session import (
    LegCounters,
    LegOffer,
    LegState,
    MediaSession,
    MediaStream,
    Side,
    StreamOffer,
)
from sbc.media.values import Direction, Endpoint
from sbc.media.worker import MAX_FRAME, FrameError, frame, read_frame
from sbc.media.workers import MediaWorkers, WorkersUnavailable, port_slices, worker_configs

LOOPBACK = IPv4Address("127.0.0.1")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on the loop the SBC runs on (uvloop when installed)."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


#: Ports of the relay in these tests (two workers: 46000-46099, 46100-46199).
PORT_MIN, PORT_MAX = 46000, 46199
T = TypeVar("T")


def config(**changes: object) -> MediaConfig:
    base = MediaConfig(
        realms=(
            RealmMediaAddress("outside", ipv4=LOOPBACK),
            RealmMediaAddress("inside", ipv4=LOOPBACK),
        ),
        port_min=PORT_MIN,
        port_max=PORT_MAX,
        kernel_path=False,
        port_quarantine=0.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def pool(workers: int = 2, **changes: object) -> AsyncIterator[MediaWorkers]:
    media = MediaWorkers(config(**changes), workers)
    await media.start()
    try:
        yield media
    finally:
        await media.close()


class Peer:
    """A phone's media socket on loopback."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(LOOPBACK, self.sock.getsockname()[1])

    def send(self, port: int, seq: int) -> None:
        packet = bytes(RtpHeader(0, seq, seq * 160, 0x1234)) + b"\xff" * 160
        self.sock.sendto(packet, ("127.0.0.1", port))

    async def receive(self, timeout: float = 3.0) -> tuple[bytes, int]:
        # In a thread: uvloop has no sock_recvfrom.
        self.sock.settimeout(timeout)
        data, addr = await asyncio.to_thread(self.sock.recvfrom, 2048)
        return data, addr[1]

    def close(self) -> None:
        self.sock.close()


@contextmanager
def peers() -> Iterator[tuple[Peer, Peer]]:
    a, b = Peer(), Peer()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def call_offer(a: Peer, b: Peer) -> tuple[StreamOffer, ...]:
    return (
        StreamOffer(LegOffer("outside", remote=a.endpoint), LegOffer("inside", remote=b.endpoint)),
    )


async def relayed_both_ways(session: MediaSession, a: Peer, b: Peer, seq: int = 1) -> None:
    """RTP from a reaches b from the relay's b-side port, and back."""
    stream = session.streams[0]
    a.send(stream.a.local.port, seq)
    data, source = await b.receive()
    assert source == stream.b.local.port and RtpHeader.parse(data).sequence == seq
    b.send(stream.b.local.port, seq)
    data, source = await a.receive()
    assert source == stream.a.local.port and RtpHeader.parse(data).sequence == seq


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: its parent reaps it in `wait`.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def eventually(check: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- the port range, cut ---------------------------------------------------------------


def test_port_slices_cut_the_range_into_whole_pairs() -> None:
    assert port_slices(20000, 29999, 4) == [
        (20000, 22499),
        (22500, 24999),
        (25000, 27499),
        (27500, 29999),
    ]
    # An odd lowest port: pairs start on the even port after it.
    assert port_slices(20001, 20010, 2) == [(20002, 20005), (20006, 20009)]
    slices = port_slices(30000, 30013, 3)  # 7 pairs
    assert [(high - low + 1) // 2 for low, high in slices] == [2, 2, 3]
    assert all(low % 2 == 0 for low, _ in slices)
    with pytest.raises(ValueError, match="3 RTP/RTCP pairs"):
        port_slices(30000, 30005, 4)


def test_each_worker_relays_in_user_space_on_its_own_slice() -> None:
    configs = worker_configs(config(kernel_path=True, port_seed=7), 2)
    assert [(c.port_min, c.port_max) for c in configs] == [(46000, 46099), (46100, 46199)]
    assert not any(c.kernel_path for c in configs)
    assert [c.port_seed for c in configs] == [7, 8]
    assert all(c.realms == config().realms for c in configs)


# -- frames ----------------------------------------------------------------------------


def decode(data: bytes) -> object:
    """A frame's value, read as the other end reads it."""

    async def read() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader)

    return run(read())


def sample_session(port: int) -> MediaSession:
    hint = Endpoint(LOOPBACK, 30000)
    a = LegState("outside", Endpoint(LOOPBACK, port), remote_hint=hint)
    b = LegState("inside", Endpoint(IPv4Address("127.0.0.3"), port), remote_hint=hint)
    return MediaSession("0123456789ab", "call", (MediaStream(0, a, b),), created=1.0)


def test_a_frame_carries_a_session_unchanged_and_shares_its_common_values() -> None:
    first, second = sample_session(40000), sample_session(40002)
    one, two = decode(frame(first)), decode(frame(second))
    assert one == first and two == second
    assert isinstance(one, MediaSession) and isinstance(two, MediaSession)
    a, b = one.streams[0].a, two.streams[0].b
    assert a.remote_hint is not None and b.remote_hint is not None
    # One object each in the receiving process, however many sessions carry them.
    assert a.rtp_latch is b.rtcp_latch and a.rtp_latch == Latch()
    assert a.counters is b.counters and a.quality is b.quality
    assert a.remote_hint.address is b.remote_hint.address
    assert a.direction is Direction.SENDRECV
    # Counters that moved are sent as they are.
    moved = replace(first.streams[0].a, counters=LegCounters(packets=3))
    assert decode(frame(moved)) == moved


def forged(pid: object) -> bytes:
    """A frame whose value holds the persistent id ``pid``."""

    class Forger(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return pid if obj == "here" else None

    out = io.BytesIO()
    Forger(out, protocol=pickle.HIGHEST_PROTOCOL).dump(["here"])
    body = out.getvalue()
    return len(body).to_bytes(4, "big") + body


def test_a_frame_names_only_the_sbcs_own_values_and_refuses_others() -> None:
    assert decode(frame(socket.AF_INET)) is socket.AF_INET  # not the SBC's: as usual
    assert decode(forged("latch")) == [Latch()]
    for pid in (("enum", "os", "path", "sep"), ("enum", "sbc.media", "nothing", "x"), "nope"):
        with pytest.raises(FrameError, match="does not unpickle"):
            decode(forged(pid))
    with pytest.raises(FrameError, match="frame of"):
        decode((MAX_FRAME + 1).to_bytes(4, "big"))


# -- real workers ----------------------------------------------------------------------


def test_sessions_spread_over_the_workers_and_their_media_is_relayed() -> None:
    async def main() -> None:
        async with pool() as media:
            with peers() as (a1, b1), peers() as (a2, b2):
                first = await media.allocate("call-1", call_offer(a1, b1))
                second = await media.allocate("call-2", call_offer(a2, b2))
                status = media.status()
                assert [w["sessions"] for w in status] == [1, 1]
                assert all(w["ready"] and w["starts"] == 1 for w in status)
                assert len({w["pid"] for w in status} | {os.getpid()}) == 3
                slices = sorted(
                    (session.streams[0].a.local.port, session.streams[0].b.local.port)
                    for session in (first, second)
                )
                assert all(PORT_MIN <= p <= 46099 for p in slices[0])
                assert all(46100 <= p <= PORT_MAX for p in slices[1])
                assert media.held_ports() == {
                    s.session_id: {
                        port
                        for side in Side
                        for port in (
                            s.streams[0].leg(side).local.port,
                            s.streams[0].leg(side).local.port + 1,
                        )
                    }
                    for s in (first, second)
                }
                await relayed_both_ways(first, a1, b1)
                await relayed_both_ways(second, a2, b2, seq=9)
                counted = await media.stats(first.session_id)
                assert counted.streams[0].a.counters.packets == 1
                # A re-offer goes to the worker that holds the session.
                updated = await media.update(first.session_id, call_offer(a1, b1))
                assert updated.streams[0].a.local == first.streams[0].a.local
                final = await media.delete(first.session_id)
                assert final.streams[0].b.counters.packets == 1
                assert media.sessions() == (second.session_id,)
                assert [w["sessions"] for w in media.status()] in ([0, 1], [1, 0])

    run(main())


def test_a_replicated_session_is_restored_on_the_worker_of_its_ports() -> None:
    """HA takeover: the state a peer node replicated comes back on the same ports,
    in the worker whose slice holds them, and relays at once."""

    async def main() -> None:
        async with pool() as media:
            with peers() as (a, b), peers() as (a2, b2):
                await media.allocate("other", call_offer(a2, b2))  # worker 0 is busier
                session = await media.allocate("call", call_offer(a, b))
                await relayed_both_ways(session, a, b)
                state = await media.stats(session.session_id)
                await media.delete(session.session_id)  # the old node's copy is gone
                restored = await media.restore(state)
                assert restored.streams[0].a.local == session.streams[0].a.local
                port = session.streams[0].a.local.port
                ranges = [tuple(map(int, str(w["ports"]).split("-"))) for w in media.status()]
                holder = next(i for i, (low, high) in enumerate(ranges) if low <= port <= high)
                assert holder == 1  # "other" went to worker 0, the least loaded then
                assert [w["sessions"] for w in media.status()] == [1, 1]
                await relayed_both_ways(restored, a, b, seq=2)
                with pytest.raises(MediaError, match="exists already"):
                    await media.restore(state)

    run(main())


def test_each_workers_log_lines_name_it(capfd: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with pool():
            pass

    run(main())
    err = capfd.readouterr().err
    for index in (0, 1):
        assert f"sbc.media.worker[worker {index}] - media worker {index} (pid" in err, err


def test_a_workers_refusal_reaches_the_caller_with_its_type() -> None:
    async def main() -> None:
        async with pool() as media:
            with pytest.raises(MediaError) as refused:
                await media.allocate(
                    "call", (StreamOffer(LegOffer("nowhere"), LegOffer("inside")),)
                )
            assert "nowhere" in str(refused.value)
            assert media.sessions() == ()
            with pytest.raises(KeyError):  # UnknownSession
                await media.delete("0123456789ab")
            # The workers go on.
            with peers() as (a, b):
                session = await media.allocate("call", call_offer(a, b))
                await relayed_both_ways(session, a, b)

    run(main())


def test_a_dead_worker_ends_only_its_calls_and_is_started_again() -> None:
    async def main() -> None:
        async with pool() as media:
            with peers() as (a1, b1), peers() as (a2, b2), peers() as (a3, b3):
                doomed = await media.allocate("call-1", call_offer(a1, b1))
                kept = await media.allocate("call-2", call_offer(a2, b2))
                victim = next(
                    w
                    for w in media.status()
                    if PORT_MIN
                    <= doomed.streams[0].a.local.port
                    <= int(str(w["ports"]).split("-")[1])
                )
                os.kill(int(str(victim["pid"])), signal.SIGKILL)
                event = await media.next_event(5.0)
                assert isinstance(event, MediaLost), event
                assert (event.session_id, event.call_id) == (doomed.session_id, "call-1")
                assert "exit code -9" in event.reason
                assert media.sessions() == (kept.session_id,)
                # The other worker's call goes on.
                await relayed_both_ways(kept, a2, b2)
                # Until the worker is back, new calls go to the other one.
                await eventually(lambda: all(w["ready"] for w in media.status()))
                again = next(w for w in media.status() if w["starts"] == 2)
                assert again["lost_calls"] == 1 and again["pid"] != victim["pid"]
                assert not alive(int(str(victim["pid"])))
                fresh = await media.allocate("call-3", call_offer(a3, b3))
                assert [w["sessions"] for w in media.status()] == [1, 1]
                await relayed_both_ways(fresh, a3, b3)

    run(main())


def test_a_worker_sent_sigterm_closes_its_relay_exits_and_is_started_again() -> None:
    async def main() -> None:
        async with pool(workers=1) as media:
            with peers() as (a, b):
                session = await media.allocate("call", call_offer(a, b))
                pid = int(str(media.status()[0]["pid"]))
                os.kill(pid, signal.SIGTERM)
                event = await media.next_event(5.0)
                assert isinstance(event, MediaLost) and event.session_id == session.session_id
                assert "exit code 0" in event.reason  # a clean exit, not a crash
                await eventually(lambda: media.status()[0]["ready"])
                # Its ports were given back: the worker after it binds them again.
                again = await media.allocate("call", call_offer(a, b))
                await relayed_both_ways(again, a, b)

    run(main())


def test_a_dead_workers_ports_rest_for_the_quarantine_before_it_comes_back() -> None:
    async def main() -> None:
        async with pool(workers=1, port_quarantine=1.5) as media:
            with peers() as (a, b):
                await media.allocate("call", call_offer(a, b))
                os.kill(int(str(media.status()[0]["pid"])), signal.SIGKILL)
                await media.next_event(5.0)
                lost_at = asyncio.get_running_loop().time()
                await asyncio.sleep(1.0)
                assert not media.status()[0]["ready"]
                await eventually(lambda: media.status()[0]["ready"])
                assert asyncio.get_running_loop().time() - lost_at >= 1.5

    run(main())


def test_a_hung_worker_is_killed_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "REQUEST_TIMEOUT", 0.5)

    async def main() -> None:
        async with pool(workers=1) as media:
            with peers() as (a, b):
                session = await media.allocate("call", call_offer(a, b))
                pid = int(str(media.status()[0]["pid"]))
                os.kill(pid, signal.SIGSTOP)
                try:
                    with pytest.raises(MediaError, match="did not answer"):
                        await media.stats(session.session_id)
                    event = await media.next_event(5.0)
                    assert isinstance(event, MediaLost) and event.session_id == session.session_id
                    with pytest.raises(WorkersUnavailable):
                        await media.allocate("call", call_offer(a, b))
                    await eventually(lambda: media.status()[0]["ready"])
                finally:
                    if alive(pid):
                        os.kill(pid, signal.SIGCONT)
                assert not alive(pid)
                session = await media.allocate("call", call_offer(a, b))
                await relayed_both_ways(session, a, b)

    run(main())


def test_close_stops_every_worker_and_frees_every_port() -> None:
    async def main() -> list[int]:
        async with pool() as media:
            with peers() as (a, b):
                sessions = [await media.allocate(f"call-{i}", call_offer(a, b)) for i in range(4)]
            pids = [int(str(w["pid"])) for w in media.status()]
        assert not any(alive(pid) for pid in pids)
        return [
            port for s in sessions for side in Side for port in (s.streams[0].leg(side).local.port,)
        ]

    ports = run(main())
    for port in ports:
        for p in (port, port + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", p))


def test_a_worker_that_cannot_start_fails_the_start_and_leaves_nothing() -> None:
    async def main() -> None:
        media = MediaWorkers(config(), 2, python="/bin/false")
        with pytest.raises(MediaError, match="did not start"):
            await media.start()
        assert not any(w["ready"] for w in media.status())

    run(main())


# -- configuration ---------------------------------------------------------------------

CONFIG = """\
sip:
  listen: [{transport: udp, address: 127.0.0.1, port: 0}]
realms:
  - name: outside
    listen: [{transport: udp, address: 198.51.100.1, port: 5060}]
    media_address: 198.51.100.1
media:
  port_min: 30000
  port_max: 30007
"""


def load(text: str) -> object:
    return load_config_text(textwrap.dedent(text), "sbc.yaml", Path("/etc/sbc"))


def test_workers_need_the_kernel_path_off_and_a_pair_each() -> None:
    with pytest.raises(ConfigError) as info:
        load(CONFIG + "  workers: 2\n")
    assert "sbc.yaml" in str(info.value) and "media.workers" in str(info.value)
    assert "kernel_path: false" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(CONFIG + "  workers: 5\n  kernel_path: false\n")
    assert "media.workers: 5 workers for 4 RTP/RTCP pairs" in str(info.value)
    loaded = load(CONFIG + "  workers: 4\n  kernel_path: false\n")
    assert loaded.media.workers == 4  # type: ignore[attr-defined]


def test_an_sbc_whose_workers_cannot_start_says_so_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sbc.app import serve
    from sbc.config.loader import load_config

    async def cannot(self: MediaWorkers, worker: object) -> None:
        raise MediaError("media worker 0 did not start (exit 1)")

    monkeypatch.setattr(MediaWorkers, "_spawn", cannot)
    path = tmp_path / "sbc.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        state_dir: {tmp_path / "state"}
        sip:
          listen: [{{transport: udp, address: 127.0.0.1, port: 0}}]
        management:
          listen: {{address: 127.0.0.1, port: 0}}
        firewall: {{enabled: false}}
        media: {{workers: 2, kernel_path: false, port_min: 46200, port_max: 46299}}
        realms:
          - name: lan
            listen: [{{transport: udp, address: 127.0.0.1, port: 0}}]
            media_address: 127.0.0.1
        """)
    )
    with caplog.at_level(logging.ERROR, logger="sbc.app"):
        assert run(serve(load_config(path), path)) == 1
    assert "x cannot start: media worker 0 did not start (exit 1)" in caplog.text
    assert "Traceback" not in caplog.text
