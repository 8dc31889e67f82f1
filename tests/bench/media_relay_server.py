"""MediaRelay driven by JSON lines on stdin, for the media benchmark (one per run).

    ip netns exec NS python tests/bench/media_relay_server.py '{"kernel": true, ...}'

Requests (one JSON object per line), each answered by one JSON line:

- ``{"op": "allocate", "calls": [[caller_port, callee_port], ...]}``: one session per
  call, SDP hints caller_ip:caller_port / callee_ip:callee_port; answers the relay's
  ports ``[[a_port, b_port], ...]`` and the time taken.
- ``{"op": "wait_kernel", "streams": N, "timeout": T}``: until N streams (since start)
  are in the kernel path or T seconds passed.
- ``{"op": "setups", "count": N}``: N allocate + delete of a one-stream session
  through MediaControl; the rate.
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
from ipaddress import ip_address
from typing import Any

from sbc.media import Endpoint, KernelPathEngaged, LegOffer, MediaConfig, RealmMediaAddress
from sbc.media import StreamOffer as Offer
from sbc.media.relay import MediaRelay, new_event_loop


async def serve(spec: dict[str, Any]) -> None:
    config = MediaConfig(
        realms=(
            RealmMediaAddress("outside", ip_address(spec["outside"])),  # type: ignore[arg-type]
            RealmMediaAddress("inside", ip_address(spec["inside"])),  # type: ignore[arg-type]
        ),
        port_min=spec.get("port_min", 20000),
        port_max=spec.get("port_max", 59999),
        port_quarantine=0.0,
        kernel_path=spec["kernel"],
        media_timeout=600.0,
        poll_interval=5.0,
    )
    engaged = 0

    async with MediaRelay(config) as relay:

        async def count_events() -> None:
            nonlocal engaged
            async for event in relay.events():
                if isinstance(event, KernelPathEngaged):
                    engaged += 1

        counter = asyncio.create_task(count_events())
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        reply({"ready": True, "kernel": relay.kernel_enabled, "reason": relay.kernel_unavailable})
        while line := await reader.readline():
            request = json.loads(line)
            op = request["op"]
            started = time.perf_counter()
            if op == "allocate":
                ports = []
                for caller_port, callee_port in request["calls"]:
                    session = await relay.allocate(
                        "bench",
                        [
                            Offer(
                                LegOffer("outside", 4, Endpoint.of(spec["caller"], caller_port)),
                                LegOffer("inside", 4, Endpoint.of(spec["callee"], callee_port)),
                            )
                        ],
                    )
                    stream = session.streams[0]
                    ports.append([stream.a.local.port, stream.b.local.port])
                reply({"ports": ports, "seconds": time.perf_counter() - started})
            elif op == "wait_kernel":
                deadline = started + float(request["timeout"])
                while engaged < request["streams"] and time.perf_counter() < deadline:
                    await asyncio.sleep(0.05)
                reply({"engaged": engaged, "seconds": time.perf_counter() - started})
            elif op == "setups":
                offer = [
                    Offer(
                        LegOffer("outside", 4, Endpoint.of(spec["caller"], 9)),
                        LegOffer("inside", 4, Endpoint.of(spec["callee"], 9)),
                    )
                ]
                count = int(request["count"])
                for _ in range(count):
                    session = await relay.allocate("setup", offer)
                    await relay.delete(session.session_id)
                elapsed = time.perf_counter() - started
                reply({"setups_per_s": count / elapsed, "seconds": elapsed})
            elif op == "quit":
                break
        counter.cancel()


def reply(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(json.loads(sys.argv[1])))
    finally:
        loop.close()
