"""Put the project's import roots on sys.path (platform/ is a folder, not a package)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_import_roots() -> None:
    for path in (REPO_ROOT, REPO_ROOT / "platform"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
