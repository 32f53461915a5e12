"""`sisyphus serve --workers N`: real worker processes on one port under the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sisyphus.client import RedisPublisher
from tests.conftest import publish
from tests.support.metrics import samples
from tests.support.redis_server import RedisServer, free_port
from tests.support.sse_client import SseClient, status
from tests.test_cli import SISYPHUS, run_cli

# Generous: the machine has 2 cores, and other suites may be running on it.
TIMEOUT = 60.0


class Workers:
    """A supervisor process; its stderr (and its workers') is read all along into ``log``."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log = b""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log += line

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), TIMEOUT)
            except TimeoutError:
                self.process.kill()  # its workers get SIGTERM from the kernel (PDEATHSIG)
                await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 10)


StartWorkers = Callable[..., Awaitable[Workers]]


@pytest.fixture
async def start_workers(
    redis_server: RedisServer, redis_client: object
) -> AsyncIterator[StartWorkers]:
    """Start `sisyphus serve --workers N` on the test Redis; stop it after the test."""
    started: list[Workers] = []

    async def start(*args: str, count: int = 2, env: dict[str, str] | None = None) -> Workers:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            *SISYPHUS, "serve", "--workers", str(count), "--redis", redis_server.url,
            "--port", str(port), "--keepalive", "0.5", *args,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        workers = Workers(process, port)
        started.append(workers)
        await until(
            lambda: b"workers listening on" in workers.log or process.returncode is not None,
            "the supervisor's line that every worker listens",
        )
        assert process.returncode is None, workers.log.decode()
        return workers

    yield start
    await asyncio.gather(*(workers.stop() for workers in started))


