"""Recipe: a Flask application that lets its users listen to Sisyphus.

    SISYPHUS_URL=http://127.0.0.1:3001 SISYPHUS_SECRET=... flask --app flask_app run

The page mints the user's token, asks Sisyphus for the position of now and renders
both into the sisyphus.js snippet: the stream then starts where the page was
rendered, so nothing published in between is missed. tests/test_recipes.py runs it.
"""

from __future__ import annotations

import json
import os

from flask import Flask, request

from sisyphus.client import DEFAULT_URL, HttpPublisher, mint_token

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


def create_app(
    sisyphus_url: str, secret: str, api_key: str | None = None, public_url: str | None = None
) -> Flask:
    """``sisyphus_url`` is how this server reaches Sisyphus, ``public_url`` how browsers do."""
    browser_url = (public_url or sisyphus_url).rstrip("/")
    sisyphus = HttpPublisher(sisyphus_url, api_key=api_key)  # stateless: share it
    app = Flask(__name__)

    def current_user() -> str:
        return "42"  # your session's user id

    @app.post("/rooms/<int:room>/join")
    def join(room: int) -> tuple[str, int]:
        sisyphus.grant(current_user(), [f"room:{room}"])
        return "", 204

    @app.post("/rooms/<int:room>/messages")
    def post_message(room: int) -> tuple[str, int]:
        sisyphus.publish(f"room:{room}", request.get_json()["text"])
        return "", 204

    @app.get("/rooms/<int:room>")
    def page(room: int) -> str:
        token = mint_token(secret, current_user(), ttl=3600)
        position = sisyphus.position()
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
