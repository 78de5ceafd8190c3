"""When a scoring run publishes its progress (`scoring.ProgressThrottle`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.config import ScoringConfig
from tasks.scoring import ProgressThrottle


def test_first_and_last_updates_always_and_between_them_one_per_interval() -> None:
    throttle = ProgressThrottle(interval_s=1.0)
    times = [10.0, 10.2, 10.9, 11.0, 11.5, 12.1, 12.2]
    due = [throttle.due(done, 8, t) for done, t in enumerate(times, start=1)]
    assert due == [True, False, False, True, False, True, False]
    assert throttle.due(8, 8, 12.25)  # the last one, however soon


def test_interval_zero_publishes_every_update() -> None:
    throttle = ProgressThrottle(interval_s=0.0)
    assert all(throttle.due(done, 5, 1.0) for done in range(1, 6))


def test_a_config_value_below_zero_is_refused() -> None:
    assert ScoringConfig().progress_interval_s == 1.0
    with pytest.raises(ValidationError, match="progress_interval_s"):
        ScoringConfig(progress_interval_s=-1)
