"""Telling systemd (``Type=notify``) that the service listens, and that it stops.

``systemctl start`` returns once ``READY=1`` arrived (the port listens and a SIGTERM
drains), so a deploy script can start the next process and only then stop the old one
(see docs/operations.md). Without ``NOTIFY_SOCKET`` in the environment (not under
systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("sisyphus")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to systemd; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state, exc)
        return False
    return True
