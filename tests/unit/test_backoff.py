"""relay.backoff: the one formula for a message's retries and for the pauses of a broker outage."""

from __future__ import annotations

import pytest

from aftercommit.relay import backoff, broker_backoff, message_backoff


@pytest.mark.parametrize(
    ("failures", "ceiling"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (60, 30.0)],
)
def test_backoff__doubles_from_base_up_to_cap_with_jitter_over_the_upper_half(
    failures: int, ceiling: float
) -> None:
    waits = [backoff(failures, base=1.0, cap=30.0) for _ in range(200)]
    assert all(ceiling / 2 <= w <= ceiling for w in waits)
    assert max(waits) - min(waits) > 0, "no jitter: senders retrying together stay together"


def test_backoff__huge_failure_counts_stay_at_the_cap() -> None:
    assert 15.0 <= backoff(10_000, base=1.0, cap=30.0) <= 30.0


def test_backoff__zero_base_or_cap__no_wait() -> None:
    assert backoff(3, base=0.0, cap=30.0) == 0.0
    assert backoff(3, base=1.0, cap=0.0) == 0.0


def test_message_backoff__reads_the_settings(settings) -> None:  # type: ignore[no-untyped-def]
    settings.AFTERCOMMIT = {"BACKOFF_BASE": 2.0, "BACKOFF_MAX": 5.0}
    assert 1.0 <= message_backoff(1) <= 2.0
    assert 2.5 <= message_backoff(10) <= 5.0


def test_broker_backoff__starts_at_half_a_second_capped_by_its_setting(settings) -> None:  # type: ignore[no-untyped-def]
    settings.AFTERCOMMIT = {"BROKER_BACKOFF_MAX": 3.0}
    assert 0.25 <= broker_backoff(1) <= 0.5
    assert 1.5 <= broker_backoff(20) <= 3.0
