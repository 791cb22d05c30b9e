#!/usr/bin/env python
"""Django's command-line utility for Precedent.

`platform/` is a plain folder, not a package (it would shadow the standard-library
module `platform`), so it is put on the import path here, next to the repository root
that holds the `embeddings` and `triage` apps.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    for path in (ROOT, ROOT / "platform"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "precedent.settings.dev")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A bad setting, e.g. PRECEDENT_MAX_UPLOAD_BYTES=abc: one line, not a traceback.
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.exit(2)
    finally:
        # Background jobs a command queued (embedding, triage of what it stored) finish
        # before the process, and with it perhaps the embedded PostgreSQL, goes away.
        from precedent.tasks import finish_background_jobs

        finish_background_jobs()


if __name__ == "__main__":
    main()
