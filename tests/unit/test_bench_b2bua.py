"""The B2BUA bench's own checks, run by `make test` so the bench cannot rot unseen.

The bench (`tests/bench/b2bua_bench.py`, `make bench`) is a script with its own
self-tests; they are collected here. The configuration it writes for the SBC must
also pass the SBC's own check: a stricter check once made every bench run fail at
start-up ("udp ... is inside the media port range") while `make test` stayed green.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sbc.config.loader import check_config
from tests.bench.b2bua_bench import (
    MEDIA_PORT_MIN,
    Bench,
    Pinning,
    Plan,
    Sbc,
    Users,
    test_kamailio_template_fills_every_placeholder,
    test_kamailio_template_with_authentication,
    test_kib_per_call,
    test_marginal_kib_per_call_ignores_the_early_ramp,
    test_sbc_config_has_two_realms_and_a_trunk_route,
    test_search_doubles_then_bisects,
    test_search_reports_the_cap_and_a_failing_first_step,
    test_stats_take_the_last_row,
    test_stats_without_rows_or_columns_are_errors,
    test_step_verdict_failed_share_is_strict,
    test_step_verdict_needs_the_rate_kept,
)

__all__ = [
    "test_kamailio_template_fills_every_placeholder",
    "test_kamailio_template_with_authentication",
    "test_kib_per_call",
    "test_marginal_kib_per_call_ignores_the_early_ramp",
    "test_sbc_config_has_two_realms_and_a_trunk_route",
    "test_search_doubles_then_bisects",
    "test_search_reports_the_cap_and_a_failing_first_step",
    "test_stats_take_the_last_row",
    "test_stats_without_rows_or_columns_are_errors",
    "test_step_verdict_failed_share_is_strict",
    "test_step_verdict_needs_the_rate_kept",
]


@pytest.mark.parametrize(
    ("media_section", "registrar", "workers"),
    [(True, False, 0), (False, False, 0), (True, True, 0), (True, False, 6)],
)
def test_the_sbc_config_the_bench_writes_passes_check_config(
    tmp_path: Path, media_section: bool, registrar: bool, workers: int
) -> None:
    bench = Bench(Plan.quick(), Pinning(None, None), tmp_path)
    if registrar:
        database = tmp_path / "users.sqlite"
        database.touch()
        bench.users = Users(database, tmp_path / "users.csv", "sbc", "00ff" * 8, 1)
    sbc = Sbc(bench, media_section=media_section, registrar=registrar, media_workers=workers)
    for round_ in range(5):  # the ports are drawn at random each time
        path, target = sbc.write_config(5060, f"check-{round_}")
        result = check_config(path)
        assert result.status == 0, "\n".join(result.messages)
        assert target.port < MEDIA_PORT_MIN
