"""Media relay benchmark: kernel path, userspace path and rtpengine, side by side.

    .venv/bin/python tests/bench/media_bench.py [--quick] [--fixed-rate 20000] [--json OUT]

Two network namespaces: ``gen`` (198.51.100.10 | 203.0.113.20) holds the C load
generator (tests/bench/media_gen.c, compiled into build/); ``relay`` (198.51.100.1 |
203.0.113.1, forwarding on) holds the relay under test. A call is two streams (caller
to callee and back) of 172-byte packets (G.711, 20 ms) at 50 packets/s each, so a rate
of R packets/s is R/100 calls.

For each relay, in the same run:

- CPU per forwarded packet at a fixed rate: the relay's processes (all threads), the
  generator and the ksoftirqd threads, minus the generator and ksoftirqd with no relay
  (the generator talking to itself) at the same rate. Per-process CPU time is the
  scheduler's runtime, which includes softirq work done in that process's context
  (this kernel has tick accounting, no IRQ time accounting); ksoftirqd covers the rest.
  /proc/stat's softirq column is shown too.
- The highest rate on a ladder with < 1 % real-time loss (lost, or > 100 ms late),
  the generator's own ceiling (no relay) measured the same way.

rtpengine (Debian's rtpengine-daemon) forwards in user space (``--table=-1``), driven
over its ng protocol (bencode over UDP). Everything runs inside the namespaces and is
torn down on exit, failure included; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.netns import Lab, can_run_lab  # noqa: E402

CALLER, CALLEE = "198.51.100.10", "203.0.113.20"
RELAY_OUT, RELAY_IN = "198.51.100.1", "203.0.113.1"
NG_PORT = 2223
#: Generator socket ports: caller side CALLER:PORT_BASE+i, callee side CALLEE:PORT_BASE+i.
PORT_BASE = 10000
#: Real-time loss threshold of the maximum rate.
MAX_LOSS = 0.01
PACKETS_PER_CALL = 100  # two streams at 50 packets/s

# -- bencode (the ng protocol's encoding) ------------------------------------------------


def bencode(value: Any) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"d" + b"".join(bencode(k) + bencode(value[k]) for k in sorted(value)) + b"e"
    raise TypeError(type(value))


def bdecode(data: bytes, at: int = 0) -> tuple[Any, int]:
    kind = data[at : at + 1]
    if kind == b"i":
        end = data.index(b"e", at)
        return int(data[at + 1 : end]), end + 1
    if kind in (b"l", b"d"):
        items, at = [], at + 1
        while data[at : at + 1] != b"e":
            item, at = bdecode(data, at)
            items.append(item)
        if kind == b"l":
            return items, at + 1
        return {items[i].decode(): items[i + 1] for i in range(0, len(items), 2)}, at + 1
    colon = data.index(b":", at)
    length = int(data[at:colon])
    return data[colon + 1 : colon + 1 + length], colon + 1 + length


# -- relays under test -------------------------------------------------------------------


class Relay:
    name = "relay"
    pids: list[int]

    def allocate(self, calls: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Relay ports (toward caller, toward callee) for each call's generator ports."""
        raise NotImplementedError

    def settle(self, calls: int) -> None:
        """Wait until the primed calls reached their steady path."""

    def close(self) -> None:
        raise NotImplementedError


