"""One flood step against the real `sbc run`: SIPp calls through the B2BUA under a flood.

Topology (the two namespaces of `fw_lab`):

    ext                                       sbc
    198.51.100.2 SIPp UAC (trusted trunk) --> 198.51.100.1:5060 realm "outside" (sbc run)
    spoofed 203.0.113.0/24, 198.51.100.64/26      |  route user 1000* -> inside
      C flooder (INVITE/REGISTER/garbage)         v
                                              127.0.0.1:5080 realm "inside"
                                              127.0.0.1:5090 SIPp UAS (same namespace, lo)

The firewall meters the realms' UDP ports per source and the detectors ban the flood
sources; `iif lo` is accepted, so the inside leg is never metered. The flood's INVITEs
are for user 100, which no route matches: the few that get through are answered
404 and never reach the UAS.

`run_step()` returns the figures of one step: flood packets/rate, kernel drops (nft
counters), UDP datagrams that reached sockets in the SBC namespace (/proc/net/snmp,
per namespace), SIPp's successful/failed calls, CPU of the `sbc run` process
(/proc/PID/stat utime+stime) and machine-wide idle (/proc/stat) over the flood window.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.scenario import fw_lab

SCENARIOS = Path(__file__).parent / "sipp"
ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_PORT = 5060
INSIDE_PORT = 5080
UAS_PORT = 5090
PLAIN_PORT = 5072  # sip.listen, on the namespace's loopback only
MGMT_PORT = 18091
FLOOD_SOURCES = ("203.0.113.1", "254", "198.51.100.64", "190")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def missing() -> str | None:
    """Why a flood step cannot run here, or None."""
    why = fw_lab.available()
    if why:
        return why
    if shutil.which("sipp") is None:
        return "SIPp (Debian sip-tester) not installed"
    if shutil.which("gcc") is None:
        return "gcc needed for the flood sender"
    return None


#: The per-source meter and detectors of the test (as test_firewall_flood.py's stand-in):
#: with the defaults (100 packets/s per source, 60 requests in 2 s) 444 sources pass
#: ~44k packets/s to user space until each is banned, which saturates the SBC for seconds.
TIGHT = """\
  udp: {rate: 10, burst: 20}
  detectors:
    rate: {window: 2.0, max_requests: 20}
    malformed: {window: 10, max_messages: 5}
"""


def config_text(workdir: Path, firewall_extra: str = TIGHT) -> str:
    return f"""\
state_dir: {workdir / "state"}
log:
  level: warning
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: {PLAIN_PORT}}}
management:
  listen: {{address: 127.0.0.1, port: {MGMT_PORT}}}
