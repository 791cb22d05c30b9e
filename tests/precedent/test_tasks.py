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


@pytest.mark.django_db(transaction=True)
def test_celery_sends_the_job_to_the_broker(settings):
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
    tasks.enqueue("tests.record", n=4)
    message = client.lpop("celery")
    assert message is not None and b"precedent.run_job" in message and b"tests.record" in message
    assert ran == []  # a worker process would run it, not this one
    # What that worker runs is the same function:
    app.tasks["precedent.run_job"]("tests.record", {"n": 4})
    assert ran == [{"n": 4}]
    client.flushdb()
