"""Boot the lab-VM image under QEMU (BIOS) and check it from the outside: SIP OPTIONS
over the forwarded port, the health endpoint, the first-boot password, SSH by key only,
the listening sockets and the SBC's privileges, seen from a console login."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.conftest import record
from tests.image.vm import BootedVm, boot_vm, http_status, sip_options_tcp

pytestmark = pytest.mark.image

# What may listen on a non-loopback address: SIP (UDP/TCP 5060, TLS 5061), the admin UI
# and API with /healthz (8080), SSH (22). VRRP is IP protocol 112, not a port.
ALLOWED = {("udp", 5060), ("tcp", 5060), ("tcp", 5061), ("tcp", 8080), ("tcp", 22)}
# Clients, not services: networkd's DHCPv4 client keeps UDP 68 for renewals.
ALLOWED_CLIENT_PORTS = {("udp", 68), ("udp", 546)}
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN = 10, 12


@pytest.fixture(scope="module")
def vm(raw_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedVm]:
    with boot_vm(raw_image, tmp_path_factory.mktemp("vm-bios"), firmware="bios") as booted:
        record("boot.bios.seconds_to_sip_answer", round(booted.sip_answer_seconds, 1))
        yield booted
        seconds = booted.power_off()
        record("boot.bios.poweroff_seconds", round(seconds, 1))
        assert booted.proc.returncode is not None


@pytest.fixture(scope="module")
def shell(vm: BootedVm) -> BootedVm:
    vm.login()
    return vm


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


def test_sip_options_answered_over_tcp(vm: BootedVm) -> None:
    assert status_line(vm.first_sip_answer) == "SIP/2.0 200 OK"
    again = sip_options_tcp(vm.ports.sip, timeout=10)
    assert again is not None and status_line(again) == "SIP/2.0 200 OK"
    assert b"\r\nCSeq: 1 OPTIONS\r\n" in again


# UDP from inside the guest: QEMU's user network with restrict=on drops UDP replies to
# forwarded datagrams, so the host cannot see them.
UDP_OPTIONS = (
    "python3 -c \"import socket;s=socket.socket(2,2);s.settimeout(5);s.bind(('10.0.2.15',0));"
    "p=s.getsockname()[1];s.sendto(('OPTIONS sip:sbc@10.0.2.15 SIP/2.0\\r\\nVia: SIP/2.0/UDP "
    "10.0.2.15:%d;branch=z9hG4bKudp1;rport\\r\\nMax-Forwards: 70\\r\\nFrom: <sip:t@x>;tag=1"
    "\\r\\nTo: <sip:sbc@x>\\r\\nCall-ID: udp-boot-test\\r\\nCSeq: 1 OPTIONS\\r\\n"
    "Content-Length: 0\\r\\n\\r\\n' % p).encode(),('10.0.2.15',5060));"
    "print(s.recv(65535).split(b'\\r\\n')[0].decode())\""
)


def test_sip_options_answered_over_udp_inside_the_guest(shell: BootedVm) -> None:
    assert "SIP/2.0 200 OK" in shell.run(UDP_OPTIONS)


def test_health_endpoint_answers(vm: BootedVm) -> None:
    assert http_status(vm.ports.admin, "/healthz", timeout=10) == 200


def test_admin_password_shown_once_on_the_console(vm: BootedVm) -> None:
    password = vm.admin_password()
    assert len(password) >= 12
    assert vm.console_text().count(password.encode()) == 1


def test_ssh_offers_public_key_only(vm: BootedVm) -> None:
    if not shutil.which("ssh"):
        pytest.skip("no ssh client")
    result = subprocess.run(
        ["ssh", "-p", str(vm.ports.ssh), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30",
         "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null",
         "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_console_login_with_the_first_boot_password(shell: BootedVm) -> None:
    assert shell.run("id -un").strip().endswith("admin")


def test_password_never_reaches_the_journal(shell: BootedVm) -> None:
    password = shell.admin_password()
    out = shell.run(f"journalctl -b --no-pager | grep -cF '{password}'")
    assert out.strip().splitlines()[-1] == "0"


def listening(ss_output: str) -> list[tuple[str, str, int]]:
    """(proto, address, port) from `ss -Htuln`."""
    sockets = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ("udp", "tcp"):
            continue
        addr, _, port = fields[4].rpartition(":")
        sockets.append((fields[0], addr.strip("[]").split("%")[0], int(port)))
    return sockets


def test_no_open_ports_besides_sip_admin_and_ssh(shell: BootedVm) -> None:
    sockets = listening(shell.run("ss -Htuln"))
    assert ("udp", "0.0.0.0", 5060) in sockets and ("tcp", "0.0.0.0", 8080) in sockets
    exposed = {
        (proto, port)
        for proto, addr, port in sockets
        if addr in ("*", "0.0.0.0", "::") or not ipaddress.ip_address(addr).is_loopback
    }
    record("open_ports", sorted(exposed))
    assert exposed - ALLOWED - ALLOWED_CLIENT_PORTS == set()


def test_sbc_runs_unprivileged_with_two_capabilities(shell: BootedVm) -> None:
    pid = shell.run("systemctl show -P MainPID sbc.service").strip().splitlines()[-1]
    assert pid.isdigit() and int(pid) > 0
    status = shell.run(f"grep -E '^(Uid|CapEff|CapBnd|CapPrm):' /proc/{pid}/status")
    fields = dict(re.findall(r"^(\w+):\s+(.+)$", status, re.M))
    assert fields["Uid"].split()[0] != "0"
    wanted = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN)
    assert int(fields["CapBnd"], 16) == wanted
    assert int(fields["CapEff"], 16) == wanted
