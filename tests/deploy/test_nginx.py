"""Sisyphus behind a real nginx run from deploy/nginx/sisyphus.conf (TLS, HTTP/2)."""

from __future__ import annotations

import re
import signal

from sisyphus.client import RedisPublisher
from tests.deploy.conftest import NginxFactory, ServeFactory, token
from tests.support.nginx import CONFIG, curl, curl_stream
from tests.support.redis_server import free_port
from tests.support.sse_client import status


async def test_streams_and_resumes_through_nginx_over_http2(
    serve: ServeFactory, make_nginx: NginxFactory, publisher: RedisPublisher
) -> None:
    """A browser gets its stream through nginx over HTTP/2, and resumes by id after a cut."""
    served = await serve()
    nginx = make_nginx([served.port])
    publisher.grant("7", ["room:1"])
    url = f"{nginx.url}/?token={token('7')}"
    client = await curl_stream(url)
    assert client.status_code == 200
    assert client.protocol == "HTTP/2"  # type: ignore[attr-defined]
    assert client.headers["content-type"] == "text/event-stream"
    assert (await client.expect()).data == status("ok")
    for n in range(3):
        publisher.publish("room:1", f"first {n}")
    got = [await client.next_message() for _ in range(3)]
    assert [e.data for e in got] == ["first 0", "first 1", "first 2"]
    await client.close()
    for n in range(2):
        publisher.publish("room:1", f"missed {n}")
    last = got[-1].id
    resumed = await curl_stream(url, f"Last-Event-ID: {last}")
    assert (await resumed.expect()).data == status("ok")
    missed = [await resumed.next_message() for _ in range(2)]
    assert [e.data for e in missed] == ["missed 0", "missed 1"]
    publisher.publish("room:1", "live")
    assert (await resumed.next_message()).data == "live"


async def test_nginx_answers_200_with_retry_while_sisyphus_is_down(
    make_nginx: NginxFactory,
) -> None:
    """With Sisyphus down, a stream through nginx gets 200, `error` and a retry: hint, never a
    502 that would make EventSource give up; the hint is jittered and carries no id."""
    nginx = make_nginx([free_port()])
    retries = set()
    for flavour in ("", "&format=json"):
        for _ in range(8):
            client = await curl_stream(f"{nginx.url}/?token={token('7')}{flavour}")
            assert client.status_code == 200
            assert client.headers["content-type"] == "text/event-stream"
            events = await client.until_closed()
            assert len(events) == 1
            assert events[0].id is None  # the browser keeps its Last-Event-ID
            if flavour:
                assert events[0].event == "status"
                assert events[0].data == '{"status":"error","reason":"unavailable"}'
            else:
                assert events[0].data == status("error")
            assert events[0].retry is not None and 2000 <= events[0].retry < 4000
            retries.add(events[0].retry)
    assert len(retries) > 1


async def test_no_token_reaches_any_nginx_log_after_upstream_failures(
    serve: ServeFactory, make_nginx: NginxFactory, publisher: RedisPublisher
) -> None:
    """Refused, reset and cut upstreams leave their trace in nginx's logs, but no token."""
    port = free_port()
    nginx = make_nginx([port])
    publisher.grant("7", ["room:1"])
    secret_token = token("7")
    url = f"{nginx.url}/?token={secret_token}"
    down = await curl_stream(url)  # refused: Sisyphus is not running
    await down.until_closed()
    served = await serve(port=port)
    client = await curl_stream(url)
    assert (await client.expect()).data == status("ok")
    served.process.send_signal(signal.SIGKILL)  # the upstream dies mid-stream
    await client.until_closed(timeout=10)
    await served.process.wait()
    for target in (f"/api/publish?token={secret_token}", f"/nowhere?token={secret_token}"):
        await curl(f"{nginx.url}{target}")
    await curl("--http1.1", f"{nginx.url}/?token={secret_token}")
    nginx.stop()  # every log written and closed
    logs = nginx.log_text()
    assert secret_token not in logs
    assert "token=" not in logs
    assert "upstream_status=502" in logs  # the failures are still there to see
    assert '"GET / HTTP/2.0" 200' in logs


async def test_health_endpoints_metrics_and_api_through_nginx(
    serve: ServeFactory, make_nginx: NginxFactory
) -> None:
    """/readyz, /healthz and /sisyphus.js pass (ready while any process is), /metrics and
    /demo are hidden, and the API and health endpoints refuse outside addresses."""
    served = await serve()
    nginx = make_nginx([free_port(), served.port])  # one process down, one up
    for _ in range(4):
        assert await curl(f"{nginx.url}/readyz") == (200, '{"status": "ready"}')
        assert await curl(f"{nginx.url}/healthz") == (200, '{"status": "alive"}')
    code, _ = await curl(f"{nginx.url}/metrics")
    assert code == 404
    code, body = await curl(f"{nginx.url}/sisyphus.js")
    assert code == 200 and "export function connect" in body, (code, body[:200])
    code, _ = await curl(f"{nginx.url}/demo")
    assert code == 404
    code, body = await curl(f"{nginx.url}/api/position")
    assert "nginx" not in body and "error" in body, (code, body)  # Sisyphus answered
    for path in ("/api/position", "/readyz", "/healthz"):
        code, body = await curl("--interface", "127.0.0.2", f"{nginx.url}{path}")
        assert code == 403, path
        assert "nginx" in body


def test_security_doc_quotes_the_tested_configuration() -> None:
    """The nginx lines docs/security.md shows are the ones the tests run (comments aside)."""
    doc = (CONFIG.parent.parent.parent / "docs" / "security.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", doc, re.DOTALL)
    assert blocks
    for block in blocks:
        assert _directives(block) in _directives(CONFIG.read_text())


def _directives(text: str) -> str:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)
