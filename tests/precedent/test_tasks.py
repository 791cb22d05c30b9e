"""Background jobs: the in-process worker and the Celery hand-off run the same functions."""

from __future__ import annotations

import threading

import pytest

from precedent import tasks

ran: list[dict] = []
lock = threading.Lock()


@tasks.job("tests.record")
def record(**kwargs) -> None:
    with lock:
        ran.append(kwargs)


@tasks.job("tests.explode")
def explode() -> None:
    raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def clear():
    ran.clear()


def test_unknown_job_is_refused():
    with pytest.raises(LookupError, match="no background job named 'nope'"):
        tasks.enqueue("nope")


@pytest.mark.django_db(transaction=True)
def test_thread_worker_runs_jobs_after_commit_and_survives_failures(settings, caplog):
    from django.db import transaction

    settings.PRECEDENT_WORKER = "thread"
    with transaction.atomic():
        tasks.enqueue("tests.explode")
        tasks.enqueue("tests.record", n=1)
        assert ran == []  # nothing before the commit
    tasks.enqueue("tests.record", n=2)
    assert tasks.wait_for_background_jobs(timeout=30)
    assert ran == [{"n": 1}, {"n": 2}]
    assert "background job tests.explode({}) failed" in caplog.text


@tasks.job("tests.slow")
def slow(**kwargs) -> None:
    threading.Event().wait(0.5)
    record(**kwargs)


@pytest.mark.django_db(transaction=True)
def test_commands_finish_queued_jobs_before_the_process_exits(settings, capsys):
    settings.PRECEDENT_WORKER = "thread"
    tasks.enqueue("tests.slow", n=4)
    tasks.enqueue("tests.slow", n=5)
    assert tasks.finish_background_jobs() >= 1
    assert ran == [{"n": 4}, {"n": 5}]
    assert "background job(s) (embedding, triage) before exit" in capsys.readouterr().err
    assert tasks.finish_background_jobs() == 0


@pytest.mark.django_db(transaction=True)
def test_inline_runs_in_the_caller(settings):
    settings.PRECEDENT_WORKER = "inline"
    tasks.enqueue("tests.record", n=3)
    assert ran == [{"n": 3}]


