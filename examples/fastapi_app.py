"""Recipe: a FastAPI application that lets its users listen to Sisyphus.

    SISYPHUS_URL=http://127.0.0.1:3001 SISYPHUS_SECRET=... uvicorn fastapi_app:app

The page mints the user's token, asks Sisyphus for the position of now and renders
both into the sisyphus.js snippet: the stream then starts where the page was
rendered, so nothing published in between is missed. tests/test_recipes.py runs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from sisyphus.client import DEFAULT_URL, AsyncHttpPublisher, mint_token

PAGE = """<!doctype html>
<title>Room {room}</title>
<ul id="messages"></ul>
<script type="module">
  import {{ connect }} from {script};
  connect({stream}, {{
    token: {token},
    onMessage(data, meta) {{
      const item = document.createElement("li");
      item.textContent = data;
      document.getElementById("messages").append(item);
    }},
  }});
</script>
"""


def js(value: str) -> str:
    """A JavaScript string literal that is safe inside <script>."""
    return json.dumps(value).replace("<", "\\u003c")


class Message(BaseModel):
    text: str


def create_app(
    sisyphus_url: str, secret: str, api_key: str | None = None, public_url: str | None = None
) -> FastAPI:
    """``sisyphus_url`` is how this server reaches Sisyphus, ``public_url`` how browsers do."""
    browser_url = (public_url or sisyphus_url).rstrip("/")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One publisher (one connection pool) for the application's lifetime.
        async with AsyncHttpPublisher(sisyphus_url, api_key=api_key) as publisher:
            app.state.sisyphus = publisher
            yield

    app = FastAPI(lifespan=lifespan)

    def current_user(request: Request) -> str:
        return "42"  # your session's user id

    @app.post("/rooms/{room}/join", status_code=204)
    async def join(room: int, request: Request) -> Response:
        await request.app.state.sisyphus.grant(current_user(request), [f"room:{room}"])
        return Response(status_code=204)

    @app.post("/rooms/{room}/messages", status_code=204)
    async def post_message(room: int, message: Message, request: Request) -> Response:
        await request.app.state.sisyphus.publish(f"room:{room}", message.text)
        return Response(status_code=204)

    @app.get("/rooms/{room}", response_class=HTMLResponse)
    async def page(room: int, request: Request) -> str:
        token = mint_token(secret, current_user(request), ttl=3600)
        position = await request.app.state.sisyphus.position()
        return PAGE.format(
            room=room,
            script=js(f"{browser_url}/sisyphus.js"),
            stream=js(f"{browser_url}/?lastEventId={position}"),
            token=js(token),
        )

    return app


app = create_app(
    os.environ.get("SISYPHUS_URL", DEFAULT_URL),
    os.environ.get("SISYPHUS_SECRET", ""),
    os.environ.get("SISYPHUS_API_KEY"),
    os.environ.get("SISYPHUS_PUBLIC_URL"),
)
