"""A real nginx for the tests, run from the project's own configuration file.

The test renders ``deploy/nginx/sisyphus.conf`` with only its listen address,
certificate paths, log folder and upstream addresses replaced, and includes it,
with ``deploy/nginx/sisyphus-main.conf``, in a small wrapper that gives nginx its
own prefix, pid and temporary paths. It runs as a foreground process on a free port.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.redis_server import free_port
from tests.support.sse_client import OPEN_CLIENTS, SseClient

DEPLOY = Path(__file__).parent.parent.parent / "deploy" / "nginx"
CONFIG = DEPLOY / "sisyphus.conf"
MAIN_CONFIG = DEPLOY / "sisyphus-main.conf"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _replace(text: str, pattern: str, replacement: str, count: int = 0) -> str:
    """``re.sub`` that fails loudly when the project's file no longer has the line."""
    result, found = re.subn(pattern, replacement, text, count=count, flags=re.MULTILINE)
    assert found, f"{CONFIG.name} has no line matching {pattern!r}"
    return result


def render(
    listen_port: int, upstream_ports: list[int], cert: Path, key: Path, log_dir: Path
) -> str:
    """The project's configuration with the test's ports, certificate and log folder."""
    text = CONFIG.read_text()
    text = _replace(text, r"^(\s*)listen 443 ", rf"\1listen 127.0.0.1:{listen_port} ")
    text = _replace(text, r"^(\s*ssl_certificate) .*;$", rf"\1 {cert};")
    text = _replace(text, r"^(\s*ssl_certificate_key) .*;$", rf"\1 {key};")
    text = _replace(text, "/var/log/nginx/", f"{log_dir}/")
    servers = "".join(f"server 127.0.0.1:{port} max_fails=0;\n    " for port in upstream_ports)
    text = _replace(text, r"^(\s*)server 127\.0\.0\.1:\d+ max_fails=0;\n\s*", rf"\1{servers}")
    return text


class Nginx:
    """``nginx -g 'daemon off;'`` with its own prefix in a temporary folder."""

    def __init__(self, upstream_ports: list[int]) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        self.binary = binary
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="sisyphus-nginx-")
        self.root = Path(self._dir.name)
        # nginx workers run as another user when the suite runs as root: let them in.
        os.chmod(self.root, 0o755)  # noqa: S103 - a test folder holding no secret but a test key
        self.logs = self.root / "logs"
        self.logs.mkdir()
        cert, key = make_certificate(self.root)
        self.cert = cert
        (self.root / "sisyphus.conf").write_text(
            render(self.port, upstream_ports, cert, key, self.logs)
        )
        temp_paths = "".join(
            f"    {kind}_temp_path {self.root}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (self.root / "nginx.conf").write_text(
            f"daemon off;\n"
            f"worker_processes 1;\n"
            f"pid {self.root}/nginx.pid;\n"
            f"error_log {self.logs}/error.log error;\n"  # Debian's default level
            f"include {MAIN_CONFIG};\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n{temp_paths}"
            f"    access_log {self.logs}/access.log;\n"  # Debian's default log, $request in it
            f"    include {self.root}/sisyphus.conf;\n"
            f"}}\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.root / "nginx.conf"
        command = [
            self.binary,
            "-p",
            str(self.root),
            "-c",
            str(conf),
            "-e",
            f"{self.logs}/error.log",
        ]
        self._process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    _, err = self._process.communicate(timeout=5)
                    raise RuntimeError(f"nginx did not start: {err.decode()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful (worker_shutdown_timeout)
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None

    def log_text(self) -> str:
        """Everything nginx wrote to any log file so far."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.iterdir()))

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class _CurlWriter:
    """What :class:`SseClient` needs of a writer, for a stream read from curl's output."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    def is_closing(self) -> bool:
        return self._process.returncode is not None

    def close(self) -> None:
        if self._process.returncode is None:
            self._process.kill()

    async def wait_closed(self) -> None:
        await self._process.wait()


async def curl_stream(url: str, *headers: str, http2: bool = True) -> SseClient:
    """An event stream through nginx, read by ``curl`` (HTTP/2 over TLS by default)."""
    args = ["curl", "-sN", "-i", "-k", "--http2" if http2 else "--http1.1", url]
    for header in headers:
        args += ["-H", header]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    client = SseClient(process.stdout, cast(asyncio.StreamWriter, _CurlWriter(process)))
    OPEN_CLIENTS.append(client)
    client.head = await asyncio.wait_for(process.stdout.readuntil(b"\r\n\r\n"), 10)
    status_line, *header_lines = client.head.decode("latin-1").split("\r\n")
    client.status_code = int(status_line.split(" ")[1])
    client.protocol = status_line.split(" ")[0]  # type: ignore[attr-defined]
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            client.headers[name.strip().lower()] = value.strip()
    return client


async def curl(*args: str) -> tuple[int, str]:
    """A short request through nginx: (HTTP status, body)."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sk", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code), body
