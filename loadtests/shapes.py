"""The Locust load shape that follows a rate plan (loadtests/plan.py) picked with `--shape`."""

from __future__ import annotations

import time

from locust import LoadTestShape
from locust.argument_parser import LocustArgumentParser

from loadtests.plan import SHAPES, USER_RATE, RatePlan, users_for


def add_shape_arguments(parser: LocustArgumentParser) -> None:
    """The command-line options of the shapes (also settable as KONNICHIWA_* variables)."""
    group = parser.add_argument_group("konnichiwa load shape")
    group.add_argument("--shape", choices=SHAPES, default="fixed", env_var="KONNICHIWA_SHAPE")
    group.add_argument(
        "--rate", type=float, default=1000.0, env_var="KONNICHIWA_RATE",
        help="requests per second in total (fixed), the first step (steps) or the base (spike)",
    )  # fmt: skip
    group.add_argument(
        "--user-rate", type=float, default=USER_RATE, env_var="KONNICHIWA_USER_RATE",
        help="requests per second of each simulated user",
    )  # fmt: skip
    group.add_argument("--step-rate", type=float, default=1000.0, help="rate added per step")
    group.add_argument("--step-seconds", type=float, default=30.0, help="how long a step lasts")
    group.add_argument("--max-rate", type=float, default=10000.0, help="the last step's rate")
    group.add_argument("--spike-after", type=float, default=20.0, help="seconds before the spike")
    group.add_argument("--spike-seconds", type=float, default=10.0, help="how long it lasts")
    group.add_argument("--spike-factor", type=float, default=5.0, help="spike rate / base rate")


class LoadProfile(LoadTestShape):
    """The shape picked with `--shape`; users start within a second of each change of rate."""

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        if options is None:
            return None
        plan = RatePlan(
            options.shape, options.rate, options.step_rate, options.step_seconds,
            options.max_rate, options.spike_after, options.spike_seconds, options.spike_factor,
        )  # fmt: skip
        elapsed = time.perf_counter() - self.start_time  # get_run_time(), typed
        # With a shape, Locust applies --run-time only after the shape ends: the shape must stop.
        rate = plan.rate_at(elapsed)
        if rate is None or (options.run_time and elapsed >= options.run_time):
            return None
        users = users_for(rate, options.user_rate)
        return users, float(users)
