"""python manage.py dicom_listener: arguments checked before listening, and a real run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from django.core.management import CommandError, call_command
from pynetdicom import AE, sop_class

from tests.conftest import REPO_ROOT


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another program is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ae-title", "SEVENTEEN_CHARS_X"], "AE title 'SEVENTEEN_CHARS_X' is longer than 16 characters"),
        (["--ae-title", "BACK\\SLASH"], "printable ASCII characters other than backslash"),
        (["--ae-title", "   "], "AE title must not be empty"),
        (["--allowed-ae", "MODALITY,WAY_TOO_LONG_CALLING_AE"], "allowed calling AE title 'WAY_TOO_LONG"),
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--port", "eleven"], "invalid int value: 'eleven'"),
    ],
)
def test_bad_arguments_are_one_line_errors(arguments: list[str], message: str):
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("dicom_listener", *(["--port", str(free_port())] + arguments))


def test_port_in_use_is_a_one_line_error(busy_port: int):
    with pytest.raises(CommandError, match=f"cannot listen on 127.0.0.1:{busy_port}: Address already in use"):
        call_command("dicom_listener", "--port", str(busy_port), "--ae-title", "PRECEDENT")


def test_unknown_bind_address_is_a_one_line_error():
    with pytest.raises(CommandError, match="cannot listen on no-such-host.invalid:"):
        call_command("dicom_listener", "--port", str(free_port()), "--bind", "no-such-host.invalid")


def echo(port: int) -> int | None:
    """C-ECHO status from the listener on `port`, or None while nothing answers."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PRECEDENT")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_runs_in_the_foreground_answers_echo_and_stops_cleanly(tmp_path, stop_signal: signal.Signals):
    """The command as an operator runs it: start, answer C-ECHO, stop on Ctrl-C or on
    the SIGTERM service managers send. C-ECHO needs no database, so none is set up."""
    port = free_port()
    env = {**os.environ, "PRECEDENT_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "dicom_listener", "--port", str(port), "--ae-title", "PRECEDENT"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while status is None and process.poll() is None and time.monotonic() < deadline:
            status = echo(port)
            time.sleep(0.2)
        assert status == 0, f"no C-ECHO answer; exit code {process.poll()}"
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert f"DICOM listener PRECEDENT on 127.0.0.1:{port}, accepting any calling AE title." in output
    assert "echo MODALITY@127.0.0.1:" in output
    assert "DICOM listener stopped (0 open association(s) aborted)." in output
    assert "Traceback" not in output
