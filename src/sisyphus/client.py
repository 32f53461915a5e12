"""The helper a main application imports to publish and change rights.

Two ways, one interface (:class:`Publisher`):

* :class:`HttpPublisher` talks to a running Sisyphus (the only way with the
  embedded broker): ``HttpPublisher("http://127.0.0.1:3001", api_key=...)``.
* :class:`RedisPublisher` writes straight to the Redis that Sisyphus reads:
  ``RedisPublisher("redis://localhost:6379/0")``; exactly what a main app doing
  plain ``PUBLISH`` / ``SADD`` / ``SREM`` does, with names validated first.

Both are synchronous (a web request handler calls them) and raise
:class:`SisyphusClientError` with a message saying what went wrong.

:class:`AsyncHttpPublisher` (on httpx2, the ``sisyphus[async]`` extra) and
:class:`AsyncRedisPublisher` (on ``redis.asyncio``) have the same methods as
coroutines, for an asyncio application (FastAPI, Starlette, aiohttp), and raise
the same errors; close them with ``await publisher.aclose()`` or ``async with``.

:func:`mint_token` signs the expiring token a browser connects with:
``mint_token(secret, "42", ttl=3600)``, then ``/?token=<token>``.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel

from sisyphus import config
from sisyphus.brokers import groups
from sisyphus.brokers.lua import (
    CLUSTER_PUBLISH_SCRIPT,
    POSITION_SCRIPT,
    PUBLISH_SCRIPT,
    SINGLE_LAYOUT,
    KeyLayout,
    publish_call,
)
from sisyphus.brokers.memory import new_epoch
from sisyphus.brokers.slots import SlotMap
from sisyphus.brokers.topology import parse_broker_url
from sisyphus.errors import ConfigError
from sisyphus.protocol.auth import mint_token
from sisyphus.protocol.names import InvalidName, channels_key, check_channel, check_user_id
from sisyphus.protocol.names import user_channel as _user_channel
from sisyphus.protocol.resume import EventId, channel_group, history_name
from sisyphus.protocol.rights import rights_notice

if TYPE_CHECKING:
    import httpx2

__all__ = [
    "DEFAULT_URL",
    "AsyncHttpPublisher",
    "AsyncPublisher",
    "AsyncRedisPublisher",
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


class AsyncPublisher(Protocol):
    """:class:`Publisher` for asyncio: each call is a coroutine."""

    async def publish(self, channel: str, data: str | bytes) -> str: ...
    async def grant(self, user_id: str, channels: Iterable[str]) -> str: ...
    async def revoke(self, user_id: str, channels: Iterable[str]) -> str: ...
    async def position(self) -> str: ...
    async def aclose(self) -> None: ...


def _checked(user_id: str, channels: Iterable[str]) -> list[str]:
    try:
        check_user_id(user_id)
        checked = [check_channel(channel) for channel in channels]
    except InvalidName as exc:
        raise SisyphusClientError(str(exc)) from None
    if not checked:
        raise SisyphusClientError("give at least one channel")
    return checked


def _publish_body(channel: str, data: str | bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        # The API carries text (JSON), and a browser's EventSource reads UTF-8 only.
        raise SisyphusClientError(
            f"the message is not UTF-8 text (byte {exc.start}); "
            "publish bytes through RedisPublisher, or encode them (e.g. base64)"
        ) from None
    return {"channel": channel, "data": text}


def _rights_body(user_id: str, channels: Iterable[str]) -> dict[str, Any]:
    return {"user": user_id, "channels": _checked(user_id, channels)}


def _http_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise SisyphusClientError(f"unsupported URL {url!r}: use http:// or https://")
    return url


def _authorization(api_key: str | None) -> str | None:
    """The header's text; http.client sends it as latin-1, so this puts the key's UTF-8
    bytes on the wire, exactly what curl sends for the same key."""
    return None if not api_key else f"Bearer {api_key}".encode().decode("latin-1")


def _api_error(route: str, code: int, body: bytes, reason: str) -> SisyphusClientError:
    with contextlib.suppress(ValueError, AttributeError):  # not a JSON object: the status says
        reason = json.loads(body).get("error", reason)
    return SisyphusClientError(f"{route}: HTTP {code}: {reason}")


def _answer_id(route: str, body: bytes) -> str:
    try:
        return str(json.loads(body)["id"])
    except (ValueError, KeyError, TypeError):
        raise SisyphusClientError(f"{route}: the answer is not JSON") from None


class HttpPublisher:
    """Publish and change rights through a running Sisyphus's HTTP API."""

    def __init__(
        self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 5.0
    ) -> None:
        self._url = url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout

    def _post(self, route: str, body: dict[str, Any] | None) -> str:
        """POST ``body`` (GET without one) to ``route``; the event id answered."""
        url = _http_url(self._url)
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's, http(s) only
            url + route,
            data=None if body is None else json.dumps(body).encode(),
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        authorization = _authorization(self._api_key)
        if authorization is not None:
            request.add_header("Authorization", authorization)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                answer = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise _api_error(route, exc.code, exc.read(), exc.reason) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SisyphusClientError(f"can't reach Sisyphus at {url}: {exc}") from None
        return _answer_id(route, answer)

    def publish(self, channel: str, data: str | bytes) -> str:
        return self._post("/api/publish", _publish_body(channel, data))

    def grant(self, user_id: str, channels: Iterable[str]) -> str:
        return self._post("/api/grant", _rights_body(user_id, channels))

    def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        return self._post("/api/revoke", _rights_body(user_id, channels))

    def position(self) -> str:
        return self._post("/api/position", None)


