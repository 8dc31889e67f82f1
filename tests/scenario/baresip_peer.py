"""A real softphone for scenario tests: baresip 1.0.0 (Debian ``baresip-core``).

``BaresipPeer`` writes a config directory, runs ``baresip -f DIR`` as a subprocess,
drives it over the ``ctrl_tcp`` module (JSON commands and events in netstrings) and
hands back what the phone heard. Each phone plays a generated sine (``aufile``
source) and its decoded receive audio is kept as a WAV file (``sndfile`` filter).

What baresip 1.0.0 needs, learned the hard way:

- ``aufile`` is only an audio *source* in 1.0.0 (the ``aufile`` player came later),
  and the WAV must match the source rate and channels (8000 Hz mono S16LE here).
  The recording is the ``sndfile`` filter's decode dump,
  ``snd_path/dump-<time>-dec.wav``, written under the player; its header is final
  only once the call has closed. The player itself is an ``aubridge`` device (no
  sound card needed, nothing is played).
- ``sip_listen HOST:P`` binds UDP and TCP on P **and TLS on P+1**; both must be free.
- The SDP address is the "local network address", not ``sip_listen``'s: set
  ``net_interface`` to the phone's own IP address (an interface name such as
  ``lo`` fails with "could not get network address"). RTP binds 0.0.0.0 in
  ``rtp_ports``.
- ``dial``/``hangup`` are commands of the ``menu`` module; without it ctrl_tcp
  answers "command not found". ``;answermode=auto`` on the account answers calls.
- A ctrl_tcp port already taken only unloads that module; baresip keeps running.
  ``start`` therefore checks, over the control connection, that it reached its own
  phone (the ``reginfo`` command lists the AOR) and retries with new ports.
- The first REGISTER leaves before ctrl_tcp listens, so REGISTER_OK can come
  before anyone is connected to hear it: registration is polled with ``reginfo``.
- Events reach only connected clients; ``CALL_INCOMING`` is not sent for a call
  answered automatically (the callee sees CALL_ESTABLISHED directly).
- The dump files are named to the second: one call per phone per second.
- ``-s`` traces every SIP message to stdout (``#``, ``UDP src -> dst``, the message
  with LF line ends, in ANSI colour); stdout is a file, flushed as it goes.
- SDES-SRTP needs ``module srtp.so`` loaded before ``account.so`` reads the
  account's ``mediaenc``: ``srtp-mand`` offers RTP/SAVP with one
  ``a=crypto:1 AES_CM_128_HMAC_SHA1_80`` and logs "SRTP is Enabled" once keyed; a
  phone without ``mediaenc`` answers an RTP/SAVP offer 488 ("no common audio codecs").

Every phone binds its own loopback address (127.0.0.2, 127.0.0.3, ...), so what
another party saw of it in SIP or SDP is easy to search for.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Final

from tests.scenario.tones import DEFAULT_RATE, read_wav, write_tone

logger = logging.getLogger(__name__)

#: The executable, or None when baresip is not installed.
BARESIP: Final = shutil.which("baresip")
#: Where distributions install baresip's modules; the first that exists is used.
MODULE_DIRS: Final = (
    Path("/usr/lib/baresip/modules"),
    Path("/usr/lib/x86_64-linux-gnu/baresip/modules"),
    Path("/usr/local/lib/baresip/modules"),
)
#: Largest netstring accepted from ctrl_tcp (baresip's events are a few hundred bytes).
MAX_NETSTRING: Final = 1 << 20
#: Attempts at starting a phone when a picked port was taken meanwhile.
START_ATTEMPTS: Final = 3


class EventType(StrEnum):
    """The ctrl_tcp ``type`` of the user-agent events the harness waits for."""

    REGISTER_OK = "REGISTER_OK"
    REGISTER_FAIL = "REGISTER_FAIL"
    CALL_INCOMING = "CALL_INCOMING"
    CALL_RINGING = "CALL_RINGING"
    CALL_PROGRESS = "CALL_PROGRESS"
    CALL_ESTABLISHED = "CALL_ESTABLISHED"
    CALL_CLOSED = "CALL_CLOSED"


class Registration(Enum):
    """An account's state in ``reginfo``: OK, ERR, or not (yet) known."""

    PENDING = "pending"
    OK = "OK"
    FAILED = "ERR"


