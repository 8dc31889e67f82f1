"""The garbage collector's tuning and the watch on full collections."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from sbc import gc_tuning


@pytest.fixture
def watch() -> Iterator[gc_tuning.GcWatch]:
    watch = gc_tuning.GcWatch()
    watch.install()
    try:
        yield watch
    finally:
        watch.uninstall()
    assert watch._callback not in gc.callbacks


def test_full_collections_are_counted_and_timed(watch: gc_tuning.GcWatch) -> None:
    gc.collect(0)  # young only: not a full collection
    assert watch.full_collections == 0
    gc.collect()
    gc.collect()
    status = watch.status()
    assert status["full_collections"] == 2
    assert watch.longest >= watch.last > 0
    assert status["longest_ms"] == round(watch.longest * 1000, 1)


def test_a_slow_full_collection_is_logged(
    watch: gc_tuning.GcWatch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gc_tuning, "SLOW_FULL_COLLECTION", 0.0)
    with caplog.at_level(logging.WARNING, logger="sbc.gc_tuning"):
        gc.collect(1)
        assert not caplog.records
        gc.collect()
    (record,) = caplog.records
    assert "full garbage collection took" in record.getMessage()


def test_installing_twice_adds_one_callback(watch: gc_tuning.GcWatch) -> None:
    watch.install()
    assert gc.callbacks.count(watch._callback) == 1


def test_tune_freezes_start_up_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc_tuning.tune()
        assert gc.get_threshold()[0] == gc_tuning.GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
