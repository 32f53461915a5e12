"""The helper a main application imports to publish and change rights.

Two ways, one interface (:class:`Publisher`):

* :class:`HttpPublisher` talks to a running Sisyphus (the only way with the
  embedded broker): ``HttpPublisher("http://127.0.0.1:3001", api_key=...)``.
* :class:`RedisPublisher` writes straight to the Redis that Sisyphus reads:
  ``RedisPublisher("redis://localhost:6379/0")``; exactly what a main app doing
  plain ``PUBLISH`` / ``SADD`` / ``SREM`` does, with names validated first.

Both are synchronous (a web request handler calls them) and raise
:class:`SisyphusClientError` with a message saying what went wrong.

:func:`mint_token` signs the expiring token a browser connects with:
``mint_token(secret, "42", ttl=3600)``, then ``/?token=<token>``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any, Protocol

import redis
import redis.sentinel

from sisyphus import config
from sisyphus.brokers.lua import EPOCH_KEY, PUBLISH_SCRIPT, SEQUENCE_KEY, publish_call
from sisyphus.brokers.memory import new_epoch
from sisyphus.brokers.topology import parse_broker_url
from sisyphus.errors import ConfigError
from sisyphus.protocol.auth import mint_token
from sisyphus.protocol.names import InvalidName, check_channel, check_user_id
from sisyphus.protocol.names import user_channel as _user_channel
from sisyphus.protocol.resume import EventId
from sisyphus.protocol.rights import rights_notice

__all__ = [
    "DEFAULT_URL",
    "HttpPublisher",
    "Publisher",
    "RedisPublisher",
    "SisyphusClientError",
    "connect",
    "mint_token",
]

DEFAULT_URL = config.DEFAULT_URL


class SisyphusClientError(Exception):
    """Publishing or changing rights failed; the message says why."""


class Publisher(Protocol):
    """Each call returns the event id its message got (render :meth:`position` into pages)."""

    def publish(self, channel: str, data: str | bytes) -> str: ...
    def grant(self, user_id: str, channels: Iterable[str]) -> str: ...
    def revoke(self, user_id: str, channels: Iterable[str]) -> str: ...
    def position(self) -> str: ...


def _checked(user_id: str, channels: Iterable[str]) -> list[str]:
    try:
        check_user_id(user_id)
        checked = [check_channel(channel) for channel in channels]
    except InvalidName as exc:
        raise SisyphusClientError(str(exc)) from None
    if not checked:
        raise SisyphusClientError("give at least one channel")
    return checked


class HttpPublisher:
    """Publish and change rights through a running Sisyphus's HTTP API."""

    def __init__(
        self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 5.0
    ) -> None:
        self._url = url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout

    def _post(self, route: str, body: dict[str, Any] | None) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's, http(s) only
            self._url + route,
            data=None if body is None else json.dumps(body).encode(),
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        if not request.full_url.startswith(("http://", "https://")):
            raise SisyphusClientError(f"unsupported URL {self._url!r}: use http:// or https://")
        if self._api_key:
            # http.client sends header text as latin-1; going through it this way puts the
            # key's UTF-8 bytes on the wire, exactly what curl sends for the same key.
            header = f"Bearer {self._api_key}".encode().decode("latin-1")
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise SisyphusClientError(f"{route}: HTTP {exc.code}: {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SisyphusClientError(f"can't reach Sisyphus at {self._url}: {exc}") from None
        except ValueError:
            raise SisyphusClientError(f"{route}: the answer is not JSON") from None

    def publish(self, channel: str, data: str | bytes) -> str:
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as exc:
            # The API carries text (JSON), and a browser's EventSource reads UTF-8 only.
            raise SisyphusClientError(
                f"the message is not UTF-8 text (byte {exc.start}); "
                "publish bytes through RedisPublisher, or encode them (e.g. base64)"
            ) from None
        return str(self._post("/api/publish", {"channel": channel, "data": text})["id"])

    def grant(self, user_id: str, channels: Iterable[str]) -> str:
        body = {"user": user_id, "channels": _checked(user_id, channels)}
        return str(self._post("/api/grant", body)["id"])

    def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        body = {"user": user_id, "channels": _checked(user_id, channels)}
        return str(self._post("/api/revoke", body)["id"])

    def position(self) -> str:
        return str(self._post("/api/position", None)["id"])


def _connect_redis(url: str, timeout: float) -> redis.Redis:
    """A redis-py client for any broker URL form (with Sentinel: the master it names)."""
    topology = parse_broker_url(url)
    if not topology.uses_sentinel:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    # redis-py's sentinel module has no type hints.
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(topology.sentinels), socket_timeout=timeout, socket_connect_timeout=timeout
    )
    params = topology.params
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        topology.master_name,
        db=params.get("db", 0),
        username=params.get("username"),
        password=params.get("password"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return master


class RedisPublisher:
    """Publish and change rights directly in the Redis that Sisyphus reads.

    Messages go through the same script as the service's own publish path, so
    they are retained and streams can resume them. ``history_size`` and
    ``history_max_age`` must match the service's: left out, they are read as the
    service reads them (``SISYPHUS_HISTORY_SIZE``, ``SISYPHUS_HISTORY_MAX_AGE``,
    else the service's defaults).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        history_size: int | None = None,
        history_max_age: float | None = None,
    ) -> None:
        flags = {
            "history_size": None if history_size is None else str(history_size),
            "history_max_age": None if history_max_age is None else str(history_max_age),
        }
        retention = (config.option("history_size"), config.option("history_max_age"))
        try:
            values = config.read(retention, flags)
        except ConfigError as exc:
            raise SisyphusClientError(str(exc)) from None
        self._history_size: int = values["history_size"]
        self._history_max_age: float = values["history_max_age"]
        try:
            self._redis = _connect_redis(url, timeout)
        except ValueError as exc:
            raise SisyphusClientError(f"invalid Redis URL: {exc}") from None
        self._script = self._redis.register_script(PUBLISH_SCRIPT)

    def publish(self, channel: str, data: str | bytes) -> str:
        try:
            check_channel(channel)
        except InvalidName as exc:
            raise SisyphusClientError(str(exc)) from None
        payload = data.encode() if isinstance(data, str) else data
        return self._sequenced(channel, payload)

    def grant(self, user_id: str, channels: Iterable[str]) -> str:
        checked = _checked(user_id, channels)
        notice = rights_notice("granted", checked)
        return self._sequenced(_user_channel(user_id), notice, ("SADD", user_id, checked))

    def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        checked = _checked(user_id, channels)
        notice = rights_notice("revoked", checked)
        return self._sequenced(_user_channel(user_id), notice, ("SREM", user_id, checked))

    def position(self) -> str:
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(EPOCH_KEY, new_epoch(), nx=True)
                pipe.get(EPOCH_KEY)
                pipe.get(SEQUENCE_KEY)
                _, epoch, seq = pipe.execute()
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return EventId(epoch.decode(), int(seq or 0), int(time.time())).encode().decode()

    def _sequenced(
        self, channel: str, payload: bytes, rights: tuple[str, str, list[str]] | None = None
    ) -> str:
        keys, args = publish_call(
            channel, payload, self._history_size, self._history_max_age, new_epoch(), rights
        )
        try:
            epoch, seq, moment = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return EventId(epoch.decode(), int(seq), int(moment)).encode().decode()

    def close(self) -> None:
        self._redis.close()


def connect(
    url: str | None = None,
    redis_url: str | None = None,
    api_key: str | None = None,
    history_size: int | None = None,
    history_max_age: float | None = None,
) -> Publisher:
    """A publisher for ``redis_url`` if given, else for the service at ``url``.

    ``history_size`` and ``history_max_age`` apply with ``redis_url`` (see
    :class:`RedisPublisher`); the service applies its own otherwise.
    """
    if redis_url:
        return RedisPublisher(redis_url, history_size=history_size, history_max_age=history_max_age)
    return HttpPublisher(url or DEFAULT_URL, api_key=api_key)
