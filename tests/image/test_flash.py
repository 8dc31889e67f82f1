"""sbc-flash refuses to overwrite what it must not, before writing a byte (fast, no image)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLASH = ROOT / "packer" / "sbc-flash"


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sbc_flash", str(FLASH))
    spec = importlib.util.spec_from_loader("sbc_flash", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sbc_flash"] = module
    loader.exec_module(module)
    return module


flash = _load()

GiB = 1 << 30


def fake_sys(tmp: Path, disks: dict[str, tuple[str, int, list[tuple[str, str]]]]) -> Path:
    """A sysfs tree: {name: (devno, size_bytes, [(part_name, part_devno)])}."""
    sys_root = tmp / "sys"
    for name, (devno, size, parts) in disks.items():
        d = sys_root / "devices" / "virtual" / "block" / name
        (d / "holders").mkdir(parents=True)
        (d / "size").write_text(f"{size // 512}\n")
        (d / "ro").write_text("0\n")
        (d / "dev").write_text(devno + "\n")
        links = [(devno, d)]
        for pname, pdevno in parts:
            p = d / pname
            (p / "holders").mkdir(parents=True)
            (p / "partition").write_text("1\n")
            (p / "dev").write_text(pdevno + "\n")
            links.append((pdevno, p))
        for dn, target in links:
            (sys_root / "dev" / "block").mkdir(parents=True, exist_ok=True)
            (sys_root / "dev" / "block" / dn).symlink_to(target)
            (sys_root / "class" / "block").mkdir(parents=True, exist_ok=True)
            (sys_root / "class" / "block" / target.name).symlink_to(target)
    return sys_root


def block_node(tmp: Path, name: str, major: int, minor: int) -> str:
    """A real block device node (no I/O is ever done on it)."""
    path = tmp / name
    try:
        os.mknod(path, 0o600 | 0o060000, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("mknod needs root")
    return str(path)


MOUNTINFO_ROOT_ON_VDA1 = (
    "22 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw - proc proc rw\n"
    "24 22 0:22 / /tmp rw - tmpfs tmpfs rw\n"
)


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """System disk vda (254:0, root on vda1), spare disk sdb (8:16) with sdb1, sdb2."""
    fake_sys(
        tmp_path,
        {
            "vda": ("254:0", 20 * GiB, [("vda1", "254:1")]),
            "sdb": ("8:16", 8 * GiB, [("sdb1", "8:17"), ("sdb2", "8:18")]),
        },
    )
    return tmp_path


def describe(lab: Path, node: str) -> Any:
    return flash.describe_disk(node, sys_root=lab / "sys")


def test_a_regular_file_posing_as_a_device_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "sdz"
    fake.write_bytes(b"\0" * 4096)
    with pytest.raises(flash.Refusal, match=r"sdz is not a block device"):
        flash.describe_disk(str(fake))


def test_a_missing_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(flash.Refusal, match=r"No such file or directory"):
        flash.describe_disk(str(tmp_path / "sdq"))


def test_a_spare_unmounted_disk_is_accepted(lab: Path) -> None:
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    assert disk.name == "sdb" and disk.size == 8 * GiB
    assert disk.partitions == ("sdb1", "sdb2")
    mounts = flash.parse_mountinfo(MOUNTINFO_ROOT_ON_VDA1)
    flash.check_target(disk, 2 * GiB, mounts, [], sys_root=lab / "sys")


def test_a_disk_with_a_mounted_partition_is_refused(lab: Path) -> None:
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    mounts = flash.parse_mountinfo(
        MOUNTINFO_ROOT_ON_VDA1 + "40 22 8:18 / /mnt/usb rw,relatime - vfat /dev/sdb2 rw\n"
    )
    with pytest.raises(flash.Refusal, match=r"is mounted: /dev/sdb2 on /mnt/usb"):
        flash.check_target(disk, 2 * GiB, mounts, [], sys_root=lab / "sys")


def test_a_disk_used_as_swap_is_refused(lab: Path) -> None:
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    swaps = flash.swap_devices(
        "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb1 partition 1048572 0 -2\n"
    )
    mounts = flash.parse_mountinfo(MOUNTINFO_ROOT_ON_VDA1)
    with pytest.raises(flash.Refusal, match=r"holds the running system"):
        flash.check_target(disk, 2 * GiB, mounts, swaps, sys_root=lab / "sys")


def test_the_system_disk_is_refused(lab: Path) -> None:
    disk = describe(lab, block_node(lab, "vda", 254, 0))
    mounts = flash.parse_mountinfo(MOUNTINFO_ROOT_ON_VDA1)
    with pytest.raises(flash.Refusal, match=r"\(vda\) holds the running system"):
        flash.check_target(disk, 2 * GiB, mounts, [], sys_root=lab / "sys")


def test_the_system_disk_under_device_mapper_is_refused(lab: Path) -> None:
    # Root on LVM: dm-0 (253:0) whose slave is sdb2.
    dm = lab / "sys" / "devices" / "virtual" / "block" / "dm-0"
    (dm / "slaves").mkdir(parents=True)
    (dm / "dev").write_text("253:0\n")
    (dm / "slaves" / "sdb2").symlink_to(
        lab / "sys" / "devices" / "virtual" / "block" / "sdb" / "sdb2"
    )
    (lab / "sys" / "dev" / "block" / "253:0").symlink_to(dm)
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    mounts = flash.parse_mountinfo("22 1 253:0 / / rw - ext4 /dev/mapper/vg-root rw\n")
    with pytest.raises(flash.Refusal, match=r"\(sdb\) holds the running system"):
        flash.check_target(disk, 2 * GiB, mounts, [], sys_root=lab / "sys")


def test_a_partition_is_refused(lab: Path) -> None:
    with pytest.raises(flash.Refusal, match=r"is a partition of sdb: give the whole disk"):
        describe(lab, block_node(lab, "sdb1", 8, 17))


def test_a_disk_held_by_device_mapper_is_refused(lab: Path) -> None:
    (lab / "sys" / "devices" / "virtual" / "block" / "sdb" / "sdb1" / "holders" / "dm-3").mkdir()
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    with pytest.raises(flash.Refusal, match=r"is in use by dm-3"):
        flash.check_target(disk, 2 * GiB, [], [], sys_root=lab / "sys")


def test_a_disk_smaller_than_the_image_is_refused(lab: Path) -> None:
    disk = describe(lab, block_node(lab, "sdb", 8, 16))
    with pytest.raises(flash.Refusal, match=r"has 8589934592 bytes; the image needs 9663676416"):
        flash.check_target(disk, 9 * GiB, [], [], sys_root=lab / "sys")


def test_this_machines_root_disk_is_refused() -> None:
    """The real thing: the disk under / on this machine, with the real /proc and /sys."""
    st = os.stat("/")
    devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if os.major(st.st_dev) == 0 or not Path(f"/sys/dev/block/{devno}").exists():
        pytest.skip(f"/ is not on a block device here ({devno})")
    name = flash.whole_disk_name(devno, Path("/sys"))
    node = Path("/dev") / name
    if not node.exists():
        pytest.skip(f"no {node}")
    disk = flash.describe_disk(str(node))
    mounts = flash.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    with pytest.raises(flash.Refusal, match=rf"\({name}\) holds the running system"):
        flash.check_target(disk, 1, mounts, flash.swap_devices(Path("/proc/swaps").read_text()))


def test_the_cli_refuses_a_file_and_writes_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "sbc-lab-vm.raw"
    raw.write_bytes(b"image" * 1000)
    (tmp_path / "SHA256SUMS").write_text(
        f"{hashlib.sha256(raw.read_bytes()).hexdigest()} *sbc-lab-vm.raw\n"
    )
    target = tmp_path / "not-a-disk"
    target.write_bytes(b"precious")
    result = subprocess.run(
        [sys.executable, str(FLASH), "--yes", str(raw), str(target)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "x sbc-flash: " in result.stderr and "is not a block device" in result.stderr
    assert target.read_bytes() == b"precious"


def test_the_cli_refuses_an_image_without_its_checksum(tmp_path: Path) -> None:
    raw = tmp_path / "sbc-lab-vm.raw"
    raw.write_bytes(b"image")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + " *other.raw\n")
    result = subprocess.run(
        [sys.executable, str(FLASH), "--yes", str(raw), "/dev/null"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "SHA256SUMS lists no sbc-lab-vm.raw" in result.stderr


def test_write_and_verify_copies_and_reads_back(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    target = tmp_path / "disk"
    target.write_bytes(b"\0" * (len(data) + 4096))
    digest = hashlib.sha256(data).hexdigest()
    flash.write_and_verify(io.BytesIO(data), str(target), len(data), digest, exclusive=False)
    assert target.read_bytes()[: len(data)] == data


def test_write_and_verify_rejects_a_corrupt_stream(tmp_path: Path) -> None:
    data = b"x" * 10000
    target = tmp_path / "disk"
    target.write_bytes(b"\0" * 20000)
    with pytest.raises(flash.Refusal, match=r"does not match SHA256SUMS"):
        flash.write_and_verify(io.BytesIO(data), str(target), len(data), "0" * 64, exclusive=False)
