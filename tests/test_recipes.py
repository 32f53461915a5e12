"""The README's recipes run: each app, through its framework's test client, against a service."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest

from tests.conftest import ServiceFactory
from tests.support.sse_client import SseClient, status

EXAMPLES = Path(__file__).parent.parent / "examples"
SECRET = "recipe-secret-of-at-least-32-bytes!!"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as the framework would (it is not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def visit_fastapi(app: Any) -> str:
    """Join room 918, render its page, then post a message; the page as rendered."""
    from fastapi.testclient import TestClient

    with TestClient(app) as browser:  # runs the lifespan: the publisher opens and closes
        assert browser.post("/rooms/918/join").status_code == 204
        page = browser.get("/rooms/918")
        assert page.status_code == 200
        assert browser.post("/rooms/918/messages", json={"text": "hello"}).status_code == 204
        return page.text


def visit_flask(app: Any) -> str:
    """The same visit through Flask's test client."""
    browser = app.test_client()
    assert browser.post("/rooms/918/join").status_code == 204
    page = browser.get("/rooms/918")
    assert page.status_code == 200
    assert browser.post("/rooms/918/messages", json={"text": "hello"}).status_code == 204
    return str(page.get_data(as_text=True))


@pytest.mark.parametrize(
    ("recipe", "visit"), [("fastapi_app", visit_fastapi), ("flask_app", visit_flask)]
)
async def test_recipe_page_connects_and_misses_nothing_published_after_render(
    make_service: ServiceFactory, recipe: str, visit: Any
) -> None:
    """The rendered snippet's token and position open a stream that gets the later message."""
    service = await make_service(secret=SECRET)
    base = f"http://127.0.0.1:{service.port}"
    app = load(recipe).create_app(base, SECRET)
    page = await asyncio.to_thread(visit, app)
    assert f'import {{ connect }} from "{base}/sisyphus.js";' in page
    found = re.search(r"connect\((\"[^\"]*\"), \{\s*token: (\"[^\"]*\"),", page)
    assert found is not None, page
    stream_url, token = json.loads(found.group(1)), json.loads(found.group(2))
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "42"
    query = urlsplit(stream_url).query
    assert query.startswith("lastEventId=")
    client = await SseClient.open(service.port, f"{query}&token={token}")
    assert (await client.expect()).data == status("ok")
    assert (await client.next_message()).data == "hello"
