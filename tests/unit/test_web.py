"""The management listener's health endpoint and the loop monitor behind it."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer

from sbc.web.app import MAX_LOOP_LAG, LoopMonitor, create_app


async def _get(report: dict[str, object]) -> tuple[int, dict[str, object], str]:
    async with TestClient(TestServer(create_app(lambda: report))) as client:
        response = await client.get("/healthz")
        return response.status, await response.json(), response.headers["Cache-Control"]


def test_healthz_is_200_only_when_ok() -> None:
    status, body, cache = asyncio.run(_get({"ok": True, "sip_bound": True}))
    assert (status, body["sip_bound"], cache) == (200, True, "no-store")
    status, body, _ = asyncio.run(_get({"ok": False, "sip_bound": False}))
    assert status == 503 and body == {"ok": False, "sip_bound": False}


def test_loop_monitor_sees_a_blocked_loop() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        monitor = LoopMonitor(interval=0.05)
        before_start = monitor.responsive()
        monitor.start()
        await asyncio.sleep(0.2)
        healthy = monitor.responsive()
        time.sleep(MAX_LOOP_LAG + 0.3)  # the loop is blocked: no heartbeat runs
        blocked = monitor.responsive()
        await monitor.stop()
        return before_start, healthy, blocked

    before_start, healthy, blocked = asyncio.run(scenario())
    assert not before_start
    assert healthy
    assert not blocked
