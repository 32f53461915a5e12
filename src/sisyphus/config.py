"""Settings: each option defined once (default, environment variable, help).

The CLI flags and the ``SISYPHUS_*`` variables are both derived from
:data:`OPTIONS`; a flag wins over the variable, which wins over the default.
Values are validated at start-up with a message naming the variable and value.
The CLI's publishing commands and the Python helper read the options they
share with the service (:data:`PUBLISHER_OPTIONS`, :data:`TOKEN_OPTIONS`)
from here too, so no other module spells a ``SISYPHUS_*`` name.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sisyphus.brokers.topology import parse_broker_url
from sisyphus.errors import ConfigError
from sisyphus.protocol.auth import MIN_SECRET_LENGTH

DEFAULT_URL = "http://127.0.0.1:3001"
MIN_API_KEY_LENGTH = 16


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


def _workers(text: str) -> int:
    """A count of worker processes, or ``auto``: one per core this process may run on."""
    if text.strip().lower() == "auto":
        try:
            return len(os.sched_getaffinity(0))  # honours taskset and systemd's CPUAffinity
        except AttributeError:  # pragma: no cover - not on Linux
            return os.cpu_count() or 1
    return _positive_int(text)


def _optional_str(text: str) -> str | None:
    return text or None


def _host(text: str) -> str:
    """An address to listen on: an IP address, or a name that resolves now."""
    if not text:
        raise ValueError("give an address such as 127.0.0.1, 0.0.0.0 or ::")
    try:
        socket.getaddrinfo(text, None, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ValueError(f"can't resolve it ({reason})") from None
    return text


def _redis_url(text: str) -> str | None:
    if not text:
        return None
    try:
        parse_broker_url(text)
    except ValueError as exc:
        # The parser's words may quote a piece of the password: then they are not shown.
        credentials = text.partition("://")[2].rpartition("@")[0]
        pieces = [piece for piece in re.split(r"[:/?#@]", credentials) if len(piece) >= 2]
        reason = str(exc)
        if any(piece in reason for piece in pieces):
            reason = (
                "it is not a URL once its password is read (the parser's words would show "
                "the password); percent-encode any / ? # @ in it (%2F %3F %23 %40)"
            )
        raise ValueError(
            f"{reason}; e.g. redis://localhost:6379/0 or redis+sentinel://HOST:PORT,HOST:PORT/NAME"
        ) from None
    return text


def _service_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise ValueError(f"use http:// or https://, e.g. {DEFAULT_URL}")
    return text


def _api_key(text: str) -> str | None:
    if not text:
        return None
    if len(text) < MIN_API_KEY_LENGTH:
        raise ValueError(f"too short: an API key needs at least {MIN_API_KEY_LENGTH} characters")
    return text


def redact_password(text: str) -> str:
    """A URL as it may be shown in a message or a log: its credentials replaced by ***.

    The credentials end at the URL's last ``@``: a password may hold ``@``, and, not
    percent-encoded, ``/``, ``?`` or ``#`` (which then look like the path's start).
    """
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        return scheme + sep + "***@" + rest.rpartition("@")[2]
    return text


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _timestamp(text: str) -> float | None:
    """Epoch seconds, or an ISO 8601 date-time with a time zone (2026-12-31T00:00:00Z)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("give a time zone, e.g. 2026-12-31T00:00:00Z")
    return moment.timestamp()


def _secret(text: str) -> str | None:
    if not text:
        return None
    if len(text.encode()) < MIN_SECRET_LENGTH:
        raise ValueError(f"too short: a token secret needs at least {MIN_SECRET_LENGTH} bytes")
    return text


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in {"yes", "true", "1", "on"}:
        return True
    if value in {"no", "false", "0", "off", ""}:
        return False
    raise ValueError("must be yes or no")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


_SYMMETRIC = {"HS256", "HS384", "HS512"}
_ASYMMETRIC = {
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
}


def _algorithms(text: str) -> tuple[str, ...]:
    names = _csv(text)
    unknown = [name for name in names if name not in _SYMMETRIC | _ASYMMETRIC]
    if unknown or not names:
        raise ValueError(f"unsupported {unknown or 'empty list'}; use e.g. HS256, RS256, ES256")
    return names


