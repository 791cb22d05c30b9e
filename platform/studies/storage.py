"""Content-addressed file store for DICOM files (no Django).

A file is first spooled to a temporary file under the store while its SHA-256 is
computed (the sync to disk follows in the background), then validated, then moved to
`dicom/<aa>/<bb>/<sha256>.dcm` with an atomic rename once the sync is done. The same
bytes always land on the same path, so storing twice is harmless and a half-written
file never appears under its final name.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import NotDicom, TooLarge

CHUNK = 1024 * 1024
# A temp file in the spool folder untouched this long was left by a process that died.
STALE_SPOOL_SECONDS = 24 * 3600
GZIP_MAGIC = b"\x1f\x8b"
# The File Meta of a Part 10 file ends within this many bytes (it is a few hundred).
META_WINDOW = 64 * 1024

# fsync releases the GIL: a spooled file's sync runs on this pool while the caller
# parses and validates it, and `place` waits for it before the file gets its name;
# the folder syncs of a batch run here side by side.
_SYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="precedent-fsync")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dataset_sha256(path: Path | str) -> str:
    """The SHA-256 of what follows the File Meta of a Part 10 file."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(META_WINDOW)
        digest.update(memoryview(head)[dataset_offset(head) :])
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Spooled:
    """A received file, hashed, not yet in the store.

    `dataset_sha256` hashes what follows the File Meta: the same instance sent by
    another route (C-STORE, a re-export) gets a File Meta of that route's own
    (implementation UID and version, source AE), but the same dataset bytes. Only a
    duplicate check needs it (a stored SOP UID arrives with other file bytes), so it is
    computed when first asked for, from the spool or, once `place` has run, from the
    copy in the store.
    """

    path: Path
    sha256: str
    size: int
    synced: Future[None] | None = None  # the fsync under way, when the store syncs
    gzip_wrapped: bool = False  # its bytes start as a gzip stream does (see DicomStore.unwrap)
    stored_at: Path | None = None  # the same bytes in the store, once committed
    _dataset_sha256: str | None = field(default=None, repr=False)

    @property
    def dataset_sha256(self) -> str:
        if self._dataset_sha256 is None:
            self._dataset_sha256 = dataset_sha256(self.stored_at or self.path)
        return self._dataset_sha256

    def wait_synced(self) -> None:
        """Block until the file's bytes are on disk (re-raises the fsync's error)."""
        if self.synced is not None:
            self.synced.result()

    def discard(self) -> None:
        """Remove the temp file once its sync is done (a committed file's copy in the
        store stays where it is)."""
        if self.synced is not None:
            with contextlib.suppress(Exception):
                self.synced.result()
        self.path.unlink(missing_ok=True)


