"""What a load run does, free of Locust: the request rate over time and the persona mix.

Every persona runs `--user-rate` one-request tasks a second, so a rate R needs R / user-rate users;
a plan only decides the rate over time and Locust's pacing does the rest. (Kept apart from the
Locust modules because importing Locust monkey-patches the interpreter with gevent.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("fixed", "steps", "spike")
# Requests per second of each simulated user. Locust times every request from its own gevent
# loop: against a bare aiohttp app at 1,000 req/s on a 2-core machine, 100 users at 10/s added
# p50 ~7 / p99 ~23 ms of their own (~9 / ~30 when they start in step), 50 users at 20/s p50 ~2 /
# p99 5-8 ms. A user waits for each answer and does not make up for a slow one, so each period
# (50 ms) must leave room for the slowest answers, or the achieved rate falls short.
USER_RATE = 20.0
PERSONAS = ("reader", "writer", "operator", "admin")


@dataclass(frozen=True)
class RatePlan:
    """The request rate at each moment of a run; None once the plan is over."""

    shape: str
    rate: float
    step_rate: float = 1000.0
    step_seconds: float = 30.0
    max_rate: float = 10000.0
    spike_after: float = 20.0
    spike_seconds: float = 10.0
    spike_factor: float = 5.0

    def rate_at(self, elapsed: float) -> float | None:
        if self.shape == "steps":
            step_rate = self.rate + self.step_rate * math.floor(elapsed / self.step_seconds)
            return step_rate if step_rate <= self.max_rate else None
        if self.shape == "spike" and self.spike_after <= elapsed < (
            self.spike_after + self.spike_seconds
        ):
            return self.rate * self.spike_factor
        return self.rate


def users_for(rate: float, user_rate: float) -> int:
    """How many paced users make `rate` requests a second."""
    return max(1, math.ceil(rate / user_rate))


def parse_mix(text: str) -> dict[str, int]:
    """`reader=70,writer=20` → {"reader": 70, "writer": 20}; unknown personas are an error."""
    weights: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in PERSONAS or not weight.isdigit():
            raise ValueError(f"--mix item {item!r}: expected one of {PERSONAS} = integer weight")
        weights[name] = int(weight)
    return weights