class BaresipError(RuntimeError):
    """baresip failed, refused a command, or an awaited event did not come in time."""


class NetstringError(ValueError):
    """A malformed netstring on the control connection."""


def netstring(payload: bytes) -> bytes:
    """``<length>:<payload>,`` (D. J. Bernstein's netstrings, as ctrl_tcp frames JSON)."""
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Splits a byte stream into netstring payloads; keeps a partial one for later."""

    def __init__(self, max_length: int = MAX_NETSTRING) -> None:
        self._buffer = b""
        self._max_length = max_length

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by ``data``, in order."""
        self._buffer += data
        out: list[bytes] = []
        while True:
            head, colon, rest = self._buffer.partition(b":")
            if not colon:
                if head and (not head.isdigit() or len(head) > len(str(self._max_length))):
                    raise NetstringError(f"bad netstring length {head[:20]!r}")
                return out
            if not head.isdigit() or (len(head) > 1 and head.startswith(b"0")):
                raise NetstringError(f"bad netstring length {head[:20]!r}")
            length = int(head)
            if length > self._max_length:
                raise NetstringError(f"netstring of {length} bytes exceeds {self._max_length}")
            if len(rest) < length + 1:
                return out
            if rest[length : length + 1] != b",":
                raise NetstringError("netstring not terminated by ','")
            out.append(rest[:length])
            self._buffer = rest[length + 1 :]


@dataclass(frozen=True)
class BaresipEvent:
    """One ctrl_tcp event, e.g. ``{"event":true,"type":"CALL_ESTABLISHED",...}``."""

    type: str
    account: str
    direction: str
    peer_uri: str
    #: The SIP Call-ID of the call (empty for registration events).
    call_id: str
    param: str

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BaresipEvent:
        def text(key: str) -> str:
            value = data.get(key, "")
            return value if isinstance(value, str) else str(value)

        return cls(
            text("type"),
            text("accountaor"),
            text("direction"),
            text("peeruri"),
            text("id"),
            text("param"),
        )


@dataclass(frozen=True)
class CommandResponse:
    """A ctrl_tcp response: ``{"response":true,"ok":...,"data":...,"token":...}``."""

    ok: bool
    data: str
    token: str


@dataclass(frozen=True)
class SipTraceEntry:
    """One message from baresip's ``-s`` SIP trace."""

    transport: str
    source: str
    destination: str
    message: str


#: ``-s`` prints each message as ``#``, a ``UDP src -> dst`` line and the message,
#: in ANSI colour: the message ends at the colour reset (or the next ``#`` head).
_TRACE_ENTRY = re.compile(
    r"(?:\x1b\[[0-9;]*m)?#\n(?P<transport>UDP|TCP|TLS|WS|WSS) (?P<src>\S+) -> (?P<dst>\S+)\n"
    r"(?P<message>.*?)(?=\x1b\[|\n#\n(?:UDP|TCP|TLS|WS|WSS) |\Z)",
    re.DOTALL,
)


def parse_sip_trace(log: str) -> list[SipTraceEntry]:
    """The SIP messages in baresip's log, as its ``-s`` option prints them."""
    return [
        SipTraceEntry(m["transport"], m["src"], m["dst"], m["message"].rstrip("\n"))
        for m in _TRACE_ENTRY.finditer(log)
    ]


