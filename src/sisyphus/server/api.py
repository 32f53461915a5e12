"""The publish-and-rights API: ``POST /api/publish``, ``/api/grant``, ``/api/revoke``.

Owns request validation and the API key check. Bodies are JSON:

    publish: {"channel": "room:918", "data": "text or any JSON value"}
    grant:   {"user": "42", "channels": ["room:918"]}
    revoke:  {"user": "42", "channels": ["room:918"]}

and each answers with the event id the message got. ``GET /api/position``
answers the id of "now", for a page to resume its first stream from.

Bodies must be sent as ``Content-Type: application/json`` (415 otherwise): a web
page can't send that type across origins without a preflight, which only listed
origins pass. A request with an ``Origin`` outside the configured list is refused
(403; ``*`` in the list opens streams to every site, not the API), unless it is the
service's own origin (a page it served: the demo). Without a configured key only
loopback clients may call it, and only with a loopback ``Host`` (``localhost``,
``127.x.y.z``, ``[::1]``), so that a page whose domain was re-pointed at 127.0.0.1
(DNS rebinding) can't reach it either.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson

from sisyphus.brokers.base import Broker
from sisyphus.errors import ApiError, BrokerUnavailable
from sisyphus.metrics import Metrics
from sisyphus.protocol import http
from sisyphus.protocol.cors import CorsPolicy
from sisyphus.protocol.names import InvalidName, check_channel, check_user_id
from sisyphus.protocol.resume import EventId
from sisyphus.protocol.rights import rights_notice

ROUTES = ("/api/publish", "/api/grant", "/api/revoke", "/api/position")
MAX_CHANNELS_PER_CALL = 1000
# Deepest nesting of arrays and objects a published ``data`` may have (400 beyond).
MAX_DATA_DEPTH = 100


def _json(
    status: HTTPStatus, body: dict[str, Any] | bytes, keep_alive: bool, headers: http.Headers
) -> bytes:
    encoded = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.response(status, encoded, keep_alive=keep_alive, headers=headers)


@functools.lru_cache(maxsize=4096)  # asked on every API call; parsing the address costs
def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)  # asked on every key-less API call; bounded for hostile Hosts
def is_loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine: localhost, 127.x.y.z or [::1], any port."""
    if host is None:
        return False
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port, version = port[1:], 6
    else:
        name, _, port = host.partition(":")
        version = 4
    if (port and not port.isdigit()) or host.endswith(":"):
        return False
    if version == 4 and name.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.version == version and address.is_loopback


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` is the service's own (a page it served, like ``/demo``).

    Browsers send ``Origin`` on a same-origin ``POST`` too. Another site's page can't
    send an ``Origin`` naming this ``Host``; a page whose domain was re-pointed at
    this machine (DNS rebinding) can, but then its ``Host`` is not a loopback name,
    which the key-less API refuses, and with a key configured it still needs the key.
    """
    if not host:
        return False
    origin = origin.lower()
    host = host.lower()
    return origin in ("http://" + host, "https://" + host)


def too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels deep.

    Walked without recursion: a body can nest about a thousand levels before the JSON
    parser stops it, which is deeper than Python's own recursion allows.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return False


def bearer_token(request: http.Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class Api:
    def __init__(
        self,
        broker: Broker,
        api_key: str | None,
        metrics: Metrics,
        cors: CorsPolicy,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._wall_clock = wall_clock
        self._broker = broker
        self._key = api_key.encode() if api_key else None
        self._metrics = metrics
        self._cors = cors

    def _authorize(self, request: http.Request, peer_host: str | None) -> None:
        if self._key is None:
            if not is_loopback(peer_host):
                raise ApiError(
                    HTTPStatus.FORBIDDEN,
                    "no API key is configured, so only loopback clients may use the API",
                )
            if not is_loopback_host(request.headers.get("host")):
                raise ApiError(
                    HTTPStatus.FORBIDDEN,
                    "no API key is configured, so the Host must be localhost, 127.0.0.1 or [::1]",
                )
            return
        given = bearer_token(request)
        # Constant-time: the comparison must not tell how much of a guess was right.
        # Header values are decoded as latin-1: encoding back gives the bytes that came in.
        if given is None or not hmac.compare_digest(given.encode("latin-1"), self._key):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key")

    async def handle(self, request: http.Request, peer_host: str | None) -> bytes:
        """Answer one API request with a complete response."""
        self._metrics.api_requests += 1
        keep = request.keep_alive
        origin = request.headers.get("origin")
        cors = self._cors.headers(origin)
        method = "GET" if request.path == "/api/position" else "POST"
        if request.method != method:
            self._metrics.api_rejected += 1
            return http.response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                http.error_body(f"use {method}"),
                keep_alive=keep,
                headers=(("Allow", method), *cors),
            )
        result: dict[str, Any] | bytes
        try:
            if (
                origin is not None
                and not self._cors.lists(origin)
                and not same_origin(origin, request.headers.get("host"))
            ):
                # A web page's request: only configured origins, and the service's own
                # pages (the demo), may drive the API.
                raise ApiError(HTTPStatus.FORBIDDEN, "origin not allowed")
            self._authorize(request, peer_host)
            if request.path == "/api/position":
                result = await self._position()
            elif request.path == "/api/publish":
                channel, payload = self._publish_args(self._parse(request))
                event_id = await self._broker.publish(channel, payload)
                # Built without a JSON encoder (the busiest route): channels are printable
                # ASCII and ids need no escaping; only `"` and `\\` in a channel do.
                quoted = channel.encode("ascii")
                if 34 in quoted or 92 in quoted:
                    quoted = orjson.dumps(channel)[1:-1]
                result = b'{"published": true, "channel": "%s", "id": "%s"}' % (
                    quoted,
                    event_id.encode(),
                )
            else:
                result = await self._rights(request.path.rsplit("/", 1)[1], self._parse(request))
        except ApiError as exc:
            self._metrics.api_rejected += 1
            challenge = (("WWW-Authenticate", "Bearer"),) if exc.status == 401 else ()
            return http.response(
                exc.status, http.error_body(str(exc)), keep_alive=keep, headers=challenge + cors
            )
        except BrokerUnavailable as exc:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}, keep, cors)
        return _json(HTTPStatus.OK, result, keep, cors)

    @staticmethod
    def _parse(request: http.Request) -> dict[str, Any]:
        media_type = request.headers.get("content-type", "")
        if (
            media_type != "application/json"
            and media_type.partition(";")[0].strip(" \t").lower() != "application/json"
        ):
            raise ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as Content-Type: application/json"
            )
        try:
            # orjson refuses what isn't valid Unicode (lone surrogates, bad UTF-8) with
            # the same 400: such text could not be sent to a browser as UTF-8 anyway.
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    @staticmethod
    def _publish_args(body: dict[str, Any]) -> tuple[str, bytes]:
        """The channel and payload of a publish body, validated."""
        channel = body.get("channel")
        if not isinstance(channel, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"channel" (a string) is required')
        if "data" not in body:
            raise ApiError(HTTPStatus.BAD_REQUEST, '"data" is required')
        data = body["data"]
        if not isinstance(data, str) and too_deep(data, MAX_DATA_DEPTH):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f'"data" nests deeper than {MAX_DATA_DEPTH} levels'
            )
        # A string is sent as is; any other JSON value as its compact JSON text.
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        try:
            check_channel(channel)
        except InvalidName as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        return channel, text.encode("utf-8")

    async def _position(self) -> dict[str, Any]:
        """The id of "now": a page renders it, and its first stream resumes from there."""
        position = await self._broker.position()
        now = int(self._wall_clock())
        return {"id": EventId(position.epoch, position.seqs, now).encode().decode()}

    async def _rights(self, change: str, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        channels = body.get("channels")
        if not isinstance(user, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"user" (a string) is required')
        if (
            not isinstance(channels, list)
            or not channels
            or not all(isinstance(c, str) for c in channels)
        ):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"channels" must be a non-empty list of strings')
        if len(channels) > MAX_CHANNELS_PER_CALL:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"at most {MAX_CHANNELS_PER_CALL} channels per call"
            )
        try:
            check_user_id(user)
            for channel in channels:
                check_channel(channel)
        except InvalidName as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        if change == "grant":
            event_id = await self._broker.grant(user, channels, rights_notice("granted", channels))
            return {
                "user": user,
                "granted": sorted(set(channels)),
                "id": event_id.encode().decode(),
            }
        event_id = await self._broker.revoke(user, channels, rights_notice("revoked", channels))
        return {"user": user, "revoked": sorted(set(channels)), "id": event_id.encode().decode()}
