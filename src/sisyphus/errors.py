"""The exception tree, and the one place errors map to HTTP statuses.

    SisyphusError
    ├── PeerError           the client broke HTTP or a limit (4xx, with a status hint)
    ├── ApiError            a well-formed API request we refuse (4xx, with a status hint)
    ├── BrokerUnavailable   the broker (Redis) can't be reached: clients get `error`
    └── ConfigError         a setting has a bad value; names the variable and the value

Third-party exceptions (redis, OSError) are translated into these at the
broker boundary, so the server never catches a library's exception type.
"""

from __future__ import annotations

from http import HTTPStatus


class SisyphusError(Exception):
    """Base of every error Sisyphus raises on purpose."""


class PeerError(SisyphusError):
    """The peer sent something we can't accept; answer ``status`` and close."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiError(SisyphusError):
    """An API request that is well-formed HTTP but refused (bad JSON, bad name, no key)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class BrokerUnavailable(SisyphusError):
    """The broker can't be reached or didn't answer in time."""


class ConfigError(SisyphusError):
    """A configuration value is invalid."""