def parse_reginfo(text: str, aor: str) -> Registration:
    """The state of ``aor`` in ``reginfo``'s output (``> AOR  OK  Expires 60s``)."""
    for line in _ANSI_CODE.sub("", text).splitlines():
        words = line.lstrip("> ").split()
        if len(words) >= 2 and words[0] == aor:
            return next(
                (state for state in Registration if state.value == words[1]), Registration.PENDING
            )
    return Registration.PENDING


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class PeerConfig:
    """One phone: who it is, where it binds, what it plays.

    ``registrar`` None makes a direct peer (no REGISTER, ``regint=0``): it is
    called at ``sip:NAME@ADDRESS:PORT`` and dials any URI itself.
    """

    name: str
    #: A loopback address of its own, e.g. 127.0.0.2: SIP, SDP and control bind it.
    address: str
    #: The sine the phone sends, Hz (a multiple of 10: see tones.BLOCK_SECONDS).
    tone_hz: float
    #: RTP port range, inclusive (RTCP takes the port above each RTP port).
    rtp_ports: tuple[int, int]
    #: ``host:port`` of the registrar (the SBC); None: no registration.
    registrar: str | None = None
    password: str | None = None
    #: Registration interval, seconds (RFC 3261 10.2.1 Expires).
    regint: int = 60
    auto_answer: bool = True
    #: Length of the generated tone file; longer than any call in a test.
    tone_seconds: float = 30.0
    #: The AOR's domain when it is not the registrar's ``host:port``; REGISTER and
    #: calls then still go to ``registrar``, as the outbound proxy.
    domain: str | None = None
    #: baresip's media encryption (``mediaenc`` account parameter, module ``srtp``):
    #: ``srtp-mand`` offers RTP/SAVP with a=crypto and accepts only SRTP, ``srtp``
    #: offers RTP/AVP with a=crypto (best effort); None: plain RTP, srtp.so not loaded.
    mediaenc: str | None = None

    def aor(self) -> str:
        """The account's address of record."""
        return f"sip:{self.name}@{self.domain or self.registrar or self.address}"

    def account_line(self) -> str:
        """The one line of baresip's ``accounts`` file for this phone."""
        params = ["audio_codecs=pcmu", f"answermode={'auto' if self.auto_answer else 'manual'}"]
        if self.registrar is None:
            params.append("regint=0")
        else:
            params.append(f"regint={self.regint}")
            params.append(f"auth_user={self.name}")
            if self.password is not None:
                params.append(f"auth_pass={self.password}")
            if self.domain is not None:
                params.append(f'outbound="sip:{self.registrar}"')
        if self.mediaenc is not None:
            params.append(f"mediaenc={self.mediaenc}")
        return f"<{self.aor()}>;" + ";".join(params) + "\n"

    def config_text(self, sip_port: int, ctrl_port: int, tone: Path, recordings: Path) -> str:
        """baresip's ``config`` file for this phone."""
        module_dir = next((d for d in MODULE_DIRS if d.is_dir()), MODULE_DIRS[0])
        low, high = self.rtp_ports
        lines = [
            ("poll_method", "epoll"),
            ("sip_listen", f"{self.address}:{sip_port}"),
            ("net_interface", self.address),
            ("call_local_timeout", "30"),
            ("call_max_calls", "4"),
            ("audio_source", f"aufile,{tone}"),
            ("audio_player", f"aubridge,play-{self.name}"),
            ("audio_alert", f"aubridge,alert-{self.name}"),
            ("ausrc_srate", str(DEFAULT_RATE)),
            ("auplay_srate", str(DEFAULT_RATE)),
            ("ausrc_channels", "1"),
            ("auplay_channels", "1"),
            ("rtp_ports", f"{low}-{high}"),
            ("rtcp_mux", "no"),
            ("jitter_buffer_delay", "1-10"),
            ("module_path", str(module_dir)),
            ("module", "g711.so"),
            ("module", "aufile.so"),
            ("module", "aubridge.so"),
            ("module", "sndfile.so"),
            *([("module", "srtp.so")] if self.mediaenc is not None else []),
            ("module_tmp", "account.so"),
            ("module_app", "menu.so"),
            ("module_app", "ctrl_tcp.so"),
            ("ctrl_tcp_listen", f"{self.address}:{ctrl_port}"),
            ("snd_path", str(recordings)),
        ]
        return "".join(f"{key:<24}{value}\n" for key, value in lines)


