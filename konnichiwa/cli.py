"""The `konnichiwa` command: serve, migrate, monitor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import asyncpg

from konnichiwa import __version__, monitor
from konnichiwa.auth import SCOPES, ApiKey, new_api_key
from konnichiwa.logs import configure_logging
from konnichiwa.postgres import claim_database, migrate
from konnichiwa.settings import Settings, SettingsError

DEV_KEY_FILE = "api-key"


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:  # the command's usage error, with the command's exit status
        commands[args.command].error(f"unrecognized arguments: {' '.join(unrecognized)}")
    if args.command == "monitor":  # an operator's check: needs no service settings
        return monitor.run(args)
    try:
        settings = _with_overrides(Settings.from_env(), args)
        configure_logging(settings)
        if args.command == "serve":
            return serve(settings)
        return run_migrations(settings)
    except SettingsError as exc:
        print(f"konnichiwa: configuration error: {exc}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error's exit status of the command's choosing: `monitor` answers
    Nagios, which would read argparse's 2 as CRITICAL."""

    def __init__(self, *args: Any, usage_error: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_error = usage_error

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_error, f"{self.prog}: error: {message}\n")


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The `konnichiwa` parser, and its commands' parsers by name."""
    parser = _Parser(prog="konnichiwa", description=__doc__)
    parser.add_argument("--version", action="version", version=f"konnichiwa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host", help="address to listen on (HOST, default 0.0.0.0)")
    serve_cmd.add_argument(
        "--port", type=_bounded_int(1, 65535), help="port to listen on (PORT, default 4000)"
    )
    serve_cmd.add_argument(
        "--workers",
        type=_bounded_int(1, 256),
        help="worker processes (WORKERS, default: one per CPU)",
    )
    serve_cmd.add_argument(
        "--access-log", action="store_true", default=None, help="log every request (ACCESS_LOG)"
    )
    commands.add_parser("migrate", help="apply the Postgres schema migrations and exit")
    monitor.add_arguments(
        commands.add_parser(
            "monitor",
            help="check the service's capacity (Nagios exit codes)",
            description=monitor.DESCRIPTION,
            usage_error=monitor.UNKNOWN,
        )
    )
    return parser, commands.choices


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """Command-line flags win over the environment."""
    flags = {name: getattr(args, name, None) for name in ("host", "port", "workers", "access_log")}
    return settings.replace(**{name: value for name, value in flags.items() if value is not None})


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}")
        return int(raw)

    return parse


@contextlib.contextmanager
def _servers(
    settings: Settings, service_url: str | None = None, *, share: bool = False
) -> Iterator[Settings]:
    """Settings pointing at real servers: the configured ones, or the embedded dev stack — the
    one a running `konnichiwa serve` owns when `share`, else one this process owns."""
    if not settings.embedded:
        yield settings
        return
    from konnichiwa import embedded  # noqa: PLC0415  (needs the `embedded` extra)

    state_dir = settings.state_dir.resolve()
    with contextlib.ExitStack() as stack:
        try:
            record = stack.enter_context(embedded.owned_state_dir(state_dir))
        except embedded.StackInUse as in_use:
            if not share:
                raise
            running = in_use.shared(settings)
            print(f"Using the running dev stack in {state_dir} ({in_use.holder}):", flush=True)
        else:
            print(f"Starting the embedded dev stack in {state_dir} ...", flush=True)
            running = stack.enter_context(embedded.started_servers(settings, record, service_url))
        print(f"  Redis (Valkey): {running.redis_url}", flush=True)
        print(f"  PostgreSQL:     {running.database_url}", flush=True)
        if settings.emulate_aws:
            print(f"  AWS emulator:   {running.aws_endpoint_url}", flush=True)
        yield running


def serve(settings: Settings) -> int:
    from konnichiwa.server import Supervisor, claimed_port  # noqa: PLC0415  (keeps `migrate` light)

    with (
        _servers(settings, f"http://{settings.host}:{settings.port}") as running,
        claimed_port(running.host, running.port),
    ):
        asyncio.run(claim_database(running))  # a refusal stops here, before any worker starts
        return Supervisor(_with_dev_key(running)).run()


def run_migrations(settings: Settings) -> int:
    with _servers(settings, share=True) as running:
        applied = asyncio.run(_migrate(running.require("database_url")))
    print(f"applied migrations: {applied}" if applied else "the schema is up to date")
    return 0


async def _migrate(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        return await migrate(connection)
    finally:
        await connection.close()


def _with_dev_key(settings: Settings) -> Settings:
    """In dev without configured keys, use a random key kept in the state directory."""
    if settings.environment != "dev" or settings.api_keys or settings.api_key_secret_id:
        return settings
    path = settings.state_dir / DEV_KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(new_api_key() + "\n")
    print(f"  API key (all scopes): in {path.resolve()}  (export API_KEY=$(cat {path}))")
    return settings.replace(api_keys=(ApiKey(path.read_text().strip(), SCOPES),))