@pytest.fixture
def broker(settings):
    """Celery on a real Redis broker (database 15); the test plays the worker."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    from precedent.celery import app

    app.conf.broker_url = "redis://127.0.0.1:6379/15"
    settings.PRECEDENT_WORKER = "celery"
    yield client
    client.flushdb()


@pytest.mark.django_db(transaction=True)
def test_celery_sends_the_job_to_the_broker(broker):
    from precedent.celery import app

    tasks.enqueue("tests.record", n=4)
    message = broker.lpop("celery")
    assert message is not None and b"precedent.run_job" in message and b"tests.record" in message
    assert ran == []  # a worker process would run it, not this one
    # What that worker runs is the same function:
    app.tasks["precedent.run_job"]("tests.record", {"n": 4})
    assert ran == [{"n": 4}]


# --- coalescing in the in-process worker ----------------------------------------------

gate = threading.Event()


@tasks.job("tests.gate")
def wait_at_gate() -> None:
    """Holds the worker so that what is submitted meanwhile waits in its queue."""
    assert gate.wait(30)


@tasks.job("tests.batch", merge="ids")
def batch(*, ids: list[int], kind: str = "a") -> None:
    record(ids=list(ids), kind=kind)


@tasks.job("tests.settle", settle=lambda: 0.4)
def settled(**kwargs) -> None:
    import time

    record(at=time.monotonic(), **kwargs)


@pytest.fixture
def worker():
    gate.clear()
    w = tasks.InProcessWorker()
    yield w
    gate.set()
    assert w.wait_idle(timeout=30)


def test_equal_waiting_jobs_run_once_and_lists_merge(worker):
    worker.submit("tests.gate", {})
    for n in (1, 1, 2, 1):
        worker.submit("tests.record", {"n": n})
    worker.submit("tests.batch", {"ids": [1, 2]})
    worker.submit("tests.batch", {"ids": [2, 3], "kind": "b"})  # other arguments: its own job
    worker.submit("tests.batch", {"ids": [3, 4]})
    assert worker.pending == 1 + 2 + 2
    gate.set()
    assert worker.wait_idle(timeout=30)
    assert ran == [{"n": 1}, {"n": 2}, {"ids": [1, 2, 3, 4], "kind": "a"}, {"ids": [2, 3], "kind": "b"}]


def test_a_running_job_is_not_joined(worker):
    worker.submit("tests.gate", {})
    worker.submit("tests.record", {"n": 1})
    gate.set()
    assert worker.wait_idle(timeout=30)
    gate.clear()
    worker.submit("tests.gate", {})  # started already: this one is a new run
    worker.submit("tests.gate", {})  # waits behind it, joins the waiting one
    worker.submit("tests.record", {"n": 1})
    gate.set()
    assert worker.wait_idle(timeout=30)
    assert ran == [{"n": 1}, {"n": 1}]


def test_merged_lists_stop_at_the_limit(worker, monkeypatch):
    monkeypatch.setattr(tasks, "MERGE_LIMIT", 3)
    worker.submit("tests.gate", {})
    for i in range(5):
        worker.submit("tests.batch", {"ids": [i]})
    gate.set()
    assert worker.wait_idle(timeout=30)
    assert [r["ids"] for r in ran] == [[0, 1, 2], [3, 4]]


def test_a_settling_job_waits_for_quiet(worker):
    import time

    start = time.monotonic()
    gate.set()
    for _ in range(4):  # re-submitted every 0.2 s: each pushes the start 0.4 s on
        worker.submit("tests.settle", {"study": 7})
        time.sleep(0.2)
    assert worker.wait_idle(timeout=30)
    assert len(ran) == 1
    assert ran[0]["at"] - start >= 0.6 + 0.4 - 0.05


def test_embedding_of_new_images_waits_for_the_burst_to_settle(settings) -> None:
    """Stored images are embedded in one batch once arrivals pause, not one job per
    image beside each request (the setting is read when the job is queued)."""
    import embeddings.services  # noqa: F401  (registers the job)

    settings.PRECEDENT_EMBED_SETTLE_SECONDS = 0.25
    assert tasks.settle_seconds("embeddings.embed_instances") == 0.25
    settings.PRECEDENT_EMBED_SETTLE_SECONDS = 0
    assert tasks.settle_seconds("embeddings.embed_instances") == 0


# --- coalescing with Celery: waiting jobs in PostgreSQL --------------------------------


def sent(client) -> list[tuple[str, list, bool]]:
    """(task, args, has a countdown) of every message waiting in the broker, oldest first."""
    import base64
    import json

    out = []
    while (raw := client.rpop("celery")) is not None:
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], args, message["headers"].get("eta") is not None))
    return out


@pytest.mark.django_db(transaction=True)
def test_celery_coalesces_equal_jobs_in_one_waiting_row(broker):
    from precedent.celery import app
    from precedent.models import WaitingJob

    for ids in ([1], [2], [3, 1]):
        tasks.enqueue("tests.batch", ids=ids)
    tasks.enqueue("tests.batch", ids=[9], kind="b")  # other arguments: a job of its own
    first, other = WaitingJob.objects.order_by("pk")
    assert (first.ids, first.kwargs, other.ids, other.kwargs) == ([1, 2, 3], {}, [9], {"kind": "b"})
    # One task per waiting job, not one per enqueue.
    assert sent(broker) == [
        ("precedent.run_waiting_job", [first.pk], False),
        ("precedent.run_waiting_job", [other.pk], False),
    ]
    run = app.tasks["precedent.run_waiting_job"]
    assert run(first.pk) == "ran" and run(other.pk) == "ran"
    assert ran == [{"ids": [1, 2, 3], "kind": "a"}, {"ids": [9], "kind": "b"}]
    assert not WaitingJob.objects.exists()
    assert run(first.pk) == "gone"  # a second delivery of the same task runs nothing
    assert len(ran) == 2


@pytest.mark.django_db(transaction=True)
def test_celery_runs_a_settling_job_once_arrivals_pause(broker):
    import time

    from precedent.models import WaitingJob

    tasks.enqueue("tests.settle", study=7)
    tasks.enqueue("tests.settle", study=7)
    row = WaitingJob.objects.get()
    assert sent(broker) == [("precedent.run_waiting_job", [row.pk], True)]  # after the settle time
    # Delivered early (another arrival pushed it back): it sends itself again for later.
    assert tasks.run_waiting_job(row.pk) == "later" and ran == []
    assert sent(broker) == [("precedent.run_waiting_job", [row.pk], True)]
    time.sleep(0.45)
    assert tasks.run_waiting_job(row.pk) == "ran"
    assert len(ran) == 1 and ran[0]["study"] == 7
    # What arrives after the run started is a new waiting job with a task of its own.
    tasks.enqueue("tests.settle", study=7)
    assert WaitingJob.objects.get().pk != row.pk and len(sent(broker)) == 1


@pytest.mark.django_db(transaction=True)
def test_a_claimed_job_is_run_again_after_a_crash_and_new_arrivals_wait_apart(broker):
    from django.utils import timezone

    from precedent.models import WaitingJob

    tasks.enqueue("tests.batch", ids=[1])
    row = WaitingJob.objects.get()
    # A worker claimed it and died: the redelivered task runs it again.
    WaitingJob.objects.filter(pk=row.pk).update(claimed_at=timezone.now())
    tasks.enqueue("tests.batch", ids=[2])  # the claimed row is not joined
    assert sorted(WaitingJob.objects.values_list("ids", flat=True)) == [[1], [2]]
    sent(broker)
    assert tasks.run_waiting_job(row.pk) == "ran"
    assert ran == [{"ids": [1], "kind": "a"}]


def test_every_model_of_ours_is_in_the_admin():
    """Issue 2: the Django admin covers every model the platform defines."""
    from django.apps import apps
    from django.contrib import admin

    ours = {"precedent", "studies", "embeddings", "triage", "dicomweb", "dimse", "exports", "access"}
    inlined = {inline.model for model_admin in admin.site._registry.values() for inline in model_admin.inlines}
    missing = [
        m._meta.label
        for m in apps.get_models()
        if m._meta.app_label in ours
        and not m._meta.auto_created
        and not admin.site.is_registered(m)
        and m not in inlined
    ]
    assert missing == []


@pytest.mark.django_db(transaction=True)
def test_a_broker_that_refuses_the_task_leaves_no_waiting_row(broker, monkeypatch):
    """A waiting row nobody will run would swallow every equal job after it: when the
    task cannot be sent, the row goes and the error reaches the caller."""
    from kombu.exceptions import OperationalError

    from precedent.celery import app
    from precedent.models import WaitingJob

    def refuse(*args, **kwargs):
        raise OperationalError("broker unreachable")

    monkeypatch.setattr(app, "send_task", refuse)
    with pytest.raises(OperationalError, match="broker unreachable"):
        tasks.enqueue("tests.batch", ids=[1])
    assert not WaitingJob.objects.exists()
    monkeypatch.undo()
    tasks.enqueue("tests.batch", ids=[2])
    assert WaitingJob.objects.get().ids == [2] and len(sent(broker)) == 1
