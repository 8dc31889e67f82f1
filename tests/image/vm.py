"""Boot the appliance image under QEMU (TCG) and talk to it from the outside.

The guest gets user-mode networking with `restrict=on` (no way out) and host
forwards on 127.0.0.1 only: SIP UDP/TCP 5060, TLS 5061, admin 8080, SSH 22. Its serial
console is a Unix socket (to type at the login prompt) with a log file (to read).
Every QEMU started here runs in its own session and is powered off, or killed, on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BOOT_TIMEOUT = 420.0  # seconds to a SIP answer under TCG on a busy 2-core CI machine
POWEROFF_TIMEOUT = 90.0
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PASSWORD_RE = re.compile(rb"admin password \(console login and admin UI\): (\S+)")


@dataclass(frozen=True)
class Ports:
    sip: int  # UDP and TCP 5060
    tls: int
    admin: int
    ssh: int


def _free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port")


def options_request(transport: str, local_port: int) -> tuple[bytes, str]:
    call_id = secrets.token_hex(8)
    branch = "z9hG4bK" + secrets.token_hex(6)
    msg = (
        f"OPTIONS sip:sbc@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{local_port};branch={branch};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:boot-test@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:sbc@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Content-Length: 0\r\n\r\n"
    )
    return msg.encode(), call_id


def sip_options_udp(port: int, timeout: float = 2.0) -> bytes | None:
    """Send OPTIONS over UDP; the response (bytes) or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        msg, call_id = options_request("UDP", s.getsockname()[1])
        s.sendto(msg, ("127.0.0.1", port))
        try:
            while True:
                data, _ = s.recvfrom(65535)
                if call_id.encode() in data:
                    return data
        except OSError:
            return None


