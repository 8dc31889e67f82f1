"""On stop the kernel fast path leaves `nft list ruleset` as it found it.

Same lab as test_media_relay: caller (198.51.100.10) -- sbc -- callee (203.0.113.20),
the relay in this process with its thread in the sbc namespace. A call is latched on
both sides with real packets so a forward is in the kernel, then the relay closes:
without the firewall, table inet sbc goes away with the media objects; beside a
stand-in for the firewall's objects, only the media objects go.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sbc.app import TABLE_CHECK_INTERVAL
from sbc.media import KernelPathEngaged
from sbc.media.kernel import POSTROUTING, PREROUTING
from sbc.media.relay import MediaRelay
from tests.netns import Lab, can_run_lab
from tests.scenario.test_media_relay import (
    ADDR,
    ROOT,
    event_of,
    media_config,
    nft_media_objects,
    run,
    setup_call,
    warm_up,
)
from tests.scenario.test_media_relay import lab as lab


def _nft_unusable() -> str | None:
    why = can_run_lab()
    if why is not None:
        return why
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed"
    if importlib.util.find_spec("nftables") is None:
        return "the nftables Python binding is missing"
    return None


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_nft_unusable() is not None, reason=str(_nft_unusable())),
]

#: A stand-in for the firewall's part of the table: a base chain with a rule and a
#: set with an element (the blacklist is persisted, never the relay's to delete).
FIREWALL = """\
add table inet sbc
add chain inet sbc fw_input { type filter hook input priority -10; policy accept; }
add rule inet sbc fw_input tcp dport 22 accept
add set inet sbc blacklist_v4 { type ipv4_addr; }
add element inet sbc blacklist_v4 { 198.51.100.66 }
"""


def ruleset(lab: Lab) -> str:
    return lab.run("sbc", "nft", "list", "ruleset").stdout


def media_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "media_" in line]


def latched_call_then_close(lab: Lab, family: int, on_start: str = "") -> dict[str, Any]:
    """Start the relay (then apply ``on_start`` in the namespace), latch a call into
    the kernel path, close the relay: what the table held on the way."""

    async def scenario() -> dict[str, Any]:
        relay = MediaRelay(media_config())
        try:
            await relay.start()
            assert relay.kernel_enabled, relay.kernel_unavailable
            if on_start:
                lab.run("sbc", "nft", "-f", "-", input=on_start)
            call = await setup_call(lab, relay, family)
            await warm_up(call, family)
            await event_of(relay, KernelPathEngaged)
            during = nft_media_objects(lab)
            during_text = ruleset(lab)
            call.caller.close()
            call.callee.close()
        finally:
            await relay.close()
        return {"during": during, "during_text": during_text, "kernel": relay.kernel_enabled}

    result: dict[str, Any] = run(lab, scenario)
    return result


@pytest.mark.parametrize("family", [4, 6])
def test_close_without_firewall_removes_the_table(lab: Lab, family: int) -> None:
    before = ruleset(lab)
    r = latched_call_then_close(lab, family)
    after = ruleset(lab)
    # The forwards were in the kernel: a counted tuple and four rewrites each way.
    assert len(r["during"]["forwards"]) == 2 and len(r["during"]["elements"]) == 10
    assert {PREROUTING, POSTROUTING} <= set(r["during"]["chains"])
    assert "table inet sbc" in r["during_text"]
    # Stopped: no table inet sbc, the ruleset as before the start.
    assert "table inet sbc" not in after
    assert after == before
    assert r["kernel"] is False
    missing = lab.run("sbc", "nft", "list", "table", "inet", "sbc", check=False)
    assert missing.returncode != 0 and "No such file or directory" in missing.stderr


@pytest.mark.parametrize("when", ["before", "after"], ids=["firewall-first", "relay-first"])
def test_close_beside_the_firewall_removes_only_media_objects(lab: Lab, when: str) -> None:
    """`before`: the table is the firewall's when the relay starts (firewall on).
    `after`: the relay made the table, the firewall came later (enabled by a reload);
    either way the firewall's objects keep the table."""
    empty = ruleset(lab)
    if when == "before":
        lab.run("sbc", "nft", "-f", "-", input=FIREWALL)
    before = ruleset(lab)
    r = latched_call_then_close(lab, 4, on_start=FIREWALL if when == "after" else "")
    after = ruleset(lab)
    assert len(r["during"]["forwards"]) == 2 and len(r["during"]["elements"]) == 10
    assert "chain fw_input" in r["during_text"] and media_lines(r["during_text"])
    # Only the media objects went: the chain with its rule and the set with its
    # element stay, exactly as the firewall made them.
    assert media_lines(after) == []
    expected = before if when == "before" else _firewall_only(lab)
    assert after == expected
    assert "tcp dport 22 accept" in after and "198.51.100.66" in after
    assert after != empty
    # The firewall's own stop then finds its objects and removes the table.
    lab.run("sbc", "nft", "delete", "table", "inet", "sbc")
    assert ruleset(lab) == empty