def _public_key(text: str) -> str | None:
    """A PEM public key, given inline or as the path of a file holding it."""
    if not text:
        return None
    if text.lstrip().startswith("-----BEGIN"):
        return text
    try:
        with open(text) as pem:
            content = pem.read()
    except OSError as exc:
        raise ValueError(f"can't read the key file: {exc.strerror}") from None
    if "-----BEGIN" not in content:
        raise ValueError("the file holds no PEM key")
    return content


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _log_format(text: str) -> str:
    chosen = text.lower()
    if chosen not in ("text", "json"):
        raise ValueError("must be text or json")
    return chosen


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    metavar: str,
    flag: str = "",
    secret: bool = False,
    shown: Callable[[str], str] = repr,
) -> Any:
    """A settings field whose metadata tells how to read it from a flag or variable.

    A ``secret`` field is left out of the settings' repr, so it never reaches a log;
    ``shown`` is how an error message quotes a bad value.
    """
    return dataclasses.field(
        default=default,
        repr=not secret,
        metadata={
            "parse": parse,
            "help": help,
            "metavar": metavar,
            "flag": flag,
            "secret": secret,
            "shown": shown,
        },
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated settings of one service process; each field is one option."""

    host: str = _setting("127.0.0.1", _host, "address to listen on", "HOST")
    port: int = _setting(3001, _port, "port to listen on (0 picks a free one)", "PORT")
    reuse_port: bool = _setting(
        False,
        _yes_no,
        "yes: bind with SO_REUSEPORT, so a new process can take over the port while the old "
        "one drains (a restart without refused connects); needs --redis",
        "yes|no",
    )
    workers: int = _setting(
        1,
        _workers,
        "worker processes sharing the port (SO_REUSEPORT) under one supervisor that restarts "
        "them; auto is one per core; above 1 needs --redis and a fixed --port",
        "N|auto",
    )
    redis_url: str | None = _setting(
        None,
        _redis_url,
        "Redis/Valkey URL such as redis://localhost:6379/0; without it the embedded broker runs",
        "URL",
        flag="--redis",
        shown=lambda text: repr(redact_password(text)),
    )
    keepalive: float = _setting(
        15.0, _positive_float, "seconds of silence before a noop", "SECONDS"
    )
    api_key: str | None = _setting(
        None,
        _api_key,
        f"key for the publish/grant/revoke API, at least {MIN_API_KEY_LENGTH} characters; "
        "without it only loopback clients may call it",
        "KEY",
        secret=True,
    )
    secret: str | None = _setting(
        None,
        _secret,
        "HMAC secret that signs user tokens; without it (and without --public-key) the "
        "service runs in development mode where anyone may listen as anyone with ?user=",
        "SECRET",
        secret=True,
    )
    previous_secret: str | None = _setting(
        None,
        _secret,
        "the secret before the last rotation; its tokens stay valid until --previous-secret-until",
        "SECRET",
        secret=True,
    )
    previous_secret_until: float | None = _setting(
        None,
        _timestamp,
        "when the previous secret stops being accepted (epoch seconds or ISO 8601 with zone)",
        "TIME",
    )
    public_key: str | None = _setting(
        None,
        _public_key,
        "PEM public key (inline, or a file path) that verifies RS/ES-signed user tokens",
        "PEM",
    )
    algorithms: tuple[str, ...] | None = _setting(
        None,
        _algorithms,
        "accepted token algorithms, comma-separated (default HS256 with a secret, "
        "RS256,ES256 with a public key); never taken from the token",
        "LIST",
    )
    audience: str | None = _setting(
        None, _optional_str, "required `aud` claim of user tokens", "AUD"
    )
    issuer: str | None = _setting(None, _optional_str, "required `iss` claim of user tokens", "ISS")
    leeway: float = _setting(
        10.0, _non_negative_float, "seconds of clock skew allowed on exp/nbf/iat", "SECONDS"
    )
    token_cookie: str = _setting(
        "sisyphus_token", str, "name of the cookie that may carry the user token", "NAME"
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        _csv,
        "origins allowed to connect from other sites, comma-separated, or * "
        "(then without credentials, and streams only: the API takes a listed origin); "
        "none by default",
        "LIST",
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
    history_size: int = _setting(
        1000, _positive_int, "messages retained per channel for resuming streams", "COUNT"
    )
    history_max_age: float = _setting(
        3600.0,
        _positive_float,
        "seconds a message is retained; a position older than that (by the broker's own "
        "record of publish times) gets `reset`",
        "SECONDS",
    )
    replay_max_messages: int = _setting(
        1000, _positive_int, "messages one reconnect may replay; beyond, `reset`", "COUNT"
    )
    replay_max_bytes: int = _setting(
        256 * 1024,
        _positive_int,
        "wire bytes one reconnect may replay (never more than --max-unsent-bytes); beyond, `reset`",
        "BYTES",
    )
    max_connections: int = _setting(
        0,
        _non_negative_int,
        "streams one process holds at most; 0 means the open-file limit minus 64",
        "COUNT",
    )
    max_connections_per_user: int = _setting(
        32, _positive_int, "streams one user may hold at once in one process", "COUNT"
    )
    max_channels_per_user: int = _setting(
        1000, _positive_int, "channels a user may read; a larger set is refused", "COUNT"
    )
    header_timeout: float = _setting(
        10.0,
        _positive_float,
        "seconds a client has to send its request head; slower senders are cut",
        "SECONDS",
    )
    max_last_event_id_bytes: int = _setting(
        512, _positive_int, "longest Last-Event-ID accepted (400 beyond)", "BYTES"
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
    broker_ping_interval: float = _setting(
        5.0,
        _positive_float,
        "seconds between PINGs on the Redis pub/sub link; no PONG within --broker-timeout "
        "means the link is dead and is reconnected",
        "SECONDS",
    )
    subscription_linger: float = _setting(
        5.0,
        _non_negative_float,
        "seconds a Redis channel stays subscribed after its last stream closed, so that "
        "a client coming back within them connects with no SUBSCRIBE (and, its set kept "
        "in-process while user:<id> stays subscribed, no round trip at all); 0: none",
        "SECONDS",
    )
    shutdown_drain: float = _setting(
        2.0,
        _non_negative_float,
        "seconds over which streams are closed at shutdown, so clients don't return as one storm",
        "SECONDS",
    )
    shutdown_timeout: float = _setting(
        10.0,
        _positive_float,
        "seconds a graceful stop may take before the process exits",
        "SECONDS",
    )
    log_level: str = _setting("INFO", _log_level, "debug, info, warning or error", "LEVEL")
    log_format: str = _setting(
        "text",
        _log_format,
        "text (a line for people) or json (one JSON object per line: time, level, logger, "
        "event, message, and the event's fields such as user, reason, peer)",
        "FORMAT",
    )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def development_mode(self) -> bool:
        """No way to verify tokens: ``?user=`` is trusted as it comes."""
        return self.secret is None and self.public_key is None

    def token_algorithms(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(algorithms for the secret, algorithms for the public key), each possibly empty."""
        chosen = self.algorithms
        if chosen is None:
            chosen = ("HS256",) if self.secret else ("RS256", "ES256")
        return (
            tuple(a for a in chosen if a in _SYMMETRIC),
            tuple(a for a in chosen if a in _ASYMMETRIC),
        )


@dataclass(frozen=True, slots=True)
class Option:
    """How one settings field is given: its flag, its variable, its parser and help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str
    flag: str
    secret: bool
    shown: Callable[[str], str] = repr

    @property
    def env(self) -> str:
        return "SISYPHUS_" + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as help texts show it: ``none`` for no value."""
        return "none" if self.default in (None, ()) else str(self.default)


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        name=f.name,
        parse=f.metadata["parse"],
        default=f.default,
        help=f.metadata["help"],
        metavar=f.metadata["metavar"],
        flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
        secret=f.metadata["secret"],
        shown=f.metadata["shown"],
    )
    for f in dataclasses.fields(Settings)
)


