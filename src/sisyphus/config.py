"""Settings: each option defined once (default, environment variable, help).

The CLI flags and the ``SISYPHUS_*`` variables are both derived from
:data:`OPTIONS`; a flag wins over the variable, which wins over the default.
Values are validated at start-up with a message naming the variable and value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sisyphus.errors import ConfigError


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _optional_str(text: str) -> str | None:
    return text or None


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _setting(
    default: Any, parse: Callable[[str], Any], help: str, metavar: str, flag: str = ""
) -> Any:
    """A settings field whose metadata tells how to read it from a flag or variable."""
    return dataclasses.field(
        default=default,
        metadata={"parse": parse, "help": help, "metavar": metavar, "flag": flag},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated settings of one service process; each field is one option."""

    host: str = _setting("127.0.0.1", str, "address to listen on", "HOST")
    port: int = _setting(3001, _port, "port to listen on (0 picks a free one)", "PORT")
    redis_url: str | None = _setting(
        None,
        _optional_str,
        "Redis/Valkey URL such as redis://localhost:6379/0; without it the embedded broker runs",
        "URL",
        flag="--redis",
    )
    keepalive: float = _setting(
        15.0, _positive_float, "seconds of silence before a noop", "SECONDS"
    )
    api_key: str | None = _setting(
        None,
        _optional_str,
        "key for the publish/grant/revoke API; without it only loopback clients may call it",
        "KEY",
    )
    retry_ms: int = _setting(
        5000,
        _positive_int,
        "reconnect delay hinted to clients closed with `error` (jittered up to +50%)",
        "MS",
    )
    failure_retry_ms: int = _setting(
        60000,
        _positive_int,
        "reconnect delay hinted to clients closed with `failure` or `disconnected`",
        "MS",
    )
    max_unsent_bytes: int = _setting(
        256 * 1024,
        _positive_int,
        "unsent bytes a connection may hold before it is cut as a slow client",
        "BYTES",
    )
    max_head_bytes: int = _setting(
        8192, _positive_int, "largest request line plus headers", "BYTES"
    )
    max_message_bytes: int = _setting(
        1024 * 1024, _positive_int, "largest API request body (and so published message)", "BYTES"
    )
    broker_timeout: float = _setting(
        5.0,
        _positive_float,
        "seconds to wait for the broker before a client gets `error`",
        "SECONDS",
    )
    log_level: str = _setting("INFO", _log_level, "debug, info, warning or error", "LEVEL")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Option:
    """How one settings field is given: its flag, its variable, its parser and help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str
    flag: str

    @property
    def env(self) -> str:
        return "SISYPHUS_" + self.name.upper()


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        name=f.name,
        parse=f.metadata["parse"],
        default=f.default,
        help=f.metadata["help"],
        metavar=f.metadata["metavar"],
        flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
    )
    for f in dataclasses.fields(Settings)
)


def load(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from CLI ``flags`` (raw strings, ``None`` if not given) and ``environ``.

    Raises :class:`ConfigError` naming the flag or variable and the bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.name)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} is invalid: {exc}") from None
    return Settings(**values)
