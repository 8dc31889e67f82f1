"""Tags, branches and ids come from the OS CSPRNG, read a block at a time."""

from __future__ import annotations

import os

import pytest

from sbc.sip import message
from sbc.sip.message import MAGIC_COOKIE, new_branch, new_tag, random_below, random_hex


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every read of the CSPRNG (its size); the pool starts empty."""
    reads: list[int] = []

    def token_bytes(count: int) -> bytes:
        reads.append(count)
        return os.urandom(count)

    monkeypatch.setattr(message.secrets, "token_bytes", token_bytes)
    monkeypatch.setattr(message, "_RANDOM", message._RandomPool())
    return reads


def test_a_thousand_tags_cost_two_reads_and_never_repeat(counted: list[int]) -> None:
    tags = [new_tag() for _ in range(1000)]
    assert counted == [4096, 4096]  # 6000 bytes
    assert len(set(tags)) == 1000
    assert all(len(t) == 12 and int(t, 16) >= 0 for t in tags)


def test_branches_carry_the_magic_cookie(counted: list[int]) -> None:
    branches = {new_branch() for _ in range(100)}
    assert len(branches) == 100
    assert all(b.startswith(MAGIC_COOKIE) and len(b) == len(MAGIC_COOKIE) + 16 for b in branches)


def test_a_request_larger_than_a_block_gets_its_own_read(counted: list[int]) -> None:
    assert len(random_hex(5000)) == 10000
    assert counted == [5000]


def test_random_below_stays_below_and_covers_the_range(counted: list[int]) -> None:
    values = [random_below(10) for _ in range(2000)]
    assert set(values) == set(range(10))
    assert all(0 <= random_below(10**12) < 10**12 for _ in range(200))


def test_a_forked_child_starts_with_an_empty_pool() -> None:
    new_tag()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether its pool was emptied at fork
        os.close(read)
        os.write(write, b"empty" if message._RANDOM._block == b"" else b"kept")
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 10) == b"empty"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
