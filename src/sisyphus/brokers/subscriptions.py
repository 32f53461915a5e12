"""Bookkeeping both Redis brokers share around their subscriptions, without I/O.

Who waits for which channel's confirmation, which channels linger past their last
stream (in the order they were left, so in deadline order), and the log line for
sequenced messages dropped as malformed.
"""

from __future__ import annotations

import asyncio
import logging

from sisyphus.errors import BrokerUnavailable

log = logging.getLogger("sisyphus.redis")

Waiters = dict[str, list[asyncio.Future[None]]]


def release(waiters: Waiters, name: str) -> None:
    """``name`` is confirmed (or nobody reads it any more): its waiters wait no longer."""
    for future in waiters.pop(name, ()):
        if not future.done():
            future.set_result(None)


def fail_all(waiters: Waiters, reason: str) -> None:
    """The pub/sub side is lost: every waiter fails with ``reason``."""
    for future in [f for futures in waiters.values() for f in futures]:
        if not future.done():
            future.set_exception(BrokerUnavailable(reason))
            future.exception()  # retrieved: nobody may be waiting any more
    waiters.clear()


def pop_expired(lingering: dict[str, float], now: float) -> list[str]:
    """The lingering channels whose deadline passed, removed from ``lingering``."""
    ended = []
    for channel, deadline in lingering.items():
        if deadline > now:
            break
        ended.append(channel)
    for channel in ended:
        del lingering[channel]
    return ended


def count_malformed(count: int, name: bytes) -> int:
    """One more malformed sequenced message dropped; said on the 1st, 2nd, 4th, 8th, ..."""
    count += 1
    if count & (count - 1) == 0:
        log.warning("dropped %d malformed sequenced messages (latest on %r)", count, name)
    return count
