"""Background jobs: an in-process worker by default, Celery when a broker is configured.

A job is a plain service function registered by name with `@job`. `enqueue(name, ...)`
runs it later, after the current transaction commits, on:

- the in-process worker (default, nothing to start): one daemon thread per process
  that takes jobs from a queue, each with its own database connection;
- Celery, when CELERY_BROKER_URL is set: the job is sent as a task that calls the
  same function in a `celery -A precedent worker` process;
- inline, when PRECEDENT_WORKER=inline (tests, one-off commands): right away, in the
  caller's thread, once the transaction commits.

Jobs must be idempotent (a job can run twice after a crash or a retry) and take only
JSON-serialisable keyword arguments, so that all three runners behave alike.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction

log = logging.getLogger(__name__)

_JOBS: dict[str, Callable[..., Any]] = {}


def job(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a service function as a background job under `name`."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _JOBS[name] = fn
        return fn

    return register


def run_job(name: str, kwargs: dict[str, Any]) -> Any:
    """Run one job now (what every runner finally calls)."""
    try:
        fn = _JOBS[name]
    except KeyError:
        raise LookupError(f"no background job named {name!r}") from None
    return fn(**kwargs)


def enqueue(name: str, **kwargs: Any) -> None:
    """Run job `name` in the background once the current transaction commits."""
    if name not in _JOBS:
        raise LookupError(f"no background job named {name!r}")
    transaction.on_commit(lambda: _dispatch(name, kwargs))


def _dispatch(name: str, kwargs: dict[str, Any]) -> None:
    mode = settings.PRECEDENT_WORKER
    if mode == "inline":
        run_job(name, kwargs)
    elif mode == "celery":
        from precedent.celery import app

        app.send_task("precedent.run_job", args=[name, kwargs])
    else:
        _worker().submit(name, kwargs)


class InProcessWorker:
    """One daemon thread that runs jobs in arrival order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._pending = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="precedent-worker", daemon=True)
        self._thread.start()

    def submit(self, name: str, kwargs: dict[str, Any]) -> None:
        with self._done:
            self._pending += 1
        self._queue.put((name, kwargs))

    @property
    def pending(self) -> int:
        with self._done:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has run (for tests and commands)."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            name, kwargs = self._queue.get()
            close_old_connections()
            try:
                run_job(name, kwargs)
            except Exception:
                # A failed job must not stop the worker; it is logged, and the job's
                # own state (e.g. an instance still without embedding) lets a later
                # `--pending` run pick it up again.
                log.exception("background job %s(%s) failed", name, kwargs)
            finally:
                connection.close()
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()


_worker_lock = threading.Lock()
_worker_instance: InProcessWorker | None = None


def _worker() -> InProcessWorker:
    global _worker_instance
    with _worker_lock:
        if _worker_instance is None:
            _worker_instance = InProcessWorker()
        return _worker_instance


def wait_for_background_jobs(timeout: float | None = None) -> bool:
    """Wait for the in-process worker to drain (no-op for other runners)."""
    return _worker_instance.wait_idle(timeout) if _worker_instance is not None else True


def finish_background_jobs(out=None) -> int:
    """Run what the in-process worker still holds before this process exits; returns
    how many jobs there were.

    manage.py calls it after every command. The worker's thread is a daemon that dies
    with the interpreter, and the embedded PostgreSQL stops when the last process using
    it exits: without this, a command that stored images (ingest, import_dataset,
    encoder activate) would leave their embedding and triage jobs half done, with
    "terminating connection" errors in the log. A second Ctrl-C leaves them to
    `embed --pending` and `triage --pending`.
    """
    worker = _worker_instance
    pending = worker.pending if worker is not None else 0
    if pending:
        print(
            f"finishing {pending} background job(s) (embedding, triage) before exit; "
            "Ctrl-C leaves them to `embed --pending` and `triage --pending`",
            file=out or sys.stderr,
        )
        worker.wait_idle()
    return pending
