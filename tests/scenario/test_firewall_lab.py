"""Firewall scenarios in namespaces: host untouched, persistence, /64 meters, bans."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scenario import fw_lab

pytestmark = [pytest.mark.root]

HOST_RULESET = """\
table inet filter {
 chain input {
  type filter hook input priority 0; policy accept;
  tcp dport 22 counter accept
 }
}
table ip nat {
 chain postrouting {
  type nat hook postrouting priority 100; policy accept;
 }
}
table inet sbc {
 set media_streams {
  type ipv4_addr
  elements = { 198.51.100.77 }
 }
 chain media_pre {
  type filter hook prerouting priority -300; policy accept;
  udp dport 40000 counter
 }
}
"""


@pytest.fixture
def lab():  # type: ignore[no-untyped-def]
    why = fw_lab.available()
    if why:
        pytest.skip(why)
    with fw_lab.lab() as the_lab:
        yield the_lab


def _send(lab: fw_lab.Lab, **kwargs: object) -> int:
    return int(fw_lab.lab_python(lab, lab.ext, "send", json.dumps(kwargs)))


def _ban(lab: fw_lab.Lab, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lab.ns(
            lab.sbc,
            sys.executable,
            "-m",
            "tests.scenario.fw_lab",
            "ban",
            "--state-file",
            str(state),
            *args,
        ),
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_host_tables_untouched_media_kept_and_blacklist_persisted(
    lab: fw_lab.Lab, tmp_path: Path
) -> None:
    subprocess.run(lab.ns(lab.sbc, "nft", "-f", "-"), input=HOST_RULESET, text=True, check=True)
    host_before = lab.ruleset_outside_sbc()
    sbc_before = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc")
    state = tmp_path / "bl.json"
    options = {"trusted": [f"{fw_lab.TRUNK_V4}/32"], "state_file": str(state)}
    node = fw_lab.start_node(lab, options, tmp_path / "s1.json")
    assert lab.ruleset_outside_sbc() == host_before
    assert "chain fw_prerouting" in lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc")
    added = _ban(lab, state, "add", "203.0.113.50", "--duration", "100", "--reason", "honeypot")
    assert added.returncode == 0, added.stderr
    assert lab.set_elements("blacklist_v4") == ["203.0.113.50"]
    refused = _ban(lab, state, "add", fw_lab.TRUNK_V4)
    assert refused.returncode == 2 and "trusted" in refused.stderr
    fw_lab.stop_node(node)
    # Stopped: our objects are gone, the relay's and the host's are as they were.
    assert lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc") == sbc_before
    assert lab.ruleset_outside_sbc() == host_before
    saved = json.loads(state.read_text())
    assert [b["target"] for b in saved["bans"]] == ["203.0.113.50/32"]
    # Started again: the ban is back with what was left of its 100 s.
    node = fw_lab.start_node(lab, options, tmp_path / "s2.json")
    elements = lab.nft_json("set", "inet", "sbc", "blacklist_v4")["nftables"][1]["set"]["elem"]
    assert elements[0]["elem"]["val"] == "203.0.113.50"
    assert 90 <= elements[0]["elem"]["expires"] <= 100
    listed = json.loads(_ban(lab, state, "list", "--json").stdout)
    assert listed[0]["target"] == "203.0.113.50/32" and listed[0]["reason"] == "operator: honeypot"
    assert _ban(lab, state, "remove", "203.0.113.50").returncode == 0
    assert lab.set_elements("blacklist_v4") == []
    fw_lab.stop_node(node)
    assert lab.ruleset_outside_sbc() == host_before


def test_ipv6_sources_in_one_64_share_a_meter(lab: fw_lab.Lab, tmp_path: Path) -> None:
    options = {"udp": [1, 5], "rate": [60.0, 1000], "state_file": str(tmp_path / "bl.json")}
    node = fw_lab.start_node(lab, options, tmp_path / "s.json")
    first = _send(lab, source="2001:db8:1:2::1", target=fw_lab.SBC_V6, count=5, wait=0.2)
    same_64 = _send(lab, source="2001:db8:1:2::2", target=fw_lab.SBC_V6, count=5, wait=0.2)
    other_64 = _send(lab, source="2001:db8:1:3::1", target=fw_lab.SBC_V6, count=5, wait=0.2)
    counters = lab.counters()
    fw_lab.stop_node(node)
    assert first == 5
    # The burst of 5 is spent by ::1; ::2 only gets the ~1/s refill.
    assert same_64 <= 2
    assert counters["fw_drop_rate_udp_v6"] == 5 - same_64
    assert other_64 == 5


def test_media_range_closed_except_pinholes(lab: fw_lab.Lab, tmp_path: Path) -> None:
    node = fw_lab.start_node(lab, {"state_file": str(tmp_path / "bl.json")}, tmp_path / "s.json")
    code = (
        "import socket,sys;s=socket.socket(2,2);s.bind(('198.51.100.3',0))\n"
        "[s.sendto(b'rtp',('198.51.100.1',p)) for p in (20000,20002,20000)]"
    )
    script = (
        "from sbc.firewall import Firewall, FirewallConfig;from pathlib import Path;import sys\n"
        "fw=Firewall(FirewallConfig(state_file=Path(sys.argv[2])))\n"
        "getattr(fw, sys.argv[1] + '_pinholes')([20000])"
    )
    root = Path(__file__).resolve().parents[2]

    def pinhole(action: str) -> None:
        subprocess.run(
            lab.ns(
                lab.sbc,
                sys.executable,
                "-c",
                script,
                action,
                str(tmp_path / "bl.json"),
            ),
            cwd=root,
            check=True,
            timeout=30,
        )

    lab.run(lab.ext, sys.executable, "-c", code)
    closed = lab.counters()["fw_drop_media_closed"]
    pinhole("open")
    assert lab.set_elements("fw_media_pinholes") == [20000]
    lab.run(lab.ext, sys.executable, "-c", code)
    opened = lab.counters()["fw_drop_media_closed"]
    pinhole("close")
    lab.run(lab.ext, sys.executable, "-c", code)
    closed_again = lab.counters()["fw_drop_media_closed"]
    fw_lab.stop_node(node)
    assert (closed, opened, closed_again) == (3, 4, 7)


@pytest.mark.skipif(shutil.which("svwar") is None, reason="sipvicious not installed")
def test_sipvicious_banned_expires_and_trusted_not_banned(lab: fw_lab.Lab, tmp_path: Path) -> None:
    options = {
        "trusted": [f"{fw_lab.TRUNK_V4}/32"],
        "durations": [8],
        "state_file": str(tmp_path / "bl.json"),
    }
    status = tmp_path / "s.json"
    node = fw_lab.start_node(lab, options, status)
    env = {**os.environ, "HOME": str(tmp_path)}

    dev = lab.run(lab.ext, "ip", "-o", "link", "show", "type", "veth").split(":")[1].strip()
    dev = dev.split("@")[0]

    def svwar(source: str) -> None:
        # svwar binds to any address (its -b is ignored here): pick the source by route.
        lab.run(lab.ext, "ip", "route", "replace", f"{fw_lab.SBC_V4}/32", "dev", dev, "src", source)
        subprocess.run(
            lab.ns(
                lab.ext,
                "timeout",
                "15",
                "svwar",
                "-e100-160",
                "-m",
                "REGISTER",
                "--force",
                "-t",
                "0.02",
                fw_lab.SBC_V4,
            ),
            env=env,
            capture_output=True,
            timeout=20,
            cwd=tmp_path,
        )

    started = time.monotonic()
    svwar(fw_lab.PEER_V4)
    banned_at = lab.set_elements("blacklist_v4")
    data = fw_lab.read_status(status)
    assert banned_at == [fw_lab.PEER_V4]
    ban = data["bans"][0]
    assert ban["reason"].startswith("scanner-user-agent: User-Agent 'friendly-scanner'")
    # Banned at the first request; the rest of the sweep died in the kernel.
    assert ban["requests_before"] <= 2
    assert data["requests"][fw_lab.PEER_V4] <= 3
    assert lab.counters()["fw_drop_blacklist_v4"] > 0
    # The ban expires on time (8 s) and the peer is answered again.
    time.sleep(max(0.0, ban["expires"] - time.time()) + 0.5)
    assert lab.set_elements("blacklist_v4") == []
    assert _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=1) == 1
    # A trusted peer doing the same is never banned and answered throughout.
    svwar(fw_lab.TRUNK_V4)
    # svwar stops early when every user gets the same 401; sweep 60 users by hand too.
    answered = _send(
        lab,
        source=fw_lab.TRUNK_V4,
        target=fw_lab.SBC_V4,
        count=60,
        method="REGISTER",
        user_agent="friendly-scanner",
        distinct_users=True,
    )
    assert answered == 60
    time.sleep(0.5)  # the node writes its status every 0.2 s
    data = fw_lab.read_status(status)
    fw_lab.stop_node(node)
    assert all(b["target"] != f"{fw_lab.TRUNK_V4}/32" for b in data["bans"])
    assert data["requests"][fw_lab.TRUNK_V4] >= 61
    assert data["trusted_events"] == data["requests"][fw_lab.TRUNK_V4]
    print(
        {
            "time_to_ban_requests": ban["requests_before"],
            "ban_seconds": round(ban["expires"] - ban["created"], 2),
            "test_seconds": round(time.monotonic() - started, 1),
        }
    )


def test_repeated_digest_failures_ban_the_source(lab: fw_lab.Lab, tmp_path: Path) -> None:
    options = {"auth": [60.0, 3, 100], "state_file": str(tmp_path / "bl.json")}
    status = tmp_path / "s.json"
    node = fw_lab.start_node(lab, options, status)
    statuses = json.loads(
        fw_lab.lab_python(
            lab,
            lab.ext,
            "register",
            json.dumps(
                {
                    "source": fw_lab.PEER_V4,
                    "target": fw_lab.SBC_V4,
                    "user": "alice",
                    "password": "wrong",
                    "count": 5,
                }
            ),
        )
    )
    good = json.loads(
        fw_lab.lab_python(
            lab,
            lab.ext,
            "register",
            json.dumps(
                {
                    "source": fw_lab.TRUNK_V4,
                    "target": fw_lab.SBC_V4,
                    "user": "bob",
                    "password": fw_lab.PASSWORD,
                    "count": 1,
                }
            ),
        )
    )
    data = fw_lab.read_status(status)
    fw_lab.stop_node(node)
    # Three failures (403), then silence: the source is in the kernel blacklist.
    assert statuses == [403, 403, 403, 0, 0]
    assert good == [200]
    assert [b["target"] for b in data["bans"]] == [f"{fw_lab.PEER_V4}/32"]
    assert data["bans"][0]["reason"].startswith("auth-failures: 3 digest failures in 60 s")
