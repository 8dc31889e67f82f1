"""The media relay in worker processes (``media.workers: N``).

One process relays media on one core and holds at most as many sockets as its
open-files limit allows (four a call). With ``media.workers`` set, the relay runs
in that many child processes (`sbc.media.worker`), each with its own slice of the
port range and its own open-files limit, and the SIP process keeps only the
signalling. `MediaWorkers` is the `MediaControl` the B2BUA sees: it places each new
session on the worker with the fewest, and sends the session's later requests to
the worker that holds it.

The kernel fast path stays with the in-process relay: the configuration refuses
``workers`` with ``kernel_path`` on (the workers' media all goes through user space,
which is what spreads over cores).

A worker that dies (killed, a crash) or stops answering takes its calls' media with
it. Each of its sessions gets a `MediaLost` event, and the B2BUA ends the call (BYE
both ways, or 503 and CANCEL while it rings; its CDR says ``media_lost``). The
worker is started again on the same ports once they have rested for the port
quarantine (10 s by default). The other workers' calls
go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sbc
from sbc.media.config import MediaConfig
from sbc.media.control import EventQueue, MediaError, MediaLost, UnknownSession
from sbc.media.session import MediaSession, Side, StreamOffer, relay_ports
from sbc.media.worker import EVENT, FrameError, WorkerHello, frame, read_frame

logger = logging.getLogger(__name__)

#: Seconds a worker has to start its relay and say so.
START_TIMEOUT = 30.0
#: Seconds a request may take before its worker is deemed hung and killed.
REQUEST_TIMEOUT = 10.0
#: How often the watchdog looks for requests past their deadline (one timer for all
#: requests: a timer per request costs every call).
WATCHDOG_INTERVAL = 0.5
#: Seconds a worker has to delete its sessions and exit on close (thousands of
#: sessions take a few seconds).
CLOSE_TIMEOUT = 30.0
#: Seconds a worker whose socket closed has to exit before it is killed.
EXIT_WAIT = 2.0
#: Seconds between a worker's death and its restart, at least (and at least the
#: port quarantine).
RESTART_DELAY = 1.0


class WorkersUnavailable(MediaError):
    """No media worker is running (all starting again): the call is refused."""


def port_slices(port_min: int, port_max: int, workers: int) -> list[tuple[int, int]]:
    """``port_min..port_max`` cut into ``workers`` ranges of whole RTP/RTCP pairs
    (even RTP port, RTCP the next), as even as the pairs allow."""
    first = port_min + port_min % 2
    pairs = (port_max - first + 1) // 2
    if workers < 1 or pairs < workers:
        raise ValueError(f"{pairs} RTP/RTCP pairs in {port_min}..{port_max} for {workers} workers")
    bounds = [first + 2 * (pairs * i // workers) for i in range(workers + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(workers)]


def worker_configs(config: MediaConfig, workers: int) -> list[MediaConfig]:
    """Each worker's relay configuration: its port slice, no kernel path."""
    return [
        replace(
            config,
            port_min=low,
            port_max=high,
            kernel_path=False,
            port_seed=None if config.port_seed is None else config.port_seed + index,
        )
        for index, (low, high) in enumerate(port_slices(config.port_min, config.port_max, workers))
    ]


@dataclass(frozen=True, slots=True)
class _Held:
    """What the pool keeps of a session: whose call it is, and its ports (the B2BUA
    keeps the session itself; a second copy here would cost every call)."""

    call_id: str
    ports: frozenset[int]

    @classmethod
    def of(cls, session: MediaSession) -> _Held:
        legs = (stream.leg(side) for stream in session.streams for side in Side)
        return cls(session.call_id, frozenset(relay_ports(legs)))


@dataclass(eq=False)
class _Worker:
    index: int
    config: MediaConfig
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    pid: int | None = None
    ready: bool = False
    #: Each session the worker holds, as last reported.
    sessions: dict[str, _Held] = field(default_factory=dict)
    #: Allocations sent and not answered yet (they count towards its load).
    allocating: int = 0
    #: Requests sent and not answered: their future, and when they are overdue.
    pending: dict[int, tuple[asyncio.Future[Any], float]] = field(default_factory=dict)
    starts: int = 0
    lost_calls: int = 0

    @property
    def load(self) -> int:
        return len(self.sessions) + self.allocating


