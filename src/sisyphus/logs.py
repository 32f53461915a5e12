"""Log output: text lines for people (the default) or one JSON object per line.

A JSON line has stable field names: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``event`` (what happened, without its values), ``message`` (the text line's
message), then the event's own fields: ``user``, ``reason``, ``peer``, counts such
as ``streams`` or ``channels``, and ``exception`` with a traceback. Fields come from
``extra={...}`` at the call site, or from the ``name=%s`` pairs of the message
template (``log.info("slow client cut user=%s", ...)`` gives ``user``).

Whatever a call site passes, tokens, keys and cookies never reach the output:
both formats scrub JWTs, ``Bearer`` credentials, ``token=``/``secret=``-style pairs
and URL passwords from every line.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("text", "json")

_SCRUB = (
    # A JWT (three base64url parts, the first a JSON header): whoever holds it may listen.
    (re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*"), "***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s,;\"']+"), r"\1 ***"),
    (
        re.compile(
            # \w*token: token, access_token, id_token, refresh_token, a cookie's name...
            r"(?i)\b(\w*token|api[_-]?key|secret|password|cookie|authorization)"
            r"([=:]\s*)[^\s&;,\"']+"
        ),
        r"\1\2***",
    ),
    # Credentials in a URL: up to its last "@" (a password may hold "@", "/", "?", "#").
    (re.compile(r"://\S*@"), "://***@"),
)

# The names a LogRecord carries by itself; every other attribute came from ``extra``.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "event"}
_PLACEHOLDER = re.compile(r"(?:(\w+)=)?%(?:%|[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGa])")


def scrub(text: str) -> str:
    """``text`` with every credential-looking value replaced by ``***``."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return text


class TextFormatter(logging.Formatter):
    """The default format, scrubbed."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, scrubbed; see the module's docstring for the fields."""

    def format(self, record: logging.LogRecord) -> str:
        template = record.msg if isinstance(record.msg, str) else str(record.msg)
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or _event(template),
            "message": record.getMessage(),
        }
        out.update(_template_fields(template, record.args))
        for name, value in record.__dict__.items():
            if name not in _RESERVED and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return scrub(json.dumps(out, default=str, ensure_ascii=False))


def _event(template: str) -> str:
    """The template without its values: ``slow client cut user=%s`` -> ``slow client cut``."""
    text = _PLACEHOLDER.sub("", template)
    return " ".join(text.split()).rstrip(":;,. ") or "log"


def _template_fields(template: str, args: Any) -> dict[str, Any]:
    """The ``name=%s`` pairs of ``template``, filled from ``args``."""
    if not isinstance(args, tuple) or not args:
        return {}
    fields: dict[str, Any] = {}
    index = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.group(0).endswith("%%"):
            continue
        name = match.group(1)
        if name and index < len(args):
            fields[name] = args[index]
        index += 1
    return fields


def configure(level: str, format: str = "text", stream: TextIO | None = None) -> None:
    """Send the process's logs to ``stream`` (standard error) in ``format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
