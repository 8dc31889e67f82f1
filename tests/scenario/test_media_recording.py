"""A recorded call across network namespaces: pcap of both directions, WAV of the tones.

Same lab as test_media_relay: caller (198.51.100.10) -- sbc -- callee (203.0.113.20).
The caller speaks a 400 Hz tone in PCMU, the callee a 1 kHz tone in PCMA, 20 ms per
packet in real time.
"""

from __future__ import annotations

import asyncio
import math
from array import array
from pathlib import Path
from typing import Any

import pytest

from sbc.media import Endpoint, LegOffer, RecordingFinished, StreamOffer
from sbc.media.recording import PT_PCMA, PT_PCMU, WavAudio, g711_decode, g711_encode, parse_pcap
from sbc.media.relay import MediaRelay
from sbc.media.rtp import RtpHeader
from tests.netns import Lab, can_run_lab
from tests.scenario.test_media_relay import (
    ADDR,
    Peer,
    event_of,
    media_config,
    nft_media_objects,
    run,
)
from tests.scenario.test_media_relay import lab as lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(can_run_lab() is not None, reason=str(can_run_lab())),
]

#: 1.5 s of speech each way.
PACKETS = 75


def tone(frequency: float, count: int) -> list[int]:
    return [round(9000 * math.sin(2 * math.pi * frequency * n / 8000)) for n in range(count)]


def packets(pt: int, ssrc: int, codes: bytes, ts0: int) -> list[bytes]:
    return [
        bytes(RtpHeader(pt, 100 + i, (ts0 + 160 * i) & 0xFFFFFFFF, ssrc))
        + codes[160 * i : 160 * (i + 1)]
        for i in range(len(codes) // 160)
    ]


def test_recorded_call_writes_pcap_and_wav_of_both_directions(
    lab: Lab,
    tmp_path: Path,
) -> None:
    up_codes = g711_encode(tone(400, 160 * PACKETS), PT_PCMU)
    down_codes = g711_encode(tone(1000, 160 * PACKETS), PT_PCMA)
    up = packets(PT_PCMU, 0xA, up_codes, 12345)
    down = packets(PT_PCMA, 0xB, down_codes, 0xFFFFF000)  # wraps during the call

    async def scenario() -> dict[str, Any]:
        async with MediaRelay(media_config(state_dir=tmp_path)) as relay:
            assert relay.kernel_enabled, relay.kernel_unavailable
            session = await relay.allocate(
                "call-r",
                [
                    StreamOffer(
                        LegOffer("outside", 4, Endpoint.of(ADDR[4]["caller"], 34000)),
                        LegOffer("inside", 4, Endpoint.of(ADDR[4]["callee"], 5000)),
                    )
                ],
                record=True,
            )
            a_local, b_local = session.streams[0].a.local, session.streams[0].b.local
            caller = await Peer.open(lab, "caller", ADDR[4]["caller"], 34000)
            callee = await Peer.open(lab, "callee", ADDR[4]["callee"], 5000)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(PACKETS):
                # Real-time pacing (bounded: PACKETS ticks of 20 ms).
                await asyncio.sleep(max(0.0, start + 0.02 * i - loop.time()))
                await caller.send([up[i]], a_local)
                await callee.send([down[i]], b_local)
            got_callee = await callee.wait_count(PACKETS)
            got_caller = await caller.wait_count(PACKETS)
            during = nft_media_objects(lab)
            stats = await relay.stats(session.session_id)
            await relay.delete(session.session_id)
            finished = await event_of(relay, RecordingFinished)
            caller.close()
            callee.close()
            return locals()

    r = run(lab, scenario)
    assert (r["got_callee"], r["got_caller"]) == (PACKETS, PACKETS)
    # Recording keeps the stream in user space: no kernel rules, every packet seen.
    assert not r["stats"].streams[0].kernel and r["stats"].recording
    assert r["during"]["forwards"] == []
    assert r["stats"].streams[0].a.counters.packets == PACKETS

    finished: RecordingFinished = r["finished"]
    session_id = r["session"].session_id
    assert finished.pcap == tmp_path / "recordings" / f"{session_id}.pcap"
    assert finished.packets == 2 * PACKETS and not finished.truncated
    datagrams = [record.datagram for record in parse_pcap(finished.pcap.read_bytes())]
    caller_src, callee_src = (
        Endpoint.of(ADDR[4]["caller"], 34000),
        Endpoint.of(ADDR[4]["callee"], 5000),
    )
    from_caller = [
        d.payload for d in datagrams if d.source == caller_src and d.destination == r["a_local"]
    ]
    from_callee = [
        d.payload for d in datagrams if d.source == callee_src and d.destination == r["b_local"]
    ]
    assert from_caller == up and from_callee == down  # both ways, byte for byte

    assert finished.wav is not None and finished.wav.name == f"{session_id}.wav"
    audio = WavAudio.parse(finished.wav.read_bytes())
    assert audio.rate == 8000 and len(audio.channels) == 2
    for channel, codes, pt in ((0, up_codes, PT_PCMU), (1, down_codes, PT_PCMA)):
        expected = g711_decode(codes, pt).tobytes()
        recorded = array("h", audio.channels[channel]).tobytes()
        at = recorded.find(expected)
        # The whole tone, sample for sample, starting where it arrived (< 0.3 s in).
        assert at >= 0 and at % 2 == 0, f"channel {channel}: tone not found in the WAV"
        assert at // 2 < 0.3 * 8000
    # Left and right start together (both sides began speaking in the same tick).
    left_at = array("h", audio.channels[0]).tobytes().find(g711_decode(up_codes, PT_PCMU).tobytes())
    right_at = (
        array("h", audio.channels[1]).tobytes().find(g711_decode(down_codes, PT_PCMA).tobytes())
    )
    assert abs(left_at - right_at) // 2 <= 80  # within 10 ms
