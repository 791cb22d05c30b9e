"""Background jobs: an in-process worker by default, Celery when a broker is configured.

A job is a plain service function registered by name with `@job`. `enqueue(name, ...)`
runs it later, after the current transaction commits, on:

- the in-process worker (default, nothing to start): one daemon thread per process
  that takes jobs from a queue, each with its own database connection;
- Celery, when CELERY_BROKER_URL is set: the job is sent as a task that calls the
  same function in a `celery -A precedent worker` process (jobs that merge or settle
  wait in a PostgreSQL row first, see below);
- inline, when PRECEDENT_WORKER=inline (tests, one-off commands): right away, in the
  caller's thread, once the transaction commits.

Jobs must be idempotent (a job can run twice after a crash or a retry) and take only
JSON-serialisable keyword arguments, so that all three runners behave alike.

The in-process worker coalesces what waits in its queue: a job equal to one already
waiting (same name, same arguments) is not queued again, and a job registered with
`merge="ids"` joins its ids to a waiting job of the same name whose other arguments
match. A job registered with `settle` also waits for a quiet spell (no equal job
queued for that many seconds). An ingest of a 200-image series therefore costs one
triage run and a few embedding batches, not 200 of each. A job that has started is
never joined: work that arrives while it runs gets a run of its own.

With Celery the same rules hold across processes: a job that merges or settles is
kept as a `WaitingJob` row (equal jobs join it in one upsert) and one Celery task is
sent for it, which runs it once it is due (re-sending itself while arrivals keep
pushing it back). Jobs without merge or settle go to Celery directly.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction

log = logging.getLogger(__name__)

_JOBS: dict[str, Callable[..., Any]] = {}
_MERGE: dict[str, str] = {}  # job name → the list argument that waiting jobs merge
_SETTLE: dict[str, Callable[[], float]] = {}  # job name → seconds to wait for quiet
MERGE_LIMIT = 256  # most ids one merged job carries (one embedding batch pass)
SETTLE_CAP_FACTOR = 10  # a job that keeps being re-submitted still starts this many settle times in


def job(
    name: str, *, merge: str | None = None, settle: Callable[[], float] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a service function as a background job under `name`.

    `merge` names a list argument (e.g. "instance_ids"): waiting jobs of this name whose
    other arguments are equal are run once with their lists joined. `settle` returns
    seconds (read when a job is queued, so a setting can supply it): the job waits until
    no equal job has been queued for that long, e.g. until a study stops receiving
    images. Celery runs such a job after that many seconds (a countdown).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _JOBS[name] = fn
        for table, value in ((_MERGE, merge), (_SETTLE, settle)):
            if value:
                table[name] = value
            else:
                table.pop(name, None)
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

        if name in _MERGE or name in _SETTLE:
            _celery_wait(name, kwargs)
        else:
            app.send_task("precedent.run_job", args=[name, kwargs])
    else:
        _worker().submit(name, kwargs)


@dataclass
class _Waiting:
    """A job in the in-process queue, not started yet (so others may join it)."""

    name: str
    kwargs: dict[str, Any]
    key: str
    due: float  # time.monotonic() at which it may start
    latest: float  # settling never pushes `due` past this


def _coalesce_key(name: str, kwargs: dict[str, Any]) -> str:
    """Jobs with equal keys are one job while they wait (the merged list left out)."""
    merged = _MERGE.get(name)
    rest = {k: v for k, v in kwargs.items() if k != merged}
    return name + json.dumps(rest, sort_keys=True, default=str)


# --- Celery: waiting jobs in PostgreSQL -------------------------------------------------

_JOIN_SQL = """
INSERT INTO precedent_waitingjob (key, name, kwargs, ids, due, latest)
VALUES (%(key)s, %(name)s, %(kwargs)s::jsonb, %(ids)s::bigint[],
        now() + make_interval(secs => %(settle)s), now() + make_interval(secs => %(cap)s))
ON CONFLICT (key) WHERE claimed_at IS NULL DO UPDATE SET
    ids = ARRAY(SELECT DISTINCT unnest(precedent_waitingjob.ids || EXCLUDED.ids) ORDER BY 1),
    due = LEAST(EXCLUDED.due, precedent_waitingjob.latest)