def free_tcp_udp_port(address: str, also_next_tcp: bool = False) -> int:
    """A port free on ``address`` for TCP and UDP now (and TCP on port+1 if asked)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        wanted = [(socket.SOCK_DGRAM, port)]
        if also_next_tcp:
            wanted.append((socket.SOCK_STREAM, port + 1))
        if all(_bindable(address, kind, p) for kind, p in wanted):
            return port
    raise BaresipError(f"no free port on {address}")


def _bindable(address: str, kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


class BaresipPeer:
    """``baresip -f DIR`` in a subprocess, one phone; ``stop`` always ends it.

    Use as a context manager, or call ``stop`` in a ``finally``: the process is
    killed by its PID even when a test fails half-way.
    """

    def __init__(self, workdir: Path, config: PeerConfig) -> None:
        self.config = config
        self.workdir = workdir / f"baresip-{config.name}"
        self.recordings = self.workdir / "recordings"
        self.log_path = self.workdir / "baresip.log"
        self.sip_port = 0
        self.ctrl_port = 0
        self.events: list[BaresipEvent] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._decoder = NetstringDecoder()
        self._responses: dict[str, CommandResponse] = {}

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> BaresipPeer:
        """Write the config, start baresip, connect to it; registered if it registers."""
        if BARESIP is None:
            raise BaresipError("baresip is not installed")
        self.recordings.mkdir(parents=True, exist_ok=True)
        tone = write_tone(
            self.workdir / f"tone-{self.config.tone_hz:g}.wav",
            self.config.tone_hz,
            self.config.tone_seconds,
        )
        (self.workdir / "accounts").write_text(self.config.account_line())
        (self.workdir / "contacts").write_text("")
        deadline = time.monotonic() + timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            self.sip_port = free_tcp_udp_port(self.config.address, also_next_tcp=True)
            self.ctrl_port = free_tcp_udp_port(self.config.address)
            (self.workdir / "config").write_text(
                self.config.config_text(self.sip_port, self.ctrl_port, tone, self.recordings)
            )
            if self._launch(deadline):
                break
            logger.info("x baresip %s: attempt %d failed, new ports", self.config.name, attempt)
            self._kill()
        else:
            raise BaresipError(f"baresip {self.config.name} did not start:\n{self.log()[-3000:]}")
        logger.info(
            "- baresip %s: pid %d, sip %s:%d, ctrl %d",
            self.config.name,
            self.pid,
            self.config.address,
            self.sip_port,
            self.ctrl_port,
        )
        if self.config.registrar is not None:
            self.wait_registered(max(1.0, deadline - time.monotonic()))
        return self

    def _launch(self, deadline: float) -> bool:
        """Start the process and connect to its ctrl_tcp; False if ports were taken."""
        assert BARESIP is not None
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [BARESIP, "-f", str(self.workdir), "-s"],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. sip_listen's port (or port+1 for TLS) was taken
            with contextlib.suppress(OSError):
                self._sock = socket.create_connection(
                    (self.config.address, self.ctrl_port), timeout=0.5
                )
                break
            if "ctrl_tcp: failed to listen" in self.log():
                return False
            time.sleep(0.05)
        if self._sock is None:
            return False
        self._sock.settimeout(0.1)
        try:
            info = self.command("reginfo", timeout=max(0.5, deadline - time.monotonic()))
        except (BaresipError, OSError):
            return False
        # The control port might be someone else's baresip: ours lists our AOR.
        return self.config.aor() in info

    def stop(self, timeout: float = 5.0) -> int | None:
        """Quit baresip (politely, then SIGTERM, then SIGKILL by PID); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self._sock is not None:
            with contextlib.suppress(OSError, BaresipError):
                self._send("quit", "", "stop")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self._kill()
        finally:
            self._close()

    def _kill(self) -> int | None:
        """SIGTERM then SIGKILL to our own process (its PID), reaped."""
        self._close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> BaresipPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def uri(self) -> str:
        """Where this phone is called directly: ``sip:NAME@ADDRESS:PORT``."""
        return f"sip:{self.config.name}@{self.config.address}:{self.sip_port}"

    # -- control ----------------------------------------------------------------------

    def command(self, name: str, params: str = "", timeout: float = 5.0) -> str:
        """Run a baresip command (``dial``, ``hangup``, ``reginfo``...); its output."""
        token = f"{name}-{secrets.token_hex(4)}"
        self._send(name, params, token)
        deadline = time.monotonic() + timeout
        while token not in self._responses:
            if time.monotonic() >= deadline:
                raise BaresipError(f"baresip {self.config.name}: no answer to {name}")
            self._pump()
        response = self._responses.pop(token)
        if not response.ok:
            raise BaresipError(f"baresip {self.config.name}: {name} failed: {response.data}")
        return response.data

    def _send(self, name: str, params: str, token: str) -> None:
        if self._sock is None:
            raise BaresipError(f"baresip {self.config.name} is not connected")
        message = {"command": name, "params": params, "token": token}
        logger.debug("> baresip %s: %s %s", self.config.name, name, params)
        self._sock.sendall(netstring(json.dumps(message).encode()))

    def _pump(self) -> None:
        """Read what arrives within 0.1 s (the socket's timeout) into events/responses."""
        if self._sock is None:
            raise BaresipError(f"baresip {self.config.name} is not connected")
        if self.proc is not None and self.proc.poll() is not None:
            raise BaresipError(
                f"baresip {self.config.name} exited ({self.proc.returncode}):\n"
                + self.log()[-3000:]
            )
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            self._close()
            raise BaresipError(f"baresip {self.config.name} closed the control connection")
        for payload in self._decoder.feed(data):
            message = json.loads(payload)
            if message.get("response"):
                token = str(message.get("token", ""))
                self._responses[token] = CommandResponse(
                    bool(message.get("ok")), str(message.get("data", "")), token
                )
            elif message.get("event"):
                event = BaresipEvent.from_json(message)
                logger.debug("< baresip %s: %s %s", self.config.name, event.type, event.param)
                self.events.append(event)

    def wait_event(
        self,
        kind: EventType,
        timeout: float = 10.0,
        after: int = 0,
        fail_on: tuple[EventType, ...] = (),
    ) -> BaresipEvent:
        """The first event ``kind`` at or after index ``after`` of ``events``.

        An event in ``fail_on`` (e.g. CALL_CLOSED while waiting for an answer)
        raises at once instead of waiting out the timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[after:]:
                if event.type == kind:
                    return event
                if event.type in fail_on:
                    raise BaresipError(
                        f"baresip {self.config.name}: {event.type} ({event.param}) "
                        f"while waiting for {kind}"
                    )
            if time.monotonic() >= deadline:
                seen = [e.type for e in self.events[after:]]
                raise BaresipError(
                    f"baresip {self.config.name}: no {kind} in {timeout} s (saw {seen})"
                )
            self._pump()

    def registration(self) -> Registration:
        """The account's registration state, as the ``reginfo`` command shows it."""
        return parse_reginfo(self.command("reginfo"), self.config.aor())

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Until the registrar accepted the REGISTER (RFC 3261 10.3: a 2xx).

        The first REGISTER goes out while baresip starts, before ctrl_tcp accepts
        connections, so its REGISTER_OK/REGISTER_FAIL event may be lost: the state
        is polled with ``reginfo`` (every 0.2 s) as well as read from events.
        """
        deadline = time.monotonic() + timeout
        while True:
            kinds = {e.type for e in self.events}
            state = self.registration()
            if EventType.REGISTER_OK in kinds or state is Registration.OK:
                return
            if EventType.REGISTER_FAIL in kinds or state is Registration.FAILED:
                raise BaresipError(f"baresip {self.config.name}: registration refused")
            if time.monotonic() >= deadline:
                raise BaresipError(
                    f"baresip {self.config.name}: not registered in {timeout} s ({state.name})"
                )
            self.pump_for(0.2)

    def dial(self, uri: str, timeout: float = 10.0) -> BaresipEvent:
        """Call ``uri`` and wait until the call is established (2xx received)."""
        mark = len(self.events)
        self.command("dial", uri)
        return self.wait_event(
            EventType.CALL_ESTABLISHED, timeout, after=mark, fail_on=(EventType.CALL_CLOSED,)
        )

    def wait_established(self, timeout: float = 10.0) -> BaresipEvent:
        """Until a call is established (for the callee: answered automatically).

        Looks only after the last call that closed, so a phone can take calls in turn.
        """
        after = self._last_index(EventType.CALL_CLOSED) + 1
        return self.wait_event(
            EventType.CALL_ESTABLISHED, timeout, after=after, fail_on=(EventType.CALL_CLOSED,)
        )

    def hangup(self, timeout: float = 5.0) -> BaresipEvent:
        """Hang up the current call (sends BYE) and wait until it has closed."""
        self.command("hangup")
        return self.wait_closed(timeout)

    def wait_closed(self, timeout: float = 5.0) -> BaresipEvent:
        """Until the last established call has closed (either side hung up)."""
        after = max(0, self._last_index(EventType.CALL_ESTABLISHED))
        return self.wait_event(EventType.CALL_CLOSED, timeout, after=after)

    def _last_index(self, kind: EventType) -> int:
        """Index in ``events`` of the last ``kind`` event, -1 if none."""
        return max((i for i, e in enumerate(self.events) if e.type == kind), default=-1)

    def pump_for(self, seconds: float) -> None:
        """Keep reading events for ``seconds`` (the call goes on meanwhile)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump()

    # -- what the phone saw ---------------------------------------------------------

    def recording(self, timeout: float = 5.0) -> array.array[int]:
        """What the phone heard in its last call: decoded samples at 8 kHz."""
        return self._dump("dec", timeout)

    def transmitted(self, timeout: float = 5.0) -> array.array[int]:
        """What the phone sent in its last call, before encoding."""
        return self._dump("enc", timeout)

    def _dump(self, kind: str, timeout: float) -> array.array[int]:
        """The sndfile dump of the last call; waits until libsndfile has closed it."""
        deadline = time.monotonic() + timeout
        while True:
            dumps = sorted(self.recordings.glob(f"dump-*-{kind}.wav"), key=_mtime)
            if dumps and _complete_wav(dumps[-1]):
                samples, rate = read_wav(dumps[-1])
                if rate != DEFAULT_RATE:
                    raise BaresipError(f"{dumps[-1]}: {rate} Hz, expected {DEFAULT_RATE}")
                return samples
            if time.monotonic() >= deadline:
                found = [p.name for p in dumps]
                raise BaresipError(f"baresip {self.config.name}: no complete {kind} dump {found}")
            time.sleep(0.05)

    def log(self) -> str:
        """baresip's output so far (its SIP trace included)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sip_trace(self) -> list[SipTraceEntry]:
        """Every SIP message the phone sent or received."""
        return parse_sip_trace(self.log())

    def received_sip(self) -> list[str]:
        """The SIP messages the phone received, in order."""
        own = f"{self.config.address}:{self.sip_port}"
        return [e.message for e in self.sip_trace() if e.destination == own]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _complete_wav(path: Path) -> bool:
    """Whether the WAV header (written by libsndfile on close) covers all the data."""
    try:
        with path.open("rb") as wav:
            header = wav.read(44)
        size = path.stat().st_size
    except OSError:
        return False
    if len(header) < 44 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return False
    riff_size = int.from_bytes(header[4:8], "little")
    return riff_size + 8 == size and riff_size > 36


@contextlib.contextmanager
def running(workdir: Path, *configs: PeerConfig) -> Iterator[list[BaresipPeer]]:
    """Start phones in order; stop every one that started, whatever happens."""
    peers: list[BaresipPeer] = []
    try:
        for config in configs:
            peer = BaresipPeer(workdir, config)
            peers.append(peer)
            peer.start()
        yield peers
    finally:
        for peer in reversed(peers):
            peer.stop()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
