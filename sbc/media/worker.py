"""One media worker process: ``python -m sbc.media.worker FD``.

`sbc.media.workers.MediaWorkers` starts one per ``media.workers`` and talks to it over
the Unix socket FD. Each message is a frame: four bytes of length, then a pickle
(both ends run the same code from the same installation, and the socket is a
private socketpair: nothing else can write to it).

- The first frame from the parent is a `WorkerHello`. The worker answers
  ``("ready", pid)`` once its relay is up.
- Then requests ``(request_id, method, args, kwargs)``, for the relay's
  `MediaControl` methods; each is answered with ``(request_id, True, result)`` or
  ``(request_id, False, exception)``. Requests run concurrently, as they would in
  one process (a deletion beside a set-up).
- Events of the relay go up as ``(0, True, event)``.
- ``(request_id, "close", (), {})`` ends the worker: its sessions are deleted and
  it answers once they are. End of file (the parent is gone) does the same with
  nobody to answer.

SIGINT is ignored (a Ctrl-C at the terminal reaches the whole process group; the
parent decides when its workers stop); SIGTERM closes the relay like ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from sbc import gc_tuning
from sbc.media.config import MediaConfig
from sbc.media.control import MediaError
from sbc.media.latching import Latch
from sbc.media.rtcp import RtcpQuality
from sbc.media.session import LegCounters

logger = logging.getLogger(__name__)

#: Descriptors a worker keeps for itself (its socket, recordings, the executor): a
#: worker holds nothing but media, so its reserve is smaller than the main process's.
WORKER_RESERVE = 64
#: The largest frame either side accepts (a session with many streams is a few KiB).
MAX_FRAME = 16 * 1024 * 1024
#: The relay methods a parent may call.
METHODS = frozenset({"allocate", "update", "delete", "stats", "restore"})
#: Request id of a frame that carries an event (requests count from 1).
EVENT = 0


@dataclass(frozen=True)
class WorkerHello:
    """What a worker needs to start: its slice of the relay, and how to log."""

    index: int
    config: MediaConfig
    log_level: str = "info"
    log_format: str = "text"


class FrameError(ValueError):
    """A frame that is too long or does not unpickle."""


# Values every session carries many of, sent by name. Unpickled, each would be a new
# object per session in the SIP process (a fresh unlatched Latch, zero counters and
# addresses for every leg: ~2 KiB a call, and the time to build them); by name, the
# receiving side hands out one shared object for each. All are immutable.
_DEFAULTS: dict[str, object] = {
    "latch": Latch(),
    "counters": LegCounters(),
    "quality": RtcpQuality(),
}
_DEFAULT_TYPES = {type(value): name for name, value in _DEFAULTS.items()}
#: Addresses received, by their packed bytes (bounded: relay addresses and peers).
_ADDRESSES: dict[bytes, IPv4Address | IPv6Address] = {}
_MAX_ADDRESSES = 65536
#: Enum members by (class, name), filled as they are first seen.
_MEMBERS: dict[tuple[str, str, str], enum.Enum] = {}


#: Types that are never shared: most of what a frame holds (a quick no).
_PLAIN = frozenset({int, str, float, bool, type(None), tuple, bytes, dict, list})


def _shared_id(obj: object) -> object:
    kind = type(obj)
    if kind in _PLAIN:
        return None
    if kind is IPv4Address or kind is IPv6Address:
        return ("ip", obj.packed)  # type: ignore[attr-defined]
    name = _DEFAULT_TYPES.get(kind)
    if name is not None:
        return name if obj == _DEFAULTS[name] else None
    if isinstance(obj, enum.Enum) and kind.__module__.startswith("sbc."):
        return ("enum", kind.__module__, kind.__qualname__, obj.name)
    return None


def _shared(pid: object) -> object:
    if isinstance(pid, str) and pid in _DEFAULTS:
        return _DEFAULTS[pid]
    if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "ip":
        packed = pid[1]
        address = _ADDRESSES.get(packed)
        if address is None:
            if len(_ADDRESSES) >= _MAX_ADDRESSES:
                _ADDRESSES.clear()
            address = _ADDRESSES[packed] = ip_address(packed)
        return address
    if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "enum":
        key = (pid[1], pid[2], pid[3])
        member = _MEMBERS.get(key)
        if member is None:
            member = _MEMBERS[key] = _enum_member(*key)
        return member
    raise pickle.UnpicklingError(f"unknown shared value {pid!r}")


def _enum_member(module: str, qualname: str, name: str) -> enum.Enum:
    """An enum member of the media's own modules (nothing else is looked up)."""
    if not module.startswith("sbc."):
        raise pickle.UnpicklingError(f"enum of {module} not expected")
    kind: Any = sys.modules.get(module)
    for part in qualname.split("."):
        kind = getattr(kind, part, None)
    if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        raise pickle.UnpicklingError(f"{module}.{qualname} is not an enum")
    return kind[name]


