"""Commands that store or re-triage many studies keep the per-study log lines out of
their output unless asked (-v 2): `precedent.commands.quiet_per_item_logs`."""

from __future__ import annotations

import io
import logging

import pytest
from django.core.management import load_command_class

from precedent.commands import PER_ITEM_LOGGERS, per_item_logs, quiet_per_item_logs

# Every command that ingests, imports or (re)triages studies, directly or through the
# background jobs its ingest starts.
MANY_STUDIES = {
    "studies": ["ingest", "import_dataset", "load_demo", "bench_ingest"],
    "triage": ["triage", "triage_model", "calibrate_triage"],
    "embeddings": ["bench_search"],
}


@pytest.mark.parametrize(("app", "name"), [(app, name) for app, names in MANY_STUDIES.items() for name in names])
def test_commands_over_many_studies_quiet_their_per_item_logs(app: str, name: str) -> None:
    handle = type(load_command_class(app, name)).handle
    # The decorator's wrapper runs, with the command's own handle inside it.
    assert handle.__code__ is quiet_per_item_logs(lambda: None).__code__, f"{name}.handle is not quiet_per_item_logs"
    assert handle.__wrapped__.__module__.endswith(f".{name}")


def test_per_item_logs_hold_info_back_and_restore_the_level() -> None:
    logger = logging.getLogger(PER_ITEM_LOGGERS[0])
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        with per_item_logs(1):
            assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.INFO)
        with per_item_logs(2):
            assert logger.isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(before)


@pytest.mark.django_db(transaction=True)
def test_the_jobs_a_quiet_command_started_run_quietly_before_it_returns(settings, dicom_files, caplog, capsys) -> None:
    """With the in-process worker, triage of what `ingest` stored waits for its series to
    settle: it runs before the command returns, its lines held back with the rest."""
    from django.core.management import call_command

    from precedent import tasks

    settings.PRECEDENT_WORKER = "thread"
    settings.PRECEDENT_TRIAGE_SETTLE_SECONDS = 0.5
    caplog.set_level(logging.INFO, logger=PER_ITEM_LOGGERS[0])
    call_command("ingest", str(dicom_files / "pydicom-test_files" / "CT_small.dcm"), stdout=io.StringIO())
    assert tasks.finish_background_jobs() == 0  # nothing left for manage.py to run
    assert "background job(s)" in capsys.readouterr().err
    assert not [r for r in caplog.records if " triaged " in r.getMessage()]
    from triage.models import TriageResult

    assert TriageResult.objects.count() == 1  # it did run