def sip_options_tcp(port: int, timeout: float = 3.0) -> bytes | None:
    """Send OPTIONS over TCP; the response (bytes) or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            msg, call_id = options_request("TCP", s.getsockname()[1])
            s.sendall(msg)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65535)
                if not chunk:
                    return None
                data += chunk
            return data if call_id.encode() in data else None
    except OSError:
        return None


def http_status(port: int, path: str, timeout: float = 3.0) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


@dataclass
class BootedVm:
    proc: subprocess.Popen[bytes]
    work: Path
    ports: Ports
    console_socket: Path
    serial_log: Path
    started: float
    sip_answer_seconds: float = 0.0
    first_sip_answer: bytes = b""
    _console: socket.socket | None = field(default=None, repr=False)
    _read_from: int = 0

    # -- serial console ------------------------------------------------------------

    def console_text(self) -> bytes:
        try:
            return self.serial_log.read_bytes()
        except OSError:
            return b""

    def wait_console(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for PATTERN in the console output after what was consumed so far."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = regex.search(self.console_text(), self._read_from)
            if m:
                self._read_from = m.end()
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode})")
            time.sleep(0.2)
        tail = self.console_text()[-2000:].decode(errors="replace")
        raise AssertionError(f"no {regex.pattern!r} on the console in {timeout} s; tail:\n{tail}")

    def type(self, text: str) -> None:
        if self._console is None:
            self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._console.connect(str(self.console_socket))
        # A few bytes at a time: the emulated UART's FIFO is 16 bytes and a TCG guest
        # drains it slowly; a long line sent at once loses characters.
        data = text.encode()
        for i in range(0, len(data), 8):
            self._console.sendall(data[i : i + 8])
            time.sleep(0.02)

    def admin_password(self) -> str:
        m = PASSWORD_RE.search(self.console_text())
        assert m, "the first boot did not show the admin password on the console"
        return m.group(1).decode()

    def login(self, timeout: float = 120.0) -> None:
        """Log in as admin on the serial console with the first-boot password."""
        password = self.admin_password()
        self.type("\n")
        self.wait_console(b"login: ", timeout)
        self.type("admin\n")
        self.wait_console(b"Password: ", 30)
        self.type(password + "\n")
        self.wait_console(re.compile(rb"admin@[\w-]+:~\$ "), 60)

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Run COMMAND in the logged-in console shell; its output (between markers)."""
        n = secrets.randbelow(10**6)
        # The marker is computed by the shell, so the echoed command line never matches.
        self.type(f"echo =BEGIN=$(({n}+1))=; {command}; echo =END=$(({n}+1))=\n")
        begin = self.wait_console(f"=BEGIN={n + 1}=".encode(), timeout)
        end = self.wait_console(f"=END={n + 1}=".encode(), timeout)
        text = self.console_text()[begin.end() : end.start()]
        return text.decode(errors="replace").replace("\r", "")

    # -- lifecycle -----------------------------------------------------------------

    def monitor(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.work / "monitor.sock"))
            s.sendall(command.encode() + b"\n")
            time.sleep(0.5)

    def power_off(self) -> float:
        """ACPI power button, then wait; kill QEMU if the guest does not stop in time."""
        start = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.monitor("system_powerdown")
            try:
                self.proc.wait(POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._console is not None:
            self._console.close()
        return time.monotonic() - start


def qemu_command(disk: Path, work: Path, ports: Ports, firmware: str) -> list[str]:
    fwd = ",".join(
        [
            f"hostfwd=udp:127.0.0.1:{ports.sip}-:5060",
            f"hostfwd=tcp:127.0.0.1:{ports.sip}-:5060",
            f"hostfwd=tcp:127.0.0.1:{ports.tls}-:5061",
            f"hostfwd=tcp:127.0.0.1:{ports.admin}-:8080",
            f"hostfwd=tcp:127.0.0.1:{ports.ssh}-:22",
        ]
    )
    cmd = [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", "2",
        "-m", "1024",
        "-display", "none",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        f"socket,id=ser0,path={work / 'console.sock'},server=on,wait=off,"
        f"logfile={work / 'serial.log'}",
        "-serial", "chardev:ser0",
        "-monitor", f"unix:{work / 'monitor.sock'},server=on,wait=off",
        "-drive", f"file={disk},format=qcow2,if=virtio",
        "-netdev", f"user,id=n0,restrict=on,{fwd}",
        "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    if firmware == "uefi":
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        cmd += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
        ]  # fmt: skip
    return cmd


@contextlib.contextmanager
def boot_vm(raw_image: Path, work: Path, firmware: str = "bios") -> Iterator[BootedVm]:
    """Boot RAW_IMAGE (through a qcow2 overlay: the image stays pristine) until the SBC
    answers SIP OPTIONS over TCP on the forwarded port; power it off on exit."""
    overlay = work / "disk.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(raw_image),
            str(overlay),
        ],
        check=True,
    )
    ports = Ports(sip=_free_port(), tls=_free_port(), admin=_free_port(), ssh=_free_port())
    log = open(work / "qemu.log", "wb")  # noqa: SIM115 - closed in finally
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(overlay, work, ports, firmware),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    vm = BootedVm(
        proc=proc,
        work=work,
        ports=ports,
        console_socket=work / "console.sock",
        serial_log=work / "serial.log",
        started=started,
    )
    try:
        deadline = started + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({proc.returncode}): see {work}/qemu.log")
            # TCP: with restrict=on, slirp drops the guest's UDP replies to a forwarded
            # datagram (they count as outbound traffic); UDP is checked from inside.
            answer = sip_options_tcp(ports.sip, timeout=2.0)
            if answer:
                vm.sip_answer_seconds = time.monotonic() - started
                vm.first_sip_answer = answer
                break
            time.sleep(1.0)
        else:
            tail = vm.console_text()[-3000:].decode(errors="replace")
            raise AssertionError(f"no SIP answer in {BOOT_TIMEOUT} s; console tail:\n{tail}")
        yield vm
    finally:
        vm.power_off()
        log.close()
