"""Reconnect delays: capped exponential backoff with full jitter, as a pure function."""

from __future__ import annotations

from collections.abc import Callable


def delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based); ``rand`` returns [0, 1)."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    # Half fixed, half random: never hammers at 0 s, and spreads a fleet's reconnects.
    return ceiling / 2 + rand() * ceiling / 2
