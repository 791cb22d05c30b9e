"""torch is imported when something first embeds or trains, not when Django starts:
every manage.py command (migrate, store check, roles) used to pay seconds and hundreds
of MB for it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from precedent.lazy import LazyModule
from tests.conftest import REPO_ROOT

STARTUP = """
import sys
import django
django.setup()
from django.urls import get_resolver
get_resolver().url_patterns  # every app's views, APIs, selectors and services
import embeddings.selectors, embeddings.services, triage.services, triage.selectors
print(sorted(m for m in ("torch", "torchvision") if m in sys.modules))
"""


def test_django_starts_without_torch(precedent_home) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "precedent.settings.test",
        "PRECEDENT_HOME": str(precedent_home),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "platform"), str(REPO_ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", STARTUP], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_lazy_module_is_the_module_once_used_from_many_threads() -> None:
    encoder = LazyModule("embeddings.encoder")
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(encoder.Encoder)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    import embeddings.encoder

    assert all(cls is embeddings.encoder.Encoder for cls in seen) and len(seen) == 8
    assert repr(encoder) == "<lazy module 'embeddings.encoder'>"
