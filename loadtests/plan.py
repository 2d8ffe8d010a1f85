"""What a load run does, free of Locust: the request rate over time and the persona mix.

Every persona runs `--user-rate` one-request tasks a second, so a rate R needs R / user-rate users;
a plan decides the rate over time and each user's `Pacer` when its next task starts. (Kept apart
from the Locust modules because importing Locust monkey-patches the interpreter with gevent.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

SHAPES = ("fixed", "steps", "spike")
# Requests per second of each simulated user. Locust times every request from its own gevent
# loop, so the fewer users wake at once, the less of Locust's own time the figures hold; a user
# waits for each answer, so its period (50 ms) must leave room for the slowest answers.
USER_RATE = 20.0
PERSONAS = ("reader", "writer", "operator", "admin")
# A run sends everything from one address with one API key: the service under test gets quotas
# far above any run's rate, so its rate limiter runs on every request as in production (a token
# taken from the worker's lease, a new lease from Redis now and then) and refuses none.
UNTHROTTLED = dict.fromkeys(
    ("RATE_LIMIT_READS", "RATE_LIMIT_WRITES", "RATE_LIMIT_INSPECT", "RATE_LIMIT_CONFIG",
     "RATE_LIMIT_ANONYMOUS"),
    "1000000000/s",
)  # fmt: skip


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


@dataclass
class Pacer:
    """When one user's next task starts: `rate` tasks a second on average, on its own timeline.

    Each start is planned from the previous planned start, not from when the last task ended, so
    a late wake-up does not shift the user's later tasks, and each gap is drawn between half and
    one and a half periods, so users that happen to fire together do not stay in step. (Locust's
    `constant_throughput` counts from the moment the user was created: users created together
    fire together every period, whatever their first pause, and Locust then times each of them
    behind the others in the same turn of its loop.) A user behind its timeline makes up at most
    one period, not the whole delay in a burst.
    """

    rate: float
    draw: Callable[[float, float], float] = random.uniform
    planned: float | None = field(default=None, init=False)

    def wait(self, now: float) -> float:
        """Seconds from `now` until the next task starts."""
        period = 1.0 / self.rate
        previous = now if self.planned is None else self.planned
        self.planned = max(previous + self.draw(0.5 * period, 1.5 * period), now - period)
        return max(0.0, self.planned - now)
