"""Locust personas that use Konnichiwa the way its clients do; every answer is checked.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:4000 --api-key="$KEY"
    locust -f loadtests/locustfile.py --headless --tags reader writer --mix reader=3,writer=1

The load shape (loadtests/shapes.py) sets the request rate: `--shape fixed --rate 1000` (default),
`--shape steps` to find the knee, `--shape spike` for a burst. Each user runs `--user-rate` tasks a
second and each task is exactly one request, so the rate is users times the user rate.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import gevent
import msgspec
from locust import FastHttpUser, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner

from konnichiwa.schemas import Greeting, LogsPage, Status, UpdateResult, User, UsersPage
from loadtests.plan import PERSONAS, Pacer, parse_mix
from loadtests.shapes import LoadProfile, add_shape_arguments

__all__ = ["LoadProfile", "Operator", "Reader", "UserAdmin", "Writer"]

_T = TypeVar("_T")
_unique = itertools.count()


def _arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--api-key", env_var="KONNICHIWA_API_KEY", default=os.environ.get("API_KEY", ""),
        help="API key with read, write and inspect scopes", is_secret=True,
    )  # fmt: skip
    parser.add_argument(
        "--mix", env_var="KONNICHIWA_MIX", default="reader=70,writer=20,operator=5,admin=5",
        help="persona weights, e.g. reader=70,writer=20,operator=5,admin=5",
    )  # fmt: skip
    parser.add_argument(
        "--steady-window-file", default="",
        help="write when every user was running and when the run stopped to this JSON file",
    )  # fmt: skip
    add_shape_arguments(parser)


def _select_personas(environment: Environment, **_: object) -> None:
    """Apply `--mix` weights; drop personas that `--tags`/`--exclude-tags` leave without tasks."""
    options = environment.parsed_options
    if options is None:
        return
    weights = parse_mix(options.mix)
    wanted = set(options.tags or PERSONAS) - set(options.exclude_tags or ())
    kept = [
        user for user in environment.user_classes
        if issubclass(user, Persona) and weights.get(user.persona, 0) > 0 and user.persona in wanted
    ]  # fmt: skip
    if not kept:
        raise ValueError(f"no persona left to run: tags {sorted(wanted)}, mix {options.mix!r}")
    for user in kept:
        user.weight = weights[user.persona]
    environment.user_classes[:] = kept
    if options.steady_window_file and not isinstance(environment.runner, WorkerRunner):
        SteadyWindow(Path(options.steady_window_file))


events.init_command_line_parser.add_listener(_arguments)
events.init.add_listener(_select_personas)


class SteadyWindow:
    """When every user was running and when the run stopped (wall-clock seconds, as Locust counts
    requests per second), so a ramp-up does not dilute the rate. Only the times: in a distributed
    run the master learns the workers' counts from reports that arrive up to seconds later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started: float | None = None
        events.spawning_complete.add_listener(self.spawned)
        events.test_stop.add_listener(self.stopped)

    def spawned(self, **_: object) -> None:
        if self.started is None:
            self.started = time.time()

    def stopped(self, **_: object) -> None:
        if self.started is not None:
            self.path.write_text(json.dumps({"start": self.started, "stop": time.time()}))


class Persona(FastHttpUser):
    """What every persona shares: the API key, paced tasks and checked answers."""

    abstract = True
    persona = ""

    def on_start(self) -> None:
        # Locust spawns users in groups: one random pause of up to a period spreads their first
        # requests over time, as independent clients are, and the pacer keeps them spread.
        self.pacer = Pacer(self.user_rate)
        gevent.sleep(random.uniform(0.0, 1.0 / self.user_rate))

    def wait_time(self) -> float:
        return self.pacer.wait(time.perf_counter())

    @property
    def user_rate(self) -> float:
        """Tasks a second, from `--user-rate`."""
        options = self.environment.parsed_options
        return float(options.user_rate) if options else 1.0

    @property
    def auth(self) -> dict[str, str]:
        options = self.environment.parsed_options
        return {"Authorization": f"Bearer {options.api_key if options else ''}"}

    @contextmanager
    def checked(
        self, method: str, path: str, expect: int = 200, name: str | None = None, **kwargs: Any
    ) -> Iterator[ResponseContextManager]:
        """Make a request whose status must be `expect`; the caller then checks the body."""
        with self.client.request(
            method, path, name=name or path, catch_response=True, **kwargs
        ) as response:
            problem = None
            try:
                yield response
            except (msgspec.ValidationError, msgspec.DecodeError, AssertionError) as exc:
                problem = f"unexpected body: {exc}"
            if response.status_code != expect:  # the body check of a wrong answer is moot
                problem = f"status {response.status_code}, expected {expect}"
            if problem is not None:
                response.failure(problem)


