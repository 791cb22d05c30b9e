"""Database helpers shared by commands."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from django.db import connection


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
