"""B2BUA signalling benchmark: the SBC, sippy's B2BUA and Kamailio, side by side.

    .venv/bin/python tests/bench/b2bua_bench.py [--quick] [--json OUT]
        [--systems sbc,sippy,kamailio] [--parts calls,register,hold]
        [--hold-calls N] [--hold-rate R] [--hold-uncapped] [--kamailio-children N]

One load generator (SIPp, Debian sip-tester) drives every system under test the
same way, on loopback, over UDP:

- Call rate. A call is INVITE (with an SDP offer),
  100/180/200 (SDP answer), ACK, BYE, 200; no media. For each system the rate steps
  up (100, 200, 400 ... calls/s, doubling up to a cap) and is then bisected between
  the last passing and the first failing rate. A step is ``rate x seconds`` calls
  from a fresh SIPp caller to a fresh SIPp callee through a freshly started system;
  it passes when fewer than 0.1 % of its calls fail (SIPp's -trace_stat counts) and
  SIPp got through them in time (the system kept up with the rate instead of
  queueing). "SIPp alone" (caller straight to callee, one step at the cap) shows
  whether the generator itself keeps up there.
- REGISTER rate, the same way: Kamailio's registrar (registrar + usrloc, in memory)
  and the SBC's, skipped with a message while the SBC answers REGISTER with 405.
  When the SBC challenges REGISTER, both run with digest authentication: the bench
  creates users in the SBC's users table (its own SqliteCredentials) and hands SIPp
  the same users ([authentication], tests/bench/sipp/uac_register_auth.xml).
- Concurrent calls: SIPp holds calls open (a long pause before BYE) until the SBC
  carries --hold-calls of them (20,000; 1,000 in --quick); the SBC's RSS
  (/proc/PID/status VmRSS) before and at the plateau gives the memory per call, and
  in the full run the RSS slope late in the ramp gives it without the ramp's
  transactions. The relay holds 4 UDP sockets per call, so the target is cut to
  what the open-files hard limit allows (raised to 262,144 when this process may),
  with a note; --hold-uncapped aims at the target anyway, to see how the SBC fails.

The systems under test:

- the SBC: ``sbc run --config FILE``, two realms on 127.0.0.2 (outside, the caller's)
  and 127.0.0.3 (inside, toward the callee), each its own media address, so a call
  takes one RTP/RTCP pair per address; a trunk route sends every call to the callee.
  Log level warning, media ports 10000-60999, no nftables fast path, a media timeout
  of an hour (no RTP flows; the default 30 s would end every held call).
- sippy: ``b2bua`` (sippy's B2BUA, ``sippy.b2bua``) with a static route to the callee,
  no RADIUS authentication (-u) or accounting (-A 0), no RTPproxy; SIPLOG_LVL=WARN.
- Kamailio: tests/bench/kamailio/kamailio.cfg, a stateful (tm) record-routing proxy
  with dialog tracking (dlg_manage) and topology hiding (topoh), errors-only logging;
  TLSF memory allocator (-x tlsf; Debian's default q_malloc was several times
  slower here). One SIP worker (children=1) for its one core (--kamailio-children).

The caller ignores a 180 that arrives after the 200 (SIPp transaction matching, as a
phone would): sippy's worker threads, or several Kamailio workers, reorder them now
and then, and that is no failed call.

Each system is pinned to one CPU (taskset), SIPp's caller and callee to another.
Every process started here is stopped by its PID (a system's descendants too) at the
end of its step and on exit, failure or interrupt included; every SIPp run is
bounded in calls (-m) and time (-timeout, and a deadline here).

The pure parts (SIPp statistics, the verdict of a step, the rate search, memory per
call) have tests at the end of this file: ``pytest -q tests/bench/b2bua_bench.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
BENCH: Final = Path(__file__).resolve().parent
SCENARIOS: Final = BENCH / "sipp"
KAMAILIO_TEMPLATE: Final = BENCH / "kamailio" / "kamailio.cfg"
BUILD: Final = ROOT / "build" / "bench-b2bua"
VENV_BIN: Final = ROOT / ".venv" / "bin"

#: A step fails at this share of failed calls (the issue's "< 0.1 % failed calls").
MAX_FAILED: Final = 0.001
#: A step also fails when SIPp needed longer than this share of the step's nominal
#: duration (calls / rate), plus KEEP_UP_SLACK for SIPp's start and the last call: the
#: system fell behind the rate and queued, even if every call got through in the end.
KEEP_UP: Final = 1.05
KEEP_UP_SLACK: Final = 0.3
#: A call whose next message does not come within this many ms fails (SIPp -recv_timeout).
RECV_TIMEOUT_MS: Final = 5000
#: Rates are bisected down to this many calls/s.
RATE_GRANULARITY: Final = 10
#: Socket buffers of SIPp (-buff_size); net.core.rmem_max caps them.
SIPP_BUFFER: Final = 4 * 1024 * 1024
#: Open files of the SBC: its media relay holds 4 sockets per call.
SBC_NOFILE: Final = 262_144
#: Ports the colleagues' tests use on 127.0.0.1; never picked here.
RESERVED_PORTS: Final = frozenset({5060, 5061, 8080})
#: The SBC's media ports with the `media:` config section (two realms, two addresses:
#: 25,500 RTP/RTCP pairs each, enough for 20,000 calls).
MEDIA_PORT_MIN: Final = 10000
#: The SBC's realm listeners take a port in SIP_PORT_MIN..MEDIA_PORT_MIN-1.
SIP_PORT_MIN: Final = 5100
MEDIA_PORT_MAX: Final = 60999
#: The concurrent-calls ramp lasts at least this long in the full run.
HOLD_RAMP_SECONDS: Final = 60
#: Seconds without RTP before the SBC ends a call (config media.timeout): no media here.
MEDIA_TIMEOUT: Final = 3600
#: UDP sockets the SBC's relay holds per call (RTP and RTCP on each side), and the
#: descriptors kept for everything else when sizing a run to the open-files limit.
SOCKETS_PER_CALL: Final = 4
FD_RESERVE: Final = 300
#: Without it: the relay's built-in range.
DEFAULT_MEDIA_PORTS: Final = (20000, 29999)
#: RFC 6026 Timer L / RFC 3261 Timer J: 64*T1 = 32 s after the last transaction of the
#: ramp, only the calls themselves are left in memory.
TRANSACTION_LINGER: Final = 33.0

OUTSIDE_ADDRESS: Final = "127.0.0.2"
INSIDE_ADDRESS: Final = "127.0.0.3"
LOOPBACK: Final = "127.0.0.1"


class Kind(enum.StrEnum):
    """What a SIPp run measures."""

    CALLS = "calls"
    REGISTER = "register"
    #: REGISTER, 401/407 challenge, REGISTER with credentials, 200 (one "call").
    REGISTER_AUTH = "register-auth"


#: The caller's scenario of each kind (tests/bench/sipp/).
SCENARIO: Final = {
    Kind.CALLS: "uac_call.xml",
    Kind.REGISTER: "uac_register.xml",
    Kind.REGISTER_AUTH: "uac_register_auth.xml",
}


# -- SIPp statistics and verdicts (pure) -------------------------------------------------


@dataclass(frozen=True)
class SippStats:
    """The last row of a SIPp -trace_stat file (cumulative counters)."""

    created: int
    successful: int
    failed: int
    current: int
    retransmissions: int
    #: Mean response time of the rtd named ``setup`` (or ``register``), in ms.
    response_ms: float | None

    @classmethod
    def parse(cls, text: str) -> SippStats:
        """The counters of SIPp's ';'-separated statistics (header line, then rows).

        ValueError when there is no data row or a counter is missing.
        """
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise ValueError("SIPp statistics: no data row")
        header = lines[0].split(";")
        row = lines[-1].split(";")

        def value(name: str) -> str:
            try:
                return row[header.index(name)]
            except (ValueError, IndexError):
                raise ValueError(f"SIPp statistics: no column {name}") from None

        response = None
        for rtd in ("setup", "register"):
            name = f"ResponseTime{rtd}(C)"
            if name in header:
                response = _sipp_duration_ms(value(name))
                break
        return cls(
            created=int(value("TotalCallCreated")),
            successful=int(value("SuccessfulCall(C)")),
            failed=int(value("FailedCall(C)")),
            current=int(value("CurrentCall")),
            retransmissions=int(value("Retransmissions(C)")),
            response_ms=response,
        )


def _sipp_duration_ms(text: str) -> float:
    """SIPp's ``HH:MM:SS:uuuuuu`` as milliseconds."""
    hours, minutes, seconds, micros = (int(part) for part in text.split(":"))
    return (hours * 3600 + minutes * 60 + seconds) * 1000.0 + micros / 1000.0


