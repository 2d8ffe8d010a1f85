"""Konnichiwa: a fast asynchronous HTTP service on aiohttp, Redis and Postgres."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("konnichiwa")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
