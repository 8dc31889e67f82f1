"""The real `sbc run` with `firewall.enabled`, in the two-namespace lab of `fw_lab`.

A scanner (sipvicious svmap, User-Agent friendly-scanner) from an untrusted source is
banned and dropped in the kernel; the trusted trunk sending the same is answered;
malformed messages ban an IPv6 /64; SIGHUP reloads the rules and keeps the bans;
media pinholes a crashed SBC left open are closed at the start;
`sbc ban list` shows them; on stop the host's tables are as they were and table inet
sbc is gone.
"""

from __future__ import annotations

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
from tests.scenario import fw_lab

pytestmark = [pytest.mark.root]

#: Tables of others in the SBC's namespace (a host firewall, NAT): never touched.
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
"""

#: What a crashed SBC can leave: media ports open in the pinhole set.
CRASHED_PINHOLES = """\
table inet sbc {
 set fw_media_pinholes {
  type inet_service
  elements = { 20000, 20001 }
 }
}
"""

MGMT_PORT = 18080


def config_text(state_dir: Path, state_file: Path) -> str:
    # No sip_ports: the firewall meters the listeners' ports (udp and tcp 5060, no tls).
    return f"""\
state_dir: {state_dir}
sip:
  listen:
    - {{transport: udp, address: {fw_lab.SBC_V4}, port: 5060}}
    - {{transport: tcp, address: {fw_lab.SBC_V4}, port: 5060}}
    - {{transport: udp, address: "{fw_lab.SBC_V6}", port: 5060}}
management:
  listen: {{address: 127.0.0.1, port: {MGMT_PORT}}}
firewall:
  enabled: true
  required: true
  trusted: [{fw_lab.TRUNK_V4}/32]
  state_file: {state_file}
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


def _svmap(lab: fw_lab.Lab, source: str) -> str:
    """sipvicious' svmap from `source` against the SBC: its report."""
    return lab.run(
        lab.ext,
        "timeout",
        "15",
        "svmap",
        "-b",
        source,
        "-p",
        "5060",
        fw_lab.SBC_V4,
        check=False,
        timeout=20,
    )


def _start_sbc(lab: fw_lab.Lab, config: Path, log: Path) -> subprocess.Popen[Any]:
    return fw_lab.spawn_sbc(lab, config, log, config.parent, MGMT_PORT)


