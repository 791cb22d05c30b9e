"""Start (or join) the embedded PostgreSQL server that lives in a data folder."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)
_lock = threading.Lock()
_servers: dict[Path, object] = {}


def ensure_server(pgdata: Path, database: str) -> Path:
    """Make sure a PostgreSQL server runs on `pgdata` and `database` exists.

    Returns the folder that holds the server's Unix socket. Safe to call from many
    threads and processes: pgserver serialises start-up with a lock file and counts the
    processes that use the server, stopping it when the last one exits.
    """
    pgdata = pgdata.resolve()
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
                warnings.simplefilter("ignore")
                import pgserver

                pgdata.parent.mkdir(parents=True, exist_ok=True)
                server = pgserver.get_server(pgdata, cleanup_mode="stop")
            _create_database(server.get_uri("postgres"), database)
            _servers[pgdata] = server
            log.debug("embedded PostgreSQL running on %s", pgdata)
        return Path(server.get_postmaster_info().socket_dir)


def _create_database(uri: str, database: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
