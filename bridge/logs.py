"""Logging: plain or JSON lines, each with the context of the work it is about, and no content.

The context (the portal room, the connector, the inbox or outbox item, the homeserver
transaction, the HTTP request) is set with ``log_context`` where an item or a request is taken
in hand, and rides along in a ``contextvars`` variable: every record logged meanwhile, by the
bridge or by the libraries it calls, carries it (JSON: top-level keys; text: a ``[...]`` suffix).

Log calls never carry message content, tokens or secrets: they name ids, types and error
classes. What libraries might log is kept out too: mautrix's request lines (whose text quotes
the request body) lose the body here, whatever their logger's level, and the aiohttp access log
(whose request lines hold query strings) stays off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TextIO

_CONTEXT: ContextVar[Mapping[str, object]] = ContextVar(
    "eimis_log_context", default=MappingProxyType({})
)
CONTEXT_ATTR = "eimis_context"
"""The record attribute holding the context it was logged in."""


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Records logged inside the block carry ``fields`` (None values are left out)."""
    added = {key: value for key, value in fields.items() if value is not None}
    token = _CONTEXT.set({**_CONTEXT.get(), **added})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, object]:
    return dict(_CONTEXT.get())


QUIET_BELOW_INFO = ("aiosqlite",)
"""Libraries whose DEBUG lines quote SQL parameters (message content): never written."""


class ContextFilter(logging.Filter):
    """Pins the context to each record (and keeps library lines free of content)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO and record.name.startswith(QUIET_BELOW_INFO):
            return False
        if not hasattr(record, CONTEXT_ATTR):
            setattr(record, CONTEXT_ATTR, current_context())
        _without_request_body(record)
        return True


def _without_request_body(record: logging.LogRecord) -> None:
    """mautrix logs each request as ``req #N: METHOD URL BODY``, the body being the message
    sent: keep the method and path (no query string, no body)."""
    request = getattr(record, "matrix_http_request", None)
    if not isinstance(request, dict):
        return
    url = str(request.get("url", ""))
    path = url.split("?", 1)[0]
    record.msg = f"req #{request.get('req_id')}: {request.get('method')} {path}"
    record.args = ()
    record.matrix_http_request = {
        "req_id": request.get("req_id"),
        "method": request.get("method"),
        "url": path,
        "user": request.get("user"),
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _context_of(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        context = _context_of(record)
        if context:
            line += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        return line


def _context_of(record: logging.LogRecord) -> Mapping[str, object]:
    context = getattr(record, CONTEXT_ATTR, None)
    return context if isinstance(context, Mapping) else _CONTEXT.get()


def make_handler(json_format: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing this bridge's log lines (context, no request bodies)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(
    level: str = "INFO", json_format: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Route every logger (the bridge's and the libraries') to one handler; returns it."""
    handler = make_handler(json_format, stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Its lines hold query strings (an old homeserver may send a token there): off for good.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
