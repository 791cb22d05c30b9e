"""python manage.py dicom_listener: receive DICOM over C-STORE into the archive.

Runs in the foreground until Ctrl-C or SIGTERM (what systemd and container runtimes
send), then stops accepting, aborts open associations and lets a store in progress
finish. Defaults come from settings, so a deployment configures it in the environment.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dimse.listener import validate_ae_title
from dimse.services import build_listener

# pynetdicom logs every PDU at INFO; our own lines say what an operator needs.
_PYNETDICOM_LEVEL_BY_VERBOSITY = {0: logging.WARNING, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def _ae_title_list(value: str) -> list[str]:
    return [title.strip() for title in value.split(",") if title.strip()]


class Command(BaseCommand):
    help = "Listen for DICOM C-STORE and C-ECHO and store received instances through the ingest service."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--port",
            type=int,
            default=settings.PRECEDENT_DICOM_PORT,
            help="TCP port to listen on (default: PRECEDENT_DICOM_PORT or 11112)",
        )
        parser.add_argument(
            "--ae-title",
            default=settings.PRECEDENT_DICOM_AE_TITLE,
            help="this listener's AE title, which senders must call (default: PRECEDENT_DICOM_AE_TITLE or PRECEDENT)",
        )
        parser.add_argument(
            "--bind",
            default=settings.PRECEDENT_DICOM_BIND,
            help="address to listen on; 0.0.0.0 for every interface (default: PRECEDENT_DICOM_BIND or 127.0.0.1)",
        )
        parser.add_argument(
            "--allowed-ae",
            type=_ae_title_list,
            default=list(settings.PRECEDENT_DICOM_ALLOWED_AE_TITLES),
            help="comma-separated calling AE titles to accept; empty accepts any"
            " (default: PRECEDENT_DICOM_ALLOWED_AE_TITLES)",
        )

    def handle(self, *args: Any, port: int, ae_title: str, bind: str, allowed_ae: list[str], **options: Any) -> None:
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, got {port}")
        try:
            ae_title = validate_ae_title(ae_title)
            listener = build_listener(
                ae_title=ae_title,
                allowed_calling_ae_titles=allowed_ae,
                require_called_ae_title=settings.PRECEDENT_DICOM_REQUIRE_CALLED_AE_TITLE,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        pynetdicom_level = _PYNETDICOM_LEVEL_BY_VERBOSITY.get(options["verbosity"], logging.DEBUG)
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)

        try:
            listener.start(bind, port)
        except OSError as exc:
            raise CommandError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
        stop = threading.Event()
        previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            callers = ", ".join(allowed_ae) if allowed_ae else "any calling AE title"
            self.stdout.write(f"DICOM listener {ae_title} on {bind}:{port}, accepting {callers}. Ctrl-C stops it.")
            stop.wait()
        finally:
            aborted = listener.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.stdout.write(f"DICOM listener stopped ({aborted} open association(s) aborted).")
