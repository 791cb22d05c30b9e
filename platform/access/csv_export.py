"""Audit events as CSV rows (pure: takes events, yields lines)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

COLUMNS = (
    "id",
    "time",
    "user",
    "roles",
    "remote_addr",
    "via",
    "action",
    "target_type",
    "target",
    "outcome",
    "method",
    "path",
    "status",
    "details",
)


def _row(event: Any) -> list[Any]:
    return [
        event.pk,
        event.created_at.isoformat(),
        event.username,
        " ".join(event.roles),
        event.remote_addr,
        event.via,
        event.action,
        event.target_type,
        event.target,
        event.outcome,
        event.method,
        event.path,
        "" if event.status_code is None else event.status_code,
        json.dumps(event.details, sort_keys=True) if event.details else "",
    ]


def _safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas (CSV injection): a user-controlled path or name
    starting with = + - @ would run as a formula when a reviewer opens the file."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_lines(events: Iterable[Any]) -> Iterator[str]:
    """The header line, then one line per event (for streaming)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    yield buffer.getvalue()
    for event in events:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_safe(value) for value in _row(event)])
        yield buffer.getvalue()