def _layouts(url: str) -> list[KeyLayout]:
    """One Redis: its one layout. A Cluster: none until its groups are read."""
    return [] if parse_broker_url(url).uses_cluster else [SINGLE_LAYOUT]


def _slot_map(slots: dict[tuple[int, int], dict[str, Any]]) -> SlotMap:
    """redis-py's ``cluster_slots()`` answer as a slot map."""
    ranges = []
    for (start, end), served in slots.items():
        host, port = served["primary"][:2]
        ranges.append((int(start), int(end), (str(host), int(port))))
    return SlotMap.from_ranges(ranges)


def _stored_groups(stored: bytes | None) -> list[KeyLayout]:
    if stored is None:
        raise SisyphusClientError("redis: the cluster's sequence groups vanished while set")
    try:
        return groups.layouts(groups.parse(stored))
    except groups.GroupsError as exc:
        raise SisyphusClientError(f"redis: {exc}") from None


def _position_call(layout: KeyLayout, history_max_age: float) -> tuple[list[str], list[str]]:
    keys = [layout.epoch_key, layout.sequence_key, layout.timeline_key]
    return keys, [new_epoch(), str(int(history_max_age))]


def _grouped_id(answers: list[Any], moment: int) -> str:
    """An id from each group's (epoch, seq, ...) answer, in group order."""
    epochs = [answer[0].decode() for answer in answers]
    seqs = tuple(int(answer[1]) for answer in answers)
    return EventId(history_name(epochs), seqs, moment).encode().decode()


