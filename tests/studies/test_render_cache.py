"""The rendered-PNG cache: bounded, least recently used first, and a deleted image's
renderings leave with it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from django.db import transaction

from studies.models import Instance
from studies.render_cache import MARKER, STALE_PART_SECONDS, RenderCache
from studies.services import render_cache

SHA_A = "a" * 64
SHA_B = "ab" + "c" * 62  # the same shard folder as SHA_A
SHA_C = "c" * 64


def _age(path: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(path, (then, then))


def test_put_then_get_marks_the_rendering_used(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=10**6)
    assert cache.get(SHA_A, "f1-default-s0") is None
    path = cache.put(SHA_A, "f1-default-s0", b"\x89PNG one")
    assert path == tmp_path / "aa" / f"{SHA_A}-f1-default-s0.png" and path.read_bytes() == b"\x89PNG one"
    _age(path, 3600)
    assert cache.get(SHA_A, "f1-default-s0") == path
    assert time.time() - path.stat().st_mtime < 60  # used just now
    assert not list(tmp_path.rglob("*.part"))


def test_forget_removes_every_rendering_of_one_file_only(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=10**6)
    for what in ("f1-default-s0", "f1-w40_400-s0", "f2-default-s256"):
        cache.put(SHA_A, what, b"png")
    kept = [cache.put(SHA_B, "f1-default-s0", b"png"), cache.put(SHA_C, "f1-default-s0", b"png")]
    assert cache.forget(SHA_A) == 3
    assert sorted(tmp_path.rglob("*.png")) == sorted(kept)
    assert cache.forget(SHA_A) == 0 and cache.forget("d" * 64) == 0  # nothing there, no error


def test_trim_removes_the_least_recently_used_down_to_the_trim_share(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=1000)
    paths = []
    for i in range(6):  # 6 × 200 bytes = 1200 > 1000; the older a rendering, the earlier it goes
        path = cache.put(f"{i:02d}" + "0" * 62, "f1-default-s0", bytes(200))
        _age(path, 600 - i * 60)
        paths.append(path)
    cache.get("00" + "0" * 62, "f1-default-s0")  # the oldest is viewed again
    trimmed = cache.trim()
    # Down to at most 800 bytes: the two least recently used go (paths 1 and 2).
    assert (trimmed.files, trimmed.bytes) == (2, 400)
    assert [p.exists() for p in paths] == [True, False, False, True, True, True]
    assert cache.usage().bytes == trimmed.usage.bytes == 800
    assert cache.trim().files == 0  # under the bound: nothing goes


def test_trim_never_removes_a_rendering_just_used(tmp_path: Path) -> None:
    """A request that found a rendering opens it next: trimming waits for it, even
    when that leaves the cache over its bound for a while."""
    cache = RenderCache(tmp_path, max_bytes=1000)
    old = cache.put(SHA_A, "f1-default-s0", bytes(600))
    _age(old, 600)
    recent = cache.put(SHA_B, "f1-default-s0", bytes(600))
    trimmed = cache.trim()
    assert (trimmed.files, old.exists(), recent.exists()) == (1, False, True)
    big = cache.put(SHA_C, "f1-default-s0", bytes(2000))  # over the bound on its own, just used
    assert cache.trim().files == 0 and big.exists() and recent.exists()
    _age(big, 600)
    _age(recent, 300)
    assert cache.trim().files == 1 and not big.exists() and recent.exists()  # in use no more: oldest first


def test_trim_removes_parts_left_by_a_dead_writer(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=10**6)
    cache.put(SHA_A, "f1-default-s0", b"png")
    stale, fresh = tmp_path / "aa" / "x1.part", tmp_path / "aa" / "x2.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    _age(stale, STALE_PART_SECONDS + 60)
    cache.trim()
    assert not stale.exists() and fresh.exists()


def test_the_size_is_checked_at_most_once_per_interval_across_instances(tmp_path: Path) -> None:
    """Every request builds its own RenderCache: the marker file is what they share."""
    first = RenderCache(tmp_path, max_bytes=100, check_seconds=60)
    assert first.trim_if_due() is not None and (tmp_path / MARKER).exists()
    for i in range(3):
        path = RenderCache(tmp_path, max_bytes=100, check_seconds=60).put(f"{i:02d}" + "0" * 62, "x", bytes(80))
        _age(path, 300 - i)
    assert RenderCache(tmp_path, max_bytes=100).usage().bytes == 240  # over the bound until the next check
    _age(tmp_path / MARKER, 120)
    due = RenderCache(tmp_path, max_bytes=100, check_seconds=60).trim_if_due()
    assert due is not None and due.usage.bytes <= 80


def test_a_bound_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        RenderCache(tmp_path, max_bytes=0)


# --- through the platform ------------------------------------------------------------------


def test_the_platform_cache_follows_its_settings(settings, precedent_home: Path) -> None:
    settings.PRECEDENT_RENDER_CACHE_MB = 3
    cache = render_cache()
    assert cache.root == precedent_home / "cache" / "render" and cache.max_bytes == 3 * 2**20


@pytest.mark.django_db
def test_deleting_an_instance_removes_its_previews_once_that_commits(
    api, dicom_files: Path, precedent_home: Path, django_capture_on_commit_callbacks
) -> None:
    from tests.conftest import upload

    uids = []
    for name in ("pydicom-test_files/CT_small.dcm", "pydicom-test_files/MR_small.dcm"):
        response = api.post("/api/v1/instances/", {"file": upload(Path(name).name, (dicom_files / name).read_bytes())})
        assert response.status_code == 201, response.content
        uids.append(response.json()["results"][0]["sop_instance_uid"])
    for uid in uids:
        for query in ("", "?wc=40&ww=400", "?size=64"):
            assert api.get(f"/api/v1/instances/{uid}/preview.png{query}").status_code == 200
    deleted, kept = (Instance.objects.get(sop_instance_uid=uid) for uid in uids)
    renderings = {
        i.sha256: sorted((precedent_home / "cache" / "render").rglob(f"{i.sha256}-*.png")) for i in (deleted, kept)
    }
    assert [len(r) for r in renderings.values()] == [3, 3]

    with pytest.raises(RuntimeError), transaction.atomic():  # rolled back: nothing goes
        Instance.objects.get(pk=deleted.pk).delete()
        raise RuntimeError
    assert all(p.exists() for p in renderings[deleted.sha256])
    with django_capture_on_commit_callbacks(execute=True):
        Instance.objects.get(pk=deleted.pk).delete()
    assert not any(p.exists() for p in renderings[deleted.sha256])
    assert not (precedent_home / deleted.file_path).exists()
    assert all(p.exists() for p in renderings[kept.sha256])
