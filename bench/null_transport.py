"""A transport that goes nowhere, for the in-process scripts (hub_dispatch, publish_path,
handshake_path): it counts what would have been written, and says the peer is loopback.
"""

from __future__ import annotations

from typing import Any


class NullTransport:
    __slots__ = ("bytes", "closing", "writes")

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is ever buffered

    def pause_reading(self) -> None:
        pass  # the script feeds requests itself

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True
