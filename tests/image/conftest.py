"""Appliance image tests.

Fast tests (the flash helper's refusals, the unit file's sandbox) run without an image.
Tests marked `image` (and `slow`) build the lab-VM image once per session (through
`make image`, a no-op when it is newer than its inputs), boot it under QEMU (TCG,
user-mode network forwarded to 127.0.0.1) once with BIOS for the whole session (boot,
port and lynis checks share it) and once with UEFI, and check it: `make test-image`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image import lynis
from tests.image.vm import BootedVm, boot_vm

ROOT = Path(__file__).resolve().parents[2]
TARGET = os.environ.get("SBC_IMAGE_TARGET", "lab-vm")
IMAGE_DIR = Path(os.environ.get("SBC_IMAGE_DIR", ROOT / "build" / "image" / TARGET))
BUILD_TIMEOUT = 45 * 60
# Per test, including the session fixtures it is the first to need (build, boot): the
# default pytest-timeout of 120 s is for unit tests.
IMAGE_TEST_TIMEOUT = BUILD_TIMEOUT + 15 * 60
image_tests = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.timeout(IMAGE_TEST_TIMEOUT),
]
FIGURES = IMAGE_DIR / "figures.txt"


def record(name: str, value: object) -> None:
    """Append a measured figure to build/image/TARGET/figures.txt (for the release note)."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    with open(FIGURES, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name} {value}\n")


def _make_image() -> None:
    makefile = ROOT / "Makefile"
    files = ["-f", "Makefile"]
    if "mk/image.mk" not in makefile.read_text():
        files += ["-f", "mk/image.mk"]
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            *files,
            "image",
            f"IMAGE_TARGET={TARGET}",
            f"IMAGE_DIR={IMAGE_DIR}",
        ],
        cwd=ROOT,
        check=True,
        timeout=BUILD_TIMEOUT,
    )


@pytest.fixture(scope="session")
def image_dir() -> Path:
    """The built image directory (raw, raw.zst, qcow2, SHA256SUMS, rootfs/)."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (mmdebstrap --mode=root)")
    _make_image()
    return IMAGE_DIR


@pytest.fixture(scope="session")
def raw_image(image_dir: Path) -> Path:
    return image_dir / f"sbc-{TARGET}.raw"


@pytest.fixture(scope="session")
def rootfs(image_dir: Path) -> Path:
    return image_dir / "rootfs"


@pytest.fixture(scope="session")
def vm(raw_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedVm]:
    """The image booted once with BIOS firmware, answering SIP, with SSH for the tests.
    lynis starts auditing it at once (minutes under TCG): the other checks, the UEFI boot
    included, run meanwhile, and test_hardening collects the result."""
    with boot_vm(raw_image, tmp_path_factory.mktemp("vm-bios"), firmware="bios") as booted:
        record("boot.bios.seconds_to_sip_answer", round(booted.sip_answer_seconds, 1))
        if lynis.available():
            lynis.start(booted)
        yield booted
        record("boot.bios.poweroff_seconds", round(booted.power_off(), 1))
    assert booted.proc.returncode is not None
