"""IPv6 <-> IPv4 and UDP <-> TCP interworking: a call between realms of each kind.

The caller (SIPp) speaks SIP over UDP on IPv6 to the outside realm on ::1; the
callee (SIPp) is reached over TCP on IPv4 from the inside realm on 127.0.0.1. Each
side sees only its own address family and transport, in SIP and in SDP (the relay
allocates media on each realm's own address).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.test_b2bua_sipp import _messages

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent / "sipp"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


if not os.environ.get("CI") and (SIPP is None or not _ipv6_loopback()):
    pytest.skip("needs sipp and IPv6 on loopback", allow_module_level=True)


def free_port6() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
            u.bind(("::1", 0))
            port = int(u.getsockname()[1])
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t:
            try:
                t.bind(("::1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free IPv6 port")


def test_ipv6_udp_caller_reaches_ipv4_tcp_callee(tmp_path: Path) -> None:
    assert SIPP is not None
    outside, inside, uas, uac = free_port6(), free_port(), free_port(), free_port6()
    ports = Ports(free_port(also_udp=True), 0, free_port())
    config = tmp_path / "sbc.yaml"
    config.write_text(
        f"""\
state_dir: {tmp_path / "state"}
sip:
  listen: [{{transport: udp, address: 127.0.0.1, port: {ports.sip}}}]
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
realms:
  - name: v6
    listen: [{{transport: udp, address: "::1", port: {outside}}}]
    media_address: "::1"
  - name: v4
    listen: [{{transport: tcp, address: 127.0.0.1, port: {inside}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-v4, from_realm: v6, action: trunk, realm: v4, host: 127.0.0.1, port: {uas},
      transport: tcp}}
media: {{kernel_path: false}}
"""
    )
    sbc = SbcProcess(tmp_path, config, ports).start()
    common = ["-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin", "-trace_msg"]
    callee = subprocess.Popen(
        [SIPP, "-sf", str(SCENARIOS / "uas_basic.xml"), "-i", "127.0.0.1", "-p", str(uas),
         "-t", "t1", "-mp", str(free_port(also_udp=True)), *common,
         "-message_file", str(tmp_path / "uas.msg")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        caller = subprocess.run(
            [SIPP, "-sf", str(SCENARIOS / "uac_basic.xml"), "-i", "::1", "-p", str(uac),
             "-t", "u1", "-mp", str(free_port6()), "-s", "1000", *common,
             "-message_file", str(tmp_path / "uac.msg"), f"[::1]:{outside}"],
            cwd=tmp_path, capture_output=True, timeout=40, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        _, callee_err = callee.communicate(timeout=30)
    finally:
        if callee.poll() is None:
            callee.kill()
            callee.wait(5)
        sbc.stop()
    log = sbc.log()
    assert caller.returncode == 0, caller.stderr.decode(errors="replace") + log
    assert callee.returncode == 0, callee_err.decode(errors="replace") + log
    seen_by_callee = "\n".join(m for m in _messages(tmp_path / "uas.msg") if m.startswith("<"))
    seen_by_caller = "\n".join(m for m in _messages(tmp_path / "uac.msg") if m.startswith("<"))
    # The callee gets IPv4 over TCP only: Via, Contact and SDP name the v4 realm.
    assert "SIP/2.0/TCP 127.0.0.1" in seen_by_callee and "c=IN IP4 127.0.0.1" in seen_by_callee
    assert "::1" not in seen_by_callee and "IP6" not in seen_by_callee
    # The caller gets IPv6 answers: Contact and SDP on the v6 realm's address.
    assert "c=IN IP6 ::1" in seen_by_caller and "127.0.0.1" not in seen_by_caller
    assert "TCP" not in seen_by_caller
