"""A contributor's commands, each in an environment of its own: `nox -l` lists them."""

from __future__ import annotations

import nox

# Inside .venv, which git, ruff, checkov and the docs build already leave out.
nox.options.envdir = ".venv/nox"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
CODE = ("konnichiwa", "tests", "loadtests", "noxfile.py")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, ruff format and mypy --strict, at the versions the dev extra pins."""
    session.install("-e", ".[test]")
    session.run("ruff", "check", *CODE)
    session.run("ruff", "format", "--check", *CODE)
    session.run("mypy", "--strict", *CODE)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite, as CI runs it."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(name="tests-fast", python=PYTHON)
def tests_fast(session: nox.Session) -> None:
    """The inner loop: every test not marked slow."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "not slow", *session.posargs)


@nox.session(python=PYTHON)
def slo(session: nox.Session) -> None:
    """The SLO run: the mixed Locust scenario against a service on the embedded stack."""
    session.install("-e", ".[embedded,load]")
    session.run("python", "-m", "loadtests.slo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Peak throughput per endpoint against a bare aiohttp app."""
    session.install("-e", ".[embedded,load]")
    session.run("python", "-m", "loadtests.bench", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site, built strictly into site/."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)
