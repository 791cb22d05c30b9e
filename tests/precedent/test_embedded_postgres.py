"""The embedded PostgreSQL stops when the last process using it goes, also when that
process was stopped with SIGTERM or killed outright (real pgserver, real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "from django.db import connection; connection.ensure_connection(); print('ready', flush=True); "
    "import time; time.sleep(120)"
)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    return {**env, "PRECEDENT_HOME": str(home)}


def _holder(home: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", HOLD],
        cwd=ROOT,
        env=_env(home),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def _postmaster(home: Path) -> psutil.Process | None:
    pid_file = home / "postgres" / "postmaster.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])
    return psutil.Process(pid) if psutil.pid_exists(pid) else None


def _gone(home: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _postmaster(home) is None:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def home(tmp_path: Path):
    """A private PRECEDENT_HOME; its server is stopped afterwards if a test failed."""
    home = tmp_path / "home"
    yield home
    server = _postmaster(home)
    if server is not None:
        server.terminate()


@pytest.mark.slow
def test_sigterm_and_sigkill_leave_no_server_behind(home: Path):
    holder = _holder(home)
    assert _postmaster(home) is not None
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(30) == 128 + signal.SIGTERM
    assert _gone(home), "SIGTERM: the embedded PostgreSQL kept running"

    holder = _holder(home)
    holder.kill()  # no exit handlers at all
    holder.wait(30)
    assert _postmaster(home) is not None  # nobody left to stop it...
    assert holder.pid in json.loads((home / "postgres" / ".handle_pids.json").read_text())
    # ...until the next process that uses it strikes the dead one off, and exits.
    subprocess.run([sys.executable, "manage.py", "shell", "-c", "from django.db import connection; "
                    "connection.ensure_connection()"], cwd=ROOT, env=_env(home), check=True)  # fmt: skip
    assert _gone(home), "after a SIGKILL: the embedded PostgreSQL kept running"