class _Pickler(pickle.Pickler):
    persistent_id: Callable[[object], object] = staticmethod(_shared_id)


class _Unpickler(pickle.Unpickler):
    persistent_load: Callable[[object], object] = staticmethod(_shared)


def frame(value: object) -> bytes:
    """``value`` as one frame."""
    out = io.BytesIO()
    _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    body = out.getvalue()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes (limit {MAX_FRAME})")
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's value. Raises `asyncio.IncompleteReadError` at end of file."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes (limit {MAX_FRAME})")
    body = await reader.readexactly(size)
    try:
        return _Unpickler(io.BytesIO(body)).load()
    except Exception as exc:  # any unpickling failure is one bad frame
        raise FrameError(f"frame does not unpickle: {exc}") from exc


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a `MediaError` that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return MediaError(f"{type(exc).__name__}: {exc}")
    return exc


class _Server:
    def __init__(self, relay: Any, writer: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.writer = writer
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, value: object) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(value))

    async def forward_events(self) -> None:
        while True:
            event = await self.relay.next_event()
            self.send((EVENT, True, event))
            await self.writer.drain()

    def start(
        self, request_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        task = asyncio.get_running_loop().create_task(self.run(request_id, method, args, kwargs))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(
        self, request_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            if method not in METHODS:
                raise MediaError(f"media worker: no method {method!r}")
            result = await getattr(self.relay, method)(*args, **kwargs)
        except Exception as exc:
            reply: tuple[int, bool, object] = (request_id, False, portable(exc))
        else:
            reply = (request_id, True, result)
        try:
            self.send(reply)
        except Exception as exc:  # too big, or a result that does not pickle
            self.send((request_id, False, MediaError(f"reply not sent: {exc}")))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()


def _tag_log_lines(index: int) -> None:
    """Every line this worker logs names it: its logger name gets ``[worker N]``
    (the workers and the SIP process write to the same stream)."""
    tag = f"[worker {index}]"

    def tagged(record: logging.LogRecord) -> bool:
        if not record.name.endswith(tag):
            record.name = f"{record.name}{tag}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tagged)


async def serve(fd: int) -> int:
    """Run one worker on the socket ``fd`` until told to close or orphaned."""
    from sbc.cli import setup_logging
    from sbc.media.relay import MediaRelay, descriptor_budget

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    hello = await read_frame(reader)
    if not isinstance(hello, WorkerHello):
        raise FrameError(f"expected a WorkerHello, got {type(hello).__name__}")
    setup_logging(hello.log_level, hello.log_format)
    _tag_log_lines(hello.index)
    relay = MediaRelay(hello.config)
    relay.descriptor_budget = descriptor_budget(WORKER_RESERVE)
    # Off by design here (the configuration says so): not worth a warning per worker.
    relay.kernel_unavailable = "in a media worker"
    await relay.start()
    server = _Server(relay, writer)
    server.send(("ready", os.getpid()))
    gc_tuning.tune()
    gc_tuning.GcWatch().install()
    logger.info(
        "- media worker %d (pid %d) relaying ports %d..%d",
        hello.index,
        os.getpid(),
        hello.config.port_min,
        hello.config.port_max,
    )
    loop = asyncio.get_running_loop()
    # SIGTERM ends the input as the parent's end of file would.
    loop.add_signal_handler(signal.SIGTERM, reader.feed_eof)
    events = loop.create_task(server.forward_events())
    closing: int | None = None
    try:
        while True:
            try:
                request_id, method, args, kwargs = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the parent is gone, or SIGTERM
            if method == "close":
                closing = request_id
                break
            server.start(request_id, method, args, kwargs)
    finally:
        events.cancel()
        if server.tasks:
            await asyncio.gather(*server.tasks, return_exceptions=True)
        await relay.close()
        if closing is not None:
            server.send((closing, True, None))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.close()
    return 0


def main(argv: list[str]) -> int:
    try:
        (fd,) = (int(arg) for arg in argv)
    except ValueError:
        print("usage: python -m sbc.media.worker FD", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sbc.media.relay import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(serve(fd))
    finally:
        loop.close()


if __name__ == "__main__":
    # Run as sbc.media.worker, not as __main__: the frames unpickle to that module's
    # classes (WorkerHello), which __main__'s copies would not be.
    from sbc.media import worker

    sys.exit(worker.main(sys.argv[1:]))
