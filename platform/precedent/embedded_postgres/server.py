"""Start (or join) the embedded PostgreSQL server that lives in a data folder."""

from __future__ import annotations

import logging
import signal
import sys
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
    processes that use the server, stopping it when the last one exits (at interpreter
    exit: so SIGTERM is made an orderly exit here, and processes that died without
    one are struck off the count).
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
            _forget_dead_users(server)
            _exit_cleanly_on_sigterm()
            _create_database(server.get_uri("postgres"), database)
            _servers[pgdata] = server
            log.debug("embedded PostgreSQL running on %s", pgdata)
        return Path(server.get_postmaster_info().socket_dir)


def _create_database(uri: str, database: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')


def _forget_dead_users(server) -> None:
    """Strike processes that no longer exist off pgserver's list of the server's users.

    A process killed outright (SIGKILL, an OOM kill) never removes itself, and while
    its pid is listed no later process is the last one: the server would run forever.
    """
    import psutil

    users = server.global_process_id_list
    with server._lock:
        pids = users.get()
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            users.put(alive)
            log.info("embedded PostgreSQL: %d exited process(es) struck off its users", len(pids) - len(alive))


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd, kill) ends Python without running exit handlers,
    so pgserver would not count this process out. Where nobody handles SIGTERM yet (a
    command, the development server; gunicorn workers have their own handler), make it
    an ordinary exit."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