@dataclass(frozen=True)
class Step:
    """One bounded SIPp run against one system at one rate."""

    system: str
    kind: Kind
    rate: int
    calls: int
    successful: int
    failed: int
    retransmissions: int
    wall: float
    response_ms: float | None
    sut_cpu: float
    generator_cpu: float
    error: str = ""

    @property
    def lost(self) -> int:
        """Calls that did not succeed, those SIPp never finished included."""
        return self.calls - self.successful

    @property
    def failed_share(self) -> float:
        return self.lost / self.calls if self.calls else 1.0

    @property
    def deadline(self) -> float:
        """The longest SIPp may take for the step to count as keeping up."""
        return self.calls / self.rate * KEEP_UP + KEEP_UP_SLACK

    @property
    def kept_up(self) -> bool:
        return self.wall <= self.deadline

    @property
    def passed(self) -> bool:
        return not self.error and self.failed_share < MAX_FAILED and self.kept_up

    @property
    def generator_busy(self) -> float:
        """SIPp's CPU (caller + callee) as a share of its one core over the step."""
        return self.generator_cpu / self.wall if self.wall > 0 else 0.0

    @property
    def sut_cpu_ms_per_call(self) -> float:
        return 1000.0 * self.sut_cpu / self.successful if self.successful else math.nan

    def verdict(self) -> str:
        if self.error:
            return f"error: {self.error}"
        reasons = []
        if self.failed_share >= MAX_FAILED:
            reasons.append(f"{self.lost} failed ({100 * self.failed_share:.2f} %)")
        if not self.kept_up:
            reasons.append(f"took {self.wall:.1f} s > {self.deadline:.1f} s")
        return "pass" if not reasons else "FAIL: " + ", ".join(reasons)


@dataclass(frozen=True)
class Search:
    """The highest passing rate of a step-up-then-bisect search."""

    best: int
    steps: tuple[Step, ...]
    #: The cap was reached without a failure: the system may go faster.
    capped: bool

    @property
    def best_step(self) -> Step | None:
        passing = [s for s in self.steps if s.passed and s.rate == self.best]
        return passing[-1] if passing else None


def search_rate(run: Callable[[int], Step], start: int, cap: int, bisections: int) -> Search:
    """Double the rate from ``start`` while steps pass (up to ``cap``), then bisect
    ``bisections`` times between the last pass and the first failure."""
    steps: list[Step] = []
    best, failed_at = 0, None
    rate = start
    while rate <= cap:
        step = run(rate)
        steps.append(step)
        if not step.passed:
            failed_at = rate
            break
        best = rate
        rate *= 2
    if failed_at is None:
        return Search(best, tuple(steps), capped=True)
    low, high = best, failed_at
    for _ in range(bisections):
        middle = (low + high) // 2 // RATE_GRANULARITY * RATE_GRANULARITY
        if middle <= low or middle >= high:
            break
        step = run(middle)
        steps.append(step)
        if step.passed:
            low = middle
        else:
            high = middle
    return Search(low, tuple(steps), capped=False)


def marginal_kib_per_call(
    timeline: list[tuple[float, int, int]], after: float, min_calls: int = 1000
) -> float | None:
    """The least-squares slope of RSS (KiB) over concurrent calls, from the samples
    ``(seconds, calls, rss_kib)`` taken ``after`` seconds into the ramp: once the
    ramp's transactions expire as fast as new ones start, RSS grows by the calls
    alone. None with fewer than 3 samples or ``min_calls`` calls of spread."""
    samples = [(calls, rss) for at, calls, rss in timeline if at >= after]
    if len(samples) < 3:
        return None
    xs = [float(c) for c, _ in samples]
    ys = [float(r) for _, r in samples]
    if max(xs) - min(xs) < min_calls:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def kib_per_call(rss_before_kib: int, rss_plateau_kib: int, calls: int) -> float:
    """Memory per call from RSS before the calls and at their plateau."""
    if calls <= 0:
        raise ValueError("no calls at the plateau")
    return (rss_plateau_kib - rss_before_kib) / calls


