"""The built image: files, checksums, sizes, GPT layout for BIOS and UEFI boot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.image.conftest import TARGET, image_tests, record

pytestmark = image_tests


def test_raw_zst_qcow2_and_checksums(image_dir: Path) -> None:
    name = f"sbc-{TARGET}"
    files = [f"{name}.raw", f"{name}.raw.zst", f"{name}.qcow2"]
    for f in files:
        assert (image_dir / f).is_file(), f
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"],
        cwd=image_dir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {
        line.split()[1].lstrip("*") for line in (image_dir / "SHA256SUMS").read_text().splitlines()
    }
    assert listed == set(files)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image_dir / f"{name}.qcow2")],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    raw_size = (image_dir / f"{name}.raw").stat().st_size
    assert info["format"] == "qcow2" and info["virtual-size"] == raw_size
    for f in files:
        st = (image_dir / f).stat()
        record(f"size.{f}", f"{st.st_size} bytes apparent, {st.st_blocks * 512} bytes allocated")
    build_seconds = image_dir / "build-seconds"
    if build_seconds.exists():
        record("build.seconds", build_seconds.read_text().strip())


def test_gpt_with_bios_boot_esp_and_root(raw_image: Path) -> None:
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(raw_image)], check=True, capture_output=True, text=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "gpt"
    types = [p["type"].upper() for p in table["partitions"]]
    assert types == [
        "21686148-6449-6E6F-744E-656564454649",  # BIOS boot: GRUB core.img
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system partition
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",  # root (x86-64)
    ]
    with open(raw_image, "rb") as f:
        mbr = f.read(512)
        f.seek(table["partitions"][0]["start"] * 512)
        core = f.read(512)
    assert mbr[510:512] == b"\x55\xaa" and b"GRUB" in mbr  # boot.img in the protective MBR
    assert int.from_bytes(mbr[0x5C:0x64], "little") == table["partitions"][0]["start"]
    assert any(core)  # core.img in the BIOS boot partition
    esp = f"{raw_image}@@{table['partitions'][1]['start'] * 512}"
    listing = subprocess.run(
        ["mdir", "-b", "-i", esp, "::/EFI/BOOT"], check=True, capture_output=True, text=True
    ).stdout
    assert "BOOTX64.EFI" in listing.upper()
