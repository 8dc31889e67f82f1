"""The interface the B2BUA drives the media relay through.

A `typing.Protocol`, so the relay can move to its own process later behind the same
calls; `sbc.media.relay.MediaRelay` is the in-process implementation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sbc.media.session import MediaSession, Side, StreamOffer
from sbc.media.values import Endpoint

logger = logging.getLogger(__name__)

#: Events kept for a slow consumer before the oldest are dropped.
MAX_PENDING_EVENTS = 10_000


class MediaError(RuntimeError):
    """A request the relay cannot satisfy; the message says why."""


class UnknownSession(MediaError, KeyError):
    """No relay session with that id (deleted, or never allocated)."""

    def __str__(self) -> str:
        return f"no media session {self.args[0]!r}"


@dataclass(frozen=True)
class MediaTimeout:
    """No accepted packet on any stream of the session for ``idle`` seconds."""

    session_id: str
    call_id: str
    idle: float
    on_hold: bool


@dataclass(frozen=True)
class MediaLost:
    """The session is gone with the process that relayed it (a media worker died):
    its ports relay nothing any more."""

    session_id: str
    call_id: str
    reason: str


@dataclass(frozen=True)
class SourceLatched:
    """A side's real media source was learnt (or re-learnt, ``relatched``)."""

    session_id: str
    stream: int
    side: Side
    rtcp: bool
    source: Endpoint
    relatched: bool = False


@dataclass(frozen=True)
class KernelPathEngaged:
    """RTP of a stream now goes through kernel rules."""

    session_id: str
    stream: int


@dataclass(frozen=True)
class RecordingFinished:
    """A recorded session ended: its files in the state directory."""

    session_id: str
    call_id: str
    pcap: Path
    #: None when no PCMU/PCMA was seen.
    wav: Path | None
    packets: int
    #: The size cap was reached; the files end early.
    truncated: bool


MediaEvent = MediaTimeout | MediaLost | SourceLatched | KernelPathEngaged | RecordingFinished


class MediaControl(Protocol):
    """Allocate, update, delete relay sessions; read their stats and events."""

    async def allocate(
        self, call_id: str, streams: Sequence[StreamOffer], *, record: bool = False
    ) -> MediaSession:
        """A new session with ports on each side's realm address for each stream.

        The session's ``streams[i].a.local`` / ``.b.local`` are what the SDP sent to
        each side must carry. ``record`` (policy) writes both directions to a pcap, and
        G.711 to a WAV, in the state directory; such a session stays in user space.
        Raises MediaError (unknown realm, no address of that family, ports exhausted,
        recording without a state directory).
        """
        ...

    async def update(self, session_id: str, streams: Sequence[StreamOffer]) -> MediaSession:
        """Apply a new offer/answer (re-INVITE, the answer to the first INVITE).

        A changed remote hint on a side forgets what was latched there; a direction
        other than sendrecv switches the session to the hold timeout; extra streams
        get ports.
        """
        ...

    async def delete(self, session_id: str) -> MediaSession:
        """End the session: kernel rules out, ports to quarantine; its final state."""
        ...

    async def stats(self, session_id: str) -> MediaSession:
        """The session with up-to-date counters and RTCP quality."""
        ...

    def events(self) -> AsyncIterator[MediaEvent]:
        """Events of all sessions, in order (one consumer)."""
        ...


class EventQueue:
    """The events of a `MediaControl`, kept for its consumer; past
    `MAX_PENDING_EVENTS` the oldest is dropped (and said)."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[MediaEvent] = asyncio.Queue()

    async def events(self) -> AsyncIterator[MediaEvent]:
        while True:
            yield await self._events.get()

    async def next_event(self, timeout: float | None = None) -> MediaEvent:
        """The next event (convenience for tests and simple consumers)."""
        return await asyncio.wait_for(self._events.get(), timeout)

    def _emit(self, event: MediaEvent) -> None:
        if self._events.qsize() >= MAX_PENDING_EVENTS:
            self._events.get_nowait()
            logger.warning("x media event queue full: oldest event dropped")
        self._events.put_nowait(event)