def decoded(response: ResponseContextManager, into: type[_T]) -> _T:
    """The body decoded strictly into one of the service's own response schemas."""
    return msgspec.json.decode(response.content or b"", type=into)


class Reader(Persona):
    """A client polling the shared state, the greeting and the audit log."""

    persona = "reader"
    weight = 70

    @tag("reader")
    @task(6)
    def status(self) -> None:
        with self.checked("GET", "/status") as response:
            decoded(response, Status)

    @tag("reader")
    @task(2)
    def greeting(self) -> None:
        with self.checked("GET", "/") as response:
            decoded(response, Greeting)

    @tag("reader")
    @task(2)
    def logs(self) -> None:
        page = random.choice((1, 1, 1, 2, 3))
        with self.checked("GET", f"/logs?page={page}&limit=10", name="/logs?page=[n]") as response:
            body = decoded(response, LogsPage)
            assert body.page == page, f"page {body.page}, asked for {page}"
            assert len(body.logs) <= 10, "more entries than the limit"


class Writer(Persona):
    """A client changing the shared state, sometimes with an Idempotency-Key."""

    persona = "writer"
    weight = 20

    def _update(self, body: dict[str, object], headers: dict[str, str]) -> None:
        with self.checked("POST", "/update", json=body, headers=headers) as response:
            result = decoded(response, UpdateResult)
            assert result.success, "success is false"

    @tag("writer")
    @task(5)
    def increment(self) -> None:
        self._update({"increment": random.randint(-5, 5)}, self.auth)

    @tag("writer")
    @task(2)
    def set_counter(self) -> None:
        self._update({"counter": random.randint(0, 1_000_000)}, self.auth)

    @tag("writer")
    @task(2)
    def set_message(self) -> None:
        self._update({"message": f"hello {random.randint(0, 999)}"}, self.auth)

    @tag("writer")
    @task(1)
    def idempotent_increment(self) -> None:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        self._update({"increment": 1}, self.auth | key)


class Operator(Persona):
    """An operator asking whether there is capacity left, and a load balancer's probe."""

    persona = "operator"
    weight = 5

    @tag("operator")
    @task(1)
    def inspect(self) -> None:
        with self.checked("GET", "/inspect", headers=self.auth) as response:
            body = msgspec.json.decode(response.content or b"")
            missing = {"host", "service", "traffic", "dependencies"} - set(body)
            assert not missing, f"missing {sorted(missing)}"

    @tag("operator")
    @task(1)
    def ready(self) -> None:
        with self.checked("GET", "/health/ready"):
            pass


class UserAdmin(Persona):
    """An administrator registering users and paging through them."""

    persona = "admin"
    weight = 5

    @tag("admin")
    @task(1)
    def create_user(self) -> None:
        email = f"load-{uuid.uuid4().hex[:12]}-{next(_unique)}@example.jp"
        user = {"name": "Yamada Taro", "email": email}
        with self.checked("POST", "/users", 201, json=user, headers=self.auth) as response:
            created = decoded(response, User)
            assert created.email == email, f"email {created.email!r}, sent {email!r}"

    @tag("admin")
    @task(3)
    def list_users(self) -> None:
        with self.checked("GET", "/users?page=1&limit=20", headers=self.auth) as response:
            assert len(decoded(response, UsersPage).users) <= 20, "more users than the limit"