def _connect_redis(url: str, timeout: float) -> redis.Redis:
    """A redis-py client for any broker URL form (with Sentinel: the master it names; on
    a Cluster, a cluster client that routes each command to its slot's primary)."""
    topology = parse_broker_url(url)
    if topology.uses_cluster:
        cluster: Any = redis.cluster.RedisCluster(
            startup_nodes=[
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call, unused-ignore]
                for h, p in topology.cluster_nodes
            ],
            username=topology.params.get("username"),
            password=topology.params.get("password"),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return cast(redis.Redis, cluster)  # the same commands, routed by slot
    if not topology.uses_sentinel:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    # redis-py before 8 has no type hints in its sentinel module; 8 has them.
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(topology.sentinels), socket_timeout=timeout, socket_connect_timeout=timeout
    )
    params = topology.params
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        topology.master_name,
        db=params.get("db", 0),
        username=params.get("username"),
        password=params.get("password"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return master


def _connect_async_redis(
    url: str, timeout: float
) -> tuple[redis.asyncio.Redis, list[redis.asyncio.Redis]]:
    """:func:`_connect_redis` for ``redis.asyncio``; also the sentinel clients to close."""
    topology = parse_broker_url(url)
    if topology.uses_cluster:
        cluster: Any = redis.asyncio.cluster.RedisCluster(
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(h, p) for h, p in topology.cluster_nodes
            ],
            username=topology.params.get("username"),
            password=topology.params.get("password"),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return cast(redis.asyncio.Redis, cluster), []
    if not topology.uses_sentinel:
        plain = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return plain, []
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(topology.sentinels), socket_timeout=timeout, socket_connect_timeout=timeout
    )
    params = topology.params
    master: redis.asyncio.Redis = sentinel.master_for(
        topology.master_name,
        db=params.get("db", 0),
        username=params.get("username"),
        password=params.get("password"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return master, list(sentinel.sentinels)


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
        self._history_size, self._history_max_age = _retention(history_size, history_max_age)
        try:
            self._layouts = _layouts(url)
            self._redis = _connect_redis(url, timeout)
        except (ValueError, redis.RedisError) as exc:
            raise SisyphusClientError(f"invalid Redis URL: {exc}") from None
        self._single = bool(self._layouts)
        body = PUBLISH_SCRIPT if self._single else CLUSTER_PUBLISH_SCRIPT
        self._script = self._redis.register_script(body)
        self._position_script = self._redis.register_script(POSITION_SCRIPT)
        # On a Cluster: each group's latest (epoch, seq, ...) this publisher saw, for the
        # other groups' part of a publish's id (behind the cluster's, never ahead).
        self._known: dict[int, Any] = {}

    def publish(self, channel: str, data: str | bytes) -> str:
        return self._sequenced(_publish_message(channel, data))

    def grant(self, user_id: str, channels: Iterable[str]) -> str:
        return self._sequenced(_rights_message("granted", user_id, channels))

    def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        return self._sequenced(_rights_message("revoked", user_id, channels))

    def position(self) -> str:
        try:
            if not self._single:
                answers = [self._group_position(layout) for layout in self._groups()]
                self._known.update(enumerate(answers))
                return _grouped_id(answers, int(time.time()))
            layout = SINGLE_LAYOUT
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(layout.epoch_key, new_epoch(), nx=True)
                pipe.get(layout.epoch_key)
                pipe.get(layout.sequence_key)
                _, epoch, seq = pipe.execute()
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return _now_id(epoch, seq)

    def _groups(self) -> list[KeyLayout]:
        """The cluster's sequence groups (chosen here if nobody did yet), read once."""
        if not self._layouts:
            cluster: Any = self._redis
            stored = cluster.get(groups.GROUPS_KEY)
            if stored is None:
                tags = groups.initial_tags(_slot_map(cluster.cluster_slots()))
                cluster.set(groups.GROUPS_KEY, groups.encode(tags), nx=True)
                stored = cluster.get(groups.GROUPS_KEY)
            self._layouts = _stored_groups(stored)
        return self._layouts

    def _group_position(self, layout: KeyLayout) -> Any:
        keys, args = _position_call(layout, self._history_max_age)
        return self._position_script(keys=keys, args=args)

    def _sequenced(self, message: _Message) -> str:
        try:
            layouts = self._groups()
            group = channel_group(message[0], len(layouts))
            keys, args, change = _script_call(message, layouts[group], self._history_size,
                                              self._history_max_age)  # fmt: skip
            if change is not None:
                verb, key, channels = change
                (self._redis.sadd if verb == "SADD" else self._redis.srem)(key, *channels)
            answer = self._script(keys=keys, args=args)
            if self._single:
                return _script_id(answer)
            self._known[group] = answer
            for other, layout in enumerate(layouts):
                if other not in self._known:
                    self._known[other] = self._group_position(layout)
        except redis.RedisError as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return _grouped_id([self._known[g] for g in range(len(layouts))], int(answer[2]))

    def close(self) -> None:
        self._redis.close()


# (channel, payload, rights change) as the publish script takes them.
_Message = tuple[str, bytes, tuple[str, str, list[str]] | None]


def _script_call(
    message: _Message, layout: KeyLayout, history_size: int, history_max_age: float
) -> tuple[list[str], list[str | bytes], tuple[str, str, list[str]] | None]:
    """The publish script's KEYS and ARGV, and on a Cluster the set's change to send
    before it (the set is in another slot than the script's keys)."""
    channel, payload, rights = message
    change = None
    if rights is not None and layout is not SINGLE_LAYOUT:
        verb, user_id, channels = rights
        change, rights = (verb, channels_key(user_id), channels), None
    keys, args = publish_call(channel, payload, history_size, history_max_age, new_epoch(),
                              rights, layout)  # fmt: skip
    return keys, args, change


def _retention(history_size: int | None, history_max_age: float | None) -> tuple[int, float]:
    """The retention given, else as the service reads it (its variables, its defaults)."""
    flags = {
        "history_size": None if history_size is None else str(history_size),
        "history_max_age": None if history_max_age is None else str(history_max_age),
    }
    retention = (config.option("history_size"), config.option("history_max_age"))
    try:
        values = config.read(retention, flags)
    except ConfigError as exc:
        raise SisyphusClientError(str(exc)) from None
    return values["history_size"], values["history_max_age"]


def _publish_message(channel: str, data: str | bytes) -> _Message:
    try:
        check_channel(channel)
    except InvalidName as exc:
        raise SisyphusClientError(str(exc)) from None
    return channel, data.encode() if isinstance(data, str) else data, None


def _rights_message(change: str, user_id: str, channels: Iterable[str]) -> _Message:
    checked = _checked(user_id, channels)
    command = "SADD" if change == "granted" else "SREM"
    return _user_channel(user_id), rights_notice(change, checked), (command, user_id, checked)


def _script_id(answer: Any) -> str:
    epoch, seq, moment = answer
    return EventId(epoch.decode(), (int(seq),), int(moment)).encode().decode()


def _now_id(epoch: bytes, seq: bytes | None) -> str:
    return EventId(epoch.decode(), (int(seq or 0),), int(time.time())).encode().decode()


class _AsyncClosing:
    """``async with`` for the async helpers: ``aclose()`` at the end."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncHttpPublisher(_AsyncClosing):
    """:class:`HttpPublisher` for asyncio, on an ``httpx2.AsyncClient`` (``sisyphus[async]``).

    One client (one connection pool) per publisher: create it once, at the
    application's start-up, and ``await aclose()`` at its shutdown.
    """

    def __init__(
        self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 5.0
    ) -> None:
        try:
            import httpx2
        except ImportError:  # pragma: no cover - the test extra installs it
            raise SisyphusClientError(
                "AsyncHttpPublisher needs httpx2: pip install 'sisyphus[async]'"
            ) from None
        self._httpx = httpx2
        self._url = url.rstrip("/")
        authorization = _authorization(api_key)
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        self._client: httpx2.AsyncClient = httpx2.AsyncClient(
            timeout=timeout,
            # latin-1 text that is the key's UTF-8 bytes, as HttpPublisher sends it.
            headers={name.encode(): value.encode("latin-1") for name, value in headers.items()},
        )

    async def _post(self, route: str, body: dict[str, Any] | None) -> str:
        url = _http_url(self._url)
        try:
            response = await self._client.request(
                "GET" if body is None else "POST",
                url + route,
                content=None if body is None else json.dumps(body).encode(),
            )
        except self._httpx.HTTPError as exc:
            raise SisyphusClientError(f"can't reach Sisyphus at {url}: {exc}") from None
        if response.status_code >= 400:
            raise _api_error(route, response.status_code, response.content, response.reason_phrase)
        return _answer_id(route, response.content)

    async def publish(self, channel: str, data: str | bytes) -> str:
        return await self._post("/api/publish", _publish_body(channel, data))

    async def grant(self, user_id: str, channels: Iterable[str]) -> str:
        return await self._post("/api/grant", _rights_body(user_id, channels))

    async def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        return await self._post("/api/revoke", _rights_body(user_id, channels))

    async def position(self) -> str:
        return await self._post("/api/position", None)

    async def aclose(self) -> None:
        await self._client.aclose()


class AsyncRedisPublisher(_AsyncClosing):
    """:class:`RedisPublisher` for asyncio, on ``redis.asyncio`` (same script, same retention)."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        history_size: int | None = None,
        history_max_age: float | None = None,
    ) -> None:
        self._history_size, self._history_max_age = _retention(history_size, history_max_age)
        try:
            self._layouts = _layouts(url)
            self._redis, self._sentinels = _connect_async_redis(url, timeout)
        except (ValueError, redis.RedisError) as exc:
            raise SisyphusClientError(f"invalid Redis URL: {exc}") from None
        self._single = bool(self._layouts)
        body = PUBLISH_SCRIPT if self._single else CLUSTER_PUBLISH_SCRIPT
        self._script = self._redis.register_script(body)
        self._position_script = self._redis.register_script(POSITION_SCRIPT)
        # On a Cluster: each group's latest (epoch, seq, ...) this publisher saw, for the
        # other groups' part of a publish's id (behind the cluster's, never ahead).
        self._known: dict[int, Any] = {}

    async def publish(self, channel: str, data: str | bytes) -> str:
        return await self._sequenced(_publish_message(channel, data))

    async def grant(self, user_id: str, channels: Iterable[str]) -> str:
        return await self._sequenced(_rights_message("granted", user_id, channels))

    async def revoke(self, user_id: str, channels: Iterable[str]) -> str:
        return await self._sequenced(_rights_message("revoked", user_id, channels))

    async def position(self) -> str:
        try:
            if not self._single:
                layouts = await self._groups()
                answers = [await self._group_position(layout) for layout in layouts]
                self._known.update(enumerate(answers))
                return _grouped_id(answers, int(time.time()))
            layout = SINGLE_LAYOUT
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(layout.epoch_key, new_epoch(), nx=True)
                pipe.get(layout.epoch_key)
                pipe.get(layout.sequence_key)
                _, epoch, seq = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return _now_id(epoch, seq)

    async def _groups(self) -> list[KeyLayout]:
        """As :meth:`RedisPublisher._groups`."""
        if not self._layouts:
            cluster: Any = self._redis
            stored = await cluster.get(groups.GROUPS_KEY)
            if stored is None:
                tags = groups.initial_tags(_slot_map(await cluster.cluster_slots()))
                await cluster.set(groups.GROUPS_KEY, groups.encode(tags), nx=True)
                stored = await cluster.get(groups.GROUPS_KEY)
            self._layouts = _stored_groups(stored)
        return self._layouts

    async def _group_position(self, layout: KeyLayout) -> Any:
        keys, args = _position_call(layout, self._history_max_age)
        return await self._position_script(keys=keys, args=args)

    async def _sequenced(self, message: _Message) -> str:
        try:
            layouts = await self._groups()
            group = channel_group(message[0], len(layouts))
            keys, args, change = _script_call(message, layouts[group], self._history_size,
                                              self._history_max_age)  # fmt: skip
            if change is not None:
                verb, key, channels = change
                await (self._redis.sadd if verb == "SADD" else self._redis.srem)(key, *channels)
            answer = await self._script(keys=keys, args=args)
            if self._single:
                return _script_id(answer)
            self._known[group] = answer
            for other, layout in enumerate(layouts):
                if other not in self._known:
                    self._known[other] = await self._group_position(layout)
        except (redis.RedisError, OSError) as exc:
            raise SisyphusClientError(f"redis: {exc}") from None
        return _grouped_id([self._known[g] for g in range(len(layouts))], int(answer[2]))

    async def aclose(self) -> None:
        await self._redis.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


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
