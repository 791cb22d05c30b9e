"""Settings read the environment, fail fast on bad values, and pass the deploy check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from precedent.settings import env

REPO_ROOT = Path(__file__).resolve().parents[1]


def manage(*args: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), *args],
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SETTINGS_MODULE="precedent.settings.production",
        DJANGO_SECRET_KEY="x" * 20 + "-a-long-random-production-secret-key-0123456789",
        PRECEDENT_HOME=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret(tmp_path):
    environ = {"DJANGO_SETTINGS_MODULE": "precedent.settings.production", "PRECEDENT_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), "check"],
        env={k: v for k, v in {**os.environ, **environ}.items() if k != "DJANGO_SECRET_KEY"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set in production" in result.stderr


def test_demo_secret_is_generated_once_into_precedent_home(tmp_path):
    for _ in range(2):
        assert manage("check", PRECEDENT_HOME=str(tmp_path), DJANGO_SECRET_KEY="").returncode == 0
    key = (tmp_path / "secret_key").read_text()
    assert len(key) > 50 and oct((tmp_path / "secret_key").stat().st_mode)[-3:] == "600"


def test_bad_values_fail_fast(monkeypatch):
    monkeypatch.setenv("X_BOOL", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL must be a boolean"):
        env.env_bool("X_BOOL", True)
    monkeypatch.setenv("X_INT", "12MB")
    with pytest.raises(ImproperlyConfigured, match="X_INT must be an integer"):
        env.env_int("X_INT", 1)
    monkeypatch.setenv("X_INT", "0")
    with pytest.raises(ImproperlyConfigured, match="at least 1"):
        env.env_int("X_INT", 1, minimum=1)


def test_database_url_must_be_postgres(tmp_path):
    result = manage("check", PRECEDENT_HOME=str(tmp_path), DATABASE_URL="sqlite:///x.db")
    assert result.returncode != 0 and "DATABASE_URL must point at PostgreSQL" in result.stderr


def test_index_gpu_must_be_auto_on_or_off(tmp_path):
    result = manage("check", PRECEDENT_HOME=str(tmp_path), PRECEDENT_INDEX_GPU="yes")
    assert result.returncode != 0 and "PRECEDENT_INDEX_GPU must be auto, on or off, got 'yes'" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRECEDENT_MAX_UPLOAD_BYTES", "abc", "PRECEDENT_MAX_UPLOAD_BYTES must be an integer, got 'abc'"),
        ("PRECEDENT_LOG_LEVEL", "LOUD", "PRECEDENT_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        # Read by the pure cores later; checked at start all the same.
        ("PRECEDENT_FAISS_SEARCH_THREADS", "x", "PRECEDENT_FAISS_SEARCH_THREADS must be an integer, got 'x'"),
        ("PRECEDENT_TORCH_THREADS", "0", "PRECEDENT_TORCH_THREADS must be at least 1, got 0"),
        ("PRECEDENT_DICOM_PORT", "99999", "PRECEDENT_DICOM_PORT must be at most 65535, got 99999"),
    ],
)
def test_a_bad_setting_is_one_line_not_a_traceback(tmp_path, variable, value, message):
    result = manage("check", PRECEDENT_HOME=str(tmp_path), **{variable: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {message}") and result.stderr.count("\n") == 1


def test_the_log_level_may_be_written_in_lower_case(tmp_path):
    assert manage("check", PRECEDENT_HOME=str(tmp_path), PRECEDENT_LOG_LEVEL="debug").returncode == 0


def test_embedded_database_survives_restarts(tmp_path):
    """Data written by one process is there for the next (the server stops in between)."""
    home = str(tmp_path / "home")
    assert manage("migrate", "-v0", PRECEDENT_HOME=home).returncode == 0
    created = manage(
        "shell", "-c", "from studies.models import Cohort; Cohort.objects.create(name='kept')", PRECEDENT_HOME=home
    )
    assert created.returncode == 0, created.stderr
    read = manage(
        "shell", "-c", "from studies.models import Cohort; print(Cohort.objects.get().name)", PRECEDENT_HOME=home
    )
    assert read.stdout.strip().endswith("kept"), read.stderr
