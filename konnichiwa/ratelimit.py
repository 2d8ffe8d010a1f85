"""Rate limits every worker and host shares: GCRA quotas in Redis, leased to workers in chunks."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Final, NamedTuple

from aiohttp import web
from redis.exceptions import RedisError

from konnichiwa.auth import Scope, api_key
from konnichiwa.errors import Problem
from konnichiwa.redis_store import Batcher, LuaScript, Runner, key_prefix, redis_client
from konnichiwa.scoreboard import (
    RATE_LIMITED,
    RATE_LIMITER_DOWN,
    UNCHECKED_ADMITTED,
    UNCHECKED_REFUSED,
    WorkerSlot,
    worker_slot,
)
from konnichiwa.settings import Rate, RateLimits, Settings, settings_key

log = logging.getLogger("konnichiwa.ratelimit")

# GCRA for a batch of leases, on Redis's clock (one clock for every host). KEYS[i] holds an
# identity's theoretical arrival time under one policy, in µs; ARGV[3i-2..3i] are that policy's
# emission interval and window (µs) and the tokens wanted. A lease takes at most half of what is
# left, so near the limit the workers' shares shrink instead of stranding the last tokens in one
# of them. Two integers per lease: the tokens granted and, when none, the µs until one is free.
LEASE_SCRIPT: Final = LuaScript("""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local replies = {}
for i, key in ipairs(KEYS) do
  local interval, window = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local free = math.floor((now + window - tat) / interval)
  local granted = math.min(tonumber(ARGV[3 * i]), math.ceil(free / 2))
  if granted > 0 then
    tat = tat + granted * interval
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000))
    replies[2 * i - 1], replies[2 * i] = granted, 0
  else
    replies[2 * i - 1], replies[2 * i] = 0, math.ceil(tat + interval - window - now)
  end
