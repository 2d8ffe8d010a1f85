"""Rate plans, pacing and persona mixes of the load runs."""

from __future__ import annotations

import itertools
import random

import pytest

from loadtests.plan import Pacer, RatePlan, parse_mix, users_for

STEPS = RatePlan("steps", 1000, step_rate=500, step_seconds=10, max_rate=2000)
SPIKE = RatePlan("spike", 1000, spike_after=20, spike_seconds=10, spike_factor=5)


@pytest.mark.parametrize(
    ("plan", "elapsed", "rate"),
    [
        (RatePlan("fixed", 1000), 0, 1000),
        (RatePlan("fixed", 1000), 3600, 1000),
        (STEPS, 0, 1000),
        (STEPS, 9.9, 1000),
        (STEPS, 10, 1500),
        (STEPS, 29.9, 2000),
        (STEPS, 30, None),
        (SPIKE, 19.9, 1000),
        (SPIKE, 20, 5000),
        (SPIKE, 29.9, 5000),
        (SPIKE, 30, 1000),
    ],
)
def test_rate_at(plan: RatePlan, elapsed: float, rate: float | None) -> None:
    assert plan.rate_at(elapsed) == rate


@pytest.mark.parametrize(
    ("rate", "user_rate", "users"), [(1000, 10, 100), (1001, 10, 101), (5, 10, 1), (0, 10, 1)]
)
def test_users_for(rate: float, user_rate: float, users: int) -> None:
    assert users_for(rate, user_rate) == users


@pytest.mark.parametrize(
    ("text", "weights"),
    [
        (
            "reader=70,writer=20,operator=5,admin=5",
            {"reader": 70, "writer": 20, "operator": 5, "admin": 5},
        ),
        (" reader=1 , writer=0 ", {"reader": 1, "writer": 0}),
        ("", {}),
    ],
)
def test_parse_mix(text: str, weights: dict[str, int]) -> None:
    assert parse_mix(text) == weights


@pytest.mark.parametrize("text", ["reader", "reader=x", "visitor=3", "reader=-1", "reader=1,,=2"])
def test_parse_mix_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--mix item"):
        parse_mix(text)


def middle(low: float, high: float) -> float:
    return (low + high) / 2


def test_pacer_plans_from_the_previous_planned_start() -> None:
    pacer = Pacer(20.0, draw=middle)
    assert pacer.wait(100.0) == pytest.approx(0.05)
    # The task planned at 100.05 woke 10 ms late and took 5 ms: the next still starts at 100.10.
    assert pacer.wait(100.065) == pytest.approx(0.035)
    # That one ended at 100.16, after the next planned start: no pause, and the timeline is kept.
    assert pacer.wait(100.16) == 0.0
    assert pacer.wait(100.17) == pytest.approx(0.03)


def test_pacer_makes_up_at_most_one_period() -> None:
    pacer = Pacer(20.0, draw=middle)
    pacer.wait(100.0)
    # 150 ms behind the start planned at 100.05: one at once, then one a period later.
    assert pacer.wait(100.2) == 0.0
    assert pacer.planned == pytest.approx(100.15)
    assert pacer.wait(100.2) == 0.0
    assert pacer.wait(100.2) == pytest.approx(0.05)


def test_pacer_keeps_the_rate_and_spreads_the_gaps() -> None:
    pacer = Pacer(20.0, draw=random.Random(7).uniform)
    now, starts = 0.0, []
    for _ in range(10_000):
        now += pacer.wait(now)
        starts.append(now)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= 0.025
    assert max(gaps) <= 0.075
    assert len(starts) / starts[-1] == pytest.approx(20.0, rel=0.02)
