"""`evolve` copies dataclasses as `dataclasses.replace` does."""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import pytest

from sbc.b2bua.call import CallState
from sbc.evolve import evolve
from tests.unit.test_b2bua_call import CALL


@dataclass(frozen=True, slots=True)
class Plain:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()


@dataclass(frozen=True)
class Checked:
    a: int

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError("negative")


@dataclass
class WithInitVar:
    a: int
    scale: InitVar[int] = 1
    b: int = field(init=False, default=0)

    def __post_init__(self, scale: int) -> None:
        self.b = self.a * scale


def test_same_result_as_replace_and_the_original_untouched() -> None:
    plain = Plain(1, "x", (1, 2))
    for changes in ({}, {"a": 2}, {"b": "y", "c": (3,)}, {"a": 5, "b": "z", "c": ()}):
        assert evolve(plain, **changes) == dataclasses.replace(plain, **changes)
    assert evolve(plain, a=9) is not plain and plain == Plain(1, "x", (1, 2))
    confirmed = evolve(CALL, state=CallState.CONFIRMED)
    assert confirmed == dataclasses.replace(CALL, state=CallState.CONFIRMED)
    assert confirmed.to_dict() == {**CALL.to_dict(), "state": CallState.CONFIRMED.value}
    with pytest.raises(dataclasses.FrozenInstanceError):
        confirmed.state = CallState.CALLING  # type: ignore[misc]


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="no field"):
        evolve(Plain(1), d=4)
    with pytest.raises(TypeError):
        evolve(object(), a=1)


def test_classes_with_their_own_init_work_go_through_replace() -> None:
    with pytest.raises(ValueError, match="negative"):
        evolve(Checked(1), a=-1)
    assert evolve(WithInitVar(2, 3), a=4, scale=5).b == 20
