"""In-process fan-out: plain functions that never await.

``subscriber.py`` holds one browser connection's delivery state; ``hub.py``
maps channels to subscribers, counts references, and dispatches each message
by encoding it once and writing the same bytes to every subscriber.
"""
