"""Boot the appliance image under QEMU (TCG) and talk to it from the outside.

The guest gets user-mode networking with `restrict=on` (no way out) and host
forwards on 127.0.0.1 only, to ephemeral host ports: SIP UDP/TCP 5060, TLS 5061,
admin 8080, SSH 22. Its serial console goes to a log file (the first-boot password is
read from there, as an operator would).

Commands run in the guest over SSH, as `admin` with a key made for this boot only: the
key is written into a throwaway copy of the disk (debugfs, no mounts), never into the
built image, the way a provisioning tool would add an operator's key. Root commands go
through `sudo` with the first-boot password. (Typing at a TCG guest's serial console
loses characters and races the login prompt; SSH does neither.)

Every QEMU started here runs in its own session; it is powered off from the guest's shell
(`systemctl poweroff`) with a bounded wait, then killed by its PID.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BOOT_TIMEOUT = 420.0  # seconds to a SIP answer under TCG on a busy 2-core CI machine
SSH_TIMEOUT = 180.0  # seconds from the SIP answer until sshd lets the test key in
POWEROFF_TIMEOUT = 60.0  # seconds from `systemctl poweroff` until QEMU exits
ROOT_PARTITION_OFFSET = 135168 * 512  # packer/scripts/make-disk.sh: ROOT_START
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


def make_test_key(work: Path) -> tuple[Path, str]:
    """An ed25519 key pair for one boot: (private key path, public key line)."""
    key = work / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sbc-image-test", "-f", str(key)],
        check=True,
        timeout=30,
    )
    return key, key.with_suffix(".pub").read_text().strip()


def _debugfs(disk: Path, commands: list[str]) -> str:
    script = "\n".join(commands) + "\n"
    result = subprocess.run(
        ["debugfs", "-w", "-f", "-", f"{disk}?offset={ROOT_PARTITION_OFFSET}"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout + result.stderr


def authorize_key(disk: Path, rootfs_passwd: str, user: str, public_key: str, work: Path) -> None:
    """Write PUBLIC_KEY as USER's ~/.ssh/authorized_keys (0600, owned by USER) into the
    ext4 root partition of the raw DISK, without mounting it."""
    entry = next(
        line.split(":") for line in rootfs_passwd.splitlines() if line.startswith(user + ":")
    )
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    keys = work / "authorized_keys"
    keys.write_text(public_key + "\n")
    ssh_dir = f"{home}/.ssh"
    out = _debugfs(
        disk,
        [
            f"mkdir {ssh_dir}",
            f"sif {ssh_dir} mode 040700",
            f"sif {ssh_dir} uid {uid}",
            f"sif {ssh_dir} gid {gid}",
            f"rm {ssh_dir}/authorized_keys",
            f"write {keys} {ssh_dir}/authorized_keys",
            f"sif {ssh_dir}/authorized_keys mode 0100600",
            f"sif {ssh_dir}/authorized_keys uid {uid}",
            f"sif {ssh_dir}/authorized_keys gid {gid}",
        ],
    )
    listing = _debugfs(disk, [f"stat {ssh_dir}/authorized_keys"])
    assert f"User:  {uid}" in listing and "Mode:  0600" in listing, out + listing


@dataclass
class BootedVm:
    proc: subprocess.Popen[bytes]
    work: Path
    ports: Ports
    serial_log: Path
    ssh_key: Path
    started: float
    sip_answer_seconds: float = 0.0
    first_sip_answer: bytes = b""
    poweroff_seconds: float | None = None

    # -- serial console (read only) ------------------------------------------------

    def console_text(self) -> bytes:
        try:
            return self.serial_log.read_bytes()
        except OSError:
            return b""

    def admin_password(self) -> str:
        m = PASSWORD_RE.search(self.console_text())
        assert m, "the first boot did not show the admin password on the console"
        return m.group(1).decode()

    # -- SSH -----------------------------------------------------------------------

    def ssh_command(self, *, connect_timeout: int = 30) -> list[str]:
        return [
            "ssh", "-p", str(self.ports.ssh), "-i", str(self.ssh_key),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=8",
            "admin@127.0.0.1",
        ]  # fmt: skip

    def ssh(
        self, command: str, timeout: float = 120.0, stdin: bytes = b"", check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run COMMAND (a shell command line) as admin in the guest."""
        result = subprocess.run(
            [*self.ssh_command(), command],
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ssh {command!r} exited {result.returncode}:\n"
                + result.stderr.decode(errors="replace")[-2000:]
            )
        return result

    def run(self, command: str, timeout: float = 120.0) -> str:
        """COMMAND's standard output, run as admin."""
        return self.ssh(command, timeout=timeout).stdout.decode(errors="replace")

    def run_root(self, command: str, timeout: float = 120.0, stdin: bytes = b"") -> str:
        """COMMAND's standard output, run as root through sudo with the admin password
        (sudo -S reads the password line from stdin; the rest of stdin is COMMAND's)."""
        password = self.admin_password().encode() + b"\n"
        wrapped = f"sudo -S -p '' -- sh -c {shlex.quote(command)}"
        return self.ssh(wrapped, timeout=timeout, stdin=password + stdin).stdout.decode(
            errors="replace"
        )

    def wait_ssh(self, timeout: float = SSH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode})")
            try:
                result = self.ssh("true", timeout=60, check=False)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                return
            last = result.stderr.decode(errors="replace")
            time.sleep(2.0)
        raise AssertionError(f"no SSH login in {timeout} s: {last}")

    # -- lifecycle -----------------------------------------------------------------

    def power_off(self) -> float:
        """`systemctl poweroff` in the guest, a bounded wait for QEMU to exit, then kill
        QEMU by its PID. Returns the seconds it took (once; later calls are no-ops)."""
        if self.poweroff_seconds is not None:
            return self.poweroff_seconds
        start = time.monotonic()
        if self.proc.poll() is None:
            # The SSH session dies with the guest: its exit status says nothing.
            with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
                self.run_root("systemctl poweroff", timeout=30)
            try:
                self.proc.wait(POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.poweroff_seconds = time.monotonic() - start
        return self.poweroff_seconds


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
        "-chardev", f"file,id=ser0,path={work / 'serial.log'}",
        "-serial", "chardev:ser0",
        "-drive", f"file={disk},format=raw,if=virtio",
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
    """Boot a throwaway copy of RAW_IMAGE (the image stays pristine) with a test SSH key
    for admin, until the SBC answers SIP OPTIONS over TCP on the forwarded port and SSH
    lets the key in; power it off on exit and delete the copy."""
    disk = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(raw_image), str(disk)], check=True, timeout=300)
    key, public_key = make_test_key(work)
    passwd = (raw_image.parent / "rootfs" / "etc" / "passwd").read_text()
    authorize_key(disk, passwd, "admin", public_key, work)
    ports = Ports(sip=_free_port(), tls=_free_port(), admin=_free_port(), ssh=_free_port())
    log = open(work / "qemu.log", "wb")  # noqa: SIM115 - closed in finally
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(disk, work, ports, firmware),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    vm = BootedVm(
        proc=proc,
        work=work,
        ports=ports,
        serial_log=work / "serial.log",
        ssh_key=key,
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
        vm.wait_ssh()
        yield vm
    finally:
        vm.power_off()
        log.close()
        disk.unlink(missing_ok=True)
