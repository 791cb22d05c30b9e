"""Database helpers shared by commands and background jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote, urlencode

from django.db import IntegrityError, connection, transaction
from psycopg import errors

T = TypeVar("T")


def connection_url() -> str:
    """A postgres:// URL for the database this process is connected to (for child
    processes and for tools that speak psycopg directly, such as the benchmarks).

    The embedded server listens on a Unix socket whose folder may hold capitals, which
    a URL's host part would lower-case, so a socket folder goes in the `host` option.
    """
    params = connection.get_connection_params()
    user = quote(params.get("user") or "", safe="")
    password = params.get("password")
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = str(params.get("host") or "")
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["host"] = host
        host = ""
    port = params.get("port")
    netloc = f"{auth}{host}{f':{port}' if port and host else ''}"
    if port and not host:
        query["port"] = str(port)
    url = f"postgresql://{netloc}/{quote(params['dbname'], safe='')}"
    return f"{url}?{urlencode(query)}" if query else url


def write_while_targets_exist(write: Callable[[], T], *, attempts: int = 3) -> T:
    """Run `write()` in a transaction of its own, again if its commit fails because a
    concurrent transaction deleted a row it points at.

    Background jobs (triage, embedding) read a study's images, spend seconds on them and
    then store what they found; an image deleted meanwhile would fail the foreign key
    check at commit (Django's keys are checked then). `write` is expected to keep only
    the rows whose targets still exist, read again on every attempt. Inside a caller's
    transaction the check waits for the caller's commit, so it runs once.
    """
    for attempt in range(1, attempts + 1):
        try:
            with transaction.atomic():
                return write()
        except IntegrityError as exc:
            lost_target = isinstance(exc.__cause__, errors.ForeignKeyViolation)
            if not lost_target or attempt == attempts or connection.in_atomic_block:
                raise
    raise AssertionError("unreachable")