RETURNING id, (xmax = 0) AS created
"""


def _celery_wait(name: str, kwargs: dict[str, Any]) -> None:
    """Join the open WaitingJob of this key, or open one and send the task that runs it.
    Unlike the in-process queue, a waiting row has no MERGE_LIMIT: a Celery worker runs
    the merged list in one job (embed_pending batches it itself)."""
    from precedent.celery import app

    from .models import WaitingJob

    merged = _MERGE.get(name)
    settle = settle_seconds(name)
    rest = {k: v for k, v in kwargs.items() if k != merged}
    with connection.cursor() as cursor:
        cursor.execute(
            _JOIN_SQL,
            {
                "key": _coalesce_key(name, kwargs),
                "name": name,
                "kwargs": json.dumps(rest),
                "ids": [int(i) for i in kwargs[merged]] if merged else [],
                "settle": settle,
                "cap": settle * SETTLE_CAP_FACTOR,
            },
        )
        job_id, created = cursor.fetchone()
    if created:
        try:
            app.send_task("precedent.run_waiting_job", args=[job_id], countdown=settle or None)
        except BaseException:
            # No task will ever run this row: drop it, so the next equal job opens a new one.
            WaitingJob.objects.filter(pk=job_id, claimed_at__isnull=True).delete()
            raise


def run_waiting_job(job_id: int) -> str:
    """Run a WaitingJob once it is due (Celery's `precedent.run_waiting_job` calls this).

    Returns what happened: "gone" (run by another delivery), "later" (arrivals pushed
    it back: the task is sent again for the new due time) or "ran". A run that a
    worker crash cut short leaves its claimed row, and the redelivered task runs it
    again (jobs are idempotent).
    """
    from django.utils import timezone

    from precedent.celery import app

    from .models import WaitingJob

    with transaction.atomic():
        row = WaitingJob.objects.select_for_update(skip_locked=True).filter(pk=job_id).first()
        if row is None:
            return "gone"
        now = timezone.now()
        if row.claimed_at is None and row.due > now:
            countdown = (row.due - now).total_seconds()
        else:
            countdown = None
            row.claimed_at = now
            row.save(update_fields=["claimed_at"])
    if countdown is not None:
        app.send_task("precedent.run_waiting_job", args=[job_id], countdown=countdown)
        return "later"
    merged = _MERGE.get(row.name)
    run_job(row.name, {**row.kwargs, **({merged: list(row.ids)} if merged else {})})
    WaitingJob.objects.filter(pk=job_id).delete()
    return "ran"


def settle_seconds(name: str) -> float:
    settle = _SETTLE.get(name)
    return float(settle()) if settle is not None else 0.0


class InProcessWorker:
    """One daemon thread that runs jobs in arrival order, coalescing what waits.

    A job registered with `settle` starts only once no equal job has been submitted
    for that many seconds (at most SETTLE_CAP_FACTOR times that after the first), as a
    PACS waits for a study to be stable before routing it.
    """

    def __init__(self) -> None:
        self._queue: dict[int, _Waiting] = {}  # every job not started, in submission order
        self._open: dict[str, _Waiting] = {}  # those that equal jobs may still join, by key
        self._serial = 0
        self._pending = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="precedent-worker", daemon=True)
        self._thread.start()

    def submit(self, name: str, kwargs: dict[str, Any]) -> None:
        key = _coalesce_key(name, kwargs)
        merged = _MERGE.get(name)
        settle = settle_seconds(name)
        now = time.monotonic()
        with self._cond:
            waiting = self._open.get(key)
            if waiting is not None:
                if merged is not None:
                    ids = waiting.kwargs[merged]
                    ids.extend(i for i in kwargs[merged] if i not in ids)
                    if len(ids) >= MERGE_LIMIT:
                        del self._open[key]  # full: it runs as it is, the next one starts another
                waiting.due = min(now + settle, waiting.latest)
                self._cond.notify_all()
                return
            kwargs = {k: list(v) if k == merged else v for k, v in kwargs.items()}
            waiting = _Waiting(name, kwargs, key, now + settle, now + settle * SETTLE_CAP_FACTOR)
            self._serial += 1
            self._queue[self._serial] = self._open[key] = waiting
            self._pending += 1
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has run (for tests and commands)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _next(self) -> _Waiting:
        """The first job in submission order that is due, waiting until there is one."""
        with self._cond:
            while True:
                now = time.monotonic()
                for serial, waiting in self._queue.items():
                    if waiting.due <= now:
                        # From here on the job is running: what arrives now queues anew.
                        del self._queue[serial]
                        if self._open.get(waiting.key) is waiting:
                            del self._open[waiting.key]
                        return waiting
                soonest = min((w.due for w in self._queue.values()), default=None)
                self._cond.wait(None if soonest is None else soonest - now)

    def _run(self) -> None:
        while True:
            waiting = self._next()
            close_old_connections()
            try:
                run_job(waiting.name, waiting.kwargs)
            except Exception:
                # A failed job must not stop the worker; it is logged, and the job's
                # own state (e.g. an instance still without embedding) lets a later
                # `--pending` run pick it up again.
                log.exception("background job %s(%s) failed", waiting.name, waiting.kwargs)
            finally:
                with self._cond:
                    self._pending -= 1
                    idle = not self._queue
                    self._cond.notify_all()
                # Keep the connection while jobs queue up (a new PostgreSQL backend per
                # job costs more than most jobs); give it back when nothing waits.
                if idle:
                    connection.close()


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
