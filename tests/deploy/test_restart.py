"""Restarts that lose no client: the SO_REUSEPORT hand-over, and a rolling restart behind nginx."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from sisyphus.client import RedisPublisher
from tests.deploy.conftest import NginxFactory, ServeFactory, token
from tests.support.nginx import curl_stream
from tests.support.redis_server import free_port
from tests.support.sse_client import SseClient, status


class Browser:
    """What EventSource does: reconnect after the hinted delay, with the last id it saw."""

    def __init__(self, port: int, user: str) -> None:
        self.port = port
        self.user = user
        self.messages: list[str] = []
        self.failed_connects: list[str] = []
        self.opened = 0

    async def run(self) -> None:
        retry_ms = 1000
        last_id: str | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                client = await SseClient.open(
                    self.port, f"token={token(self.user)}", headers=headers
                )
            except (OSError, EOFError) as exc:  # refused or cut: nginx would answer 502
                self.failed_connects.append(repr(exc))
                await asyncio.sleep(0.1)
                continue
            while (event := await client.next_event(timeout=30)) is not None:
                if event.retry is not None:
                    retry_ms = event.retry
                if event.data == status("ok"):
                    self.opened += 1
                elif not event.is_noop and not event.data.startswith("<message>"):
                    self.messages.append(event.data)
            last_id = client.last_event_id
            # A comment line's retry: (the drain's) counts as well.
            tail = bytes(client.raw).rsplit(b"retry: ", 1)
            if len(tail) == 2:
                retry_ms = int(tail[1].split(b"\n", 1)[0])
            await client.close()
            await asyncio.sleep(retry_ms / 1000)


class Prober:
    """A load balancer's health check, as often as it gets: every failed connect counts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers = 0
        self.failures: list[str] = []

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 10)
            except OSError as exc:  # reset: a connect the kernel had queued for a closed listener
                answer = repr(exc).encode()
            finally:
                writer.close()
            if answer.startswith(b"HTTP/1.1 200 "):
                self.answers += 1
            else:
                self.failures.append(repr(answer[:60]))
            await asyncio.sleep(0.01)


async def test_reuse_port_hand_over_refuses_no_connect_and_loses_no_message(
    serve: ServeFactory, publisher: RedisPublisher
) -> None:
    """A new process takes the port with --reuse-port, then the old one drains: no connect
    is refused, and every client gets every message once, in order."""
    port = free_port()
    old = await serve("--reuse-port", "yes", "--shutdown-drain", "1", port=port)
    users = [str(n) for n in range(20)]
    for user in users:
        publisher.grant(user, ["room:1"])
    browsers = [Browser(port, user) for user in users]
    prober = Prober(port)
    tasks = [asyncio.create_task(b.run()) for b in browsers]
    tasks.append(asyncio.create_task(prober.run()))
    sent: list[str] = []

    async def publish_for(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until:
            sent.append(f"m{len(sent)}")
            publisher.publish("room:1", sent[-1])
            await asyncio.sleep(0.02)

    try:
        await _until(lambda: all(b.opened for b in browsers), "every stream opened")
        await publish_for(0.5)
        new = await serve("--reuse-port", "yes", port=port)
        await publish_for(0.3)
        old.process.send_signal(signal.SIGTERM)
        publishing = asyncio.create_task(publish_for(3))
        assert await asyncio.wait_for(old.process.wait(), 20) == 0
        await publishing
        await _until(lambda: all(len(b.messages) >= len(sent) for b in browsers), "delivery")
        answers_before = prober.answers
        await _until(lambda: prober.answers > answers_before + 10, "the new process answers")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert new.process.returncode is None
    assert prober.failures == []
    for browser in browsers:
        assert browser.failed_connects == []
        assert browser.messages == sent  # all of them, once each, in order
        assert browser.opened >= 2  # it did move to the new process


async def _until(condition: object, what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class ProxiedBrowser:
    """EventSource through nginx (HTTP/2, read by curl): reconnects with its last id."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[str] = []
        self.opened = 0
        self.unavailable = 0  # nginx's own answer: no process took the connect
        self.refused_while_draining = 0

    async def run(self) -> None:
        last_id: str | None = None
        while True:
            headers = [f"Last-Event-ID: {last_id}"] if last_id else []
            client = await curl_stream(self.url, *headers)
            retry_ms = 1000
            while (event := await client.next_event(timeout=30)) is not None:
                if event.retry is not None:
                    retry_ms = event.retry
                if event.data == status("ok"):
                    self.opened += 1
                elif event.data == status("error"):
                    if b"sisyphus unavailable" in client.raw:
                        self.unavailable += 1
                    else:
                        self.refused_while_draining += 1
                elif not event.is_noop:
                    self.messages.append(event.data)
            last_id = client.last_event_id
            tail = bytes(client.raw).rsplit(b"retry: ", 1)
            if len(tail) == 2:
                retry_ms = int(tail[1].split(b"\n", 1)[0])
            await client.close()
            await asyncio.sleep(retry_ms / 1000)


async def test_rolling_restart_behind_nginx_loses_nothing(
    serve: ServeFactory, make_nginx: NginxFactory, publisher: RedisPublisher
) -> None:
    """Two processes behind nginx restarted one at a time: every reconnect finds a process
    (nginx never answers for them), and every client gets every message once, in order."""
    ports = [free_port(), free_port()]
    processes = {port: await serve(port=port) for port in ports}
    nginx = make_nginx(ports)
    users = [f"r{n}" for n in range(10)]
    for user in users:
        publisher.grant(user, ["room:1"])
    browsers = [ProxiedBrowser(f"{nginx.url}/?token={token(user)}") for user in users]
    tasks = [asyncio.create_task(b.run()) for b in browsers]
    sent: list[str] = []
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            sent.append(f"m{len(sent)}")
            publisher.publish("room:1", sent[-1])
            await asyncio.sleep(0.05)

    try:
        await _until(lambda: all(b.opened for b in browsers), "every stream opened")
        tasks.append(asyncio.create_task(publish()))
        for port in ports:
            processes[port].process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(processes[port].process.wait(), 20) == 0
            processes[port] = await serve(port=port)
            await asyncio.sleep(0.5)
        stop.set()
        await _until(lambda: all(len(b.messages) >= len(sent) for b in browsers), "delivery")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for browser in browsers:
        assert browser.unavailable == 0
        assert browser.messages == sent  # all of them, once each, in order
    assert sum(b.opened for b in browsers) > len(browsers)  # restarts moved streams
