"""Boot the lab-VM image under QEMU (BIOS) and check it from the outside: SIP OPTIONS
over the forwarded port, the health endpoint, the first-boot password, SSH by key only;
and from inside (over SSH with the boot's test key): SIP over UDP, the listening
sockets and the SBC's privileges."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

import pytest

from tests.image.conftest import image_tests, record
from tests.image.vm import BootedVm, http_status, sip_options_tcp

pytestmark = image_tests

# What may listen on a non-loopback address: SIP (UDP/TCP 5060, TLS 5061), the admin UI
# and API with /healthz (8080), SSH (22). VRRP is IP protocol 112, not a port.
ALLOWED = {("udp", 5060), ("tcp", 5060), ("tcp", 5061), ("tcp", 8080), ("tcp", 22)}
# Clients, not services: networkd's DHCPv4 client keeps UDP 68 for renewals.
ALLOWED_CLIENT_PORTS = {("udp", 68), ("udp", 546)}
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN = 10, 12


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


def test_sip_options_answered_over_tcp(vm: BootedVm) -> None:
    assert status_line(vm.first_sip_answer) == "SIP/2.0 200 OK"
    again = sip_options_tcp(vm.ports.sip, timeout=10)
    assert again is not None and status_line(again) == "SIP/2.0 200 OK"
    assert b"\r\nCSeq: 1 OPTIONS\r\n" in again


# UDP from inside the guest: QEMU's user network with restrict=on drops UDP replies to
# forwarded datagrams, so the host cannot see them.
UDP_OPTIONS = b"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.bind(("10.0.2.15", 0))
port = s.getsockname()[1]
s.sendto((
    "OPTIONS sip:sbc@10.0.2.15 SIP/2.0\\r\\n"
    f"Via: SIP/2.0/UDP 10.0.2.15:{port};branch=z9hG4bKudp1;rport\\r\\n"
    "Max-Forwards: 70\\r\\nFrom: <sip:t@x>;tag=1\\r\\nTo: <sip:sbc@x>\\r\\n"
    "Call-ID: udp-boot-test\\r\\nCSeq: 1 OPTIONS\\r\\nContent-Length: 0\\r\\n\\r\\n"
).encode(), ("10.0.2.15", 5060))
print(s.recv(65535).split(b"\\r\\n")[0].decode())
"""


def test_sip_options_answered_over_udp_inside_the_guest(vm: BootedVm) -> None:
    out = vm.ssh("python3 -", stdin=UDP_OPTIONS, timeout=60).stdout.decode()
    assert out.strip() == "SIP/2.0 200 OK"


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


def test_first_boot_password_authenticates_admin(vm: BootedVm) -> None:
    # The same PAM stack as a console login: sudo asks for admin's own password.
    assert vm.run_root("id -un").strip() == "root"
    wrong = vm.ssh("sudo -S -p '' true", stdin=b"not-the-password\n", check=False, timeout=60)
    assert wrong.returncode != 0


def test_password_never_reaches_the_journal(vm: BootedVm) -> None:
    # As admin (group systemd-journal reads the whole journal), the password on stdin:
    # on a command line, sudo or the audit log would put it into the journal themselves.
    out = vm.ssh(
        "journalctl -b --no-pager | grep -cF -f /dev/stdin;"
        " journalctl -b --no-pager | grep -c 'sbc-firstboot: done'",
        stdin=vm.admin_password().encode() + b"\n",
        check=False,
        timeout=120,
    ).stdout.decode()
    password_lines, firstboot_lines = (int(n) for n in out.split())
    assert firstboot_lines >= 1  # the journal was readable and holds the first boot
    assert password_lines == 0


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


def test_no_open_ports_besides_sip_admin_and_ssh(vm: BootedVm) -> None:
    sockets = listening(vm.run("ss -Htuln"))
    assert ("udp", "0.0.0.0", 5060) in sockets and ("tcp", "0.0.0.0", 8080) in sockets
    exposed = {
        (proto, port)
        for proto, addr, port in sockets
        if addr in ("*", "0.0.0.0", "::") or not ipaddress.ip_address(addr).is_loopback
    }
    record("open_ports", sorted(exposed))
    assert exposed - ALLOWED - ALLOWED_CLIENT_PORTS == set()


def test_sbc_runs_unprivileged_with_two_capabilities(vm: BootedVm) -> None:
    pid = vm.run("systemctl show -P MainPID sbc.service").strip().splitlines()[-1]
    assert pid.isdigit() and int(pid) > 0
    status = vm.run(f"grep -E '^(Uid|CapEff|CapBnd|CapPrm):' /proc/{pid}/status")
    fields = dict(re.findall(r"^(\w+):\s+(.+)$", status, re.M))
    assert fields["Uid"].split()[0] != "0"
    wanted = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN)
    assert int(fields["CapBnd"], 16) == wanted
    assert int(fields["CapEff"], 16) == wanted
