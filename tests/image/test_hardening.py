"""Offline hardening checks of the built root filesystem: the SBC unit's sandbox
(systemd-analyze security) and lynis run inside it with systemd-nspawn."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.image.conftest import record

pytestmark = pytest.mark.image

MAX_EXPOSURE = 2.0
MIN_LYNIS_INDEX = 80


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


def test_lynis_hardening_index_at_least_80(rootfs: Path, tmp_path: Path) -> None:
    lynis = shutil.which("lynis")
    if not lynis or not shutil.which("systemd-nspawn"):
        pytest.skip("needs lynis and systemd-container")
    out = tmp_path / "lynis"
    out.mkdir()
    result = subprocess.run(
        [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--timezone=off",
            "--resolv-conf=off", "--volatile=overlay", f"--directory={rootfs}",
            "--bind-ro=/usr/share/lynis", "--bind-ro=/etc/lynis",
            f"--bind-ro={lynis}:/usr/sbin/lynis",
            f"--bind={out}:/run/lynis-out",
            "/usr/sbin/lynis", "audit", "system", "--quick", "--no-colors",
            "--report-file", "/run/lynis-out/report.dat", "--logfile", "/run/lynis-out/lynis.log",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = (out / "report.dat").read_text() if (out / "report.dat").exists() else ""
    m = re.search(r"^hardening_index=(\d+)$", report, re.M)
    assert m, result.stdout[-3000:] + result.stderr[-2000:]
    index = int(m.group(1))
    suggestions = re.findall(r"^suggestion\[\]=([^|]+)\|([^|]+)", report, re.M)
    shutil.copyfile(out / "report.dat", Path(rootfs).parent / "lynis-report.dat")
    record("lynis.hardening_index", index)
    assert index >= MIN_LYNIS_INDEX, "\n".join(f"{t}: {s}" for t, s in suggestions)
