"""The cache of rendered PNGs (previews, thumbnails, WADO-RS renderings), no Django.

Each rendering is a file `<root>/<sha[:2]>/<sha>-<what>.png`, named after the SHA-256
of the DICOM file it was drawn from, so a cached image can never belong to other pixel
data and every rendering of a file is found by one listing of one folder:

- `get` finds a rendering and marks it used (its mtime), `put` stores one atomically;
- `forget` removes every rendering of a file: its instance was deleted, and a deleted
  patient's images must not live on as PNGs;
- the cache is bounded: once it holds more than `max_bytes`, the renderings used least
  recently are removed until it is down to `TRIM_TO` of that. A custom window chosen by
  dragging in the viewer is one more file per image, so without a bound the cache
  would grow for as long as people read. The size is checked at most once per
  `check_seconds`, by whichever process stores a rendering next (a marker file's mtime
  says when the last check was), so the check costs nothing per request.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TRIM_TO = 0.8  # a trim leaves the cache at this share of its bound, so it is not trimmed again at once
STALE_PART_SECONDS = 3600  # a `.part` file this old was left by a process that died mid-write
# A rendering used this recently is never trimmed: a request that has just found it is
# about to open it. The cache may pass its bound for that long.
IN_USE_SECONDS = 60
MARKER = ".checked"


@dataclass(frozen=True)
class Usage:
    files: int
    bytes: int


@dataclass(frozen=True)
class Trimmed:
    files: int
    bytes: int
    usage: Usage  # what is left


class RenderCache:
    def __init__(self, root: Path, *, max_bytes: int, check_seconds: float = 60.0) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.check_seconds = check_seconds

    def path(self, sha256: str, what: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}-{what}.png"

    def get(self, sha256: str, what: str) -> Path | None:
        """The cached rendering, marked as just used; None when there is none."""
        path = self.path(sha256, what)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def put(self, sha256: str, what: str, png: bytes) -> Path:
        """Store a rendering (atomically: a reader sees all of it or none) and return
        its path; trims the cache first when a size check is due."""
        self.trim_if_due()
        path = self.path(sha256, what)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(png)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def forget(self, sha256: str) -> int:
        """Remove every rendering of the file with this SHA-256; returns how many."""
        removed = 0
        for path in self._shard(sha256[:2]):
            if path.name.startswith(f"{sha256}-"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def shard_renderings(self, shard: str) -> list[tuple[str, Path, int, float]]:
        """(SHA-256 of the file drawn, path, size, mtime) of every rendering in one shard."""
        out = []
        for path in self._shard(shard):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                out.append((path.name.split("-", 1)[0], path, stat.st_size, stat.st_mtime))
        return out

    def usage(self) -> Usage:
        files = self._files()
        return Usage(len(files), sum(size for _, size, _ in files))

    def trim_if_due(self) -> Trimmed | None:
        """`trim` when no process has checked the size for `check_seconds`."""
        marker = self.root / MARKER
        now = time.time()
        try:
            if now - marker.stat().st_mtime < self.check_seconds:
                return None
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return self.trim()

    def trim(self) -> Trimmed:
        """Bring the cache under its bound: when it holds more than `max_bytes`, remove
        the renderings used least recently until it holds at most TRIM_TO of that (none
        used in the last IN_USE_SECONDS: a request may be about to open it).
        Also removes `.part` files left by a process that died while writing."""
        files = self._files()
        total = sum(size for _, size, _ in files)
        removed = freed = 0
        if total > self.max_bytes:
            target = self.max_bytes * TRIM_TO
            in_use = time.time() - IN_USE_SECONDS
            for mtime, size, path in sorted(files, key=lambda f: f[0]):
                if total - freed <= target or mtime > in_use:
                    break
                path.unlink(missing_ok=True)
                removed += 1
                freed += size
        cutoff = time.time() - STALE_PART_SECONDS
        for shard in self._shards():
            for path in shard.glob("*.part"):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
        return Trimmed(removed, freed, Usage(len(files) - removed, total - freed))

    def _shards(self) -> list[Path]:
        try:
            return [entry for entry in self.root.iterdir() if entry.is_dir()]
        except FileNotFoundError:
            return []

    def _shard(self, name: str) -> list[Path]:
        try:
            return [Path(entry.path) for entry in os.scandir(self.root / name) if entry.name.endswith(".png")]
        except FileNotFoundError:
            return []

    def _files(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every cached rendering."""
        files = []
        for shard in self._shards():
            for entry in os.scandir(shard):
                if not entry.name.endswith(".png"):
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # removed meanwhile (a forget, another trim)
                    continue
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return files
