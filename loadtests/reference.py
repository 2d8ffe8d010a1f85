"""The benchmark's yardstick: a bare aiohttp app on uvloop answering a constant small JSON.

It runs with the same number of worker processes (SO_REUSEPORT) as the service it is compared to.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal

import uvloop
from aiohttp import web

BODY = b'{"message":"hello"}'


async def _constant(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def _worker(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", _constant)
    web.run_app(
        app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4900)
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    workers = [
        multiprocessing.get_context("spawn").Process(target=_worker, args=(args.port,))
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            worker.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
