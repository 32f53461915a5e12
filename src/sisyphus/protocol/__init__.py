"""Protocol logic without I/O: bytes and values in, bytes and values out.

Nothing in this package imports asyncio, socket or redis, so every rule here
is tested with plain tables of input and expected output.
"""