end
return replies
""")
# The policies, named as RateLimit-Policy names them, in the scoreboard's order.
POLICIES: Final = tuple(field.replace("_", "-") for field in RateLimits._fields)
# The policy of a protected route, by the scope it asks for.
SCOPE_POLICIES: Final[Mapping[Scope, str]] = {
    "read": "reads", "write": "writes", "inspect": "inspect", "config": "config",
    "secrets": "config",
}  # fmt: skip
# A worker leases a twentieth of a quota at a time and keeps it for at most one window: every
# worker on every host may hold one lease per identity, so a client can exceed its quota in a
# window by at most (workers x quota / 20), and no lease costs more than one round trip per
# twentieth of the quota.
LEASE_DIVISOR: Final = 20
MAX_LEASE_BATCH: Final = 256  # leases per script: Redis runs nothing else while a script runs
# A lease Redis has not granted within this long is decided as if Redis were down.
LEASE_TIMEOUT: Final = 0.25  # with the 1 s command timeout, a stalled Redis is a 503 within ~1 s
# While Redis is down, requests are decided without it; it is asked again after this long.
RETRY_SECONDS: Final = 1.0
# Identities a worker remembers per policy: the oldest is forgotten first (and leases afresh).
MAX_IDENTITIES: Final = 65536

Identity = str | bytes  # an address, or an API key's digest


class Policy:
    """One quota as RateLimit-Policy states it, and the lease a worker takes from it."""

    __slots__ = ("counter", "fails_closed", "header", "interval_us", "lease", "name", "window",
                 "window_us")  # fmt: skip

    def __init__(self, name: str, rate: Rate, counter: int) -> None:
        self.name, self.window, self.counter = name, rate.window, counter
        self.window_us = rate.window * 1_000_000
        self.interval_us = self.window_us / rate.quota
        self.lease = max(1, rate.quota // LEASE_DIVISOR)
        self.header = f'"{name}";q={rate.quota};w={rate.window}'
        # Writes the limiter cannot count are refused; everything else is admitted.
        self.fails_closed = name == "writes"


class Lease(NamedTuple):
    key: str
    policy: Policy


class Grant(NamedTuple):
    tokens: int
    wait_us: int  # when no tokens: how long until the quota has one


async def lease_tokens(run: Runner, leases: Sequence[Lease]) -> list[Grant]:
    """Lease tokens for every (key, policy) in one script; `run` sends a command."""
    arguments = [
        value
        for lease in leases
        for value in (repr(lease.policy.interval_us), lease.policy.window_us, lease.policy.lease)
    ]
    reply = await LEASE_SCRIPT(run, [lease.key for lease in leases], *arguments)
    return [Grant(reply[at], reply[at + 1]) for at in range(0, len(reply), 2)]


class Allowance:
    """What a worker holds for one identity: `tokens` to spend until `until` (monotonic), or,
    when `refused`, nothing until then, when the shared quota has a token again."""

    __slots__ = ("refused", "tokens", "until")

    def __init__(self, tokens: int, until: float, refused: bool) -> None:
        self.tokens, self.until, self.refused = tokens, until, refused


class Quota:
    """One policy's allowances in this worker, by identity."""

    __slots__ = ("_held", "_limiter", "_prefix", "_refills", "policy")

    def __init__(self, policy: Policy, limiter: Limiter, prefix: str) -> None:
        self.policy, self._limiter, self._prefix = policy, limiter, prefix
        self._held: dict[Identity, Allowance] = {}
        self._refills: dict[Identity, asyncio.Task[None]] = {}

    def take(self, identity: Identity) -> bool:
        """Spend a token this worker holds: a dict lookup and arithmetic, no I/O."""
        held = self._held.get(identity)
        if held is None or held.tokens == 0 or held.until < time.monotonic():
            return False
        held.tokens -= 1
        return True

    async def spend(self, identity: Identity) -> None:
        """Spend a token, leasing more first if need be; a 429 problem when the shared quota has
        none, and while Redis is down the policy's choice."""
        while not self.take(identity):
            now = time.monotonic()
            held = self._held.get(identity)
            if held is not None and held.refused and now < held.until:
                raise self.refusal(held.until - now)
            if self._limiter.down(now):
                self._limiter.decide_unchecked(self.policy)
                return
            refill = self._refills.get(identity)
            if refill is None:
                refill = asyncio.ensure_future(self._refill(identity))
                self._refills[identity] = refill
            await self._limiter.settle(refill)

    def raise_if_refused(self, identity: Identity) -> None:
        """Raise the 429 problem if the shared quota is known to have nothing for `identity`."""
        held = self._held.get(identity)
        if held is not None and held.refused and (wait := held.until - time.monotonic()) > 0:
            raise self.refusal(wait)

    def refusal(self, wait: float) -> Problem:
        """The 429 answer: Retry-After, and the quota in RateLimit-Policy and RateLimit."""
        policy, seconds = self.policy, max(1, math.ceil(wait))
        self._limiter.count(policy.counter)
        return Problem(
            429,
            "Too Many Requests",
            f"The '{policy.name}' quota is used up; retry in {seconds} s.",
            type="/problems/rate-limited",
            headers={
                "Retry-After": str(seconds),
                "RateLimit-Policy": policy.header,
                "RateLimit": f'"{policy.name}";r=0;t={seconds}',
            },
        )

    async def _refill(self, identity: Identity) -> None:
        name = identity.hex() if isinstance(identity, bytes) else identity
        try:
            grant = await self._limiter.lease(Lease(self._prefix + name, self.policy))
        except (RedisError, OSError) as exc:  # the quota is unknown: decide as when Redis is down
            self._limiter.lost_redis(exc)
            return
        finally:
            del self._refills[identity]
        self._limiter.reached_redis()
        now = time.monotonic()
        if grant.tokens:
            allowance = Allowance(grant.tokens, now + self.policy.window, refused=False)
        else:
            allowance = Allowance(0, now + grant.wait_us / 1e6, refused=True)
        held = self._held
        held.pop(identity, None)  # re-inserted last: the oldest entries are the first ones
        held[identity] = allowance
        if len(held) > MAX_IDENTITIES:
            del held[next(iter(held))]


def client_addresses(trusted: Sequence[IPv4Network | IPv6Network]) -> Callable[[web.Request], str]:
    """How to tell a request's client: its peer, or when the peer is one of the `trusted`
    proxies, the last address in X-Forwarded-For that is not one of them. An IPv6 client is its
    /64, the share one host usually gets; an IPv4-mapped one is its IPv4 address."""

    @functools.lru_cache(maxsize=4096)
    def parse(address: str) -> IPv4Address | IPv6Address | None:
        try:
            return ip_address(address)
        except ValueError:
            return None

    def is_trusted(address: str) -> bool:
        parsed = parse(address)
        return parsed is not None and any(parsed in network for network in trusted)

    @functools.lru_cache(maxsize=4096)
    def ipv6_client(address: str) -> str:
        parsed = parse(address)
        if not isinstance(parsed, IPv6Address):
            return address
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ip_network((parsed, 64), strict=False))

    def forwarded_client(request: web.Request, peer: str) -> str:
        hops = request.headers.get("X-Forwarded-For", "").split(",")
        for hop in reversed([hop.strip() for hop in hops]):
            if not is_trusted(hop):
                return hop if parse(hop) is not None else peer
        return peer  # every hop is a proxy of ours

    def client_address(request: web.Request) -> str:
        peer = request.remote or ""
        if trusted and is_trusted(peer):
            peer = forwarded_client(request, peer)
        return ipv6_client(peer) if ":" in peer else peer

    return client_address


