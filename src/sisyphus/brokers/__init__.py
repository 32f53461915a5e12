"""Brokers: where messages and rights sets live.

``base.py`` is the one interface; ``memory.py`` the embedded default;
``redis.py`` the Redis/Valkey broker; ``backoff.py`` the reconnect schedule.
"""

from sisyphus.brokers.base import Broker

__all__ = ["Broker"]