# -- processes ---------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of all its threads), depth first."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 10_000:
        parent = pending.pop()
        tasks = Path(f"/proc/{parent}/task")
        try:
            task_ids = [entry.name for entry in tasks.iterdir()]
        except OSError:
            continue
        for task in task_ids:
            with contextlib.suppress(OSError):
                for child in (tasks / task / "children").read_text().split():
                    found.append(int(child))
                    pending.append(int(child))
    return found


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot): with its PID, who it is."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_cpu(pid: int) -> float:
    """User + system seconds of one process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Processes:
    """Every process this bench starts; each stopped by PID, descendants included."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: list[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        def limits() -> None:
            if nofile is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(hard, nofile)))
                except (ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        with log.open("ab") as out:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                preexec_fn=limits if nofile is not None else None,
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s; then any descendant left, by PID."""
        alive = process.poll() is None
        children = [(pid, start_time(pid)) for pid in descendants(process.pid)] if alive else []
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for pid, started in children:
            # Only the very process seen under ours, not a later one with its PID.
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(reversed(self.running)):
            with contextlib.suppress(Exception):
                self.stop(process, grace=5.0)


def running(process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` has not exited, without reaping it (so that
    :func:`wait_with_cpu` still gets its resource usage)."""
    if process.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def open_files_limit() -> int:
    """The open-files limit a child can get: the hard limit, or SBC_NOFILE when this
    process may raise it (CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, max(hard, SBC_NOFILE)))
    except (ValueError, OSError):
        return hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(hard, SBC_NOFILE)


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (the SBC and its media workers)."""
    return [pid, *descendants(pid)]


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants, summed (those that exit meanwhile: 0)."""
    total = 0
    for each in tree(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kib(each)
    return total


def open_files(pid: int) -> int:
    """Descriptors a process holds now."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def wait_with_cpu(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for ``process`` (killed at ``timeout``); its exit code and CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.02)


# -- ports and probes --------------------------------------------------------------------


def free_udp_port(
    address: str = LOOPBACK, span: int = 1, tcp: bool = False, below_media: bool = False
) -> int:
    """A port (``span`` consecutive ones) free for UDP (and TCP) on ``address`` now.

    ``below_media``: under MEDIA_PORT_MIN, for the SBC's own SIP listeners on the
    realms' media addresses (the SBC refuses a UDP SIP port inside its media range).
    """
    rng = random.Random()
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
            port = int(probe.getsockname()[1])
        if below_media:
            port = rng.randrange(SIP_PORT_MIN, MEDIA_PORT_MIN - span)
        elif span > 1:
            port = rng.randrange(40000, 60000 - span, 2)
        if any(p in RESERVED_PORTS for p in range(port, port + span)):
            continue
        sockets: list[socket.socket] = []
        try:
            for p in range(port, port + span):
                for kind in (
                    (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp else (socket.SOCK_DGRAM,)
                ):
                    s = socket.socket(socket.AF_INET, kind)
                    sockets.append(s)
                    s.bind((address, p))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return port
    raise RuntimeError(f"no free port on {address}")


def udp_bound(address: str, port: int) -> bool:
    """Whether a UDP socket is bound to address:port (/proc/net/udp), without binding."""
    wanted = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            if line.split()[1] == wanted:
                return True
    return False


_STATUS = re.compile(rb"^SIP/2\.0 (\d{3}) ")


def sip_probe(
    method: str, address: str, port: int, timeout: float = 1.0, user: str = "probe"
) -> int | None:
    """Send one ``method`` request over UDP; the status code of the first final answer."""
    tag = random.randrange(1 << 30)
    target = f"{address}:{port}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        local = s.getsockname()[1]
        request = (
            f"{method} sip:{target} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOOPBACK}:{local};branch=z9hG4bKprobe{tag};rport\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:{user}@{target}>;tag=p{tag}\r\n"
            f"To: <sip:{user}@{target}>\r\n"
            f"Call-ID: probe-{tag}@{LOOPBACK}\r\n"
            f"CSeq: 1 {method}\r\n"
            f"Contact: <sip:{user}@{LOOPBACK}:{local}>\r\n"
            f"Expires: 60\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        s.sendto(request, (address, port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(65535)
            except TimeoutError:
                return None
            match = _STATUS.match(data)
            if match and int(match.group(1)) >= 200:
                return int(match.group(1))
    return None


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready in {timeout:.0f} s")


# -- CPU pinning -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """The CPU of the systems under test and the CPU of SIPp (None: no pinning)."""

    sut: int | None
    generator: int | None

    @classmethod
    def choose(cls, sut: int, generator: int) -> Pinning:
        allowed = os.sched_getaffinity(0)
        if shutil.which("taskset") is None or len(allowed) < 2:
            return cls(None, None)
        if {sut, generator} <= allowed and sut != generator:
            return cls(sut, generator)
        first, second = sorted(allowed)[:2]
        return cls(second, first)

    def wrap(self, cpu: int | None, args: list[str]) -> list[str]:
        return ["taskset", "-c", str(cpu), *args] if cpu is not None else args

    def describe(self) -> str:
        if self.sut is None:
            return "no CPU pinning (fewer than 2 CPUs or no taskset): numbers are not comparable"
        return (
            f"each system under test pinned to CPU {self.sut} (taskset -c {self.sut}), "
            f"SIPp caller and callee to CPU {self.generator}"
        )


# -- systems under test ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where SIPp's caller sends (a system's listener for the caller's side)."""

    address: str
    port: int


class System:
    """A system under test: started fresh for each step, stopped by PID after it."""

    name = "system"

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []

    def start(self, callee_port: int, tag: str) -> Target:
        raise NotImplementedError

    @property
    def slug(self) -> str:
        """The name as it appears in file names."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower())

    def pids(self) -> list[int]:
        if self.process is None or self.process.poll() is not None:
            return []
        return [self.process.pid, *descendants(self.process.pid)]

    def cpu(self) -> float:
        return sum(process_cpu(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.process is not None:
            self.bench.processes.stop(self.process)
            self.process = None

    def _spawn(self, args: list[str], tag: str, **kwargs: Any) -> None:
        self.command = self.bench.pinning.wrap(self.bench.pinning.sut, args)
        self.process = self.bench.processes.start(
            self.command, log=self.bench.workdir / f"{self.slug}-{tag}.log", **kwargs
        )

    def _wait_sip(self, target: Target, timeout: float = 20.0) -> None:
        def answered() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            return sip_probe("OPTIONS", target.address, target.port, timeout=0.3) is not None

        wait_until(answered, timeout, self.name)


class SippAlone(System):
    """No system: SIPp's caller talks to its callee (the generator's ceiling)."""

    name = "SIPp alone"

    def start(self, callee_port: int, tag: str) -> Target:
        self.command = []
        return Target(LOOPBACK, callee_port)


class Sbc(System):
    name = "sbc"

    def __init__(
        self, bench: Bench, media_section: bool, registrar: bool = False, media_workers: int = 0
    ) -> None:
        super().__init__(bench)
        self.media_section = media_section
        #: ``media.workers``: the relay in that many child processes (0: in-process).
        self.media_workers = media_workers
        #: The outside realm takes REGISTER (config: realm `registrar: true`, and the
        #: bench's users table when it has one).
        self.registrar = registrar
        self.mgmt = 0

    def config(self, callee_port: int, outside: int, inside: int, mgmt: int, tag: str) -> str:
        state = self.bench.workdir / f"sbc-state-{tag}"
        # No nftables fast path: no media flows here, and the host's tables are shared.
        # No RTP at all either: without a long media timeout the SBC would end every
        # held call after 30 s (sippy and Kamailio relay no media and time none out).
        media = (
            f"media: {{port_min: {MEDIA_PORT_MIN}, port_max: {MEDIA_PORT_MAX},"
            f" kernel_path: false, timeout: {MEDIA_TIMEOUT}"
            + (f", workers: {self.media_workers}" if self.media_workers else "")
            + "}\n"
            if self.media_section
            else ""
        )
        registrar = "    registrar: true\n" if self.registrar else ""
        users = self.bench.users
        if self.registrar and users is not None:
            media += f"registrar: {{realm: {users.realm}, users_db: {users.database}}}\n"
        return f"""\
state_dir: {state}
log:
  level: warning
sip:
  listen:
    - {{transport: udp, address: {LOOPBACK}, port: 0}}
management:
  listen: {{address: {LOOPBACK}, port: {mgmt}}}
{media}realms:
  - name: outside
    listen: [{{transport: udp, address: {OUTSIDE_ADDRESS}, port: {outside}}}]
    media_address: {OUTSIDE_ADDRESS}
{registrar}  - name: inside
    listen: [{{transport: udp, address: {INSIDE_ADDRESS}, port: {inside}}}]
    media_address: {INSIDE_ADDRESS}
routes:
  - {{name: to-callee, from_realm: outside, action: trunk, realm: inside,
      host: {LOOPBACK}, port: {callee_port}, transport: udp}}
"""

    def write_config(self, callee_port: int, tag: str) -> tuple[Path, Target]:
        outside = free_udp_port(OUTSIDE_ADDRESS, below_media=True)
        inside = free_udp_port(INSIDE_ADDRESS, below_media=True)
        self.mgmt = free_udp_port(LOOPBACK, tcp=True)
        path = self.bench.workdir / f"sbc-{tag}.yaml"
        path.write_text(self.config(callee_port, outside, inside, self.mgmt, tag))
        return path, Target(OUTSIDE_ADDRESS, outside)

    def start(self, callee_port: int, tag: str) -> Target:
        path, target = self.write_config(callee_port, tag)
        self._spawn(
            [str(VENV_BIN / "sbc"), "run", "--config", str(path)],
            tag,
            nofile=SBC_NOFILE,
            cwd=self.bench.workdir,
        )
        wait_until(self._healthy, 30.0, "sbc")
        return target

    def health(self) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.mgmt}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                result: dict[str, Any] = json.loads(reply.read())
                return result
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read() or b"{}"))
        except (OSError, ValueError):
            return {}

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"sbc exited with {self.process.returncode}")
        return bool(self.health().get("ok"))


class Sippy(System):
    name = "sippy b2bua"

    def start(self, callee_port: int, tag: str) -> Target:
        port = free_udp_port()
        workdir = self.bench.workdir
        args = [
            str(VENV_BIN / "b2bua"),
            "-f",  # foreground
            "-u",  # no RADIUS authentication
            "-A", "0",  # no accounting
            "-l", LOOPBACK, "-p", str(port),
            "-s", f"{LOOPBACK}:{callee_port}",  # static route to the callee
            "-a", LOOPBACK,  # accept calls from SIPp's address
            "-c", str(workdir / f"sippy-{tag}.sock"),
            "-P", str(workdir / f"sippy-{tag}.pid"),
            "-L", str(workdir / f"sippy-{tag}.out"),
        ]  # fmt: skip
        self._spawn(
            args,
            tag,
            env={**os.environ, "SIPLOG_LVL": "WARN", "SIPLOG_BEND": "stderr"},
            cwd=workdir,
        )
        target = Target(LOOPBACK, port)
        self._wait_sip(target)
        return target


class Kamailio(System):
    name = "kamailio"

    def __init__(self, bench: Bench, children: int, authenticate: bool = False) -> None:
        super().__init__(bench)
        self.children = children
        #: REGISTER needs credentials: the password of the bench's users.
        self.authenticate = authenticate

    def config(self, port: int, callee_port: int) -> str:
        text = KAMAILIO_TEMPLATE.read_text()
        users = self.bench.users
        if self.authenticate and users is None:
            raise ValueError("kamailio: authentication needs the bench's users")
        for key, value in {
            "CHILDREN": str(self.children),
            "PORT": str(port),
            "UAS_PORT": str(callee_port),
            "MASK_KEY": f"bench{random.randrange(1 << 30):x}",
            "AUTH_DEFINE": "#!define WITH_AUTH" if self.authenticate else "# no authentication",
            # Hex digits only: nothing Kamailio would read as a pseudo-variable.
            "PASSWORD": users.password if self.authenticate and users else "unused",
        }.items():
            text = text.replace(f"@@{key}@@", value)
        if "@@" in text:
            raise ValueError("kamailio.cfg: a placeholder is left")
        return text

    def start(self, callee_port: int, tag: str) -> Target:
        port = free_udp_port()
        workdir = self.bench.workdir
        config = workdir / f"kamailio-{tag}.cfg"
        config.touch(mode=0o600)  # may hold the bench users' password
        config.write_text(self.config(port, callee_port))
        rundir = workdir / f"kamailio-{tag}.run"
        rundir.mkdir(exist_ok=True)
        args = [
            shutil.which("kamailio") or "kamailio",
            "-DD",  # no daemon: this PID is the main process
            "-E",  # log to stderr
            "-f", str(config),
            "-m", "1024",  # MB of shared memory (transactions, dialogs, contacts)
            "-M", "32",  # MB of private memory per process
            "-x", "tlsf",  # O(1) allocator; Debian's default q_malloc is far slower
            "-Y", str(rundir),
            "-P", str(workdir / f"kamailio-{tag}.pid"),
        ]  # fmt: skip
        self._spawn(
            args,
            tag,
            cwd=workdir,
        )
        target = Target(LOOPBACK, port)
        self._wait_sip(target)
        return target


# -- the bench ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How long and how far each part goes."""

    seconds: float
    start_rate: int
    cap: int
    bisections: int
    register_cap: int
    hold_calls: int
    hold_rate: int
    #: Seconds the calls stay at their plateau before the RSS is read.
    settle: float
    #: Users registering in turn when REGISTER is authenticated.
    register_users: int

    @classmethod
    def quick(cls) -> Plan:
        return cls(2.0, 100, 3200, 1, 3200, 1000, 200, 3.0, 5000)

    @classmethod
    def full(cls) -> Plan:
        return cls(10.0, 100, 12800, 3, 12800, 20000, 200, TRANSACTION_LINGER, 20000)


@dataclass(frozen=True)
class HoldResult:
    """Concurrent calls through the SBC and its memory."""

    target: int
    reached: int
    rss_before_kib: int
    rss_plateau_kib: int
    rss_peak_kib: int
    transactions_at_plateau: int | None
    setup_failed: int
    successful: int
    ramp_seconds: float
    note: str
    #: RSS slope over calls late in the ramp (see marginal_kib_per_call).
    marginal_kib_per_call: float | None = None
    #: Descriptors the SBC held at the plateau (its media workers' included).
    open_files: int = 0
    #: Media worker processes (``media.workers``); their RSS is in the figures.
    media_workers: int = 0

    @property
    def kib_per_call(self) -> float | None:
        if self.reached <= 0:
            return None
        return kib_per_call(self.rss_before_kib, self.rss_plateau_kib, self.reached)


@dataclass(frozen=True)
class Users:
    """Registrar users for authenticated REGISTER: the SBC's users table and the same
    users as a SIPp injection file, taken in turn (tests/bench/sipp/uac_register_auth.xml
    says why its lines carry whole ``[authentication ...]`` keywords)."""

    database: Path
    injection: Path
    realm: str
    password: str = field(repr=False)
    count: int = 0

    @classmethod
    def create(cls, workdir: Path, count: int, realm: str = "sbc") -> Users:
        """``count`` users with one throwaway password, through the SBC's own store."""
        from sbc.registrar.credentials import SqliteCredentials

        password = secrets.token_hex(16)
        names = [f"bench{i:06d}" for i in range(count)]
        database = workdir / "users.sqlite"
        with SqliteCredentials(database, realm) as store:
            for name in names:
                store.add(name, password)
        injection = workdir / "users.csv"
        injection.touch(mode=0o600)
        injection.write_text(
            "SEQUENTIAL\n"
            + "".join(f"{n};[authentication username={n} password={password}]\n" for n in names)
        )
        return cls(database, injection, realm, password, count)


@dataclass
class Bench:
    plan: Plan
    pinning: Pinning
    workdir: Path
    processes: Processes = field(default_factory=Processes)
    users: Users | None = None
    verbose: bool = True

    def sipp(
        self,
        role: str,
        scenario: str,
        name: str,
        *,
        port: int,
        target: Target | None = None,
        rate: int = 0,
        calls: int = 0,
        hold_ms: int = 0,
        limit: int = 0,
        timeout: float = 60.0,
        recv_timeout_ms: int | None = RECV_TIMEOUT_MS,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """A SIPp caller (uac) or callee (uas), pinned to the generator's CPU."""
        sipp = shutil.which("sipp") or "sipp"
        args = [
            sipp, "-sf", str(SCENARIOS / scenario), "-i", LOOPBACK, "-p", str(port),
            "-mp", str(free_udp_port(span=4)), "-nostdin", "-buff_size", str(SIPP_BUFFER),
            "-trace_err", "-error_file", str(self.workdir / f"{name}.err"),
            "-timeout", f"{int(timeout)}s",
        ]  # fmt: skip
        if recv_timeout_ms is not None:
            args += ["-recv_timeout", str(recv_timeout_ms)]
        if role == "uac":
            assert target is not None
            stats = self.workdir / f"{name}.csv"
            stats.unlink(missing_ok=True)
            args += [
                "-s", "1000", "-r", str(rate), "-m", str(calls), "-l", str(limit or calls),
                "-d", str(hold_ms), "-timeout_error",
                "-trace_stat", "-stf", str(stats), "-fd", "1",
                *extra, f"{target.address}:{target.port}",
            ]  # fmt: skip
        (self.workdir / f"{name}.err").unlink(missing_ok=True)
        return self.processes.start(
            self.pinning.wrap(self.pinning.generator, args),
            log=self.workdir / f"{name}.out",
            cwd=self.workdir,
        )

    def callee(self, name: str, port: int, recv_timeout_ms: int | None) -> subprocess.Popen[bytes]:
        callee = self.sipp(
            "uas", "uas_call.xml", name, port=port, timeout=3600,
            recv_timeout_ms=recv_timeout_ms,
        )  # fmt: skip
        wait_until(lambda: udp_bound(LOOPBACK, port), 10.0, "SIPp callee")
        return callee

    def step(self, system: System, kind: Kind, rate: int) -> Step:
        """One bounded run: fresh system, fresh SIPp callee, ``rate x seconds`` calls."""
        calls = max(1, round(rate * self.plan.seconds))
        tag = f"{kind}-{rate}"
        name = f"{system.slug}-{tag}"
        callee_port = free_udp_port()
        callee = None
        try:
            target = system.start(callee_port, tag)
            if kind is Kind.CALLS:
                callee = self.callee(f"{name}-uas", callee_port, RECV_TIMEOUT_MS)
            extra: tuple[str, ...] = ()
            if kind is Kind.REGISTER_AUTH:
                if self.users is None:
                    raise RuntimeError("no registrar users for authenticated REGISTER")
                extra = ("-inf", str(self.users.injection))
            budget = calls / rate * 2 + RECV_TIMEOUT_MS / 1000 * 3 + 10
            cpu_before = system.cpu()
            started = time.monotonic()
            caller = self.sipp(
                "uac", SCENARIO[kind], f"{name}-uac", port=free_udp_port(), target=target,
                rate=rate, calls=calls, limit=max(calls, 1000), timeout=budget, extra=extra,
            )  # fmt: skip
            _, caller_cpu = wait_with_cpu(caller, budget + 15)
            wall = time.monotonic() - started
            self.processes.running.remove(caller)
            sut_cpu = system.cpu() - cpu_before
            callee_cpu = process_cpu(callee.pid) if callee is not None else 0.0
            stats = SippStats.parse((self.workdir / f"{name}-uac.csv").read_text())
            step = Step(
                system.name, kind, rate, calls, stats.successful, stats.failed,
                stats.retransmissions, wall, stats.response_ms, sut_cpu,
                caller_cpu + callee_cpu,
            )  # fmt: skip
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            step = Step(system.name, kind, rate, calls, 0, 0, 0, 0.0, None, 0.0, 0.0, str(exc))
        finally:
            if callee is not None:
                self.processes.stop(callee)
            system.stop()
        self.show(step)
        return step

    def show(self, step: Step) -> None:
        if not self.verbose:
            return
        response = f"{step.response_ms:7.1f}" if step.response_ms is not None else f"{'-':>7s}"
        print(
            f"  {step.system:14s} {step.kind:8s} {step.rate:6d}/s {step.calls:7d} calls: "
            f"{step.successful:7d} ok {step.lost:6d} lost, {step.retransmissions:6d} retrans, "
            f"{step.wall:6.2f} s, resp {response} ms, SUT {step.sut_cpu_ms_per_call:6.2f} ms "
            f"CPU/call, SIPp {100 * step.generator_busy:3.0f} % CPU -> {step.verdict()}",
            flush=True,
        )

    def search(self, system: System, kind: Kind, start: int | None = None) -> Search:
        """The highest passing rate, the ladder starting at ``start`` (default: the
        plan's first rate)."""
        cap = self.plan.cap if kind is Kind.CALLS else self.plan.register_cap
        return search_rate(
            lambda rate: self.step(system, kind, rate),
            start or self.plan.start_rate,
            cap,
            self.plan.bisections,
        )

    def hold(self, sbc: Sbc, calls: int, rate: int) -> HoldResult:
        """Ramp to ``calls`` concurrent calls through the SBC; its RSS before and at the
        plateau. Calls end (BYE) after the measurement."""
        ramp = calls / rate
        hold_s = ramp + self.plan.settle + 10.0
        name = "hold"
        callee_port = free_udp_port()
        callee = caller = None
        note = ""
        timeline: list[tuple[float, int, int]] = []
        try:
            target = sbc.start(callee_port, name)
            assert sbc.process is not None
            pid = sbc.process.pid
            callee = self.callee(f"{name}-uas", callee_port, None)
            rss_before = tree_rss_kib(pid)
            started = time.monotonic()
            budget = 2 * hold_s + ramp + 120
            caller = self.sipp(
                "uac", "uac_call.xml", f"{name}-uac", port=free_udp_port(),
                target=target,
                rate=rate, calls=calls, hold_ms=int(hold_s * 1000), limit=calls + 100,
                timeout=budget, recv_timeout_ms=30_000,
            )  # fmt: skip
            peak, best, best_at = rss_before, 0, started
            ramp_end = started + ramp
            deadline = started + hold_s - 2.0
            while time.monotonic() < deadline and running(caller):
                time.sleep(1.0)
                health = sbc.health()
                current = int(health.get("calls", 0))
                rss = tree_rss_kib(pid)
                peak = max(peak, rss)
                timeline.append((time.monotonic() - started, current, rss))
                if current > best:
                    best, best_at = current, time.monotonic()
                if current >= calls:
                    break
                # Stalled well after the ramp should have ended: report how far it got.
                if time.monotonic() > ramp_end + 15 and time.monotonic() - best_at > 10:
                    note = f"stalled at {best} calls"
                    break
            ramp_seconds = time.monotonic() - started
            # Let the ramp's transactions expire (Timer L/J) so only the calls remain.
            settle_until = min(time.monotonic() + self.plan.settle, started + hold_s - 3.0)
            while time.monotonic() < settle_until and running(caller):
                time.sleep(0.5)
            health = sbc.health()
            reached = int(health.get("calls", best))
            transactions = health.get("transactions")
            rss_plateau = tree_rss_kib(pid)
            descriptors = sum(open_files(each) for each in tree(pid))
            peak = max(peak, rss_plateau)
            if reached < calls and not note:
                note = f"reached {reached} of {calls}"
            if reached < calls:
                note += "; " + self.sbc_complaints(name)
            wait_with_cpu(caller, budget + 15)
            self.processes.running.remove(caller)
            stats = SippStats.parse((self.workdir / f"{name}-uac.csv").read_text())
            (self.workdir / f"{name}-timeline.json").write_text(json.dumps(timeline))
            return HoldResult(
                calls, reached, rss_before, rss_plateau, peak,
                int(transactions) if transactions is not None else None,
                calls - stats.successful, stats.successful, ramp_seconds, note,
                marginal_kib_per_call(timeline, after=TRANSACTION_LINGER + 2), descriptors,
                sbc.media_workers,
            )  # fmt: skip
        finally:
            if caller is not None and running(caller):
                self.processes.stop(caller)
            if callee is not None:
                self.processes.stop(callee)
            sbc.stop()

    def sbc_complaints(self, name: str) -> str:
        """The SBC's most frequent failure lines (``x`` prefix) in its log."""
        log = self.workdir / f"sbc-{name}.log"
        if not log.exists():
            return "no SBC log"
        counts: dict[str, int] = {}
        for line in log.read_text(errors="replace").splitlines():
            if " x " in line or "Error" in line or "error" in line:
                text = line.split(" x ", 1)[-1]
                text = re.sub(r"\b[0-9a-f]{8,}\b", "ID", text)  # call references
                key = re.sub(r"\d+", "N", text)[:160]
                counts[key] = counts.get(key, 0) + 1
        if not counts:
            return "the SBC logged no failure"
        top = sorted(counts.items(), key=lambda item: -item[1])[:3]
        return "SBC log: " + " | ".join(f"{n}x {text}" for text, n in top)


# -- setup checks ------------------------------------------------------------------------


def check_config(config: str, workdir: Path, name: str) -> tuple[bool, str]:
    """Whether ``sbc check-config`` accepts a configuration text, and its complaint."""
    path = workdir / f"check-{name}.yaml"
    path.write_text(config)
    result = subprocess.run(
        [str(VENV_BIN / "sbc"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0, (result.stdout + result.stderr).strip()[-400:]


def missing_tools(systems: list[str]) -> list[str]:
    needs = {"sipp": "sipp (apt-get install sip-tester)"}
    if "sbc" in systems:
        needs[str(VENV_BIN / "sbc")] = "the venv's sbc (make deps)"
    if "sippy" in systems:
        needs[str(VENV_BIN / "b2bua")] = "sippy's b2bua (pip install -e '.[bench]')"
    if "kamailio" in systems:
        needs["kamailio"] = "kamailio (apt-get install kamailio)"
    return [what for tool, what in needs.items() if shutil.which(tool) is None]


def loopback_addresses_usable() -> str | None:
    for address in (OUTSIDE_ADDRESS, INSIDE_ADDRESS):
        try:
            free_udp_port(address)
        except (OSError, RuntimeError) as exc:
            return f"cannot bind {address}: {exc}"
    return None


# -- report ------------------------------------------------------------------------------


def ratio_text(ours: int, theirs: int, target: float) -> str:
    if theirs <= 0:
        return "n/a"
    ratio = ours / theirs
    verdict = "met" if ratio >= target else "NOT met"
    return f"{ratio:.2f} (target >= {target:g}: {verdict})"


def calls_section(results: dict[str, Search], plan: Plan) -> list[str]:
    """The call-rate table: max rate, CPU per call and the SBC's ratios."""
    lines = [
        "",
        f"  call rate: rate x {plan.seconds:g} s calls per step, fresh system and SIPp each"
        f" step; a step passes with < {100 * MAX_FAILED:g} % failed calls and SIPp done within"
        f" {KEEP_UP:g} x nominal + {KEEP_UP_SLACK:g} s; rates double from"
        f" {plan.start_rate}/s up to {plan.cap}/s, then {plan.bisections} bisection(s)",
        f"  {'system':16s} {'max calls/s':>11s} {'SUT CPU ms/call':>15s} {'SIPp CPU':>8s}"
        f" {'setup ms':>8s}  SBC / system",
    ]
    sbc = results.get("sbc")
    for key, found in results.items():
        best = found.best_step
        cpu = f"{best.sut_cpu_ms_per_call:15.2f}" if best and key != "alone" else f"{'':15s}"
        gen = f"{100 * best.generator_busy:7.0f}%" if best else f"{'':8s}"
        setup = f"{best.response_ms:8.1f}" if best and best.response_ms is not None else f"{'':8s}"
        mark = "+" if found.capped else " "
        ratio = ""
        if sbc is not None and key == "sippy":
            ratio = ratio_text(sbc.best, found.best, 3.0)
        elif sbc is not None and key == "kamailio":
            ratio = ratio_text(sbc.best, found.best, 0.5)
        name = {"alone": "SIPp alone", "sippy": "sippy b2bua"}.get(key, key)
        lines.append(f"  {name:16s} {found.best:>10d}{mark} {cpu} {gen} {setup}  {ratio}")
    lines.append(
        "  +: the ladder's cap passed, the system may go faster; SUT CPU and setup time"
        " (INVITE to 200, mean) at the max rate's step"
    )
    for key in ("sippy", "kamailio"):
        other = results.get(key)
        if sbc is not None and other is not None and other.capped and other.best:
            lines.append(
                f"  {key} passed the cap: SBC/{key} is at most the ratio shown"
                " (the full run's cap is higher)"
            )
    busy = [k for k, f in results.items() if f.best_step and f.best_step.generator_busy > 0.9]
    if busy:
        lines.append(f"  SIPp's CPU was above 90 % at the max rate of: {', '.join(busy)}")
    return lines


def register_section(registers: dict[str, Search | str]) -> list[str]:
    lines = ["", "  REGISTER rate (a new binding per REGISTER up to the users there are):"]
    for key, found_or_why in registers.items():
        if isinstance(found_or_why, str):
            lines.append(f"  {key:16s} skipped: {found_or_why}")
            continue
        mark = "+" if found_or_why.capped else " "
        best = found_or_why.best_step
        detail = f" ({best.kind}, {best.sut_cpu_ms_per_call:.2f} ms CPU each)" if best else ""
        lines.append(f"  {key:16s} {found_or_why.best:>10d}{mark} REGISTER/s{detail}")
    sbc, kam = registers.get("sbc"), registers.get("kamailio")
    if isinstance(sbc, Search) and isinstance(kam, Search):
        lines.append(f"  SBC / kamailio REGISTER: {ratio_text(sbc.best, kam.best, 0.5)}")
    return lines


def hold_section(hold: HoldResult | str, rate: int) -> list[str]:
    lines = ["", "  concurrent calls through the SBC (SIPp holds them, then BYE):"]
    if isinstance(hold, str):
        return [*lines, f"  skipped: {hold}"]
    per_call = hold.kib_per_call
    per_call_text = f"{per_call:.1f} KiB/call" if per_call is not None else "n/a"
    verdict = ""
    if per_call is not None:
        # The target is in kB (1000 bytes); RSS comes in KiB.
        verdict = " (target <= 20 kB: " + ("met)" if per_call * 1.024 <= 20 else "NOT met)")
    if hold.media_workers:
        lines.append(
            f"  media relayed by {hold.media_workers} worker processes (media.workers);"
            " RSS and open files are summed over the SBC and its workers"
        )
    lines += [
        f"  target {hold.target}, reached {hold.reached} (ramp {hold.ramp_seconds:.0f} s at"
        f" {rate}/s); RSS {hold.rss_before_kib / 1024:.1f} MiB before,"
        f" {hold.rss_plateau_kib / 1024:.1f} MiB at the plateau"
        f" ({hold.transactions_at_plateau} transactions left), peak"
        f" {hold.rss_peak_kib / 1024:.1f} MiB",
        f"  memory per call: {per_call_text}{verdict}; calls that failed:"
        f" {hold.setup_failed} of {hold.target}",
    ]
    if hold.reached:
        lines.append(
            f"  open files at the plateau: {hold.open_files}"
            f" ({hold.open_files / hold.reached:.1f} per call)"
        )
    if hold.marginal_kib_per_call is not None:
        lines.append(
            "  RSS slope late in the ramp (transactions in steady state, calls only):"
            f" {hold.marginal_kib_per_call:.1f} KiB/call"
        )
    else:
        lines.append(
            f"  (ramp under {TRANSACTION_LINGER + 2:.0f} s or 1000 calls: no RSS slope; the"
            " figure above includes what the ramp's transactions left in the heap)"
        )
    if hold.note:
        lines.append(f"  note: {hold.note}")
    return lines


def report(
    results: dict[str, Search],
    registers: dict[str, Search | str],
    hold: HoldResult | str | None,
    bench: Bench,
    commands: dict[str, str],
    notes: list[str],
    elapsed: float,
    argv: list[str],
) -> str:
    plan = bench.plan
    lines = [
        "",
        f"B2BUA signalling benchmark ({'quick' if plan.seconds < 5 else 'full'}, "
        f"{elapsed:.0f} s, {os.cpu_count()} CPUs)",
        f"  {bench.pinning.describe()}",
        "  call: INVITE (SDP offer) / 100 / 180 / 200 (SDP answer) / ACK / BYE / 200 over UDP"
        " on loopback, no media",
        "  the machine is shared with colleagues' test runs: expect noise between runs",
    ]
    if results:
        lines += calls_section(results, plan)
    if registers:
        lines += register_section(registers)
    if hold is not None:
        lines += hold_section(hold, plan.hold_rate)
    lines += ["", "  notes:"] + [f"  - {note}" for note in notes]
    if commands:
        lines += ["", "  systems under test as started (ports, paths vary per step):"]
        lines += [f"  {name}: {command}" for name, command in commands.items()]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *argv])
    lines += ["", f"  produced by: cd {shlex.quote(str(ROOT))} && {command}"]
    return "\n".join(lines)


def media_workers_for(asked: str, calls: int, per_process: int) -> int:
    """``--media-workers``: the number asked, or for ``auto`` none when one process
    holds ``calls`` (``per_process`` a process), else enough processes and one more
    (the workers' shares of the calls are even only to within a call or two)."""
    if asked != "auto":
        return int(asked)
    if calls <= per_process:
        return 0
    return -(-calls // per_process) + 1


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1-2 min)")
    parser.add_argument("--json", type=Path, help="write every step and result here")
    parser.add_argument("--systems", default="sbc,sippy,kamailio", help="comma-separated subset")
    parser.add_argument("--hold-calls", type=int, help="concurrent calls to reach through the SBC")
    parser.add_argument("--hold-rate", type=int, help="calls/s while ramping up to them")
    parser.add_argument(
        "--hold-uncapped",
        action="store_true",
        help="aim at --hold-calls even beyond what the open-files limit allows (see it fail)",
    )
    parser.add_argument(
        "--parts", default="calls,register,hold", help="comma-separated subset of the parts"
    )
    parser.add_argument(
        "--media-workers",
        default="auto",
        help="media.workers for the concurrent calls: a number, or auto (as many as the"
        " open-files limit per process needs, 0 when one process holds them all)",
    )
    parser.add_argument("--kamailio-children", type=int, default=1)
    parser.add_argument("--sut-cpu", type=int, default=1)
    parser.add_argument("--generator-cpu", type=int, default=0)
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"sbc", "sippy", "kamailio"}
    if unknown:
        parser.error(f"unknown systems: {sorted(unknown)}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - {"calls", "register", "hold"}:
        parser.error(f"unknown parts: {sorted(set(parts) - {'calls', 'register', 'hold'})}")
    missing = missing_tools(systems)
    if missing:
        print("cannot run, missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    if "sbc" in systems and (reason := loopback_addresses_usable()):
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    plan = Plan.quick() if args.quick else Plan.full()
    if args.hold_calls is not None:
        plan = dataclasses.replace(plan, hold_calls=args.hold_calls)
    if args.hold_rate is not None:
        plan = dataclasses.replace(plan, hold_rate=args.hold_rate)
    BUILD.mkdir(parents=True, exist_ok=True)
    workdir = BUILD / time.strftime("run-%Y%m%d-%H%M%S")
    workdir.mkdir()
    bench = Bench(plan, Pinning.choose(args.sut_cpu, args.generator_cpu), workdir)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    notes: list[str] = [f"logs, configs and SIPp files: {workdir}"]
    commands: dict[str, str] = {}
    results: dict[str, Search] = {}
    registers: dict[str, Search | str] = {}
    hold: HoldResult | str | None = None
    print(f"- {bench.pinning.describe()}; work files in {workdir}", flush=True)
    try:
        media_section = False
        if "sbc" in systems:
            probe = Sbc(bench, media_section=True)
            ok, complaint = check_config(probe.config(9, 9, 9, 9, "check"), workdir, "media")
            media_section = ok
            if ok:
                notes.append(
                    f"sbc: media ports {MEDIA_PORT_MIN}-{MEDIA_PORT_MAX} per realm address"
                    " (config `media:` section)"
                )
            else:
                notes.append(
                    "sbc: the config has no `media: {port_min, port_max}` yet"
                    f" ({complaint.splitlines()[-1] if complaint else 'rejected'}): the relay's"
                    f" built-in {DEFAULT_MEDIA_PORTS[0]}-{DEFAULT_MEDIA_PORTS[1]} holds"
                    f" {(DEFAULT_MEDIA_PORTS[1] - DEFAULT_MEDIA_PORTS[0]) // 2} calls per"
                    " address pair"
                )
        makers: dict[str, Callable[[], System]] = {
            "alone": lambda: SippAlone(bench),
            "sbc": lambda: Sbc(bench, media_section),
            "sippy": lambda: Sippy(bench),
            "kamailio": lambda: Kamailio(bench, args.kamailio_children),
        }
        if "calls" in parts:
            print("- call rate", flush=True)
        for key in ["alone", *systems] if "calls" in parts else []:
            system = makers[key]()
            # The generator's ceiling only matters at the cap: one step there, unless it fails.
            start = plan.cap if key == "alone" else None
            results[key] = bench.search(system, Kind.CALLS, start)
            if system.command:
                commands[system.name] = " ".join(shlex.quote(a) for a in system.command)
        if "register" in parts:
            print("- REGISTER rate", flush=True)
            registers = register_rates(bench, systems, media_section, args.kamailio_children)
            notes.append("sippy's b2bua has no registrar (it proxies REGISTER): not compared")
            if bench.users is not None:
                notes.append(
                    f"REGISTER with digest authentication (the SBC challenges): {bench.users.count}"
                    " users register in turn (a REGISTER beyond that refreshes a binding); the"
                    " SBC looks each user up in its SQLite users table, Kamailio checks against"
                    " one shared password (auth module, no user table)"
                )
        if "sbc" in systems and "hold" in parts:
            sbc_best = results["sbc"].best if "sbc" in results else 0
            rate = plan.hold_rate
            if sbc_best and rate > 0.8 * sbc_best:
                rate = max(RATE_GRANULARITY, int(0.8 * sbc_best))
                notes.append(f"concurrent calls ramp at {rate}/s (0.8 x the SBC's max rate)")
            plan = dataclasses.replace(plan, hold_rate=rate)
            bench.plan = plan
            capacity = (MEDIA_PORT_MAX - MEDIA_PORT_MIN) // 2 if media_section else 5000
            if plan.hold_calls > capacity:
                notes.append(
                    f"the media range holds {capacity} calls: more than that cannot be reached"
                )
            limit = open_files_limit()
            per_process = (limit - FD_RESERVE) // SOCKETS_PER_CALL
            workers = media_workers_for(args.media_workers, plan.hold_calls, per_process)
            if workers and not media_section:
                parser.error("--media-workers needs the config's media section")
            fit = per_process * max(1, workers)
            if workers:
                notes.append(
                    f"concurrent calls: the open-files limit here is {limit} a process (hard"
                    f" limit; raising it needs CAP_SYS_RESOURCE) and the relay holds"
                    f" {SOCKETS_PER_CALL} UDP sockets a call, about {per_process} calls a"
                    f" process: the SBC relays media in {workers} worker processes"
                    " (media.workers)"
                )
            if plan.hold_calls > fit and not args.hold_uncapped:
                notes.append(
                    f"concurrent calls: asked for {plan.hold_calls}, ran {fit}: the open-files"
                    f" limit here is {limit} (hard limit; raising it needs CAP_SYS_RESOURCE) and"
                    f" the SBC's media relay holds {SOCKETS_PER_CALL} UDP sockets per call, so"
                    f" {plan.hold_calls} calls need about"
                    f" {plan.hold_calls * SOCKETS_PER_CALL + FD_RESERVE} descriptors"
                    f" ({max(1, workers)} relay processes)"
                )
                plan = dataclasses.replace(plan, hold_calls=fit)
                bench.plan = plan
            # A ramp of a minute or more leaves ~25 s after the ramp's first transactions
            # expire: the RSS slope over that stretch is the memory of the calls alone.
            slow = max(RATE_GRANULARITY, plan.hold_calls // HOLD_RAMP_SECONDS)
            if plan.settle >= TRANSACTION_LINGER and plan.hold_rate > slow:
                plan = dataclasses.replace(plan, hold_rate=slow)
                bench.plan = plan
                notes.append(
                    f"concurrent calls ramp at {slow}/s: {HOLD_RAMP_SECONDS} s, for the RSS slope"
                )
            print(f"- {plan.hold_calls} concurrent calls through the SBC", flush=True)
            hold = bench.hold(
                Sbc(bench, media_section, media_workers=workers), plan.hold_calls, plan.hold_rate
            )
    except KeyboardInterrupt:
        print("x interrupted: stopping every process started", file=sys.stderr)
        bench.processes.stop_all()
        return 130
    finally:
        bench.processes.stop_all()
    text = report(
        results, registers, hold, bench, commands, notes, time.monotonic() - started,
        [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *(argv or sys.argv[1:])],
    )  # fmt: skip
    print(text)
    (workdir / "report.txt").write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "plan": asdict(plan),
                    "calls": {k: [asdict(s) for s in v.steps] for k, v in results.items()},
                    "max_calls_per_s": {k: v.best for k, v in results.items()},
                    "register": {
                        k: (v if isinstance(v, str) else [asdict(s) for s in v.steps])
                        for k, v in registers.items()
                    },
                    "hold": asdict(hold) if isinstance(hold, HoldResult) else hold,
                },
                indent=1,
            )
        )
    return 0


def register_rates(
    bench: Bench, systems: list[str], media_section: bool, kamailio_children: int
) -> dict[str, Search | str]:
    """REGISTER rates of the SBC and Kamailio, in the same mode: with digest
    authentication when the SBC challenges, without when it accepts (or answers 405,
    and is skipped)."""
    results: dict[str, Search | str] = {}
    authenticate = False
    if "sbc" in systems:
        try:
            bench.users = Users.create(bench.workdir, bench.plan.register_users)
        except (ImportError, OSError, ValueError) as exc:
            print(f"x no registrar users: {exc}", file=sys.stderr)
        sbc = Sbc(bench, media_section, registrar=True)
        accepted, complaint = check_config(
            sbc.config(9, 9, 9, 9, "check"), bench.workdir, "registrar"
        )
        if not accepted:
            sbc = Sbc(bench, media_section)  # probe REGISTER all the same: 405 expected
        try:
            target = sbc.start(free_udp_port(), "register-probe")
            status = sip_probe("REGISTER", target.address, target.port, user="bench000000")
        finally:
            sbc.stop()
        print(f"  sbc answers a REGISTER with {status}", flush=True)
        if status == 405:
            results["sbc"] = "the SBC answers REGISTER with 405 (no registrar)"
        elif status == 200:
            results["sbc"] = bench.search(sbc, Kind.REGISTER)
        elif status in (401, 407) and bench.users is not None:
            authenticate = True
            results["sbc"] = bench.search(sbc, Kind.REGISTER_AUTH)
        else:
            why = "no answer" if status is None else f"answered {status}"
            results["sbc"] = f"the SBC {why} to REGISTER" + (
                "" if accepted else f" (registrar config rejected: {complaint[-200:]})"
            )
    if "kamailio" in systems:
        kind = Kind.REGISTER_AUTH if authenticate else Kind.REGISTER
        results["kamailio"] = bench.search(
            Kamailio(bench, kamailio_children, authenticate=authenticate), kind
        )
    return results


# -- tests of the pure parts (pytest -q tests/bench/b2bua_bench.py) ----------------------

#: A real -trace_stat excerpt from SIPp 3.6.1 (first columns and the counters used).
_STAT_HEADER = (
    "StartTime;LastResetTime;CurrentTime;ElapsedTime(P);ElapsedTime(C);TargetRate;"
    "CallRate(P);CallRate(C);IncomingCall(P);IncomingCall(C);OutgoingCall(P);"
    "OutgoingCall(C);TotalCallCreated;CurrentCall;SuccessfulCall(P);SuccessfulCall(C);"
    "FailedCall(P);FailedCall(C);Retransmissions(P);Retransmissions(C);"
    "ResponseTimesetup(P);ResponseTimesetup(C);"
)


def _stat_row(created: int, ok: int, failed: int, retrans: int, setup: str) -> str:
    return (
        "2026-11-26\t10:01:05.356388\t1795687265.356388;2026-11-26\t10:01:10.364940\t1;"
        f"2026-11-26\t10:01:10.365125\t1;00:00:00;00:00:05;200;0;199.681;0;0;0;{created};"
        f"{created};0;0;{ok};0;{failed};0;{retrans};00:00:00:000000;{setup};"
    )


def _step(rate: int, ok: int, calls: int, wall: float | None = None, error: str = "") -> Step:
    """A step; by default SIPp took exactly the nominal time (calls / rate)."""
    wall = calls / rate if wall is None else wall
    return Step("x", Kind.CALLS, rate, calls, ok, calls - ok, 0, wall, 1.0, 1.0, 0.5, error)


def test_stats_take_the_last_row() -> None:
    text = "\n".join(
        [_STAT_HEADER, _stat_row(10, 9, 0, 0, "00:00:00:001000"),
         _stat_row(1000, 999, 1, 2, "00:00:01:250500")]
    )  # fmt: skip
    stats = SippStats.parse(text)
    assert (stats.created, stats.successful, stats.failed) == (1000, 999, 1)
    assert stats.retransmissions == 2
    assert stats.response_ms == 1250.5


def test_stats_without_rows_or_columns_are_errors() -> None:
    import pytest

    with pytest.raises(ValueError, match="SIPp statistics: no data row"):
        SippStats.parse(_STAT_HEADER + "\n")
    with pytest.raises(ValueError, match=r"SIPp statistics: no column FailedCall\(C\)"):
        SippStats.parse("TotalCallCreated;SuccessfulCall(C);CurrentCall\n1;1;0\n")


def test_step_verdict_failed_share_is_strict() -> None:
    # 1 failed in 1000 is 0.1 %: not "< 0.1 %".
    assert not _step(100, 999, 1000, 10.0).passed
    assert _step(100, 9991, 9992, 99.9).passed
    assert _step(100, 999, 1000, 10.0).verdict() == "FAIL: 1 failed (0.10 %)"


def test_step_verdict_needs_the_rate_kept() -> None:
    # 1000 calls at 100/s: 10 s nominal, deadline 10 * 1.05 + 0.3 = 10.8 s.
    assert _step(100, 1000, 1000, 10.8).passed
    slow = _step(100, 1000, 1000, 10.9)
    assert not slow.passed and slow.verdict() == "FAIL: took 10.9 s > 10.8 s"
    broken = _step(100, 1000, 1000, 1.0, error="sbc exited with 1")
    assert not broken.passed and broken.verdict() == "error: sbc exited with 1"


def test_search_doubles_then_bisects() -> None:
    capacity = 730
    tried: list[int] = []

    def run(rate: int) -> Step:
        tried.append(rate)
        return _step(rate, 100 if rate <= capacity else 50, 100)

    found = search_rate(run, 100, 12800, 3)
    # 100, 200, 400 pass, 800 fails; then 600 (pass), 700 (pass), 750 (fail).
    assert tried == [100, 200, 400, 800, 600, 700, 750]
    assert found.best == 700 and not found.capped
    best = found.best_step
    assert best is not None and best.rate == 700


def test_search_reports_the_cap_and_a_failing_first_step() -> None:
    always = search_rate(lambda rate: _step(rate, 10, 10), 100, 400, 2)
    assert (always.best, always.capped) == (400, True)
    assert [s.rate for s in always.steps] == [100, 200, 400]
    never = search_rate(lambda rate: _step(rate, 0, 10), 100, 400, 2)
    assert (never.best, never.capped) == (0, False)
    assert [s.rate for s in never.steps] == [100, 50, 20]
    assert never.best_step is None


def test_marginal_kib_per_call_ignores_the_early_ramp() -> None:
    # 10 KiB per call plus transactions that stop growing at 30 s.
    timeline = [
        (float(t), 200 * t, 50_000 + 10 * 200 * t + 5 * 200 * min(t, 30)) for t in range(1, 60)
    ]
    slope = marginal_kib_per_call(timeline, after=32)
    assert slope is not None and abs(slope - 10.0) < 1e-9
    assert marginal_kib_per_call(timeline, after=58) is None  # 2 samples
    assert marginal_kib_per_call(timeline[:5], after=0) is None  # 800 calls of spread


def test_kib_per_call() -> None:
    import pytest

    assert kib_per_call(100_000, 300_000, 20_000) == 10.0
    with pytest.raises(ValueError, match="no calls at the plateau"):
        kib_per_call(1, 2, 0)


def test_kamailio_template_fills_every_placeholder(tmp_path: Path) -> None:
    bench = Bench(Plan.quick(), Pinning(None, None), tmp_path)
    text = Kamailio(bench, 1).config(45060, 45070)
    assert "listen=udp:127.0.0.1:45060" in text
    assert '$du = "sip:127.0.0.1:45070";' in text
    assert "children=1" in text and "@@" not in text
    for module in ("tm", "dialog", "topoh", "rr", "registrar", "usrloc"):
        assert f'loadmodule "{module}.so"' in text
    assert "#!define WITH_AUTH" not in text


def test_kamailio_template_with_authentication(tmp_path: Path) -> None:
    import pytest

    bench = Bench(Plan.quick(), Pinning(None, None), tmp_path)
    with pytest.raises(ValueError, match="kamailio: authentication needs the bench's users"):
        Kamailio(bench, 1, authenticate=True).config(45060, 45070)
    bench.users = Users(tmp_path / "u.sqlite", tmp_path / "u.csv", "sbc", "00ff" * 8, 1)
    text = Kamailio(bench, 1, authenticate=True).config(45060, 45070)
    assert text.startswith("#!KAMAILIO") and "\n#!define WITH_AUTH\n" in text
    assert 'pv_www_authenticate("$td", "00ff00ff00ff00ff00ff00ff00ff00ff", "0")' in text


def test_sbc_config_has_two_realms_and_a_trunk_route(tmp_path: Path) -> None:
    bench = Bench(Plan.quick(), Pinning(None, None), tmp_path)
    text = Sbc(bench, media_section=True).config(7000, 7001, 7002, 7003, "t")
    assert f"address: {OUTSIDE_ADDRESS}, port: 7001" in text
    assert f"address: {INSIDE_ADDRESS}, port: 7002" in text
    assert f"media: {{port_min: {MEDIA_PORT_MIN}, port_max: {MEDIA_PORT_MAX}," in text
    assert "host: 127.0.0.1, port: 7000, transport: udp" in text
    assert "media:" not in Sbc(bench, media_section=False).config(1, 2, 3, 4, "t")
    assert "workers" not in text
    workers = Sbc(bench, media_section=True, media_workers=6).config(7000, 7001, 7002, 7003, "t")
    assert ", workers: 6}" in workers


def test_media_workers_auto_takes_enough_processes_for_the_calls() -> None:
    assert media_workers_for("auto", 4000, 4925) == 0
    assert media_workers_for("auto", 20000, 4925) == 6
    assert media_workers_for("auto", 9850, 4925) == 3
    assert media_workers_for("3", 20000, 4925) == 3


if __name__ == "__main__":
    sys.exit(main())