realms:
  - name: outside
    listen: [{{transport: udp, address: {fw_lab.SBC_V4}, port: {OUTSIDE_PORT}}}]
    media_address: {fw_lab.SBC_V4}
  - name: inside
    listen: [{{transport: udp, address: 127.0.0.1, port: {INSIDE_PORT}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-uas, from_realm: outside, user_prefix: "1000", action: trunk, realm: inside,
      host: 127.0.0.1, port: {UAS_PORT}, transport: udp}}
firewall:
  enabled: true
  required: true
  trusted: [{fw_lab.TRUNK_V4}/32]
  state_file: {workdir / "blacklist.json"}
{firewall_extra}"""


def start_sbc(lab: fw_lab.Lab, workdir: Path, firewall_extra: str) -> subprocess.Popen[Any]:
    config = workdir / "sbc.yaml"
    config.write_text(config_text(workdir, firewall_extra))
    return fw_lab.spawn_sbc(lab, config, workdir / "sbc.log", ROOT, MGMT_PORT)


def stop_sbc(proc: subprocess.Popen[Any], timeout: float = 15) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return -9


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the comm: state is fields[0]; utime and stime are fields 14 and 15 of stat.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values[:8])


def udp_snmp(lab: fw_lab.Lab) -> dict[str, int]:
    """The Udp: line of /proc/net/snmp in the SBC namespace (per namespace)."""
    lines = [
        line.split()
        for line in lab.run(lab.sbc, "cat", "/proc/net/snmp").splitlines()
        if line.startswith("Udp:")
    ]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def _sipp_stats(path: Path) -> tuple[int, int, int, str]:
    """Successful and failed calls, retransmissions, mean INVITE->200 time (hh:mm:ss:us)."""
    rows = list(csv.reader(path.open(), delimiter=";"))
    header, last = rows[0], rows[-1]
    return (
        int(last[header.index("SuccessfulCall(C)")]),
        int(last[header.index("FailedCall(C)")]),
        int(last[header.index("Retransmissions(C)")]),
        last[header.index("ResponseTime1(C)")],
    )


def run_step(
    workdir: Path,
    flooder: Path,
    *,
    flood_pps: int,
    flood_seconds: float,
    calls: int,
    call_rate: int,
    firewall_extra: str = TIGHT,
) -> dict[str, Any]:
    """One lab, one SBC, one flood at `flood_pps` (0: as fast as the sender goes; < 0: none)."""
    workdir.mkdir(parents=True, exist_ok=True)
    max_packets = int((flood_pps or 1_000_000) * flood_seconds)
    call_window = calls / call_rate + 10
    started = time.monotonic()
    # Other work on the machine skews the CPU figures: record the load at the start.
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    with fw_lab.lab() as lab:
        sbc = start_sbc(lab, workdir, firewall_extra)
        try:
            uas = lab.spawn(
                lab.sbc,
                "timeout", str(int(call_window + 20)),
                "sipp", "-sf", str(SCENARIOS / "uas_basic.xml"), "-i", "127.0.0.1",
                "-p", str(UAS_PORT), "-mp", "31500", "-m", str(calls), "-nostdin",
                "-timeout", f"{int(call_window + 15)}s",
                "-trace_err", "-error_file", str(workdir / "uas-err.log"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
            )  # fmt: skip
            stat_file = workdir / "uac.csv"
            uac = lab.spawn(
                lab.ext,
                "timeout", str(int(call_window + 15)),
                "sipp", "-sf", str(SCENARIOS / "uac_basic.xml"),
                f"{fw_lab.SBC_V4}:{OUTSIDE_PORT}", "-i", fw_lab.TRUNK_V4, "-p", "5070",
                "-mp", "31000", "-s", "1000", "-r", str(call_rate), "-m", str(calls),
                "-nostdin", "-trace_stat", "-stf", str(stat_file), "-fd", "1",
                "-timeout", f"{int(call_window + 10)}s", "-timeout_error",
                "-trace_err", "-error_file", str(workdir / "uac-err.log"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=workdir,
            )  # fmt: skip
            time.sleep(0.5)  # calls already flowing when the flood starts
            # The firewall's media pinholes, sampled while the calls run (each call
            # opens its relay ports, and closes them when it ends).
            pinholes_peak = [0]
            sampling = threading.Event()

            def sample_pinholes() -> None:
                while not sampling.wait(0.5):
                    open_now = len(lab.set_elements("fw_media_pinholes"))
                    pinholes_peak[0] = max(pinholes_peak[0], open_now)

            sampler = threading.Thread(target=sample_pinholes, daemon=True)
            sampler.start()
            snmp0 = udp_snmp(lab)
            cpu0, (idle0, total0), t0 = proc_cpu_seconds(sbc.pid), cpu_times(), time.monotonic()
            if flood_pps < 0:  # baseline: calls only, same window
                time.sleep(flood_seconds)
                flood_out = f"sent 0 seconds {flood_seconds}"
            else:
                flood_out = subprocess.run(
                    lab.ns(
                        lab.ext,
                        str(flooder),
                        fw_lab.SBC_V4,
                        str(OUTSIDE_PORT),
                        str(max_packets),
                        str(flood_seconds),
                        str(flood_pps),
                        *FLOOD_SOURCES,
                    ),
                    capture_output=True,
                    text=True,
                    timeout=flood_seconds + 10,
                    check=True,
                ).stdout
            cpu1, (idle1, total1), t1 = proc_cpu_seconds(sbc.pid), cpu_times(), time.monotonic()
            snmp1 = udp_snmp(lab)
            sent, seconds = int(flood_out.split()[1]), float(flood_out.split()[3])
            try:
                _, uac_err = uac.communicate(timeout=call_window + 20)
            except subprocess.TimeoutExpired:
                uac.kill()
                _, uac_err = uac.communicate(timeout=5)
            try:  # the UAS has answered every call by now; don't wait for its -timeout
                uas.wait(timeout=3)
            except subprocess.TimeoutExpired:
                uas.terminate()
                uas.wait(timeout=5)
            sampling.set()
            sampler.join(10)
            # Every call has ended: its pinholes go with it (within a round or two).
            deadline = time.monotonic() + 5
            while lab.set_elements("fw_media_pinholes") and time.monotonic() < deadline:
                time.sleep(0.2)
            pinholes_left = len(lab.set_elements("fw_media_pinholes"))
            # A call can outlive SIPp's: under the flood the SBC's datagrams to SIPp
            # may be lost too, and SIPp give up on a call the SBC still has until
            # its own timers end it (no ACK for 64*T1). Its ports are still open
            # meanwhile. (uac_basic.xml matches responses to their transaction: a
            # retransmitted 2xx is no longer taken for the BYE's answer.)
            after_calls = fw_lab.sbc_health(lab, MGMT_PORT) or {}
            counters = lab.counters()
            banned = lab.set_elements("blacklist_v4")
            health = fw_lab.sbc_health(lab, MGMT_PORT)
        finally:
            code = stop_sbc(sbc)
    log = (workdir / "sbc.log").read_text(errors="replace")
    ok, failed, retrans, setup_time = _sipp_stats(stat_file)
    wall = t1 - t0
    delivered = (snmp1["InDatagrams"] - snmp0["InDatagrams"]) + (
        snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"]
    )
    kernel_dropped = sum(v for k, v in counters.items() if k.startswith("fw_drop_"))
    return {
        "flood_pps_target": flood_pps,
        "flood_packets": sent,
        "flood_seconds": round(seconds, 2),
        "flood_pps": round(sent / seconds) if seconds else 0,
        "kernel_dropped": kernel_dropped,
        "kernel_dropped_pct": round(100.0 * kernel_dropped / sent, 2) if sent else 0.0,
        "drop_rate_udp_v4": counters.get("fw_drop_rate_udp_v4", 0),
        "drop_blacklist_v4": counters.get("fw_drop_blacklist_v4", 0),
        "drop_total_udp": counters.get("fw_drop_total_udp", 0),
        "accept_trusted_v4": counters.get("fw_accept_trusted_v4", 0),
        "udp_delivered_in_sbc_ns": delivered,
        "udp_rcvbuf_errors": snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"],
        "sources_banned": len(banned),
        "trunk_banned": fw_lab.TRUNK_V4 in banned,
        "health_bans": (health or {}).get("firewall", {}).get("bans"),
        "calls_attempted": calls,
        "calls_ok": ok,
        "calls_failed": failed,
        "calls_ok_pct": round(100.0 * ok / calls, 2),
        "uac_retransmissions": retrans,
        "uac_setup_time_mean": setup_time,
        "sbc_cpu_pct": round(100.0 * (cpu1 - cpu0) / wall, 1),
        "cpu_idle_pct": round(100.0 * (idle1 - idle0) / max(1, total1 - total0), 1),
        "ncpu": os.cpu_count(),
        "load1_at_start": load1,
        "sbc_exit": code,
        "sbc_tracebacks": log.count("Traceback"),
        "pinholes_peak": pinholes_peak[0],
        "pinholes_left": pinholes_left,
        "calls_left": after_calls.get("calls"),
        "media_sessions_left": after_calls.get("media_sessions"),
        "pinhole_errors": log.count("x firewall pinholes"),
        "uac_stderr": (uac_err or "")[-500:],
        "step_seconds": round(time.monotonic() - started, 1),
    }
