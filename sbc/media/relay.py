"""The in-process media relay: userspace path (asyncio) plus the kernel fast path.

Every port pair is bound in user space. The first packets of each side are relayed
here, which is how sources are latched; once both sides of a stream are latched, and
both are of the same address family, the stream's RTP is handed to stateless
nftables rules (`sbc.media.kernel`) and user space only sees RTCP and strays (packets
from other sources, dropped and counted). Without nftables or CAP_NET_ADMIN the relay
says so once and keeps everything in user space.

Run it on uvloop when installed (`new_event_loop()` picks it); it works on plain
asyncio too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import random
import resource
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sbc.burst import BurstLog
from sbc.evolve import evolve
from sbc.media.batcher import KernelBatcher
from sbc.media.config import MediaConfig
from sbc.media.control import (
    EventQueue,
    KernelPathEngaged,
    MediaError,
    MediaTimeout,
    RecordingFinished,
    SourceLatched,
    UnknownSession,
)
from sbc.media.kernel import (
    KernelCounter,
    KernelForward,
    KernelMediaTable,
    KernelPathUnavailable,
)
from sbc.media.latching import Latch, LatchPolicy, LatchVerdict
from sbc.media.ports import PortAllocator, PortPair, PortsExhausted
from sbc.media.recording import CallRecorder
from sbc.media.rtcp import Rtcp, RtcpError, RtcpMonitor, hide_sdes, parse_compound
from sbc.media.rtp import is_rtcp, packet_ssrc, rtp_fits
from sbc.media.session import (
    LegCounters,
    LegOffer,
    LegState,
    MediaSession,
    MediaStream,
    Side,
    StreamOffer,
    relay_ports,
)
from sbc.media.srtp import SdesCrypto, SrtpAuthError, SrtpProtectError, SrtpTransform
from sbc.media.timeout import InactivityTimer
from sbc.media.values import Endpoint
from sbc.sip.message import random_hex

logger = logging.getLogger(__name__)

#: Attempts at binding a pair before giving up (ports busy on the host).
BIND_ATTEMPTS = 16
#: UDP sockets of one stream: RTP and RTCP on each side.
SOCKETS_PER_STREAM = 4
#: File descriptors the relay leaves to the rest of the process (SIP over TCP/TLS,
#: the management endpoint, the CDR database, logs): at most this many, at most an
#: eighth of the open-files limit. A session that would eat into them is refused at
#: once, like one that hit EMFILE, so /healthz still accepts connections.
DESCRIPTOR_RESERVE = 256
#: Seconds between two log lines about running out of descriptors: the first failure
#: of a burst is logged at once, the rest of the burst as a count.
DESCRIPTOR_LOG_INTERVAL = 10.0
#: The media poll waits at least this many times as long as its counter read took.
POLL_COST_FACTOR = 9.0
#: The bind errors that say the process (EMFILE) or the host (ENFILE) is out of file
#: descriptors: every other port would fail the same way, so there is no retry.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

T = TypeVar("T")


class DescriptorsExhausted(MediaError):
    """No file descriptor for a session's sockets (EMFILE, ENFILE, or the reserve
    the relay leaves to the rest of the process): the call is refused (503)."""


def descriptor_budget(reserve: int = DESCRIPTOR_RESERVE) -> int | None:
    """Descriptors the relay may hold: the open-files soft limit minus the reserve
    (None when there is no limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return soft - min(reserve, soft // 8)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Port(asyncio.DatagramProtocol):
    # Four a call: no instance dict (asyncio's protocol bases have empty slots).
    __slots__ = ("leg", "relay", "rtcp_port")

    def __init__(self, relay: MediaRelay, leg: _Leg, rtcp_port: bool) -> None:
        self.relay, self.leg, self.rtcp_port = relay, leg, rtcp_port

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay._packet(self.leg, self.rtcp_port, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is gone: the timeout will tell.
        logger.debug("x %s: %s", self.leg.state.local, exc)


@dataclass(eq=False, slots=True)
class _Leg:
    """Runtime of one side: frozen state plus hot, mutable counters and sockets."""

    stream: _Stream
    side: Side
    state: LegState
    pair: PortPair
    rtp: asyncio.DatagramTransport | None = None
    rtcp: asyncio.DatagramTransport | None = None
    monitor: RtcpMonitor = field(default_factory=RtcpMonitor)
    packets: int = 0
    bytes: int = 0
    rtcp_packets: int = 0
    rtcp_bytes: int = 0
    kernel_packets: int = 0
    kernel_bytes: int = 0
    dropped_source: int = 0
    dropped_other: int = 0
    dropped_auth: int = 0
    #: When the latched RTP (RTCP) source was last heard: by its packets in user
    #: space, by the kernel counter's growth (at a poll) in the kernel path.
    rtp_heard: float = 0.0
    rtcp_heard: float = 0.0
    #: SRTP: unprotects what the peer sends / protects what the relay sends it.
    inbound: SrtpTransform | None = None
    outbound: SrtpTransform | None = None
    #: The peer's key before the last re-offer, and its inbound context: the peer
    #: sends with it until the offer is answered, and again when the offer fails
    #: and the key comes back (a new context would restart its rollover counter).
    previous_inbound: tuple[SdesCrypto, SrtpTransform] | None = None

    def set_keys(self) -> None:
        """Build the SRTP transforms from the state's keys (a new or restored leg).
        A re-offer changes the peer's key only (`rekey_inbound`): the relay's own key
        and its outbound context stay, since a new context would restart the rollover
        counter and the keystream of that key (RFC 3711 3.3.1, 9.1)."""
        remote, local = self.state.remote_crypto, self.state.local_crypto
        self.inbound = None if remote is None else SrtpTransform(remote, outbound=False)
        self.previous_inbound = None
        self.outbound = None if local is None else SrtpTransform(local, outbound=True)

    def rekey_inbound(self, old: SdesCrypto | None) -> None:
        """The peer's key changed in a re-offer (``old``: the key before): its
        context is kept as ``previous_inbound``, and taken back when it returns."""
        remote, kept = self.state.remote_crypto, self.previous_inbound
        if remote is not None and kept is not None and _key_of(kept[0]) == _key_of(remote):
            inbound: SrtpTransform | None = kept[1]
        else:
            inbound = None if remote is None else SrtpTransform(remote, outbound=False)
        self.previous_inbound = None if old is None or self.inbound is None else (old, self.inbound)
        self.inbound = inbound

    def fold_kernel_counters(self) -> None:
        """The kernel's figures into the user counters, before its forwards go:
        new ones count from zero, and the totals must keep what the old counted."""
        self.packets += self.kernel_packets
        self.bytes += self.kernel_bytes
        self.kernel_packets = self.kernel_bytes = 0

    def load_counters(self, counters: LegCounters) -> None:
        for name in LegCounters.__dataclass_fields__:
            setattr(self, name, getattr(counters, name))

    def snapshot(self) -> LegState:
        counters = LegCounters(
            **{name: getattr(self, name) for name in LegCounters.__dataclass_fields__}
        )
        state, quality = self.state, self.monitor.quality
        if counters == state.counters and quality == state.quality:
            # Nothing counted yet (a new session): the state itself, shared with the
            # snapshot's holder (the B2BUA keeps one per call).
            return state
        return evolve(state, counters=counters, quality=quality)

    def close(self) -> None:
        for transport in (self.rtp, self.rtcp):
            if transport is not None:
                transport.close()
        self.rtp = self.rtcp = None


@dataclass(eq=False, slots=True)
class _Stream:
    session: _Session
    index: int
    legs: dict[Side, _Leg] = field(default_factory=dict)
    kernel: bool = False
    #: A kernel install is in flight.
    engaging: bool = False
    #: When the kernel counters of the stream were last read (0: not yet).
    counted_at: float = 0.0

    def forward_name(self, source: Side) -> str:
        return f"media_{self.session.session_id}_{self.index}_{source.value}"

    def forwards(self) -> list[KernelForward]:
        result = []
        for side in Side:
            leg, other = self.legs[side].state, self.legs[side.other].state
            assert leg.rtp_latch.source is not None and other.rtp_latch.source is not None
            result.append(
                KernelForward(
                    name=self.forward_name(side),
                    source=leg.rtp_latch.source,
                    local_in=leg.local,
                    local_out=other.local,
                    destination=other.rtp_latch.source,
                    spare_rtcp=leg.rtcp_mux,
                )
            )
        return result

    def kernel_eligible(self) -> bool:
        a, b = self.legs[Side.A].state, self.legs[Side.B].state
        return (
            # A recorded session must see its packets: it stays in user space.
            not self.session.recording
            # The rules are unverified for UDPTL (and fax calls are few): user space.
            and a.rtp
            and b.rtp
            and not a.srtp
            and not b.srtp
            and a.rtp_latch.latched
            and b.rtp_latch.latched
            and a.local.family == b.local.family
            and a.rtp_latch.source is not None
            and b.rtp_latch.source is not None
            and a.rtp_latch.source.family == b.rtp_latch.source.family == a.local.family
        )

    def snapshot(self) -> MediaStream:
        return MediaStream(
            self.index,
            self.legs[Side.A].snapshot(),
            self.legs[Side.B].snapshot(),
            kernel=self.kernel,
        )


@dataclass(eq=False, slots=True)
class _Session:
    session_id: str
    call_id: str
    created: float
    timer: InactivityTimer
    streams: list[_Stream] = field(default_factory=list)
    deleted: bool = False
    recording: bool = False
    recorder: CallRecorder | None = None

    def on_hold(self) -> bool:
        return any(leg.state.direction.on_hold for s in self.streams for leg in s.legs.values())

    def snapshot(self) -> MediaSession:
        return MediaSession(
            self.session_id,
            self.call_id,
            tuple(s.snapshot() for s in self.streams),
            self.created,
            recording=self.recording,
        )


def _key_of(crypto: SdesCrypto | None) -> tuple[object, bytes] | None:
    return None if crypto is None else (crypto.suite, crypto.key)


def _unprotect(leg: _Leg, data: bytes, rtcp: bool) -> bytes:
    """What ``leg``'s peer sent, by its key or by its previous one (SrtpAuthError:
    neither authenticates it). Once the peer's new key authenticates a packet, the
    offer that brought it was answered: the previous key is let go."""
    assert leg.inbound is not None
    try:
        clear = leg.inbound.unprotect(data, rtcp)
    except SrtpAuthError:
        if leg.previous_inbound is None:
            raise
        return leg.previous_inbound[1].unprotect(data, rtcp)
    if leg.previous_inbound is not None:
        leg.previous_inbound = None
    return clear


def _refusal(leg: _Leg, offer: LegOffer) -> str | None:
    """Why a re-offer cannot apply to ``leg``, or None."""
    state = leg.state
    if offer.realm != state.realm or offer.family != state.local.family:
        return (
            f"realm/family cannot change ({state.realm}/IPv{state.local.family} -> "
            f"{offer.realm}/IPv{offer.family})"
        )
    if offer.srtp is not None and state.local_crypto is None:
        # The relay's key is in the SDP the peer already has: it is made at allocation.
        return "a leg of plain RTP cannot become SRTP"
    return None


class MediaRelay(EventQueue):
    """`MediaControl` in this process. ``await start()`` before use, ``close()`` after."""

    def __init__(
        self,
        config: MediaConfig,
        *,
        kernel_factory: Callable[[], KernelMediaTable] = KernelMediaTable,
    ) -> None:
        self.config = config
        self._policy = LatchPolicy(
            config.strict_source, config.relatch_on_new_ssrc, config.relatch_after_silence
        )
        self._relatch_wait = config.relatch_after_silence
        self._ports = PortAllocator(
            config.port_min,
            config.port_max,
            config.port_quarantine,
            rng=None if config.port_seed is None else random.Random(config.port_seed),
        )
        self._kernel_factory = kernel_factory
        self._kernel: KernelMediaTable | None = None
        self._batcher: KernelBatcher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._sessions: dict[str, _Session] = {}
        #: UDP sockets bound now, and how many the relay may hold (None: no limit).
        self._sockets = 0
        self.descriptor_budget: int | None = descriptor_budget()
        self._descriptor_log = BurstLog(DESCRIPTOR_LOG_INTERVAL)
        super().__init__()
        self._poller: asyncio.Task[None] | None = None
        #: Kernel installs and moves started by the packet path: the loop keeps only
        #: weak references to tasks, and one collected mid-flight would strand a stream.
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Why the kernel path is off (None while it is on).
        self.kernel_unavailable: str | None = "not started"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the kernel path (clearing stale media rules of a previous run)."""
        self._loop = asyncio.get_running_loop()
        if self.config.kernel_path:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sbc-media-nft")
            try:
                kernel = await self._nft(self._kernel_factory)
                removed = await self._nft(kernel.remove_all_media_objects)
                await self._nft(kernel.open)
            except KernelPathUnavailable as exc:
                self._disable_kernel(str(exc))
            else:
                self._kernel = kernel
                self._batcher = KernelBatcher(kernel, self._nft)
                self.kernel_unavailable = None
                logger.info("- kernel fast path on (%d stale media objects removed)", removed)
        else:
            self._disable_kernel("disabled by configuration")
        self._poller = asyncio.create_task(self._poll(), name="sbc-media-poll")

    def _disable_kernel(self, reason: str) -> None:
        if self._kernel is None and self.kernel_unavailable not in (None, "not started"):
            return
        self._kernel = None
        self._batcher = None
        self.kernel_unavailable = reason
        # Once, at start or on the first failure: the relay goes on in user space.
        logger.warning("x kernel fast path unavailable (%s): relaying media in user space", reason)

    async def close(self) -> None:
        """Delete every session (rules out, sockets closed) and stop."""
        # One counter read and one transaction for every kernel stream: deleting the
        # sessions one by one reads all counters of the table each time, which took
        # minutes with a few thousand streams.
        streams = [s for session in self._sessions.values() for s in session.streams if s.kernel]
        if streams and self._batcher is not None:
            names = [s.forward_name(side) for s in streams for side in Side]
            try:
                self._take_counters(await self._batcher.remove(names, counters=True))
            except KernelPathUnavailable as exc:
                logger.error("x kernel rules not removed on close: %s", exc)
            for stream in streams:
                stream.kernel = False
        for session_id in list(self._sessions):
            # A deletion still running beside the stop may take one meanwhile.
            with contextlib.suppress(UnknownSession):
                await self.delete(session_id)
        # Installs in flight see their session deleted and take their rules out again,
        # through the batcher, which must still be there.
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._kernel is not None:
            # The base chains, sets and maps (and the table, when the firewall is off)
            # go too: after a stop `nft list ruleset` reads as before the start. The path
            # is off first, so an install still in flight queues no removal behind this.
            kernel, self._kernel = self._kernel, None
            batcher, self._batcher = self._batcher, None
            self.kernel_unavailable = "not started"
            if batcher is not None:
                await batcher.drain()
            try:
                done = await self._nft(kernel.teardown)
            except Exception as exc:  # the firewall's stop comes next: never raise here
                logger.error("x kernel base objects not removed on close: %s", exc)
            else:
                logger.info(
                    "- kernel fast path off (%d media objects removed, table %s)",
                    done.removed,
                    "deleted" if done.table_deleted else f"kept with {done.kept} other objects",
                )
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> MediaRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def kernel_enabled(self) -> bool:
        return self._kernel is not None

    async def kernel_table_present(self) -> bool | None:
        """Whether table inet sbc is there; None while the kernel path is off."""
        kernel = self._kernel
        if kernel is None:
            return None
        return await self._nft(kernel.table_present)

    async def reopen_kernel(self) -> int:
        """The table vanished under the relay (``nft flush ruleset``, a restart of
        nftables.service): its base objects again, and the forwards of the streams
        that were in the kernel path (their RTP reached user space meanwhile).
        Returns how many streams went back in. When the base objects cannot be made
        again the kernel path is off, as at a start without nftables: every stream
        in user space."""
        kernel, batcher = self._kernel, self._batcher
        if kernel is None or batcher is None:
            return 0
        await batcher.drain()
        streams = [s for session in self._sessions.values() for s in session.streams if s.kernel]
        for stream in streams:
            # What the lost forwards counted since the last poll is lost with them.
            stream.kernel = False
            for leg in stream.legs.values():
                leg.fold_kernel_counters()
        try:
            await self._nft(kernel.reopen)
        except KernelPathUnavailable as exc:
            self._disable_kernel(f"table not made again: {exc}")
            return 0
        again = [s for s in streams if s.kernel_eligible() and not s.session.deleted]
        await asyncio.gather(*(self._engage(s) for s in again))
        return sum(s.kernel for s in again)

    async def _nft(self, call: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    # -- MediaControl ----------------------------------------------------------------

    async def allocate(
        self, call_id: str, streams: Sequence[StreamOffer], *, record: bool = False
    ) -> MediaSession:
        if record and self.config.recording_dir is None:
            raise MediaError("recording needs a state directory (MediaConfig.state_dir)")
        now = self._now()
        budget = self.descriptor_budget
        needed = SOCKETS_PER_STREAM * len(streams)
        if budget is not None and self._sockets + needed > budget:
            raise self._out_of_descriptors(
                f"{self._sockets} media sockets open, {budget} allowed by the open-files limit"
            )
        session = _Session(
            session_id=random_hex(6),
            call_id=call_id,
            created=time.time(),
            timer=InactivityTimer(self.config.media_timeout, self.config.hold_timeout, now),
            recording=record,
        )
        try:
            for offer in streams:
                await self._add_stream(session, offer)
            if record:
                self._start_recording(session)
        except BaseException:
            self._teardown_sockets(session)
            self._stop_recording(session)
            raise
        self._sessions[session.session_id] = session
        if logger.isEnabledFor(logging.DEBUG):
            # Per call: DEBUG (the call's one INFO line is the B2BUA's).
            logger.debug(
                "- session %s call %s: %s",
                session.session_id,
                call_id,
                ", ".join(
                    f"{s.legs[Side.A].state.local}<->{s.legs[Side.B].state.local}"
                    for s in session.streams
                ),
            )
        return session.snapshot()

    async def update(self, session_id: str, streams: Sequence[StreamOffer]) -> MediaSession:
        session = self._session(session_id)
        # All or nothing: every stream and side is checked before any is changed.
        for index, offer in enumerate(streams[: len(session.streams)]):
            for side, leg_offer in ((Side.A, offer.a), (Side.B, offer.b)):
                refusal = _refusal(session.streams[index].legs[side], leg_offer)
                if refusal is not None:
                    raise MediaError(f"stream {index} side {side.value}: {refusal}")
        unlatch: list[_Stream] = []
        for index, offer in enumerate(streams):
            if index >= len(session.streams):
                await self._add_stream(session, offer)
                continue
            stream = session.streams[index]
            was = {
                side: (
                    stream.legs[side].state.rtcp_mux,
                    stream.legs[side].state.rtp,
                    stream.legs[side].state.srtp,
                )
                for side in Side
            }
            for side, leg_offer in ((Side.A, offer.a), (Side.B, offer.b)):
                leg = stream.legs[side]
                state = evolve(
                    leg.state,
                    rtcp_mux=leg_offer.rtcp_mux,
                    direction=leg_offer.direction,
                    remote_crypto=leg_offer.crypto or leg.state.remote_crypto,
                    # A T.38 re-INVITE (m=image udptl) and the one back to audio.
                    rtp=leg_offer.rtp,
                    encrypted=leg_offer.encrypted,
                )
                # A new key, not a new tag for the same key (a re-offer may number its
                # lines anew): a new inbound context would restart its rollover counter.
                rekey = _key_of(state.remote_crypto) != _key_of(leg.state.remote_crypto)
                chosen = leg_offer.local_crypto
                if chosen is not None and chosen != state.local_crypto and leg_offer.srtp:
                    # A key of another suite for a late offer (LegOffer.local_crypto):
                    # the old one reached no peer, so no packet was protected with it.
                    state = evolve(state, local_crypto=chosen)
                    leg.outbound = SrtpTransform(chosen, outbound=True)
                if leg_offer.srtp is None and state.local_crypto is not None:
                    # SRTP given up: the B2BUA kept a key ready for a first offer it had
                    # not seen (a late offer), and that offer was RTP. The keys go.
                    state = evolve(state, local_crypto=None, remote_crypto=None)
                    leg.inbound = leg.outbound = None
                    leg.previous_inbound = None
                    rekey = False
                if (
                    leg_offer.remote is not None
                    and leg.state.remote_hint is not None
                    and leg_offer.remote != leg.state.remote_hint
                ):
                    # The peer moved (new c=/m= in a re-INVITE): learn its source again.
                    state = evolve(state, rtp_latch=Latch(), rtcp_latch=Latch())
                    if stream not in unlatch:
                        unlatch.append(stream)
                old_key = leg.state.remote_crypto
                leg.state = evolve(state, remote_hint=leg_offer.remote or state.remote_hint)
                if rekey:
                    leg.rekey_inbound(old_key)
            if stream not in unlatch and any(
                (
                    stream.legs[side].state.rtcp_mux,
                    stream.legs[side].state.rtp,
                    stream.legs[side].state.srtp,
                )
                != was[side]
                for side in Side
            ):
                # The kernel rules spare RTCP only where rtcp-mux is on, and carry RTP
                # only: render again (or leave the kernel path).
                unlatch.append(stream)
        for stream in unlatch:
            await self._rehome(stream)
        # Any change of direction may shorten or lengthen the deadline; count it as
        # activity so a re-INVITE itself does not trip a timeout.
        session.timer.activity(self._now())
        return session.snapshot()

    async def delete(self, session_id: str) -> MediaSession:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise UnknownSession(session_id)
        session.deleted = True
        names = [s.forward_name(side) for s in session.streams if s.kernel for side in Side]
        if names and self._batcher is not None:
            # The final counters are read in the same round, just before the removal.
            try:
                counters = await self._batcher.remove(names, counters=True)
            except KernelPathUnavailable as exc:
                logger.error("x session %s: kernel rules not removed: %s", session_id, exc)
            else:
                self._take_counters(counters, (session,))
        final = session.snapshot()
        self._teardown_sockets(session)
        self._stop_recording(session)
        logger.debug("- session %s deleted", session_id)
        return final

    async def stats(self, session_id: str) -> MediaSession:
        session = self._session(session_id)
        if any(s.kernel for s in session.streams):
            await self._refresh_kernel_counters(only=session)
        return session.snapshot()

    def sessions(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def held_ports(self) -> dict[str, set[int]]:
        """Each live session's local RTP and RTCP ports, both legs: what a
        firewall's media pinholes must let in."""
        return {
            session_id: relay_ports(
                leg.state for stream in session.streams for leg in stream.legs.values()
            )
            for session_id, session in self._sessions.items()
        }

    async def restore(self, state: MediaSession) -> MediaSession:
        """Rebuild a session replicated from the peer node (HA takeover).

        The same ports are bound again and, for streams that were in the kernel path,
        the same rules are installed at once: media flows without re-latching.
        """
        if state.session_id in self._sessions:
            raise MediaError(f"media session {state.session_id} exists already")
        now = self._now()
        session = _Session(
            session_id=state.session_id,
            call_id=state.call_id,
            created=state.created,
            timer=InactivityTimer(self.config.media_timeout, self.config.hold_timeout, now),
            recording=state.recording,
        )
        try:
            if state.recording:
                # The old node's files stay there; this node starts a new part.
                self._start_recording(session)
            for stream_state in state.streams:
                stream = _Stream(session, stream_state.index)
                # In the session before its first bind: a failure on side b must
                # close side a's sockets and give its ports back too.
                session.streams.append(stream)
                for side in Side:
                    leg_state = stream_state.leg(side)
                    pair = PortPair(leg_state.local.address, leg_state.local.port)
                    self._ports.reserve(pair)
                    # A restored latch counts as just heard: no new source takes it over
                    # before its own has had the time to reach this node.
                    leg = _Leg(stream, side, leg_state, pair, rtp_heard=now, rtcp_heard=now)
                    leg.load_counters(leg_state.counters)
                    leg.monitor.quality = leg_state.quality
                    leg.set_keys()
                    stream.legs[side] = leg
                    await self._bind(leg)
        except BaseException:
            self._teardown_sockets(session)
            self._stop_recording(session)
            raise
        self._sessions[session.session_id] = session
        for stream, stream_state in zip(session.streams, state.streams, strict=True):
            for leg in stream.legs.values():
                # Kernel figures of the old node (loaded with the counters) become
                # history here: the kernel counters restart at zero on this node.
                leg.fold_kernel_counters()
            if stream_state.kernel and stream.kernel_eligible():
                await self._engage(stream)
        logger.info("- session %s restored", session.session_id)
        return session.snapshot()

    # -- internals -------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    async def _add_stream(self, session: _Session, offer: StreamOffer) -> None:
        """A stream with both legs bound, or none: a failure (ports exhausted on side
        b, say) or a deletion meanwhile gives back what was bound, so no half stream
        is left in the session for packets, snapshots and the deletion to trip on."""
        stream = _Stream(session, len(session.streams))
        try:
            for side, leg_offer in ((Side.A, offer.a), (Side.B, offer.b)):
                stream.legs[side] = await self._new_leg(stream, side, leg_offer)
            if session.deleted:
                raise UnknownSession(session.session_id)
        except BaseException:
            self._teardown_legs(stream.legs.values())
            raise
        session.streams.append(stream)

    async def _new_leg(self, stream: _Stream, side: Side, offer: LegOffer) -> _Leg:
        try:
            realm = self.config.realm(offer.realm)
        except KeyError:
            raise MediaError(f"unknown media realm {offer.realm!r}") from None
        address = realm.address(offer.family)
        if address is None:
            raise MediaError(f"realm {offer.realm!r} has no IPv{offer.family} media address")
        for _ in range(BIND_ATTEMPTS):
            try:
                pair = self._ports.allocate(address, self._now())
            except PortsExhausted as exc:
                raise MediaError(str(exc)) from exc
            state = LegState(
                realm=offer.realm,
                local=Endpoint(address, pair.rtp),
                remote_hint=offer.remote,
                rtcp_mux=offer.rtcp_mux,
                direction=offer.direction,
                local_crypto=(
                    None
                    if offer.srtp is None
                    else offer.local_crypto or SdesCrypto.generate(offer.srtp)
                ),
                remote_crypto=offer.crypto,
                rtp=offer.rtp,
                encrypted=offer.encrypted,
            )
            leg = _Leg(stream, side, state, pair)
            leg.set_keys()
            try:
                await self._bind(leg)
            except OSError as exc:
                self._ports.skip(pair)
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # Not this port's fault: every other one fails the same way.
                    raise self._out_of_descriptors(str(exc)) from exc
                logger.warning("x port pair %s:%d busy (%s)", address, pair.rtp, exc)
                continue
            return leg
        raise MediaError(f"no bindable port pair on {address} after {BIND_ATTEMPTS} attempts")

    def _out_of_descriptors(self, why: str) -> DescriptorsExhausted:
        """The error for a session refused for lack of descriptors, logged once per
        burst (thousands of calls a second would each log it)."""
        quiet = self._descriptor_log.hit(self._now())
        if quiet is not None:
            logger.error(
                "x media: out of file descriptors (%s): new calls get 503%s",
                why,
                f"; {quiet} more refused since the last report" if quiet else "",
            )
        return DescriptorsExhausted(f"out of file descriptors ({why})")

    async def _bind(self, leg: _Leg) -> None:
        loop = asyncio.get_running_loop()
        local = leg.state.local
        host = str(local.address)
        family = socket.AF_INET6 if local.family == 6 else socket.AF_INET
        try:
            for rtcp in (False, True):
                # Bound here, handed over bound: half the CPU of create_datagram_endpoint
                # resolving local_addr itself (four sockets a call).
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.bind((host, local.port + rtcp))
                    transport, _ = await loop.create_datagram_endpoint(
                        functools.partial(_Port, self, leg, rtcp),
                        sock=sock,
                    )
                except BaseException:
                    sock.close()
                    raise
                self._sockets += 1
                if rtcp:
                    leg.rtcp = transport
                else:
                    leg.rtp = transport
        except OSError:
            self._close_leg(leg)
            raise

    def _close_leg(self, leg: _Leg) -> None:
        self._sockets -= (leg.rtp is not None) + (leg.rtcp is not None)
        leg.close()

    def _start_recording(self, session: _Session) -> None:
        directory = self.config.recording_dir
        if directory is None:
            raise MediaError("recording needs a state directory (MediaConfig.state_dir)")
        try:
            # The session id, never the Call-ID (peer-chosen text), names the files.
            session.recorder = CallRecorder(directory, session.session_id)
        except OSError as exc:
            raise MediaError(f"recording not started: {exc}") from exc
        logger.info("- session %s recording to %s", session.session_id, directory)

    def _stop_recording(self, session: _Session) -> None:
        recorder, session.recorder = session.recorder, None
        if recorder is None:
            return
        try:
            files = recorder.close()
        except OSError as exc:
            logger.error("x session %s: recording not finished: %s", session.session_id, exc)
            return
        self._emit(
            RecordingFinished(
                session.session_id,
                session.call_id,
                files.pcap,
                files.wav,
                files.packets,
                files.truncated,
            )
        )

    def _teardown_sockets(self, session: _Session) -> None:
        self._teardown_legs(leg for stream in session.streams for leg in stream.legs.values())

    def _teardown_legs(self, legs: Iterable[_Leg]) -> None:
        now = self._now() if self._loop is not None else 0.0
        for leg in legs:
            self._close_leg(leg)
            with contextlib.suppress(ValueError):
                self._ports.release(leg.pair, now)

    def _packet(self, leg: _Leg, rtcp_port: bool, data: bytes, addr: tuple[Any, ...]) -> None:
        """One datagram on a leg's port: latch, count, relay to the other side."""
        stream = leg.stream
        session = stream.session
        if session.deleted:
            return
        state = leg.state
        if not state.rtp:
            self._opaque_packet(leg, rtcp_port, data, addr)
            return
        control = rtcp_port or (state.rtcp_mux and is_rtcp(data))
        if rtcp_port and state.rtcp_mux:
            leg.dropped_other += 1  # nothing is expected on the RTCP port with rtcp-mux
            return
        source = Endpoint.from_sockaddr(addr)
        now = self._now()
        silent_for = self._silent_for(leg, rtcp_port, now) if self._relatch_wait else 0.0
        if state.srtp:
            # Authenticate before latching: a forged packet must not win the latch.
            if leg.inbound is None:
                leg.dropped_other += 1  # the peer's key is not known yet
                return
            latch = state.rtcp_latch if rtcp_port else state.rtp_latch
            if latch.source is not None and source != latch.source:
                # A stranger to a latched port: when the source check refuses it
                # whatever its authentication says, it is dropped undecrypted (a flood
                # costs no SRTP work). The verdict is the one given after unprotect:
                # the SSRC is in the clear and unprotect leaves it (RFC 3711 3.1, 3.4).
                policy = self._policy
                _, verdict = latch.on_packet(source, packet_ssrc(data), policy, silent_for)
                if verdict is LatchVerdict.DROP:
                    leg.dropped_source += 1
                    return
            try:
                data = _unprotect(leg, data, control)
            except SrtpAuthError:
                leg.dropped_auth += 1
                return
        ssrc = packet_ssrc(data)
        if ssrc is None:
            leg.dropped_other += 1
            return
        # Checked before latching: a malformed packet must not win the latch.
        packets: tuple[Rtcp, ...] = ()
        if control and state.encrypted and not state.srtp:
            # SRTCP of the peers' own keys: ciphertext past its first header (SDES
            # CNAMEs included, nothing to hide or read), so it crosses as it is.
            if not is_rtcp(data):
                leg.dropped_other += 1
                return
            out = data
        elif control:
            try:
                packets = parse_compound(data)
                # Topology hiding: SDES CNAMEs name the sender (user@host).
                out = hide_sdes(data)
            except RtcpError as exc:
                logger.debug("x session %s: RTCP dropped: %s", session.session_id, exc)
                leg.dropped_other += 1
                return
        elif rtp_fits(data, padding=not state.encrypted or state.srtp):
            # SRTP passed through: its padding is inside the ciphertext.
            out = data
        else:
            leg.dropped_other += 1
            return
        on_rtcp_latch = rtcp_port
        latch = state.rtcp_latch if on_rtcp_latch else state.rtp_latch
        new_latch, verdict = latch.on_packet(source, ssrc, self._policy, silent_for)
        if new_latch is not latch:
            leg.state = (
                evolve(state, rtcp_latch=new_latch)
                if on_rtcp_latch
                else evolve(state, rtp_latch=new_latch)
            )
        if verdict is LatchVerdict.DROP or verdict is LatchVerdict.CANDIDATE:
            leg.dropped_source += 1
            return
        if verdict is not LatchVerdict.ACCEPT_FOREIGN:
            if on_rtcp_latch:
                leg.rtcp_heard = now
            else:
                leg.rtp_heard = now
        if verdict in (LatchVerdict.LATCHED, LatchVerdict.RELATCHED):
            self._latched(leg, on_rtcp_latch, source, verdict is LatchVerdict.RELATCHED)
        session.timer.activity(now)
        if session.recorder is not None:
            # Ciphertext into the capture, never the WAV.
            self._record(session, leg, rtcp_port, source, data, control or state.encrypted)
        other = stream.legs[leg.side.other]
        if control:
            destination = other.state.rtcp_destination
            transport = other.rtp if other.state.rtcp_mux else other.rtcp
        else:
            destination = other.state.rtp_destination
            transport = other.rtp
        if destination is None or transport is None:
            leg.dropped_other += 1
            return
        if other.outbound is not None:
            try:
                out = other.outbound.protect(out, control)
            except SrtpProtectError as exc:
                logger.debug("x session %s: not protected: %s", session.session_id, exc)
                leg.dropped_other += 1
                return
        if control:
            leg.rtcp_packets += 1
            leg.rtcp_bytes += len(data)
            if packets:
                # The peer reports on what it hears from the relay: the other side's RTP.
                leg.monitor.received(packets, now, other.state.rtp_latch.ssrc)
                other.monitor.sender_report_forwarded(packets, now)
        else:
            leg.packets += 1
            leg.bytes += len(data)
        transport.sendto(out, destination.sockaddr())
        if (
            verdict in (LatchVerdict.LATCHED, LatchVerdict.RELATCHED)
            and not on_rtcp_latch
            and self._kernel is not None
        ):
            if stream.kernel:
                self._spawn(self._rehome(stream))
            elif stream.kernel_eligible() and not stream.engaging:
                self._spawn(self._engage(stream))

    def _opaque_packet(
        self, leg: _Leg, rtcp_port: bool, data: bytes, addr: tuple[Any, ...]
    ) -> None:
        """One datagram of a stream that is not RTP (UDPTL: T.38 Annex D, RFC 3362):
        relayed as it is. It has no SSRC, so it latches on its source alone; it is
        never SRTP, parsed, or put in the kernel path."""
        if rtcp_port:
            leg.dropped_other += 1  # UDPTL uses one port: nothing is expected here
            return
        stream = leg.stream
        session = stream.session
        state = leg.state
        source = Endpoint.from_sockaddr(addr)
        latch = state.rtp_latch
        now = self._now()
        # No SSRC: a latched source is re-latched only after its silence
        # (relatch_after_silence), never for a new SSRC.
        silent_for = self._silent_for(leg, False, now) if self._relatch_wait else 0.0
        new_latch, verdict = latch.on_packet(source, None, self._policy, silent_for)
        if new_latch is not latch:
            leg.state = evolve(state, rtp_latch=new_latch)
        if verdict is LatchVerdict.DROP or verdict is LatchVerdict.CANDIDATE:
            leg.dropped_source += 1
            return
        if verdict is not LatchVerdict.ACCEPT_FOREIGN:
            leg.rtp_heard = now
        if verdict in (LatchVerdict.LATCHED, LatchVerdict.RELATCHED):
            self._latched(leg, False, source, verdict is LatchVerdict.RELATCHED)
        session.timer.activity(now)
        if session.recorder is not None:
            # Into the capture, never the WAV (as RTCP is): it is not audio.
            self._record(session, leg, False, source, data, True)
        other = stream.legs[leg.side.other]
        destination, transport = other.state.rtp_destination, other.rtp
        if destination is None or transport is None:
            leg.dropped_other += 1
            return
        leg.packets += 1
        leg.bytes += len(data)
        transport.sendto(data, destination.sockaddr())

    @staticmethod
    def _silent_for(leg: _Leg, rtcp: bool, now: float) -> float:
        """Seconds the latched source of ``leg``'s RTP (``rtcp``: RTCP) port has not
        been heard. In the kernel path its RTP never reaches user space: silence is
        what the counters showed, from their last growth to their last reading."""
        if rtcp:
            return now - leg.rtcp_heard
        stream = leg.stream
        if stream.kernel:
            return stream.counted_at - leg.rtp_heard if stream.counted_at else 0.0
        return now - leg.rtp_heard

    def _latched(self, leg: _Leg, rtcp: bool, source: Endpoint, relatched: bool) -> None:
        stream = leg.stream
        session_id = stream.session.session_id
        logger.info(
            "- session %s stream %d side %s %s %s %s",
            session_id,
            stream.index,
            leg.side.value,
            "RTCP" if rtcp else ("RTP" if leg.state.rtp else "UDP"),
            "re-latched to" if relatched else "latched to",
            source,
        )
        self._emit(SourceLatched(session_id, stream.index, leg.side, rtcp, source, relatched))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task the relay holds until it is done (awaited by close)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("x kernel path task failed", exc_info=exc)

    def _record(
        self,
        session: _Session,
        leg: _Leg,
        rtcp_port: bool,
        source: Endpoint,
        data: bytes,
        control: bool,
    ) -> None:
        assert session.recorder is not None
        local = leg.state.local_rtcp if rtcp_port else leg.state.local
        try:
            session.recorder.packet(leg.stream.index, leg.side, source, local, data, control)
        except OSError as exc:
            # A full disk ends the recording, never the call.
            logger.error("x session %s: recording stopped: %s", session.session_id, exc)
            self._stop_recording(session)

    async def _engage(self, stream: _Stream) -> None:
        """Put a stream's RTP in the kernel path."""
        if self._batcher is None or stream.kernel or stream.engaging:
            return
        stream.engaging = True
        forwards = stream.forwards()
        batcher = self._batcher
        try:
            await batcher.install(forwards)
        except KernelPathUnavailable as exc:
            logger.warning(
                "x session %s stream %d stays in user space: %s",
                stream.session.session_id,
                stream.index,
                exc,
            )
            return
        finally:
            stream.engaging = False
        if stream.session.deleted:
            with contextlib.suppress(KernelPathUnavailable):
                await batcher.remove([f.name for f in forwards])
            return
        stream.kernel = True
        logger.info(
            "- session %s stream %d: RTP in the kernel path (%s)",
            stream.session.session_id,
            stream.index,
            "; ".join(
                f"{f.source}->{f.local_in}=>{f.local_out}->{f.destination}" for f in forwards
            ),
        )
        self._emit(KernelPathEngaged(stream.session.session_id, stream.index))

    async def _disengage(self, stream: _Stream) -> None:
        """Back to user space (a side must be latched again)."""
        if self._batcher is None or not stream.kernel:
            return
        names = [stream.forward_name(s) for s in Side]
        self._take_counters(await self._batcher.remove(names, counters=True), (stream.session,))
        stream.kernel = False
        for leg in stream.legs.values():
            leg.fold_kernel_counters()

    async def _rehome(self, stream: _Stream) -> None:
        """A side re-latched while in the kernel path: rules for the new source."""
        try:
            await self._disengage(stream)
        except KernelPathUnavailable as exc:
            # Runs in update() and in a task of the packet path: neither may raise. The
            # old rules stay (the stream is still marked kernel): the deletion retries.
            logger.error(
                "x session %s stream %d: kernel rules not removed: %s",
                stream.session.session_id,
                stream.index,
                exc,
            )
            return
        if stream.kernel_eligible() and not stream.session.deleted:
            await self._engage(stream)

    async def _refresh_kernel_counters(self, only: _Session | None = None) -> None:
        """Read every kernel counter (in the batcher's next round) into the legs of
        every session, or ``only`` that one's."""
        sessions = self._sessions.values() if only is None else (only,)
        if self._batcher is None or not any(s.kernel for x in sessions for s in x.streams):
            return
        try:
            counters = await self._batcher.counters()
        except KernelPathUnavailable as exc:
            logger.error("x kernel counters not read: %s", exc)
            return
        self._take_counters(counters, sessions)

    def _take_counters(
        self, counters: dict[str, KernelCounter], sessions: Iterable[_Session] | None = None
    ) -> None:
        """Counters listed by the kernel into the kernel streams' legs of ``sessions``
        (default: all; a session ending takes only its own, or deleting thousands
        of calls would go over every session each time); a count that grew is
        media activity."""
        now = self._now()
        for session in self._sessions.values() if sessions is None else sessions:
            for stream in session.streams:
                if not stream.kernel:
                    continue
                stream.counted_at = now
                for side in Side:
                    counter = counters.get(stream.forward_name(side))
                    if counter is None:
                        continue
                    leg = stream.legs[side]
                    if counter.packets > leg.kernel_packets:
                        session.timer.activity(now)
                        leg.rtp_heard = now
                    leg.kernel_packets, leg.kernel_bytes = counter.packets, counter.bytes

    async def _poll(self) -> None:
        """Read kernel counters and check media timeouts every poll interval.

        Reading every counter costs O(forwards in the kernel) (0.5 s at 10,000 on
        the development machine): the wait after a read is at least POLL_COST_FACTOR
        times as long as the read took, so the poll takes at most ~1/(1 + factor) of
        the nftables thread, whatever the number of calls."""
        wait = self.config.poll_interval
        while True:
            await asyncio.sleep(wait)
            try:
                started = time.monotonic()
                await self._refresh_kernel_counters()
                wait = max(
                    self.config.poll_interval, POLL_COST_FACTOR * (time.monotonic() - started)
                )
                now = self._now()
                for session in list(self._sessions.values()):
                    idle = session.timer.check(now, session.on_hold)
                    if idle is not None:
                        on_hold = session.on_hold()
                        logger.info(
                            "- session %s: media timeout after %.1f s%s",
                            session.session_id,
                            idle,
                            " (on hold)" if on_hold else "",
                        )
                        self._emit(MediaTimeout(session.session_id, session.call_id, idle, on_hold))
            except asyncio.CancelledError:
                raise
            except Exception:  # the poller must survive one bad round
                logger.exception("x media poll failed")