def test_sbc_bans_a_scanner_not_the_trunk_and_leaves_the_host_ruleset(
    lab: fw_lab.Lab, tmp_path: Path
) -> None:
    subprocess.run(lab.ns(lab.sbc, "nft", "-f", "-"), input=HOST_RULESET, text=True, check=True)
    host_before = lab.ruleset_outside_sbc()
    # A crashed SBC's media pinholes, still open: the start closes them.
    subprocess.run(
        lab.ns(lab.sbc, "nft", "-f", "-"),
        input=CRASHED_PINHOLES,
        text=True,
        check=True,
    )
    state_file = tmp_path / "blacklist.json"
    config = tmp_path / "sbc.yaml"
    config.write_text(config_text(tmp_path / "state", state_file))
    log = tmp_path / "sbc.log"
    proc = _start_sbc(lab, config, log)
    try:
        health = fw_lab.sbc_health(lab, MGMT_PORT)
        assert health is not None and health["firewall"] == {"enabled": True, "bans": 0}
        table = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc")
        # The SIP ports came from the listeners: udp and tcp meters, none for tls.
        assert "fw_meter_udp_v4" in table and "fw_meter_tcp_v4" in table
        assert "fw_meter_tls_v4" not in table
        assert lab.ruleset_outside_sbc() == host_before
        assert lab.set_elements("fw_media_pinholes") == []

        # An ordinary phone at the untrusted address is answered.
        assert _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=2) == 2

        scanner = "friendly-scanner"
        sipvicious = shutil.which("svmap") is not None
        # The trusted trunk scanning (or probing with the scanner's User-Agent) is
        # answered and not banned.
        if sipvicious:
            assert f"{fw_lab.SBC_V4}:5060" in _svmap(lab, fw_lab.TRUNK_V4)
        answered = _send(
            lab, source=fw_lab.TRUNK_V4, target=fw_lab.SBC_V4, count=5, user_agent=scanner
        )
        assert answered == 5
        assert lab.set_elements("blacklist_v4") == []

        # The same from the untrusted address: banned at the first request, which
        # gets no answer either, so the scanner learns nothing.
        if sipvicious:
            assert f"{fw_lab.SBC_V4}:5060" not in _svmap(lab, fw_lab.PEER_V4)
        else:
            _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=5, user_agent=scanner)
        assert lab.set_elements("blacklist_v4") == [fw_lab.PEER_V4]
        before = lab.counters()["fw_drop_blacklist_v4"]
        # Banned: not even a friendly User-Agent gets an answer, the kernel drops it.
        assert _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=4, wait=0.2) == 0
        assert lab.counters()["fw_drop_blacklist_v4"] >= before + 4
        assert _send(lab, source=fw_lab.TRUNK_V4, target=fw_lab.SBC_V4, count=1) == 1

        # Malformed messages (default: over 10 a minute) ban the sender's /64: the
        # transport layer's parse errors reach the detectors too.
        garbage = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            f"s.bind(('{fw_lab.EXT_V6[1]}', 0))\n"
            "for i in range(12):\n"
            f"    s.sendto(b'NOT SIP AT ALL %d\\r\\n\\r\\n' % i, ('{fw_lab.SBC_V6}', 5060))\n"
        )
        lab.run(lab.ext, sys.executable, "-c", garbage)
        deadline = time.monotonic() + 3
        while not lab.set_elements("blacklist_v6") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lab.set_elements("blacklist_v6") != []

        # SIGHUP with a changed firewall section: new meters, the ban stays.
        config.write_text(config.read_text() + "  udp: {rate: 50, burst: 150}\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "- firewall reloaded" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        table = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc")
        assert "limit rate over 50/second burst 150 packets" in table
        assert lab.set_elements("blacklist_v4") == [fw_lab.PEER_V4]

        listed = subprocess.run(
            lab.ns(
                lab.sbc,
                sys.executable,
                "-m",
                "sbc",
                "ban",
                "--state-file",
                str(state_file),
                "list",
                "--json",
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        bans = json.loads(listed.stdout)
        by_target = {b["target"]: b for b in bans}
        assert sorted(by_target) == ["198.51.100.3/32", "2001:db8:1:2::/64"]
        assert scanner in by_target["198.51.100.3/32"]["reason"]
        assert "malformed" in by_target["2001:db8:1:2::/64"]["reason"]
        assert all(b["in_kernel"] for b in bans)
        time.sleep(1.2)  # the SBC's once-a-second flush
        health = fw_lab.sbc_health(lab, MGMT_PORT)
        assert health is not None and health["firewall"] == {"enabled": True, "bans": 2}
    finally:
        code = fw_lab.stop_sbc(proc)
    assert code == 0, log.read_text()
    gone = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc", check=False)
    assert gone == ""
    assert lab.ruleset_outside_sbc() == host_before
    saved = json.loads(state_file.read_text())
    assert sorted(b["target"] for b in saved["bans"]) == sorted(by_target)
    assert "x ban 198.51.100.3/32" in log.read_text()


def test_sbc_puts_its_table_back_after_a_ruleset_flush(lab: fw_lab.Lab, tmp_path: Path) -> None:
    """`nft flush ruleset` (what restarting nftables.service does) under a running
    SBC: within a check interval its table is back, the bans restored from the
    state file and the media kernel path's base objects with them."""
    state_file = tmp_path / "blacklist.json"
    config = tmp_path / "sbc.yaml"
    config.write_text(config_text(tmp_path / "state", state_file))
    log = tmp_path / "sbc.log"
    proc = _start_sbc(lab, config, log)
    try:
        scanner = "friendly-scanner"
        _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=2, user_agent=scanner)
        assert lab.set_elements("blacklist_v4") == [fw_lab.PEER_V4]
        before = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc")
        media = "media_prerouting" in before
        # One table check has passed: a table that is there raises no alarm.
        time.sleep(TABLE_CHECK_INTERVAL + 0.5)
        assert "is gone" not in log.read_text()

        lab.run(lab.sbc, "nft", "flush", "ruleset")
        assert lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc", check=False) == ""
        deadline = time.monotonic() + 15
        table = ""
        while time.monotonic() < deadline:
            table = lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc", check=False)
            if "fw_meter_udp_v4" in table and lab.set_elements("blacklist_v4"):
                break
            time.sleep(0.2)
        assert "fw_meter_udp_v4" in table, log.read_text()
        assert ("media_prerouting" in table) == media
        assert lab.set_elements("blacklist_v4") == [fw_lab.PEER_V4]
        # The ban holds in the kernel again; others are answered.
        dropped = lab.counters()["fw_drop_blacklist_v4"]
        assert _send(lab, source=fw_lab.PEER_V4, target=fw_lab.SBC_V4, count=3, wait=0.2) == 0
        assert lab.counters()["fw_drop_blacklist_v4"] >= dropped + 3
        assert _send(lab, source=fw_lab.TRUNK_V4, target=fw_lab.SBC_V4, count=1) == 1
        # The next check finds the table back: one alarm, one reinstall.
        time.sleep(TABLE_CHECK_INTERVAL + 0.5)
        text = log.read_text()
        assert text.count("x nftables table inet sbc is gone") == 1, text
        assert text.count("firewall installed in table inet sbc (1 bans restored") == 1, text
        health = fw_lab.sbc_health(lab, MGMT_PORT)
        assert health is not None and health["nft_table"]["restores"] == 1, health
        assert health["nft_table"]["checked_s_ago"] <= TABLE_CHECK_INTERVAL + 1, health
    finally:
        code = fw_lab.stop_sbc(proc)
    assert code == 0, log.read_text()
    assert lab.run(lab.sbc, "nft", "list", "table", "inet", "sbc", check=False) == ""
