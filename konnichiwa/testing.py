"""Large data sets for tests and load tests, written straight into Postgres in a few seconds."""

from __future__ import annotations

from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# Increments of one after the newest change, a millisecond apart and ending now; the watermark
# moves to the end, so the service's consumers find Redis behind and carry on from there
# (audit.reconcile). $1 is the size the log grows to.
GROW_AUDIT_LOG: Final = """
INSERT INTO audit_log
    (seq, changed_at, old_counter, new_counter, old_message, new_message, update_type)
SELECT n, now() - ($1 - n) * interval '1 millisecond',
       counter + (n - upto - 1), counter + (n - upto), 'seed', 'seed', 'increment'
FROM (SELECT upto, coalesce((SELECT new_counter FROM audit_log WHERE seq = upto), 0) AS counter
      FROM audit_watermark FOR UPDATE) newest,
     generate_series(upto + 1, $1) AS n
"""
GROW_USERS: Final = """
INSERT INTO users (position, name, email, created_at)
SELECT n, 'Yamada Taro', 'seed-' || n || '@example.jp',
       now() - ($1 - n) * interval '1 millisecond'
FROM (SELECT total FROM user_count FOR UPDATE) counted, generate_series(total + 1, $1) AS n
"""


async def grow_audit_log(conn: asyncpg.Connection | PoolConnectionProxy, size: int) -> None:
    """Add changes until the audit log holds `size` (none when it holds as many already)."""
    async with conn.transaction():
        await conn.execute(GROW_AUDIT_LOG, size)
        await conn.execute("UPDATE audit_watermark SET upto = greatest(upto, $1)", size)
    await conn.execute("ANALYZE audit_log")  # as autovacuum would soon: plans for this size


async def grow_users(conn: asyncpg.Connection | PoolConnectionProxy, size: int) -> None:
    """Add users until there are `size` (none when there are as many already)."""
    async with conn.transaction():
        await conn.execute(GROW_USERS, size)
        await conn.execute("UPDATE user_count SET total = greatest(total, $1)", size)
    await conn.execute("ANALYZE users")
