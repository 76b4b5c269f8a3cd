"""The logging pieces that keep logs free of content and secrets: the log context, the JSON and
text formatters, the filter that strips library request lines. The full exchange searched for
leaks: tests/e2e/test_log_hygiene.py."""

from __future__ import annotations

import json
import logging
from typing import Any

from bridge.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    current_context,
    log_context,
)

# --- The pieces ----------------------------------------------------------------------------------


def make_record(
    name: str = "eimis.test", level: int = logging.INFO, **extra: Any
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "Delivery %d done", (7,), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_context_nests_leaves_out_nones_and_ends_with_its_block() -> None:
    assert current_context() == {}
    with log_context(room="!r:hs", connector=None):
        with log_context(outbox=12, connector="vendora"):
            assert current_context() == {"room": "!r:hs", "outbox": 12, "connector": "vendora"}
        assert current_context() == {"room": "!r:hs"}
    assert current_context() == {}


def test_records_carry_their_context_in_json_and_in_text() -> None:
    with log_context(room="!r:hs", outbox=12):
        record = make_record()
        assert ContextFilter().filter(record)
    # Formatted later, out of the block: the record keeps the context it was logged in.
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Delivery 7 done" and entry["level"] == "INFO"
    assert (entry["room"], entry["outbox"]) == ("!r:hs", 12)
    assert TextFormatter().format(record).endswith("Delivery 7 done [room=!r:hs outbox=12]")
    # Context never overwrites what a record is.
    with log_context(level="spoofed", message="spoofed"):
        spoof = make_record()
        ContextFilter().filter(spoof)
    entry = json.loads(JsonFormatter().format(spoof))
    assert (entry["level"], entry["message"]) == ("INFO", "Delivery 7 done")


def test_library_request_lines_lose_their_body_and_query() -> None:
    body = '{"msgtype": "m.text", "body": "CONTENT"}'
    url = "http://hs/_matrix/client/v3/rooms/%21r/send/m.room.message/t1?user_id=@g:hs&ts=1"
    record = logging.LogRecord(
        "eimis.matrix.api.api.@g:hs",
        logging.DEBUG,
        __file__,
        1,
        f"req #3: PUT {url} {body}",
        (),
        None,
    )
    record.matrix_http_request = {"req_id": 3, "method": "PUT", "url": url, "content": body}
    assert ContextFilter().filter(record)
    text = JsonFormatter().format(record)
    assert "CONTENT" not in text and "user_id" not in text
    assert json.loads(text)["message"] == (
        "req #3: PUT http://hs/_matrix/client/v3/rooms/%21r/send/m.room.message/t1"
    )
    assert "content" not in record.matrix_http_request

    # aiosqlite's DEBUG lines quote SQL parameters: never written; its warnings still are.
    assert not ContextFilter().filter(make_record("aiosqlite", logging.DEBUG))
    assert ContextFilter().filter(make_record("aiosqlite", logging.WARNING))