class MediaWorkers(EventQueue):
    """`MediaControl` over ``workers`` media worker processes. ``await start()``
    before use, ``close()`` after."""

    def __init__(
        self,
        config: MediaConfig,
        workers: int,
        *,
        log_level: str = "info",
        log_format: str = "text",
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self._workers = [_Worker(i, c) for i, c in enumerate(worker_configs(config, workers))]
        self._log = (log_level, log_format)
        self._python = python
        self._where: dict[str, _Worker] = {}
        super().__init__()
        self._ids = itertools.count(1)
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.kernel_unavailable: str | None = f"media relayed by {workers} worker processes"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises (and stops those started) when one cannot."""
        try:
            await asyncio.gather(*(self._spawn(w) for w in self._workers))
        except BaseException:
            await self.close()
            raise
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name="sbc-media-workers-watchdog"
        )

    async def close(self) -> None:
        """Delete every session (each worker its own) and stop the workers."""
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self._stop(w) for w in self._workers), return_exceptions=True)

    async def __aenter__(self) -> MediaWorkers:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def kernel_enabled(self) -> bool:
        return False

    async def kernel_table_present(self) -> bool | None:
        return None

    async def reopen_kernel(self) -> int:
        return 0

    def status(self) -> list[dict[str, object]]:
        """Each worker for /healthz: its pid, ports, sessions, starts and lost calls."""
        return [
            {
                "pid": w.pid,
                "ready": w.ready,
                "ports": f"{w.config.port_min}-{w.config.port_max}",
                "sessions": len(w.sessions),
                "starts": w.starts,
                "lost_calls": w.lost_calls,
            }
            for w in self._workers
        ]

    # -- MediaControl ----------------------------------------------------------------

    async def allocate(
        self, call_id: str, streams: Sequence[StreamOffer], *, record: bool = False
    ) -> MediaSession:
        worker = min((w for w in self._workers if w.ready), key=lambda w: w.load, default=None)
        if worker is None:
            raise WorkersUnavailable("no media worker running")
        worker.allocating += 1
        try:
            session = await self._call(worker, "allocate", call_id, tuple(streams), record=record)
        finally:
            worker.allocating -= 1
        return self._placed(worker, session)

    async def restore(self, state: MediaSession) -> MediaSession:
        if state.session_id in self._where:
            raise MediaError(f"media session {state.session_id} exists already")
        worker = next(
            (
                w
                for w in self._workers
                if w.config.port_min <= _first_port(state) <= w.config.port_max
            ),
            None,
        )
        if worker is None or not worker.ready:
            raise WorkersUnavailable(f"no media worker running for session {state.session_id}")
        return self._placed(worker, await self._call(worker, "restore", state))

    async def update(self, session_id: str, streams: Sequence[StreamOffer]) -> MediaSession:
        worker = self._holder(session_id)
        session = await self._call(worker, "update", session_id, tuple(streams))
        if session_id in worker.sessions:
            worker.sessions[session_id] = _Held.of(session)
        return session

    async def delete(self, session_id: str) -> MediaSession:
        worker = self._holder(session_id)
        try:
            return await self._call(worker, "delete", session_id)
        finally:
            # Gone either way: deleted, unknown there, or lost with its worker.
            worker.sessions.pop(session_id, None)
            if self._where.get(session_id) is worker:
                del self._where[session_id]

    async def stats(self, session_id: str) -> MediaSession:
        return await self._call(self._holder(session_id), "stats", session_id)

    def sessions(self) -> tuple[str, ...]:
        return tuple(self._where)

    def held_ports(self) -> dict[str, set[int]]:
        """As `MediaRelay.held_ports`, from the sessions as last reported."""
        return {
            session_id: set(held.ports)
            for w in self._workers
            for session_id, held in w.sessions.items()
        }

    # -- internals -------------------------------------------------------------------

    def _holder(self, session_id: str) -> _Worker:
        try:
            return self._where[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    def _placed(self, worker: _Worker, session: MediaSession) -> MediaSession:
        if session.session_id in self._where or not worker.ready:
            # Another worker drew the same id (one chance in 2**48), or the worker
            # died after answering: its session is not one the B2BUA can use.
            self._spawn_task(self._drop(worker, session.session_id))
            raise MediaError(f"media session {session.session_id} could not be placed")
        worker.sessions[session.session_id] = _Held.of(session)
        self._where[session.session_id] = worker
        return session

    async def _drop(self, worker: _Worker, session_id: str) -> None:
        with contextlib.suppress(MediaError, OSError):
            await self._call(worker, "delete", session_id)

    async def _call(
        self,
        worker: _Worker,
        method: str,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        writer = worker.writer
        if not worker.ready or writer is None:
            raise WorkersUnavailable(f"media worker {worker.index} is not running")
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        worker.pending[request_id] = (future, loop.time() + REQUEST_TIMEOUT)
        try:
            writer.write(frame((request_id, method, args, kwargs)))
            return await future
        finally:
            worker.pending.pop(request_id, None)

    async def _watch(self) -> None:
        """Kill a worker whose oldest request is overdue: it is hung (or stopped), and
        every call waiting on it would wait with it. Its death ends its calls and
        starts it again (`_lost`)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            now = loop.time()
            for worker in self._workers:
                overdue = [f for f, deadline in worker.pending.values() if deadline < now]
                if not overdue or not worker.ready:
                    continue
                logger.error(
                    "x media worker %d (pid %s) did not answer %d requests in time: killing it",
                    worker.index,
                    worker.pid,
                    len(overdue),
                )
                for future in overdue:
                    if not future.done():
                        future.set_exception(
                            MediaError(f"media worker {worker.index} did not answer")
                        )
                self._kill(worker)

    async def _spawn(self, worker: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            # The child imports sbc from where this process did, whatever its cwd.
            root = str(Path(sbc.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
            process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "sbc.media.worker",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker.process = process
        worker.pid = process.pid
        worker.starts += 1
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
            writer.write(frame(WorkerHello(worker.index, worker.config, *self._log)))
            hello = await asyncio.wait_for(read_frame(reader), START_TIMEOUT)
            if not (isinstance(hello, tuple) and hello[:1] == ("ready",)):
                raise MediaError(f"media worker {worker.index} said {hello!r}")
        except BaseException as exc:
            if writer is not None:
                writer.close()
            else:
                parent.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(exc, (asyncio.IncompleteReadError, TimeoutError, FrameError, OSError)):
                raise MediaError(
                    f"media worker {worker.index} did not start (exit {process.returncode})"
                ) from exc
            raise
        worker.writer = writer
        worker.ready = True
        worker.reader_task = asyncio.get_running_loop().create_task(
            self._read(worker, reader), name=f"sbc-media-worker-{worker.index}"
        )

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                request_id, ok, value = await read_frame(reader)
                if request_id == EVENT:
                    self._emit(value)
                    continue
                future, _ = worker.pending.get(request_id, (None, 0.0))
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, FrameError) as exc:
            reason: str = type(exc).__name__
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a malformed reply: the worker is not trusted further
            logger.exception("x media worker %d sent a bad frame", worker.index)
            reason = f"bad frame: {exc}"
        await self._lost(worker, reason)

    async def _lost(self, worker: _Worker, reason: str) -> None:
        """The worker's socket closed: reap it, end its calls, start it again."""
        worker.ready = False
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None
        process = worker.process
        code = None
        if process is not None:
            # A worker that closed its end exits by itself (SIGTERM, a crash); one
            # that did not (it sent a bad frame) is not trusted further.
            try:
                code = await asyncio.wait_for(process.wait(), EXIT_WAIT)
            except TimeoutError:
                self._kill(worker)
                code = await process.wait()
        for future, _ in worker.pending.values():
            if not future.done():
                future.set_exception(MediaError(f"media worker {worker.index} exited"))
        lost = list(worker.sessions.items())
        worker.sessions.clear()
        for session_id, _ in lost:
            if self._where.get(session_id) is worker:
                del self._where[session_id]
        if self._closing:
            return
        worker.lost_calls += len(lost)
        gone = f"media worker {worker.index} exited ({reason}, exit code {code})"
        logger.error(
            "x media worker %d (pid %s) exited (%s, exit code %s): ending its %d calls,"
            " starting it again",
            worker.index,
            worker.pid,
            reason,
            code,
            len(lost),
        )
        for session_id, held in lost:
            self._emit(MediaLost(session_id, held.call_id, gone))
        self._spawn_task(self._restart(worker))

    async def _restart(self, worker: _Worker) -> None:
        # Its ports rest first, as a deleted session's do: late packets of the lost
        # calls must not reach the next calls on them.
        delay = max(RESTART_DELAY, worker.config.port_quarantine)
        while not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._spawn(worker)
            except (MediaError, OSError) as exc:
                logger.error("x media worker %d not started again: %s", worker.index, exc)
                delay = min(delay * 2, 30.0)
            else:
                logger.info("- media worker %d started again (pid %s)", worker.index, worker.pid)
                return

    async def _stop(self, worker: _Worker) -> None:
        process = worker.process
        if process is None:
            return
        if worker.ready and worker.writer is not None:
            # Its sessions are deleted first; past the timeout it is killed below.
            with contextlib.suppress(MediaError, OSError, TimeoutError):
                await asyncio.wait_for(self._call(worker, "close"), CLOSE_TIMEOUT)
        worker.ready = False
        try:
            await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            logger.error(
                "x media worker %d (pid %s) did not stop: killing it", worker.index, worker.pid
            )
            self._kill(worker)
            await process.wait()
        if worker.reader_task is not None:
            worker.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.reader_task
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None

    def _kill(self, worker: _Worker) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def _spawn_task(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)


def _first_port(state: MediaSession) -> int:
    return state.streams[0].leg(Side.A).local.port if state.streams else 0
