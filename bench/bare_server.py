"""The least a Python server can do per stream: the floor under S4 for Sisyphus's stack.

    python bench/bare_server.py PORT

uvloop and httptools, as Sisyphus uses them: each connection's request is parsed and
answered with a constant SSE head and `ok` event, then the server waits for the client
to close. No identification, rights, hub or broker. `native_check.py` churns it with
the C client to show what a connect-`ok`-close cycle costs before any of Sisyphus's
own work.
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    b"id: 0-0-0\ndata: <message><status>ok</status></message>\n\n"
)


class BareStream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        BareStream, "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="The least a Python server can do per SSE stream (uvloop + httptools, "
        "a constant head and `ok` event, no Sisyphus): the floor under S4."
    )
    parser.add_argument("port", metavar="PORT", type=int, help="port to listen on, 127.0.0.1")
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
