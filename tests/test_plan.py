"""Rate plans and persona mixes of the load runs."""

from __future__ import annotations

import pytest

from loadtests.plan import RatePlan, parse_mix, users_for

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
