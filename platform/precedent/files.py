"""Atomic file writes, shared by every pure core that writes into PRECEDENT_HOME (no Django).

A reader, another process or a crash sees the old file or the new one, never half of
one: the data goes to a temp file beside the target, is fsynced, then renamed over it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename
    it over `path`, on an exception remove it and re-raise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
