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
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any, Protocol

import redis

from sisyphus.protocol.auth import mint_token
from sisyphus.protocol.names import InvalidName, channels_key, check_channel, check_user_id
from sisyphus.protocol.names import user_channel as _user_channel
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

DEFAULT_URL = "http://127.0.0.1:3001"


class SisyphusClientError(Exception):
    """Publishing or changing rights failed; the message says why."""


class Publisher(Protocol):
    def publish(self, channel: str, data: str | bytes) -> None: ...
    def grant(self, user_id: str, channels: Iterable[str]) -> None: ...
    def revoke(self, user_id: str, channels: Iterable[str]) -> None: ...


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

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's, http(s) only
            self._url + route,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if not request.full_url.startswith(("http://", "https://")):
            raise SisyphusClientError(f"unsupported URL {self._url!r}: use http:// or https://")
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
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

    def publish(self, channel: str, data: str | bytes) -> None:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        self._post("/api/publish", {"channel": channel, "data": text})

    def grant(self, user_id: str, channels: Iterable[str]) -> None:
        self._post("/api/grant", {"user": user_id, "channels": _checked(user_id, channels)})

    def revoke(self, user_id: str, channels: Iterable[str]) -> None:
        self._post("/api/revoke", {"user": user_id, "channels": _checked(user_id, channels)})


class RedisPublisher:
    """Publish and change rights directly in the Redis that Sisyphus reads."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def publish(self, channel: str, data: str | bytes) -> None:
        try:
            check_channel(channel)
        except InvalidName as exc:
            raise SisyphusClientError(str(exc)) from None
        try:
            self._redis.publish(channel, data)
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None

    def grant(self, user_id: str, channels: Iterable[str]) -> None:
        self._rights("granted", user_id, _checked(user_id, channels))

    def revoke(self, user_id: str, channels: Iterable[str]) -> None:
        self._rights("revoked", user_id, _checked(user_id, channels))

    def _rights(self, change: str, user_id: str, channels: list[str]) -> None:
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                if change == "granted":
                    pipe.sadd(channels_key(user_id), *channels)
                else:
                    pipe.srem(channels_key(user_id), *channels)
                pipe.publish(_user_channel(user_id), rights_notice(change, channels))
                pipe.execute()
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None

    def close(self) -> None:
        self._redis.close()


def connect(
    url: str | None = None, redis_url: str | None = None, api_key: str | None = None
) -> Publisher:
    """A publisher for ``redis_url`` if given, else for the service at ``url``."""
    if redis_url:
        return RedisPublisher(redis_url)
    return HttpPublisher(url or DEFAULT_URL, api_key=api_key)
