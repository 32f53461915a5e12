"""The thin asyncio adapter: connections, streams, the publish API, lifecycle.

``connection.py`` turns socket bytes into requests and routes them;
``streams.py`` opens, refreshes and ends event streams; ``api.py`` serves
publish/grant/revoke; ``app.py`` wires broker, hub and server and runs them.
"""