async def until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def get(port: int, path: str) -> tuple[int, str]:
    """One GET on a new connection (so the kernel may hand it to either worker)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def scrape(port: int) -> dict[str, float]:
    code, text = await asyncio.to_thread(get, port, "/metrics")
    assert code == 200
    return samples(text)


def streams_by_pid(seen: dict[str, float]) -> dict[int, float]:
    """``sisyphus_streams`` per worker, from its ``pid`` label."""
    prefix = 'sisyphus_streams{pid="'
    return {int(k[len(prefix) : -2]): v for k, v in seen.items() if k.startswith(prefix)}


async def streams_on_both(port: int, total: int) -> dict[int, float]:
    """Scrape until every one of ``total`` streams is counted; the count per worker."""
    found: dict[int, float] = {}

    async def counted() -> bool:
        found.clear()
        found.update(streams_by_pid(await scrape(port)))
        return sum(found.values()) == total

    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not await counted():
        assert loop.time() < deadline, f"streams never added up to {total}: {found}"
        await asyncio.sleep(0.1)
    assert len(found) == 2, found
    assert all(count > 0 for count in found.values()), f"one worker got every stream: {found}"
    return found


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def metrics_folder(pid: int) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR the supervisor gave worker ``pid``."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (found,) = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(found.decode())


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def open_streams(port: int, users: list[str]) -> list[SseClient]:
    clients = []
    for user in users:
        client = await SseClient.open(port, f"user={user}", timeout=TIMEOUT)
        assert (await client.expect(timeout=TIMEOUT)).data == status("ok")
        clients.append(client)
    return clients


async def test_streams_on_both_workers_receive_every_message(
    start_workers: StartWorkers, publisher: RedisPublisher
) -> None:
    """Streams spread over two workers each get every message once, in order, whichever
    worker took the publish (Redis, or either worker's API)."""
    workers = await start_workers()
    users = [str(n) for n in range(20)]
    for user in users:
        publisher.grant(user, ["room:1"])
    clients = await open_streams(workers.port, users)
    await streams_on_both(workers.port, len(users))
    sent = [f"m{n}" for n in range(6)]
    for text in sent[:3]:
        publisher.publish("room:1", text)
    for text in sent[3:]:  # through the HTTP API: each call lands on either worker
        await publish(workers.port, "room:1", text)
    for client in clients:
        assert [(await client.next_message(timeout=TIMEOUT)).data for _ in sent] == sent


class ResumingClient:
    """What EventSource does: reconnect with the last id it saw, whatever cut the stream."""

    def __init__(self, port: int, user: str) -> None:
        self.port = port
        self.user = user
        self.messages: list[str] = []
        self.opened = 0

    async def run(self) -> None:
        last_id: str | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                client = await SseClient.open(
                    self.port, f"user={self.user}", headers=headers, timeout=TIMEOUT
                )
            except (OSError, EOFError):  # reset: a connect queued at the killed worker
                await asyncio.sleep(0.1)
                continue
            try:
                while (event := await client.next_event(timeout=TIMEOUT)) is not None:
                    if event.data == status("ok"):
                        self.opened += 1
                    elif not event.is_noop and not event.data.startswith("<message>"):
                        self.messages.append(event.data)
            except (OSError, EOFError):  # the killed worker's connections may be reset
                pass
            finally:
                last_id = client.last_event_id or last_id
                await client.close()
            await asyncio.sleep(0.2)


async def test_a_killed_worker_is_replaced_and_its_clients_resume(
    start_workers: StartWorkers, publisher: RedisPublisher
) -> None:
    """SIGKILL one worker under traffic: the supervisor starts a new one (a new pid) and
    the killed worker's clients reconnect with their Last-Event-ID and miss nothing."""
    workers = await start_workers()
    users = [str(n) for n in range(20)]
    for user in users:
        publisher.grant(user, ["room:1"])
    clients = [ResumingClient(workers.port, user) for user in users]
    tasks = [asyncio.create_task(client.run()) for client in clients]
    sent: list[str] = []

    async def publish_for(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            sent.append(f"m{len(sent)}")
            publisher.publish("room:1", sent[-1])
            await asyncio.sleep(0.02)

    try:
        await until(lambda: all(client.opened for client in clients), "every stream opened")
        before = await streams_on_both(workers.port, len(users))
        victim, survivor = sorted(before)
        await publish_for(0.5)
        os.kill(victim, signal.SIGKILL)
        await publish_for(1.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:  # until a scrape shows a new worker in the victim's place
            replaced = set(streams_by_pid(await scrape(workers.port)))
            if len(replaced) == 2 and victim not in replaced:
                break
            assert loop.time() < deadline, f"no new worker: {replaced}"
            await asyncio.sleep(0.1)
        await publish_for(0.5)
        await until(
            lambda: all(len(client.messages) >= len(sent) for client in clients), "delivery"
        )
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    (newcomer,) = replaced - {survivor}
    assert parent_of(newcomer) == workers.process.pid
    assert f"worker pid={victim} killed by SIGKILL; restarting".encode() in workers.log
    for client in clients:
        assert client.messages == sent  # all of them, once each, in order
    # The killed worker's clients came back: more opens than clients.
    assert sum(client.opened for client in clients) >= len(users) + before[victim]


async def test_sigterm_drains_every_worker_and_exits_zero(
    start_workers: StartWorkers, publisher: RedisPublisher
) -> None:
    """SIGTERM to the supervisor: every worker's clients get the drain's reconnect hint,
    the supervisor exits 0 once all have exited, no worker is left, its folder is gone."""
    workers = await start_workers("--shutdown-drain", "0.5")
    publisher.grant("1", ["room:1"])
    clients = await open_streams(workers.port, ["1"] * 20)
    pids = await streams_on_both(workers.port, len(clients))
    (folder,) = {metrics_folder(pid) for pid in pids}  # one folder, shared by both
    assert folder.is_dir()
    workers.process.send_signal(signal.SIGTERM)
    for client in clients:
        events = await client.until_closed(timeout=TIMEOUT)
        assert [e.data for e in events if not e.is_noop] == []
        tail = bytes(client.raw).rsplit(b"\n\n", 2)[-2]
        assert tail.startswith(b": shutting down\nretry: ")
    assert await asyncio.wait_for(workers.process.wait(), TIMEOUT) == 0
    assert not any(is_running(pid) for pid in pids)
    assert not folder.parent.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", workers.port)


async def test_second_signal_stops_every_worker_at_once(
    start_workers: StartWorkers, publisher: RedisPublisher
) -> None:
    """A second SIGTERM while the workers drain slowly is passed on: they stop at once."""
    workers = await start_workers("--shutdown-drain", "120", "--shutdown-timeout", "240")
    publisher.grant("1", ["room:1"])
    clients = await open_streams(workers.port, ["1"] * 20)
    pids = await streams_on_both(workers.port, len(clients))
    workers.process.send_signal(signal.SIGTERM)
    await until(lambda: b"stopping: 2 workers drain" in workers.log, "the stop")
    workers.process.send_signal(signal.SIGTERM)
    # Far less than the drain's 120 s: only a forced stop ends this soon.
    assert await asyncio.wait_for(workers.process.wait(), TIMEOUT) == 0
    assert b"second signal" in workers.log
    assert not any(is_running(pid) for pid in pids)
    for client in clients:
        await client.until_closed(timeout=TIMEOUT)


async def test_metrics_and_probes_answer_for_every_worker(
    start_workers: StartWorkers, publisher: RedisPublisher
) -> None:
    """Whichever worker a scrape lands on, /metrics counts both workers' streams and
    /readyz and /healthz answer 200."""
    workers = await start_workers()
    users = [str(n) for n in range(24)]
    for user in users:
        publisher.grant(user, ["room:1"])
    await open_streams(workers.port, users)
    pids = await streams_on_both(workers.port, len(users))
    for _ in range(10):  # each on a new connection: both workers answer some of them
        seen = await scrape(workers.port)
        assert streams_by_pid(seen) == pids
        assert seen["sisyphus_connections_opened_total"] == len(users)
        assert seen["sisyphus_handshake_duration_seconds_count"] == len(users)
        assert {seen[f'sisyphus_ready{{pid="{pid}"}}'] for pid in pids} == {1.0}
        assert await asyncio.to_thread(get, workers.port, "/readyz") == (
            200,
            '{"status": "ready"}',
        )
        assert (await asyncio.to_thread(get, workers.port, "/healthz"))[0] == 200


async def test_systemd_hears_ready_once_every_worker_listens_then_stopping(
    start_workers: StartWorkers,
) -> None:
    """With NOTIFY_SOCKET, systemd hears the supervisor only: READY=1 once both workers
    listen, STOPPING=1 at the stop; the workers' own notifications stay inside."""
    with tempfile.TemporaryDirectory(prefix="sis-") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
            systemd.bind(path)
            systemd.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            systemd.settimeout(TIMEOUT)
            workers = await start_workers(env={"NOTIFY_SOCKET": path})
            heard = [await asyncio.to_thread(receive, systemd)]
            workers.process.send_signal(signal.SIGTERM)
            heard.append(await asyncio.to_thread(receive, systemd))
            assert await asyncio.wait_for(workers.process.wait(), TIMEOUT) == 0
            systemd.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    heard.append(receive(systemd))
    supervisor = workers.process.pid
    assert heard == [("READY=1", supervisor), ("STOPPING=1", supervisor)]


def receive(sock: socket.socket) -> tuple[str, int]:
    """One notification and the pid of its sender."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    (pid,) = [
        struct.unpack_from("i", payload)[0]  # struct ucred starts with the pid
        for level, kind, payload in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    return data.decode(), pid


async def test_a_worker_that_cannot_listen_stops_the_start(redis_server: RedisServer) -> None:
    """A port another process holds: the worker can't listen, so the supervisor stops the
    other one and exits 1, naming the address, instead of restarting forever."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = await run_cli(
            "serve", "--workers", "2", "--redis", redis_server.url, "--port", str(port)
        )
    assert done.returncode == 1, done.stderr
    assert f"can't listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "before listening; stopping" in done.stderr