class SbcRelay(Relay):
    def __init__(self, lab: Lab, kernel: bool) -> None:
        self.name = "sbc kernel path" if kernel else "sbc userspace path"
        spec = {
            "kernel": kernel,
            "outside": RELAY_OUT,
            "inside": RELAY_IN,
            "caller": CALLER,
            "callee": CALLEE,
        }
        self.kernel = kernel
        self.process = lab.spawn(
            "relay",
            [
                str(ROOT / ".venv/bin/python"),
                str(ROOT / "tests/bench/media_relay_server.py"),
                json.dumps(spec),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.pids = [self.process.pid]
        ready = self._read(30)
        if kernel and not ready["kernel"]:
            raise RuntimeError(f"kernel path unavailable: {ready['reason']}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"{self.name}: no answer in {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: relay process ended")
        result: dict[str, Any] = json.loads(line)
        return result

    def request(self, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(body).encode() + b"\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def allocate(self, calls: list[tuple[int, int]]) -> list[tuple[int, int]]:
        answer = self.request({"op": "allocate", "calls": calls})
        return [(int(p[0]), int(p[1])) for p in answer["ports"]]

    def settle(self, calls: int) -> None:
        if self.kernel:
            # One MediaStream per call (both directions): KernelPathEngaged once per call.
            answer = self.request({"op": "wait_kernel", "streams": calls, "timeout": 60}, 70)
            if answer["engaged"] < calls:
                raise RuntimeError(f"only {answer['engaged']}/{calls} calls in the kernel")

    def setups(self, count: int) -> float:
        return float(self.request({"op": "setups", "count": count}, 120)["setups_per_s"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.request({"op": "quit"}, 10)
        with contextlib.suppress(Exception):
            self.process.wait(timeout=10)


class Rtpengine(Relay):
    name = "rtpengine"

    def __init__(self, lab: Lab, build: Path) -> None:
        self.process = lab.spawn(
            "relay",
            [
                "rtpengine",
                "--config-file=none",
                "--foreground",
                "--log-stderr",
                "--log-level=3",
                "--table=-1",  # no kernel module: userspace forwarding
                f"--interface=pub/{RELAY_OUT}",
                f"--interface=priv/{RELAY_IN}",
                f"--listen-ng={RELAY_OUT}:{NG_PORT}",
                "--port-min=20000",
                "--port-max=59999",
                "--timeout=600",
                f"--pidfile={build / 'rtpengine.pid'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(build / "rtpengine.log", "wb"),  # noqa: SIM115
        )
        self.pids = [self.process.pid]
        self.ng = lab.socket("gen")
        self.ng.settimeout(2)
        self.cookie = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                self.command({"command": "ping"})
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("rtpengine did not answer ng ping") from None
                time.sleep(0.1)

    def command(self, body: dict[str, Any]) -> dict[str, Any]:
        self.cookie += 1
        cookie = b"%d" % self.cookie
        self.ng.sendto(cookie + b" " + bencode(body), (RELAY_OUT, NG_PORT))
        while True:
            data, _ = self.ng.recvfrom(65535)
            if data.startswith(cookie + b" "):
                answer, _ = bdecode(data, len(cookie) + 1)
                if answer.get("result") not in (b"ok", b"pong"):
                    raise RuntimeError(f"rtpengine: {answer}")
                result: dict[str, Any] = answer
                return result

    @staticmethod
    def _sdp(address: str, port: int) -> str:
        return (
            f"v=0\r\no=- 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        )

    @staticmethod
    def _port(sdp: bytes) -> int:
        match = re.search(rb"m=audio (\d+)", sdp)
        assert match is not None, sdp
        return int(match.group(1))

    def allocate(self, calls: list[tuple[int, int]]) -> list[tuple[int, int]]:
        ports = []
        for caller_port, callee_port in calls:
            call_id = f"bench-{caller_port}"
            offer = self.command(
                {
                    "command": "offer",
                    "call-id": call_id,
                    "from-tag": "caller",
                    "sdp": self._sdp(CALLER, caller_port),
                    "direction": ["pub", "priv"],
                    "flags": ["no port latching"],
                }
            )
            answer = self.command(
                {
                    "command": "answer",
                    "call-id": call_id,
                    "from-tag": "caller",
                    "to-tag": "callee",
                    "sdp": self._sdp(CALLEE, callee_port),
                }
            )
            # The offer's SDP goes to the callee (its port on the inside), the answer's
            # to the caller.
            ports.append((self._port(answer["sdp"]), self._port(offer["sdp"])))
        return ports

    def close(self) -> None:
        self.ng.close()


class Direct(Relay):
    """No relay: the generator's two sides talk to each other (its own ceiling)."""

    name = "generator alone"

    def __init__(self) -> None:
        self.pids = []

    def allocate(self, calls: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return list(calls)

    def close(self) -> None:
        pass


# -- CPU accounting ------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("ksoftirqd"):
                    pids.append(int(entry.name))
    return pids


def system_cpu() -> dict[str, float]:
    """Busy and softirq seconds of all CPUs (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return {"busy": (user + nice + system + irq + softirq) / TICK, "softirq": softirq / TICK}


@dataclass
class Run:
    relay: str
    rate: float
    streams: int
    sent: int = 0
    received: int = 0
    late: int = 0
    send_rate: float = 0.0
    max_latency_ms: float = 0.0
    elapsed: float = 0.0
    relay_cpu: float = 0.0
    generator_cpu: float = 0.0
    ksoftirqd_cpu: float = 0.0
    softirq: float = 0.0
    busy: float = 0.0

    @property
    def loss(self) -> float:
        lost = max(0, self.sent - self.received) + self.late
        return lost / self.sent if self.sent else 1.0

    @property
    def generator_kept_up(self) -> bool:
        return self.send_rate >= 0.98 * self.rate

    @property
    def passed(self) -> bool:
        return self.loss < MAX_LOSS and self.generator_kept_up


@dataclass
class Bench:
    lab: Lab
    build: Path
    generator: Path
    relay: Relay
    calls: list[tuple[int, int]] = field(default_factory=list)  # relay ports per call

    def ensure_calls(self, count: int) -> None:
        """Set up calls until there are ``count`` (rates ascend: calls are reused)."""
        if count <= len(self.calls):
            return
        new = [(PORT_BASE + i, PORT_BASE + i) for i in range(len(self.calls), count)]
        ports = self.relay.allocate(new)
        first = len(self.calls)
        self.calls += ports
        self.generate(self.streams_file(first, count), 0, 0)  # prime (latching)
        self.relay.settle(count)

    def streams_file(self, first: int, count: int) -> Path:
        path = self.build / f"streams-{first}-{count}.txt"
        lines = []
        for i in range(first, count):
            a_port, b_port = self.calls[i]
            if isinstance(self.relay, Direct):
                lines.append(f"{CALLER} {PORT_BASE + i} {CALLEE} {PORT_BASE + i}")
                lines.append(f"{CALLEE} {PORT_BASE + i} {CALLER} {PORT_BASE + i}")
            else:
                lines.append(f"{CALLER} {PORT_BASE + i} {RELAY_OUT} {a_port}")
                lines.append(f"{CALLEE} {PORT_BASE + i} {RELAY_IN} {b_port}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def generate(self, streams: Path, rate: float, seconds: float) -> dict[str, Any]:
        """Run the generator once (bounded: its own cap plus a deadline here)."""
        process = self.lab.spawn(
            "gen",
            [str(self.generator), str(streams), str(rate), str(seconds)],
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = process.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
            raise TimeoutError("generator overran its deadline") from None
        if process.returncode != 0 or not out:
            raise RuntimeError(f"generator failed (rc {process.returncode})")
        result: dict[str, Any] = json.loads(out)
        return result

    def measure(self, rate: float, seconds: float) -> Run:
        calls = max(1, round(rate / PACKETS_PER_CALL))
        self.ensure_calls(calls)
        streams = self.streams_file(0, calls)
        run = Run(self.relay.name, rate, 2 * calls)
        softirqd = ksoftirqd_pids()
        before_relay = sum(process_cpu(p) for p in self.relay.pids)
        before_soft = sum(process_cpu(p) for p in softirqd)
        before_sys = system_cpu()
        usage_before = os.times()
        result = self.generate(streams, rate, seconds)
        usage_after = os.times()
        after_sys = system_cpu()
        run.relay_cpu = sum(process_cpu(p) for p in self.relay.pids) - before_relay
        run.ksoftirqd_cpu = sum(process_cpu(p) for p in softirqd) - before_soft
        # Children's times: the generator (ip netns exec execs it, so it is our child).
        run.generator_cpu = (usage_after.children_user + usage_after.children_system) - (
            usage_before.children_user + usage_before.children_system
        )
        run.softirq = after_sys["softirq"] - before_sys["softirq"]
        run.busy = after_sys["busy"] - before_sys["busy"]
        for key in ("sent", "received", "late", "send_rate", "max_latency_ms", "elapsed"):
            setattr(run, key, result[key])
        return run


def ladder(bench: Bench, rates: list[float], seconds: float, log: list[Run]) -> tuple[float, bool]:
    """The highest passing rate of the ladder, and whether the generator was the limit."""
    best = 0.0
    for rate in rates:
        run = bench.measure(rate, seconds)
        log.append(run)
        print(
            f"  {run.relay:22s} {rate:>8.0f} pkt/s: loss {100 * run.loss:5.2f} % "
            f"(late {run.late}), sent at {run.send_rate:8.0f}/s, "
            f"max latency {run.max_latency_ms:6.1f} ms",
            flush=True,
        )
        if not run.passed:
            return best, not run.generator_kept_up
        best = rate
    return best, False


@contextlib.contextmanager
def media_lab() -> Iterator[Lab]:
    with Lab(prefix=f"sbcb{os.getpid() % 10000}") as lab:
        lab.add("gen")
        lab.add("relay")
        lab.link("gen", "relay", [f"{CALLER}/24"], [f"{RELAY_OUT}/24"])
        lab.link("relay", "gen", [f"{RELAY_IN}/24"], [f"{CALLEE}/24"])
        lab.sysctl("relay", "net.ipv4.ip_forward", 1)
        yield lab


def compile_generator(build: Path) -> Path:
    build.mkdir(parents=True, exist_ok=True)
    binary = build / "media_gen"
    source = ROOT / "tests/bench/media_gen.c"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(source)],
        check=True,
        timeout=60,
    )
    return binary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (< 60 s in all)")
    parser.add_argument("--fixed-rate", type=float, default=20000.0)
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument(
        "--relays", default="kernel,userspace,rtpengine", help="comma-separated subset"
    )
    args = parser.parse_args()
    reason = can_run_lab()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if "rtpengine" in args.relays and shutil.which("rtpengine") is None:
        print("cannot run: rtpengine missing (apt-get install rtpengine-daemon)", file=sys.stderr)
        return 2
    build = ROOT / "build/bench-media"
    generator = compile_generator(build)
    seconds = 1.0 if args.quick else 3.0
    if args.quick:
        rates = [20000.0, 45000.0, 80000.0]
    else:
        rates = [20000.0, 30000.0, 45000.0, 60000.0, 80000.0, 100000.0, 130000.0, 160000.0]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    log: list[Run] = []
    with media_lab() as lab:
        makers = {
            "alone": lambda: Direct(),
            "kernel": lambda: SbcRelay(lab, kernel=True),
            "userspace": lambda: SbcRelay(lab, kernel=False),
            "rtpengine": lambda: Rtpengine(lab, build),
        }
        for key in ["alone", *args.relays.split(",")]:
            relay = makers[key]()
            try:
                bench = Bench(lab, build, generator, relay)
                fixed = bench.measure(args.fixed_rate, seconds if args.quick else 2 * seconds)
                log.append(fixed)
                best, generator_bound = ladder(bench, rates, seconds, log)
                results[key] = {
                    "fixed": fixed,
                    "max_rate": best,
                    "generator_bound": generator_bound,
                }
                if isinstance(relay, SbcRelay):
                    results[key]["setups_per_s"] = relay.setups(300 if args.quick else 2000)
            finally:
                relay.close()
                # Free the generator's ports and the relay's process before the next one.
                for process in list(lab.processes):
                    if process.poll() is not None:
                        lab.processes.remove(process)
                if isinstance(relay, Rtpengine):
                    relay.process.terminate()
                    relay.process.wait(timeout=10)
    report(results, args, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "loss": r.loss} for r in log], indent=1))
    return 0


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, elapsed: float) -> None:
    alone: Run = results["alone"]["fixed"]
    base_cpu = alone.generator_cpu + alone.ksoftirqd_cpu

    def per_packet(run: Run) -> float:
        caused = run.relay_cpu + run.generator_cpu + run.ksoftirqd_cpu - base_cpu
        return 1e6 * caused / max(1, run.received)

    print(
        f"\nmedia relay benchmark ({elapsed:.0f} s, {os.cpu_count()} CPUs), fixed load "
        f"{args.fixed_rate:.0f} packets/s; ratios to rtpengine in this run"
    )
    header = (
        f"{'':22s} {'CPU us/pkt':>10s} {'(relay':>7s} {'gen+ksirq':>9s} {'softirq)':>8s} "
        f"{'max pkt/s':>10s} {'ratio cpu':>9s} {'ratio max':>9s}"
    )
    print(header)
    engine = results.get("rtpengine")
    engine_cpu = per_packet(engine["fixed"]) if engine else None
    engine_max = engine["max_rate"] if engine else None
    ceiling = results["alone"]["max_rate"]
    for key, value in results.items():
        run: Run = value["fixed"]
        cpu = per_packet(run) if key != "alone" else 1e6 * base_cpu / max(1, run.received)
        max_rate = value["max_rate"]
        # The generator fell behind at a rate it manages alone: the relay's kernel work
        # (softirq in the sender's context) slowed it, so that is the relay's limit.
        bound = "+" if value["generator_bound"] and max_rate >= ceiling else " "
        ratio_cpu = f"{cpu / engine_cpu:9.2f}" if engine_cpu and key != "alone" else f"{'':9s}"
        ratio_max = f"{max_rate / engine_max:9.2f}" if engine_max and key != "alone" else f"{'':9s}"
        print(
            f"{run.relay:22s} {cpu:10.2f} {1e6 * run.relay_cpu / max(1, run.received):7.2f} "
            f"{1e6 * (run.generator_cpu + run.ksoftirqd_cpu) / max(1, run.received):9.2f} "
            f"{1e6 * run.softirq / max(1, run.received):8.2f} "
            f"{max_rate:>9.0f}{bound} {ratio_cpu} {ratio_max}"
        )
        if "setups_per_s" in value:
            print(f"{'':22s} stream set-ups through MediaControl: {value['setups_per_s']:.0f}/s")
    print("+: the generator could not send faster (the limit is the generator, not the relay)")
    print("generator alone row: its own CPU per packet; its max is the generator's ceiling")


if __name__ == "__main__":
    sys.exit(main())