class Limiter:
    """A worker's rate limiter: a quota per policy, leases batched into one script, and whether
    Redis answers (logged when that changes, never per request)."""

    def __init__(
        self,
        settings: Settings,
        slot: WorkerSlot,
        send: Callable[[list[Lease]], Awaitable[Sequence[Grant]]],
    ) -> None:
        prefix = f"{key_prefix(settings.environment)}:rate"
        rates = settings.rate_limits
        self.quotas = {
            name: Quota(Policy(name, rate, RATE_LIMITED + number), self, f"{prefix}:{name}:")
            for number, (name, rate) in enumerate(zip(POLICIES, rates, strict=True))
        }
        self.client_address = client_addresses(settings.trusted_proxies)
        self._leases = Batcher(send, MAX_LEASE_BATCH)
        self._slot = slot
        self._retry_at = 0.0
        self._lost_at: float | None = None  # when Redis stopped answering, while it does not
        slot.set(RATE_LIMITER_DOWN, 0)  # this slot's previous worker may have died while down

    def route(self, scope: Scope | None) -> RouteLimit:
        return RouteLimit(self, scope)

    async def lease(self, lease: Lease) -> Grant:
        return await self._leases(lease)

    def count(self, counter: int) -> None:
        self._slot.count(counter)

    def down(self, now: float) -> bool:
        return now < self._retry_at

    async def settle(self, refill: asyncio.Task[None]) -> None:
        """Wait for a refill, but no longer than LEASE_TIMEOUT: a hung Redis counts as down."""
        done, _ = await asyncio.wait({refill}, timeout=LEASE_TIMEOUT)
        if done:
            refill.result()  # raises only what is not a Redis failure: a bug, a 500
        else:
            self.lost_redis(TimeoutError(f"no lease within {LEASE_TIMEOUT} s"))

    def decide_unchecked(self, policy: Policy) -> None:
        """Redis cannot say: admit (fail open), or refuse a write with a 503 (fail closed)."""
        if not policy.fails_closed:
            self._slot.count(UNCHECKED_ADMITTED)
            return
        self._slot.count(UNCHECKED_REFUSED)
        raise Problem(
            503,
            "Service Unavailable",
            "Writes are refused while the rate limiter cannot reach Redis; nothing was changed. "
            "Try again shortly.",
            type="/problems/rate-limiter-unavailable",
            headers={"Retry-After": str(math.ceil(RETRY_SECONDS))},
        )

    def lost_redis(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + RETRY_SECONDS
        if self._lost_at is None:
            self._lost_at = now
            self._slot.set(RATE_LIMITER_DOWN, 1)
            log.warning(
                "rate limiter cannot reach Redis (%r): until it does, reads are admitted "
                "unchecked and writes refused with 503",
                exc,
            )

    def reached_redis(self) -> None:
        if self._lost_at is not None:
            log.info(
                "rate limiter reaches Redis again after %.1f s", time.monotonic() - self._lost_at
            )
            self._lost_at = None
            self._slot.set(RATE_LIMITER_DOWN, 0)


class RouteLimit:
    """How one route's requests are limited: per API key under its scope's policy, per client
    address for a public route; and per address, the failed authentications before it."""

    __slots__ = ("_address", "_failures", "_keyed", "_quota")

    def __init__(self, limiter: Limiter, scope: Scope | None) -> None:
        self._keyed = scope is not None
        self._quota = limiter.quotas["anonymous" if scope is None else SCOPE_POLICIES[scope]]
        self._failures = limiter.quotas["auth-failures"]
        self._address = limiter.client_address

    def admit(self, request: web.Request) -> Coroutine[Any, Any, None] | None:
        """None when the request may go on at once, else what to await before it does (which
        raises the 429 problem if it may not)."""
        identity = request[api_key].digest if self._keyed else self._address(request)
        return None if self._quota.take(identity) else self._quota.spend(identity)

    def refuse_blocked(self, request: web.Request) -> None:
        """A 429 problem, before the key is looked at, for an address that failed too often."""
        self._failures.raise_if_refused(self._address(request))

    async def failed_authentication(self, request: web.Request, problem: Problem) -> web.Response:
        """The 401 answer `problem`, or a 429 once the address has failed too often."""
        try:
            await self._failures.spend(self._address(request))
        except Problem as refused:
            return refused.response()
        return problem.response()


rate_limiter = web.AppKey("rate_limiter", Limiter)


def setup_rate_limits(app: web.Application) -> None:
    app[rate_limiter] = Limiter(
        app[settings_key],
        app[worker_slot],
        lambda leases: lease_tokens(app[redis_client].execute_command, leases),
    )
