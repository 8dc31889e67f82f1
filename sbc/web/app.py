"""The management listener: an aiohttp app on the admin address.

Today it serves ``/healthz`` for keepalived's check and operators' probes; the
web UI, REST API and /metrics will be routed here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiohttp import web

#: How late the event loop may run a heartbeat before the node is called unhealthy.
MAX_LOOP_LAG = 1.0
HEARTBEAT_INTERVAL = 0.25


class LoopMonitor:
    """Measures how late the event loop runs a periodic heartbeat.

    A signalling loop that is blocked cannot answer SIP in time; the health check
    must fail then, so keepalived moves the virtual IPs away.
    """

    def __init__(self, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.lag = 0.0
        self.last_beat = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            expected = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.lag = max(0.0, now - expected)
            self.last_beat = now

    def responsive(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        stale = now - self.last_beat > self.interval + MAX_LOOP_LAG
        return self._task is not None and not stale and self.lag <= MAX_LOOP_LAG


HealthReport = Callable[[], dict[str, object]]
HEALTH_KEY: web.AppKey[HealthReport] = web.AppKey("health")


async def healthz(request: web.Request) -> web.Response:
    """200 while the node can serve SIP, 503 otherwise, with the reasons as JSON."""
    report = request.app[HEALTH_KEY]()
    status = 200 if report.get("ok") else 503
    return web.json_response(report, status=status, headers={"Cache-Control": "no-store"})


def create_app(health: Callable[[], dict[str, object]]) -> web.Application:
    """The management application; ``health`` reports the node's state."""
    app = web.Application(client_max_size=64 * 1024)
    app[HEALTH_KEY] = health
    app.router.add_get("/healthz", healthz)
    return app
