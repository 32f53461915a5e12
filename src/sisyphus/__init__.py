"""Sisyphus: push notifications to browsers over Server-Sent Events.

The package a main application imports is :mod:`sisyphus.client`; the service
itself starts with ``sisyphus serve`` (see :mod:`sisyphus.cli`).
"""

__version__ = "0.1.0"
