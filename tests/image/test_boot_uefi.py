"""The same image boots with UEFI firmware (OVMF) and answers SIP."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.conftest import image_tests, record
from tests.image.vm import OVMF_CODE, boot_vm, http_status

pytestmark = image_tests


def test_uefi_boot_answers_sip_and_health(raw_image: Path, tmp_path: Path) -> None:
    if not OVMF_CODE.exists():
        pytest.skip("needs the ovmf package")
    with boot_vm(raw_image, tmp_path, firmware="uefi") as vm:
        record("boot.uefi.seconds_to_sip_answer", round(vm.sip_answer_seconds, 1))
        assert vm.first_sip_answer.startswith(b"SIP/2.0 200 ")
        assert http_status(vm.ports.admin, "/healthz", timeout=10) == 200
