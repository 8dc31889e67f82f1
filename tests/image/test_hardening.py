"""Hardening checks: the SBC unit's sandbox (systemd-analyze security, offline on the
built root filesystem) and lynis run inside the booted appliance."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.image import lynis
from tests.image.conftest import IMAGE_DIR, image_tests, record
from tests.image.vm import BootedVm

pytestmark = image_tests

MAX_EXPOSURE = 2.0
MIN_LYNIS_INDEX = 80
LYNIS_TIMEOUT = 30 * 60  # seconds; about 15 minutes under TCG on 2 busy cores


def exposure(root: Path, unit: str) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--no-pager", unit],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


def test_sbc_unit_exposure_at_most_2(rootfs: Path) -> None:
    value = exposure(rootfs, "sbc.service")
    record("systemd-analyze.exposure.sbc.service", value)
    assert value <= MAX_EXPOSURE


def test_sbc_user_and_capabilities_in_the_image(rootfs: Path) -> None:
    lines = (rootfs / "etc/passwd").read_text().splitlines()
    passwd = {entry.split(":")[0]: entry.split(":") for entry in lines}
    assert "sbc" in passwd and int(passwd["sbc"][2]) < 1000
    assert passwd["sbc"][6] == "/usr/sbin/nologin"
    unit = (rootfs / "etc/systemd/system/sbc.service").read_text()
    assert "\nUser=sbc\n" in unit
    assert "\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n" in unit
    assert "\nAmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n" in unit
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/sbc.service").is_symlink()
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*")), "host keys must be per host"
    assert (rootfs / "etc/machine-id").read_text() == ""


def test_lynis_hardening_index_at_least_80(vm: BootedVm) -> None:
    """lynis audits the running appliance: its kernel's sysctl values, its running
    services (journald, auditd, AppArmor, fail2ban), its firewall."""
    if not lynis.available():
        pytest.skip("needs the lynis package on the host")
    # The session's `vm` fixture started the audit when the VM came up.
    result = lynis.wait(vm, LYNIS_TIMEOUT)
    shutil.copyfile(vm.work / "lynis-report.dat", IMAGE_DIR / "lynis-report.dat")
    record("lynis.hardening_index", result.hardening_index)
    assert result.hardening_index >= MIN_LYNIS_INDEX, "\n".join(
        f"{test}: {text}" for test, text in result.findings
    )
