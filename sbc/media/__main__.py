"""A standalone relay for the lab: ``python -m sbc.media SPEC_JSON``.

SPEC_JSON is ``{"config": {...MediaConfig fields, realms as
[{"realm", "ipv4", "ipv6"}]}, "calls": [{"call_id", "streams": [{"a": LegOffer,
"b": LegOffer}]}]}`` with LegOffer as ``{"realm", "family", "remote":
{"address", "port"}, "rtcp_mux", "direction", "srtp", "crypto", "rtp",
"encrypted"}`` (``rtp`` false: UDPTL). The relay allocates the calls, prints
each session as a JSON line, then one JSON line per event (with the session's state,
as a standby node would receive it) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import asdict
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.control import MediaEvent, UnknownSession
from sbc.media.relay import MediaRelay, new_event_loop
from sbc.media.session import LegOffer, StreamOffer
from sbc.media.srtp import SdesCrypto, SrtpSuite
from sbc.media.values import Direction, Endpoint


def config_from_dict(data: dict[str, Any]) -> MediaConfig:
    realms = tuple(
        RealmMediaAddress(
            r["realm"],
            IPv4Address(r["ipv4"]) if r.get("ipv4") else None,
            IPv6Address(r["ipv6"]) if r.get("ipv6") else None,
        )
        for r in data["realms"]
    )
    return MediaConfig(realms=realms, **{k: v for k, v in data.items() if k != "realms"})


def offer_from_dict(data: dict[str, Any]) -> LegOffer:
    remote = data.get("remote")
    return LegOffer(
        realm=data["realm"],
        family=int(data.get("family", 4)),
        remote=None if remote is None else Endpoint.from_dict(remote),
        rtcp_mux=bool(data.get("rtcp_mux", False)),
        direction=Direction(data.get("direction", "sendrecv")),
        srtp=SrtpSuite(data["srtp"]) if data.get("srtp") else None,
        crypto=SdesCrypto.parse(data["crypto"]) if data.get("crypto") else None,
        rtp=bool(data.get("rtp", True)),
        encrypted=bool(data.get("encrypted", False)),
    )


def _event_dict(event: MediaEvent) -> dict[str, Any]:
    body = asdict(event)
    for key, value in body.items():
        if hasattr(value, "value"):
            body[key] = value.value
        elif isinstance(value, dict) and "address" in value:
            body[key] = {"address": str(value["address"]), "port": value["port"]}
    return {"event": type(event).__name__, **body}


def _print(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def main(spec: dict[str, Any]) -> None:
    relay = MediaRelay(config_from_dict(spec["config"]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with relay:
        _print({"kernel": relay.kernel_enabled, "reason": relay.kernel_unavailable})
        for call in spec.get("calls", ()):
            streams = [
                StreamOffer(offer_from_dict(s["a"]), offer_from_dict(s["b"]))
                for s in call["streams"]
            ]
            session = await relay.allocate(call["call_id"], streams)
            _print({"session": session.to_dict()})

        async def pump() -> None:
            async for event in relay.events():
                line = _event_dict(event)
                with contextlib.suppress(UnknownSession):
                    line["session"] = (await relay.stats(event.session_id)).to_dict()
                _print(line)

        pumping = asyncio.create_task(pump())
        await stop.wait()
        pumping.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    loop = new_event_loop()
    try:
        loop.run_until_complete(main(json.loads(sys.argv[1])))
    finally:
        loop.close()
