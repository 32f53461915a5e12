"""Plain integer counters, bumped on the hot path and read at scrape time.

A Prometheus client Counter takes a lock on every increment; these are plain
attributes on one object, so counting costs one integer add.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Metrics:
    connections_opened: int = 0
    connections_closed: int = 0
    messages_in: int = 0
    messages_out: int = 0
    keepalives: int = 0
    slow_client_cuts: int = 0
    status_failure: int = 0
    status_error: int = 0
    status_disconnected: int = 0
    api_requests: int = 0
    api_rejected: int = 0
    bad_requests: int = 0
    auth_failures: int = 0
    tokens_expired: int = 0
    limit_connections: int = 0
    limit_user_connections: int = 0
    limit_channels: int = 0
    header_timeouts: int = 0
    replayed: int = 0
    resets: int = 0

    def statistics(self) -> dict[str, int]:
        return asdict(self)
