"""A gateway that answers 100 Trying and then nothing is failed over in
``calls.progress_timeout`` seconds, not at the ring timeout.

    caller (SIPp UAC) -> SBC -> trunk: gw1 (SIPp, 100 then silence), gw2 (SIPp UAS)

A real ``sbc run`` with ``progress_timeout: 2``: gw1 gets the INVITE, sends 100,
and waits; about 2 s later the SBC CANCELs it (gw1 answers 200 and 487, ACKed hop
by hop) and sends the call to gw2, which answers. The caller hears only the
answer. Loopback only.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.scenario.test_b2bua_flows import (
    SIPP,
    explain,
    first,
    header,
    pytestmark,
    realm_yaml,
    stamped,
    start_sbc,
    start_sipp,
    starts,
    udp_port,
)

__all__ = ["pytestmark"]
PROGRESS_TIMEOUT = 2


def test_a_gateway_stuck_after_100_is_cancelled_and_failed_over(tmp_path: Path) -> None:
    assert SIPP is not None
    outside, inside, g1, g2 = udp_port(), udp_port(), udp_port(), udp_port()
    body = (
        f"calls:\n  progress_timeout: {PROGRESS_TIMEOUT}\n"
        "realms:\n"
        + realm_yaml("outside", outside)
        + realm_yaml("inside", inside)
        + "routes:\n  - {name: pair, action: trunk, trunk: pair}\n"
        + "trunks:\n  - name: pair\n    realm: inside\n    probe: {enabled: false}\n"
        + f"    gateways:\n      - {{host: 127.0.0.1, port: {g1}, priority: 1}}\n"
        + f"      - {{host: 127.0.0.1, port: {g2}, priority: 2}}\n"
    )
    sbc = start_sbc(tmp_path, body)
    try:
        stuck = start_sipp(tmp_path, "gw1", "flow_uas_stuck.xml", port=g1)
        good = start_sipp(tmp_path, "gw2", "uas_basic.xml", port=g2)
        time.sleep(0.1)
        caller_sipp = start_sipp(
            tmp_path, "uac", "flow_uac_call.xml", remote=outside, service="7101",
            extra=("-d", "200"),
        )  # fmt: skip
        caller, first_gw, second_gw = caller_sipp.finish(), stuck.finish(), good.finish()
        assert caller.returncode == 0, explain(sbc, caller, first_gw, second_gw)
        assert first_gw.returncode == 0, explain(sbc, first_gw)
        assert second_gw.returncode == 0, explain(sbc, second_gw)
        assert "no ringing or progress" in sbc.log() and "(progress timeout)" in sbc.log()
    finally:
        assert sbc.stop() == 0
    assert starts(first_gw)[0].startswith(f"<INVITE sip:7101@127.0.0.1:{g1} ")
    assert "<CANCEL" in "\n".join(starts(first_gw))
    assert starts(second_gw)[0].startswith(f"<INVITE sip:7101@127.0.0.1:{g2} ")
    assert header(first(first_gw, "<INVITE"), "Call-ID") != header(
        first(second_gw, "<INVITE"), "Call-ID"
    )
    caller_saw = starts(caller)
    assert "<SIP/2.0 200" in "\n".join(caller_saw)
    assert not [s for s in caller_saw if s.startswith(("<SIP/2.0 4", "<SIP/2.0 5"))]
    # The CANCEL came about PROGRESS_TIMEOUT after the INVITE (not at Timer B, 32 s).
    lines = stamped(tmp_path / "gw1.msg")
    invited = next(t for t, line in lines if line.startswith("<INVITE"))
    cancelled = next(t for t, line in lines if line.startswith("<CANCEL"))
    assert PROGRESS_TIMEOUT - 0.2 <= cancelled - invited <= PROGRESS_TIMEOUT + 1.5, lines