def option(name: str, help: str | None = None) -> Option:
    """The service option ``name``, with another help text where its use differs."""
    found = next(o for o in OPTIONS if o.name == name)
    return found if help is None else dataclasses.replace(found, help=help)


# What `sisyphus publish|grant|revoke|position` and the Python helper read: the
# service's own options where they mean the same thing, so retention and keys agree.
PUBLISHER_OPTIONS: tuple[Option, ...] = (
    Option(
        name="url",
        parse=_service_url,
        default=DEFAULT_URL,
        help="the running service to call",
        metavar="URL",
        flag="--url",
        secret=False,
    ),
    option(
        "redis_url",
        "write straight to this Redis/Valkey (the one the service reads) instead of "
        "calling the service",
    ),
    option("api_key", "the service's API key"),
    option(
        "history_size",
        "messages retained per channel, with --redis; give the service's value",
    ),
    option(
        "history_max_age",
        "seconds a message is retained, with --redis; give the service's value",
    ),
)

# What `sisyphus token` reads: the key and claims the service checks.
TOKEN_OPTIONS: tuple[Option, ...] = (
    option("secret", "the HMAC secret the service verifies tokens with"),
    option("audience", "the `aud` claim to put in the token"),
    option("issuer", "the `iss` claim to put in the token"),
)