def _firewall_only(lab: Lab) -> str:
    """How `FIREWALL` alone lists in a namespace like the lab's."""
    with Lab() as other:
        other.add("sbc")
        other.run("sbc", "nft", "-f", "-", input=FIREWALL)
        return ruleset(other)


def _sbc_config(workdir: Path) -> str:
    # No firewall section: the firewall is off; media.kernel_path is on by default.
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen: [{{transport: udp, address: {ADDR[4]["sbc_out"]}, port: 5070}}]
management:
  listen: {{address: 127.0.0.1, port: 18090}}
realms:
  - name: outside
    listen: [{{transport: udp, address: {ADDR[4]["sbc_out"]}, port: 5080}}]
    media_address: {ADDR[4]["sbc_out"]}
  - name: inside
    listen: [{{transport: udp, address: {ADDR[4]["sbc_in"]}, port: 5080}}]
    media_address: {ADDR[4]["sbc_in"]}
"""


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_sbc_run_without_firewall_leaves_no_table_after_sigterm(lab: Lab, tmp_path: Path) -> None:
    before = ruleset(lab)
    config = tmp_path / "sbc.yaml"
    config.write_text(_sbc_config(tmp_path))
    log = tmp_path / "sbc.log"
    with log.open("w") as out:
        # `ip netns exec` execs the command: the Popen's pid is the SBC's.
        proc = lab.spawn(
            "sbc",
            [sys.executable, "-m", "sbc", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    started = _wait_for(lambda: "- kernel fast path on" in log.read_text(), 20)
    assert started, log.read_text()
    during = ruleset(lab)
    # One table check has passed: a table that is there raises no alarm.
    time.sleep(TABLE_CHECK_INTERVAL + 0.5)
    quiet = "is gone" not in log.read_text()
    # `nft flush ruleset` (nftables.service restarted) under the running SBC: its
    # table check puts the media objects back, and the next check finds them.
    lab.run("sbc", "nft", "flush", "ruleset")
    back = _wait_for(lambda: "- media kernel path back" in log.read_text(), 15)
    again = ruleset(lab)
    time.sleep(TABLE_CHECK_INTERVAL + 0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=15)
    text = log.read_text()
    assert code == 0, text
    assert quiet and back, text
    assert text.count("x nftables table inet sbc is gone") == 1, text
    assert "chain media_prerouting" in during and "map media_daddr_v4" in during
    assert "chain media_prerouting" in again and "map media_daddr_v4" in again
    # 2 chains, and per family a counted set, an rtcp-mux set and four maps.
    assert "- kernel fast path off (14 media objects removed, table deleted)" in text
    assert ruleset(lab) == before


APPLY = """\
import json
from ipaddress import IPv4Address as A
from sbc.media.kernel import KernelForward, KernelMediaTable
from sbc.media.values import Endpoint as E

def forward(name, peer_port):
    return KernelForward(name, E(A("198.51.100.10"), peer_port), E(A("198.51.100.1"), 30000),
                         E(A("203.0.113.1"), 30002), E(A("203.0.113.20"), 40000))

table = KernelMediaTable()
table.open()
table.install([forward("media_s1_0_a", 5000), forward("media_s2_0_a", 5002)])
# One transaction: s1 out, s3 in, and s2 again with a new latched source (a re-latch).
table.apply(["media_s1_0_a", "media_s2_0_a"], [forward("media_s3_0_a", 5004),
                                               forward("media_s2_0_a", 5006)])
table.apply([], [])  # nothing to do: no libnftables call at all
print(json.dumps(sorted(table.installed)))
"""


def test_removals_and_installs_of_a_round_are_one_transaction(lab: Lab) -> None:
    """The batcher's round: removals first, then installs, the same name in both."""
    try:
        out = lab.run("sbc", sys.executable, "-c", APPLY).stdout
        assert json.loads(out) == ["media_s2_0_a", "media_s3_0_a"]
        text = ruleset(lab)
        # The counted set holds s3 and the new source of s2, not s1 nor s2's old one.
        for port in (5004, 5006):
            assert f"198.51.100.10 . {port} . 198.51.100.1 . 30000 counter packets 0" in text
            assert f"198.51.100.10 . {port} . 198.51.100.1 . 30000 : 203.0.113.20" in text
        assert ". 5002 ." not in text and ". 5000 ." not in text
    finally:
        lab.run("sbc", "nft", "delete", "table", "inet", "sbc")
