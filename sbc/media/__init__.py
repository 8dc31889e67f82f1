"""Media relay: sessions, latching, kernel fast path (nftables), userspace path."""

from sbc.media.config import MediaConfig, MediaConfigError, RealmMediaAddress
from sbc.media.control import (
    KernelPathEngaged,
    MediaControl,
    MediaError,
    MediaEvent,
    MediaLost,
    MediaTimeout,
    RecordingFinished,
    SourceLatched,
    UnknownSession,
)
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

__all__ = [
    "Direction",
    "Endpoint",
    "KernelPathEngaged",
    "LegCounters",
    "LegOffer",
    "LegState",
    "MediaConfig",
    "MediaConfigError",
    "MediaControl",
    "MediaError",
    "MediaEvent",
    "MediaLost",
    "MediaSession",
    "MediaStream",
    "MediaTimeout",
    "RealmMediaAddress",
    "RecordingFinished",
    "Side",
    "SourceLatched",
    "StreamOffer",
    "UnknownSession",
]