def read(
    options: tuple[Option, ...],
    flags: Mapping[str, str | None],
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The values of ``options`` from ``flags`` (``None`` if not given), ``environ``, defaults.

    Raises :class:`ConfigError` naming the flag or variable and the bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options:
        raw = flags.get(opt.name)
        source = opt.flag
        if raw is None:
            raw = environ.get(opt.env)
            source = opt.env
        if raw is None:
            values[opt.name] = opt.default
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            shown = "<hidden>" if opt.secret else opt.shown(raw)  # a secret never reaches a log
            raise ConfigError(f"{source}={shown} is invalid: {exc}") from None
    return values


def load(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from CLI ``flags`` (raw strings, ``None`` if not given) and ``environ``.

    Raises :class:`ConfigError` naming the flag or variable and the bad value.
    """
    settings = Settings(**read(OPTIONS, flags, environ))
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    """Refuse combinations that would silently accept no token, or the wrong kind."""
    symmetric, asymmetric = settings.token_algorithms()
    if settings.secret and not symmetric:
        raise ConfigError("SISYPHUS_SECRET is set but SISYPHUS_ALGORITHMS has no HS* algorithm")
    # RFC 7518 §3.2: the key must be at least as long as the hash (HS384: 48, HS512: 64).
    needed = max((int(name[2:]) // 8 for name in symmetric), default=0)
    for variable, secret in (
        ("SISYPHUS_SECRET", settings.secret),
        ("SISYPHUS_PREVIOUS_SECRET", settings.previous_secret),
    ):
        if secret and len(secret.encode()) < needed:
            raise ConfigError(
                f"{variable} needs at least {needed} bytes for {', '.join(symmetric)}"
            )
    if settings.public_key and not asymmetric:
        raise ConfigError(
            "SISYPHUS_PUBLIC_KEY is set but SISYPHUS_ALGORITHMS has no RS*/PS*/ES*/EdDSA algorithm"
        )
    if settings.previous_secret and not settings.secret:
        raise ConfigError(
            "SISYPHUS_PREVIOUS_SECRET is set without SISYPHUS_SECRET: the service would run "
            "in development mode and accept no token; set SISYPHUS_SECRET to the new secret"
        )
    if settings.previous_secret and settings.previous_secret_until is None:
        raise ConfigError("SISYPHUS_PREVIOUS_SECRET needs SISYPHUS_PREVIOUS_SECRET_UNTIL")
    if settings.reuse_port and settings.redis_url is None:
        # Two processes on one port with embedded brokers would each keep their own
        # messages: a client would miss what was published through the other one.
        raise ConfigError(
            "SISYPHUS_REUSE_PORT=yes needs SISYPHUS_REDIS_URL: with the embedded broker, "
            "processes sharing the port would not share messages"
        )
    if settings.workers > 1 and settings.redis_url is None:
        # Each worker would run its own embedded broker: a client would miss what was
        # published through (or granted by) another worker.
        raise ConfigError(
            f"SISYPHUS_WORKERS={settings.workers} needs SISYPHUS_REDIS_URL: with the embedded "
            "broker, worker processes would not share messages"
        )
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError(
            f"SISYPHUS_WORKERS={settings.workers} needs a fixed SISYPHUS_PORT: with port 0 "
            "each worker would pick a port of its own"
        )
    if "*" in settings.cors_origins and len(settings.cors_origins) > 1:
        raise ConfigError("SISYPHUS_CORS_ORIGINS: use either * or a list of origins, not both")