@dataclass
class Placement:
    """Files renamed into the store (relative path, created: not there before) whose
    folders' syncs may still be under way."""

    files: list[tuple[str, bool]]
    syncs: list[Future[None]]

    def wait_synced(self) -> None:
        """Block until the new names are on disk (re-raises a sync's error)."""
        for sync in self.syncs:
            sync.result()


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a Part 10 file: after the 128-byte preamble, "DICM"
    and the File Meta group, whose length (0002,0000) comes first. 0 when `head` is not
    laid out that way (the whole file is then hashed)."""
    if len(head) >= 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        return min(len(head), 144 + int.from_bytes(head[140:144], "little"))
    return 0


class _Prefixed:
    """A read-only stream: `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if size > len(data) else b"")


class SpoolWriter:
    """A temp file under the store being written chunk by chunk while its SHA-256 is
    computed; `finish` turns it into a `Spooled` (and starts its sync), `abort` removes
    it. `write` raises TooLarge past `max_bytes`, having removed what it wrote."""

    def __init__(self, folder: Path, *, fsync: bool, max_bytes: int | None) -> None:
        fd, name = tempfile.mkstemp(dir=folder, suffix=".part")
        self.path = Path(name)
        self._out: BinaryIO | None = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self._fsync = fsync
        self.max_bytes = max_bytes
        self.size = 0
        self._head = b""  # the first bytes, to tell a gzip stream

    def write(self, chunk: bytes) -> None:
        if self._out is None:
            raise ValueError("write to a spool that is finished or aborted")
        if len(self._head) < len(GZIP_MAGIC):
            self._head += chunk[: len(GZIP_MAGIC) - len(self._head)]
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise TooLarge(f"file is larger than the upload limit of {self.max_bytes} bytes")
        self._digest.update(chunk)
        self._out.write(chunk)

    def finish(self) -> Spooled:
        if self._out is None:
            raise ValueError("finish a spool that is finished or aborted")
        try:
            self._out.close()
        except BaseException:
            self.abort()
            raise
        self._out = None
        return Spooled(
            path=self.path,
            sha256=self._digest.hexdigest(),
            size=self.size,
            # On the pool (it releases the GIL) while the caller parses.
            synced=_SYNC_POOL.submit(_fsync_path, str(self.path)) if self._fsync else None,
            gzip_wrapped=self._head == GZIP_MAGIC,
        )

    def abort(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None
        self.path.unlink(missing_ok=True)


class DicomStore:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def spool(self, source: BinaryIO | Path, *, max_bytes: int | None = None) -> Spooled:
        """Copy `source` into a temp file, hashing it. gzip-wrapped input is unwrapped.

        Raises TooLarge past `max_bytes` (counted after unwrapping, so a small gzip
        cannot expand without bound) and leaves nothing behind.
        """
        opened = None
        if isinstance(source, (str, Path)):
            try:
                opened = source = open(source, "rb")
            except OSError as exc:  # a folder, a missing file, no permission
                raise NotDicom(f"cannot read the file: {exc.strerror or exc}") from None
        try:
            head = source.read(2)
            if head == GZIP_MAGIC:
                # Request bodies cannot seek back: hand gzip the two bytes we peeked at.
                return self._copy(gzip.GzipFile(fileobj=_Prefixed(head, source), mode="rb"), b"", max_bytes)
            return self._copy(source, head, max_bytes)
        finally:
            if opened is not None:
                opened.close()

    def _copy(self, stream: BinaryIO, first: bytes, max_bytes: int | None) -> Spooled:
        writer = self.spool_writer(max_bytes=max_bytes)
        try:
            chunk = first
            while True:
                if chunk:
                    writer.write(chunk)
                try:
                    chunk = stream.read(CHUNK)
                except (OSError, EOFError) as exc:  # corrupt gzip stream
                    raise NotDicom(f"cannot read the file: {exc}") from None
                if not chunk:
                    break
            return writer.finish()
        except BaseException:
            writer.abort()
            raise

    def sweep(self, *, older_than: float = STALE_SPOOL_SECONDS) -> int:
        """Remove temp files a process that died mid-upload left in the spool folder
        (spools, and Django's upload temp files, which share it), untouched for
        `older_than` seconds; a file being written is touched with every chunk.
        Returns how many were removed."""
        cutoff = time.time() - older_than
        removed = 0
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another process swept it first
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def spool_writer(self, *, max_bytes: int | None = None) -> SpoolWriter:
        """A spool the caller writes chunk by chunk (a request body as it is parsed)."""
        return SpoolWriter(self.tmp, fsync=self.fsync, max_bytes=max_bytes)

    def unwrap(self, spooled: Spooled, *, max_bytes: int | None = None) -> Spooled:
        """`spooled` itself, or, when its bytes are gzip-wrapped, a new spool of what
        they unwrap to (the wrapped one is dropped either way): what `spool` does to a
        stream, for a file a `SpoolWriter` received as it was sent."""
        if not spooled.gzip_wrapped:
            return spooled
        try:
            return self.spool(spooled.path, max_bytes=max_bytes)
        finally:
            spooled.discard()

    @staticmethod
    def relative_path(sha256: str) -> str:
        return f"dicom/{sha256[:2]}/{sha256[2:4]}/{sha256}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def place(self, spooled: Sequence[Spooled]) -> Placement:
        """Rename each spooled file to its content address once its bytes are on disk,
        and start syncing every folder that got a new name, side by side on the pool,
        without waiting: the caller works meanwhile (inserts the rows) and calls
        `Placement.wait_synced` before relying on the names (before committing rows
        that point at them). A file whose bytes are stored already is not placed again
        (created False): its spool is dropped. When a rename fails, the files placed so
        far are removed before the error is raised.
        """
        placed: list[tuple[str, bool]] = []
        folders: dict[Path, None] = {}
        try:
            for item in spooled:
                relative = self.relative_path(item.sha256)
                target = self.path(relative)
                if target.exists():
                    item.discard()
                    item.stored_at = target
                    placed.append((relative, False))
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                item.wait_synced()  # never a name on bytes that are not on disk yet
                os.replace(item.path, target)
                item.stored_at = target
                placed.append((relative, True))
                folders[target.parent] = None
        except BaseException:
            self.remove_created(placed)
            raise
        syncs = [_SYNC_POOL.submit(_fsync_path, str(folder)) for folder in folders] if self.fsync else []
        return Placement(files=placed, syncs=syncs)

    def remove_created(self, placed: Sequence[tuple[str, bool]]) -> None:
        """Remove the files a `place` created (not those that were there already)."""
        for relative, created in placed:
            if created:
                self.remove(relative)

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    # --- checking the store against its index (`store check`) ---------------------------

    SHARDS = tuple(f"{i:02x}" for i in range(256))  # the first folder level: a SHA-256's first two hex digits

    def shard_files(self, shard: str) -> dict[str, StoredFile]:
        """Every file stored under one shard (`dicom/<shard>/`), by relative path."""
        files: dict[str, StoredFile] = {}
        top = self.root / "dicom" / shard
        for folder, _dirs, names in os.walk(top):
            for name in names:
                path = Path(folder) / name
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    stat = path.stat()
                    files[str(path.relative_to(self.root))] = StoredFile(stat.st_size, stat.st_mtime)
        return files

    def file_sha256(self, relative: str) -> str:
        digest = hashlib.sha256()
        with open(self.path(relative), "rb", buffering=0) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True)
class StoredFile:
    size: int
    mtime: float
