"""The FAISS index that serves similar-case search: one per encoder version and kind.

Pure module (no Django): it takes float32 vectors and int64 ids (Embedding row ids) and
answers top-k inner-product queries. PostgreSQL stays the source of truth; this index is
a cache of it that can always be rebuilt, so persistence favours "detect and rebuild"
over repair (see `VectorIndex.load` and `ids_checksum`).

Why it is built this way (facts measured on the 2-core machines, see DESIGN.md):

* `faiss` is imported before anything that may import `torch`: both ship an OpenMP
  runtime and loading torch's first can crash a process that later runs faiss kernels.
* Exact search (`IndexIDMap2(IndexFlatIP)`) is memory bound: ~157 ms per query at
  1M x 512, but a few ms below ~20k vectors, where it is also exact and supports
  `remove_ids`. Above `approx_threshold` the index switches to HNSW (default) or IVF,
  which answer a query in well under a millisecond at recall@10 >= 0.95.
* Neither HNSW nor a GPU index supports `remove_ids` (and `IndexIDMap2` around IVF
  renumbers wrongly on removal), so approximate indexes keep *tombstones*: removed
  positions are filtered out during the graph/list traversal with an `IDSelectorBitmap`,
  and the index is compacted (rebuilt aside, then swapped) once tombstones exceed
  `tombstone_rebuild_fraction`.
* One query on 2 OpenMP threads was slower than on 1 (thread start-up dominates a
  sub-millisecond search); batches and index builds do use all cores. The thread count
  is set per call in the *calling* thread (OpenMP's nthreads is a per-thread setting),
  so web threads and a background builder do not fight over one global.
* GPU (when `faiss.get_num_gpus() > 0` and the build has GPU support): searches run on
  an exact `GpuIndexFlatIP` mirror of the CPU master. HNSW does not exist on the GPU, so
  the CPU master is kept flat (cheap to build, exact, supports removal). Adds are
  mirrored incrementally; a removal renumbers the flat master's positions, so the next
  search re-copies the mirror (233-279 ms at 1M x 512); exclusions and the tombstones of a
  forced approximate master are post-filtered. Checked on an H100 with faiss-gpu 1.15.1
  (`bench/gpu_check.py`): at 1M x 512 the mirror gave the CPU's exact answers through
  searches, exclusions, removals, adds, k=100, searches during adds and save/load; one
  query took 4.0 ms (exact) against 0.6 ms for CPU HNSW at recall 0.98, and 1000 batched
  queries ran at 34.7k/s (`PRECEDENT_INDEX_GPU=off` keeps searches on the CPU). Deploy with the
  `faiss-gpu` wheel: the `faiss-gpu-cu12` wheels carry kernels for sm_70/sm_80 only and
  fail on Hopper ("no kernel image is available").

Search internals use *positions* (faiss's sequential internal ids inside the
`IndexIDMap2`) rather than external ids, because tombstones, filters and exclusions all
become one bitmap over positions, and a re-added id simply gets a new position.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

_TORCH_FIRST = "torch" in sys.modules and "faiss" not in sys.modules  # checked below

import faiss  # noqa: E402 - before torch in any process that uses both: see the module docstring
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

if _TORCH_FIRST:  # pragma: no cover - depends on the importing process
    warnings.warn(
        "torch was imported before faiss: two OpenMP runtimes may conflict. Import "
        "embeddings.index (or faiss) before torch.",
        RuntimeWarning,
        stacklevel=2,
    )

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
TOMBSTONES_FILE = "tombstones.npy"
MANIFEST_FILE = "manifest.json"
GPU_MAX_K = 2048  # faiss GPU k-selection limit
DEFAULT_APPROX_THRESHOLD = 20_000
# Below this many candidates a filtered query copies the candidates' vectors and does one
# small matrix product; above it, an exact scan with a bitmap selector avoids the copy.
_GATHER_MAX = 4096
_IVF_MIN_TRAIN = 1024
_IVF_REGROW = 4  # retrain IVF once the collection is 4x the size it was trained on

IndexType = Literal["flat", "hnsw", "ivf"]


class VectorIndexError(Exception):
    """Base class for errors raised by this module."""


class IndexFileError(VectorIndexError):
    """A saved index is missing, unreadable, corrupt or does not match its manifest.

    The index is a cache of PostgreSQL: callers react by rebuilding it.
    """


# --------------------------------------------------------------------------- helpers


def ids_checksum(ids: Iterable[int] | np.ndarray) -> str:
    """sha256 of the sorted int64 (little-endian) id array.

    The Django layer computes the same from `Embedding` ids in PostgreSQL and compares it
    with the manifest to decide whether a saved index is stale.
    """
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype="<i8").ravel()
    return hashlib.sha256(np.sort(arr).tobytes()).hexdigest()


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, writer) -> None:
    """Write through `writer(tmp_path)`, fsync, then rename over `path`.

    Readers see the old file or the new one, never half of one.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _bitmap(mask: np.ndarray) -> np.ndarray:
    """faiss IDSelectorBitmap layout: bit i of byte i // 8, least significant first."""
    return np.packbits(mask, bitorder="little")


class _RWLock:
    """Many readers (searches) or one writer (a mutation of the live index).

    Writer-preferring, so a stream of searches cannot starve an add. Not re-entrant.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class HNSWParams:
    """HNSW settings. M=32 is the usual recall/memory balance at d=512; efConstruction
    80 and efSearch 64 reach recall@10 >= 0.95 on clustered 512-d data up to 1M
    (see bench.py figures in the README)."""

    m: int = 32
    ef_construction: int = 80
    ef_search: int = 64


@dataclass(frozen=True)
class IVFParams:
    """IVF-Flat settings. `nlist=None` picks ~4*sqrt(n) (a power of two); nprobe is the
    recall/latency knob."""

    nlist: int | None = None
    nprobe: int = 32
    train_per_list: int = 40  # faiss warns below 39 training points per centroid
    max_train: int = 200_000


@dataclass
class SearchResult:
    """Top-k per query, best first. `ids` is -1 (and `scores` -inf) only where fewer
    than k candidates exist. Unpacks as `scores, ids = index.search(...)`."""

    scores: np.ndarray  # (nq, k) float32, inner product (cosine for normalised vectors)
    ids: np.ndarray  # (nq, k) int64

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.scores
        yield self.ids


@dataclass
class IndexManifest:
    """What `save` writes beside the index, so a loader can tell stale from current."""

    format_version: int
    encoder_version: str
    kind: str
    dim: int
    count: int
    index_type: str
    params: dict[str, Any]
    ids_sha256: str
    index_sha256: str
    created_at: str
    faiss_version: str = field(default_factory=lambda: faiss.__version__)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        names = {f for f in cls.__dataclass_fields__}
        missing = names - set(data) - {"faiss_version"}
        if missing:
            raise ValueError(f"manifest lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


class _IdLookup:
    """External id -> position of its live entry.

    Embedding row ids come from a sequence, so they are compact: a dense table
    (`table[id] = position`) answers a filter of m ids with one vectorised gather, O(m),
    which matters when a broad metadata filter passes 100k+ ids per query. Sparse id
    spaces fall back to sorted arrays and binary search, O(m log n).
    """

    SLACK = 4  # dense while max id < SLACK * entries (or below 1M)

    def __init__(self, labels: np.ndarray, alive: np.ndarray):
        pos = np.flatnonzero(alive)
        ids = labels[pos]
        self.table: np.ndarray | None = None
        self.sorted_ids = self.sorted_pos = np.empty(0, np.int64)
        top = int(ids.max()) + 1 if len(ids) else 0
        if top <= self._dense_limit(len(labels)):
            self.table = np.full(max(top, 1024), -1, np.int64)
            self.table[ids] = pos
        else:
            order = np.argsort(ids, kind="stable")
            self.sorted_ids, self.sorted_pos = ids[order], pos[order]

    def _dense_limit(self, ntotal: int) -> int:
        return max(1 << 20, self.SLACK * ntotal)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        if self.table is not None:
            inside = ids[ids < len(self.table)]
            pos = self.table[inside]
            return pos[pos >= 0]
        if not len(self.sorted_ids) or not len(ids):
            return np.empty(0, np.int64)
        where = np.searchsorted(self.sorted_ids, ids)
        where[where >= len(self.sorted_ids)] = 0
        return self.sorted_pos[where[self.sorted_ids[where] == ids]]

    def add(self, ids: np.ndarray, pos: np.ndarray, ntotal: int) -> None:
        if self.table is not None:
            top = int(ids.max()) + 1
            if top > len(self.table):
                if top > self._dense_limit(ntotal):  # ids became sparse: switch representation
                    live = np.flatnonzero(self.table >= 0)
                    self.table, old_ids, old_pos = None, live, self.table[live]
                    order = np.argsort(old_ids, kind="stable")
                    self.sorted_ids, self.sorted_pos = old_ids[order], old_pos[order]
                else:
                    grown = np.full(max(top, 2 * len(self.table)), -1, np.int64)
                    grown[: len(self.table)] = self.table
                    self.table = grown
            if self.table is not None:
                self.table[ids] = pos
                return
        # Merge rather than re-sort: O(n) per batch instead of O(n log n).
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self.sorted_ids, ids[order])
        self.sorted_ids = np.insert(self.sorted_ids, at, ids[order])
        self.sorted_pos = np.insert(self.sorted_pos, at, pos[order])

    def remove(self, ids: np.ndarray) -> None:
        """Forget ids that are present (callers pass only those)."""
        if self.table is not None:
            self.table[ids[ids < len(self.table)]] = -1
            return
        at = np.searchsorted(self.sorted_ids, ids)
        self.sorted_ids = np.delete(self.sorted_ids, at)
        self.sorted_pos = np.delete(self.sorted_pos, at)


# --------------------------------------------------------------------------- the store


class _Store:
    """One built faiss index plus the bookkeeping around it.

    Not thread-safe by itself: `VectorIndex` calls mutators under its write lock and
    search under its read lock, and swaps whole stores on rebuild.
    """

    _generations = iter(range(1, 1 << 62))

    def __init__(self, index: faiss.IndexIDMap2, index_type: IndexType, alive: np.ndarray | None = None):
        self.index = index
        self.inner = faiss.downcast_index(index.index)
        self.index_type: IndexType = index_type
        self.dim = index.d
        self.labels = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        self.alive = np.ones(len(self.labels), bool) if alive is None else alive.astype(bool, copy=True)
        if len(self.alive) != len(self.labels):
            raise IndexFileError("tombstone mask does not match the index size")
        self.n_dead = int(len(self.alive) - self.alive.sum())
        self.generation = next(self._generations)  # changes when positions move
        self.built_size = self.ntotal  # size when built (IVF retrains once it has grown a lot)
        self._alive_bits: np.ndarray | None = None
        self._lookup: _IdLookup | None = None  # built on first use
        if index_type == "ivf":
            self.inner.make_direct_map(True)  # positions are sequential: array direct map

    # ---- sizes
    @property
    def ntotal(self) -> int:
        return len(self.labels)

    @property
    def live(self) -> int:
        return self.ntotal - self.n_dead

    # ---- id <-> position
    def lookup(self) -> _IdLookup:
        if self._lookup is None:
            self._lookup = _IdLookup(self.labels, self.alive)
        return self._lookup

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of the live entries among `ids` (ids unique)."""
        return self.lookup().positions(ids)

    def live_ids(self) -> np.ndarray:
        """Sorted live ids."""
        return np.sort(self.labels[self.alive] if self.n_dead else self.labels)

    # ---- vectors
    def _flat_storage(self) -> faiss.IndexFlat | None:
        if self.index_type == "flat":
            return self.inner
        if self.index_type == "hnsw":
            return faiss.downcast_index(self.inner.storage)
        return None

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """Vectors at `positions` (a copy). Flat storage is read in place; IVF goes
        through its direct map."""
        positions = np.asarray(positions, np.int64)
        storage = self._flat_storage()
        if storage is not None:
            if not self.ntotal:
                return np.empty((0, self.dim), np.float32)
            view = faiss.rev_swig_ptr(storage.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
            return view[positions]
        if not len(positions):
            return np.empty((0, self.dim), np.float32)
        return self.inner.reconstruct_batch(positions)

    def all_live(self) -> tuple[np.ndarray, np.ndarray]:
        pos = np.flatnonzero(self.alive)
        return self.labels[pos].copy(), self.vectors(pos)

    # ---- mutations (caller holds the write lock)
    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Append; ids already present are replaced (upsert)."""
        present = self.positions(ids)
        if len(present):
            self.remove_positions(present)
        start = self.ntotal
        self.index.add_with_ids(x, ids)
        self.labels = np.concatenate([self.labels, ids])
        self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
        self._alive_bits = None
        if self._lookup is not None:
            self._lookup.add(ids, np.arange(start, start + len(ids), dtype=np.int64), self.ntotal)

    def remove_positions(self, positions: np.ndarray) -> int:
        positions = np.unique(positions)
        positions = positions[self.alive[positions]]
        if not len(positions):
            return 0
        if self.index_type == "flat":
            # IndexFlat renumbers on removal, which IndexIDMap2 relies on.
            self.index.remove_ids(faiss.IDSelectorBatch(self.labels[positions]))
            self.labels = faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)
            self.alive = np.ones(len(self.labels), bool)
            self.generation = next(self._generations)
            self._lookup = None
        else:
            self.alive[positions] = False
            self.n_dead += len(positions)
            if self._lookup is not None:
                self._lookup.remove(self.labels[positions])
        self._alive_bits = None
        return len(positions)

    # ---- search (caller holds the read lock)
    def alive_bits(self) -> np.ndarray:
        if self._alive_bits is None:
            self._alive_bits = _bitmap(self.alive)
        return self._alive_bits

    def memory_bytes(self) -> int:
        """Bytes held by the index structures (vectors, graph/lists, id map)."""
        total = self.ntotal * 8 + len(self.alive)
        if self.index_type == "flat":
            return total + self.inner.codes.size()
        if self.index_type == "hnsw":
            h = self.inner.hnsw
            storage = faiss.downcast_index(self.inner.storage)
            return total + storage.codes.size() + h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4
        ivf = self.inner
        quantizer = faiss.downcast_index(ivf.quantizer)
        return total + ivf.ntotal * (ivf.code_size + 8) + quantizer.ntotal * self.dim * 4 + ivf.ntotal * 8


class _Eligible:
    """Which positions one search may return, in the cheapest form for each path.

    * a small explicit list (`positions`) when an allowed set is small: gathered exactly;
    * a bitmap over positions when an allowed set is large (exclusions folded in);
    * otherwise no materialisation at all: the tombstone bitmap (cached on the store) and
      a hash set of the few excluded positions, combined as faiss selectors, so the
      common "everything but this patient's images" query costs O(excluded), not O(n).
    Keeps every numpy buffer and selector alive for as long as it lives: faiss holds
    raw pointers to them.
    """

    def __init__(self, store: _Store, allowed: np.ndarray | None, exclude: np.ndarray | None):
        self.store = store
        self.positions: np.ndarray | None = None
        self.bits: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._sel = None
        self._refs: list[Any] = []
        excluded = store.positions(exclude) if exclude is not None and len(exclude) else np.empty(0, np.int64)
        self.excluded = excluded
        if allowed is None:
            self.count = store.live - len(excluded)
            return
        pos = store.positions(allowed)
        if len(pos) <= _GATHER_MAX:
            if len(excluded):
                pos = pos[~np.isin(pos, excluded)]
            self.positions = pos
            self.count = len(pos)
            return
        mask = np.zeros(store.ntotal, bool)
        mask[pos] = True
        self.count = len(pos) - int(np.count_nonzero(mask[excluded]))
        mask[excluded] = False
        self._mask = mask
        self.bits = _bitmap(mask)
        self.excluded = np.empty(0, np.int64)  # folded into the bitmap

    def selector(self):
        """A faiss IDSelector over positions, or None when every position is eligible."""
        if self._sel is not None or not (self.bits is not None or self.store.n_dead or len(self.excluded)):
            return self._sel
        parts = []
        if self.bits is not None:
            parts.append(faiss.IDSelectorBitmap(self.store.ntotal, faiss.swig_ptr(self.bits)))
        elif self.store.n_dead:
            alive_bits = self.store.alive_bits()
            self._refs.append(alive_bits)
            parts.append(faiss.IDSelectorBitmap(self.store.ntotal, faiss.swig_ptr(alive_bits)))
        if len(self.excluded):
            batch = faiss.IDSelectorBatch(self.excluded)
            self._refs.append(batch)
            parts.append(faiss.IDSelectorNot(batch))
        sel = parts[0]
        for other in parts[1:]:
            self._refs.append(sel)
            self._refs.append(other)
            sel = faiss.IDSelectorAnd(sel, other)
        self._refs.extend(parts)
        self._sel = sel
        return sel

    def mask(self) -> np.ndarray | None:
        """Boolean mask over positions (GPU post-filter), or None when all are eligible."""
        if self._mask is None and (self.store.n_dead or len(self.excluded)):
            mask = self.store.alive.copy()
            mask[self.excluded] = False
            self._mask = mask
        return self._mask


# --------------------------------------------------------------------------- GPU mirror


class _GpuMirror:  # pragma: no cover - needs faiss-gpu and a GPU (bench/gpu_check.py checks it)
    """Exact brute force on the GPU over the CPU master's positions.

    Written per the faiss wiki (StandardGpuResources, index_cpu_to_gpu, GpuIndexFlatIP):
    the CPU master keeps adds, removals and `write_index`; GPU indexes do not
    support remove_ids or ID selectors, and one GpuResources object must not be used
    from several threads at once, hence the lock and the post-filtering.
    """

    def __init__(self, dim: int, device: int = 0):
        self.res = faiss.StandardGpuResources()
        self.dim = dim
        self.device = device
        self.index = None
        self.generation: int | None = None
        self.lock = threading.Lock()

    def sync(self, store: _Store) -> None:
        """Bring the mirror up to the store: a full copy when positions moved (or a new
        store was swapped in), else just the vectors appended since the last sync."""
        if self.index is None or self.generation != store.generation:
            flat = store._flat_storage()
            if flat is not None:  # flat master or HNSW storage: one bulk copy
                self.index = faiss.index_cpu_to_gpu(self.res, self.device, flat)
            else:
                config = faiss.GpuIndexFlatConfig()
                config.device = self.device
                self.index = faiss.GpuIndexFlatIP(self.res, self.dim, config)
            self.generation = store.generation
        have = self.index.ntotal
        chunk = 262_144
        for start in range(have, store.ntotal, chunk):
            stop = min(start + chunk, store.ntotal)
            self.index.add(np.ascontiguousarray(store.vectors(np.arange(start, stop))))

    def search(self, store: _Store, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.sync(store)
            return self.index.search(q, k)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# --------------------------------------------------------------------------- the index


class VectorIndex:
    """Top-k cosine search over L2-normalised float32 vectors keyed by int64 ids.

    Thread-safe: searches run concurrently; `add`/`remove` take a short write lock per
    chunk; `rebuild`/`compact` build the new index aside while searches keep using the
    old one, replay writes that arrived meanwhile, then swap the reference.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "image",
        encoder_version: str = "",
        index_type: Literal["auto", "flat", "hnsw", "ivf"] = "auto",
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        approximate: Literal["hnsw", "ivf"] = "hnsw",
        hnsw: HNSWParams | None = None,
        ivf: IVFParams | None = None,
        exact_subset_max: int | None = None,
        tombstone_rebuild_fraction: float = 0.1,
        search_threads: int | None = None,
        batch_threads: int | None = None,
        use_gpu: bool | None = None,
        normalize: bool = True,
        add_chunk: int | None = None,
    ) -> None:
        """
        dim: vector size. kind: "image" or "region" (stored in the manifest).
        index_type: "auto" picks exact flat up to `approx_threshold` live vectors and
            `approximate` ("hnsw" or "ivf") above it; or force one type.
        exact_subset_max: a filtered query whose allowed set has at most this many live
            ids is answered exactly over just those vectors (default: approx_threshold),
            since graph/list traversal with a very selective filter is both slower and
            may miss. Larger allowed sets use the approximate index with a selector.
        tombstone_rebuild_fraction: compact an approximate index once this fraction of
            its entries are removed ones (they cost traversal time and recall).
        search_threads: OpenMP threads for a single query (env PRECEDENT_FAISS_SEARCH_THREADS,
            default 1: measured faster than 2 here). batch_threads: for batches and
            builds (env PRECEDENT_FAISS_BATCH_THREADS, default all cores).
        use_gpu: None = automatically when a GPU and faiss-gpu are present.
        normalize: L2-normalise added vectors and queries (a copy); cheap insurance.
        add_chunk: vectors added per write-lock hold (searches wait at most one chunk).
        """
        if dim < 1:
            raise ValueError("dim must be positive")
        if index_type not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"unknown index_type {index_type!r}")
        if approximate not in ("hnsw", "ivf"):
            raise ValueError(f"approximate must be 'hnsw' or 'ivf', not {approximate!r}")
        if approx_threshold < 0:
            raise ValueError("approx_threshold must be >= 0")
        if not 0 < tombstone_rebuild_fraction <= 1:
            raise ValueError("tombstone_rebuild_fraction must be in (0, 1]")
        self.dim = int(dim)
        self.kind = kind
        self.encoder_version = encoder_version
        self.index_type_setting = index_type
        self.approx_threshold = int(approx_threshold)
        self.approximate = approximate
        self.hnsw_params = hnsw or HNSWParams()
        self.ivf_params = ivf or IVFParams()
        self.exact_subset_max = self.approx_threshold if exact_subset_max is None else int(exact_subset_max)
        self.tombstone_rebuild_fraction = float(tombstone_rebuild_fraction)
        self.search_threads = max(1, search_threads or int(os.environ.get("PRECEDENT_FAISS_SEARCH_THREADS", 1)))
        self.batch_threads = max(
            1, batch_threads or int(os.environ.get("PRECEDENT_FAISS_BATCH_THREADS", 0)) or faiss.omp_get_max_threads()
        )
        self.normalize = normalize
        self._add_chunk = add_chunk
        self.use_gpu = gpu_available() if use_gpu is None else bool(use_gpu and gpu_available())
        if use_gpu and not self.use_gpu:
            log.warning("use_gpu requested but this faiss build sees no GPU; searching on the CPU")
        self._gpu: _GpuMirror | None = None
        self._lock = _RWLock()
        self._writer = threading.Lock()  # serialises mutations (not searches)
        self._rebuilding = threading.Lock()  # one rebuild at a time
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._store = self._build_store(np.empty(0, np.int64), np.empty((0, self.dim), np.float32))

    # ------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._store.live

    def __contains__(self, item: int) -> bool:
        with self._lock.read():
            return bool(len(self._store.positions(np.array([item], np.int64))))

    @property
    def index_type(self) -> IndexType:
        """The type of the index serving now ("flat", "hnsw" or "ivf")."""
        return self._store.index_type

    def wanted_type(self) -> IndexType:
        """The type the settings ask for at the current size (`index_type`, or for
        "auto" the threshold and whether a GPU serves). A loaded index keeps the type it
        was saved with until `compact` rebuilds it."""
        return self._resolve_type(len(self))

    @property
    def tombstones(self) -> int:
        return self._store.n_dead

    def present(self, ids: Any) -> np.ndarray:
        """The ids among `ids` that are live here, sorted (a vectorised `in`)."""
        ids = np.unique(self._ids(ids))
        with self._lock.read():
            store = self._store
            return np.sort(store.labels[store.positions(ids)])

    def ids(self) -> np.ndarray:
        """Sorted ids of the live entries."""
        with self._lock.read():
            return self._store.live_ids()

    def checksum(self) -> str:
        """`ids_checksum` of the live ids, to compare with PostgreSQL."""
        return ids_checksum(self.ids())

    def memory_bytes(self) -> int:
        with self._lock.read():
            return self._store.memory_bytes()

    def params(self) -> dict[str, Any]:
        """The settings that shape results (goes into the manifest)."""
        store = self._store
        out: dict[str, Any] = {"approx_threshold": self.approx_threshold, "exact_subset_max": self.exact_subset_max}
        if store.index_type == "hnsw":
            out.update(
                m=self.hnsw_params.m,
                ef_construction=self.hnsw_params.ef_construction,
                ef_search=self.hnsw_params.ef_search,
            )
        elif store.index_type == "ivf":
            out.update(nlist=int(store.inner.nlist), nprobe=self.ivf_params.nprobe)
        return out

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the recall/latency knob of the approximate index (no rebuild needed)."""
        from dataclasses import replace

        if ef_search is not None:
            if ef_search < 1:
                raise ValueError("ef_search must be >= 1")
            self.hnsw_params = replace(self.hnsw_params, ef_search=int(ef_search))
        if nprobe is not None:
            if nprobe < 1:
                raise ValueError("nprobe must be >= 1")
            self.ivf_params = replace(self.ivf_params, nprobe=int(nprobe))

    # ------------------------------------------------------------ validation
    def _vectors(self, x: Any, *, what: str = "vectors") -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {np.shape(x)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        arr = np.array(arr, dtype=np.float32, order="C", copy=True) if self.normalize else np.ascontiguousarray(arr)
        if self.normalize and len(arr):
            faiss.normalize_L2(arr)
        return arr

    @staticmethod
    def _ids(ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr[None]
        if arr.ndim != 1:
            raise ValueError("ids must be one-dimensional")
        if len(arr) and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("ids must be integers")
        arr = arr.astype(np.int64)
        if len(arr) and arr.min() < 0:
            raise ValueError("ids must be >= 0 (-1 marks padding in results)")
        return arr

    @staticmethod
    def _dedupe_last(ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep the last vector given for an id repeated within one call."""
        if len(np.unique(ids)) == len(ids):
            return ids, x
        _, first_in_reversed = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - first_in_reversed)
        return ids[keep], x[keep]

    # ------------------------------------------------------------ building
    def _resolve_type(self, count: int) -> IndexType:
        if self.index_type_setting == "auto":
            if self.use_gpu:
                return "flat"  # the GPU mirror is exact brute force; keep the master cheap
            chosen: IndexType = self.approximate if count > self.approx_threshold else "flat"
        else:
            chosen = self.index_type_setting
        if chosen == "ivf" and count < _IVF_MIN_TRAIN:
            return "flat"  # IVF cannot exist untrained: exact until there is data to train on
        return chosen

    def _ivf_nlist(self, n: int) -> int:
        if self.ivf_params.nlist:
            return int(self.ivf_params.nlist)
        nlist = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(max(n, 1)))))
        # Keep at least ~train_per_list points per centroid.
        while nlist > 16 and nlist * self.ivf_params.train_per_list > max(n, 1):
            nlist //= 2
        return int(nlist)

    def _build_store(
        self,
        ids: np.ndarray,
        x: np.ndarray,
        index_type: IndexType | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> _Store:
        """Build a complete index for (ids, x) without touching the live one."""
        index_type = index_type or self._resolve_type(len(ids))
        faiss.omp_set_num_threads(self.batch_threads)
        if index_type == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif index_type == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_params.m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.hnsw_params.ef_construction
            inner.hnsw.efSearch = self.hnsw_params.ef_search
        else:
            nlist = self._ivf_nlist(len(ids))
            inner = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            n_train = min(len(ids), max(nlist * self.ivf_params.train_per_list, 1), self.ivf_params.max_train)
            n_train = max(n_train, min(len(ids), nlist))
            if n_train < nlist:
                raise VectorIndexError(f"IVF with nlist={nlist} needs at least {nlist} vectors to train")
            rng = np.random.default_rng(0)
            sample = x[np.sort(rng.choice(len(ids), n_train, replace=False))] if n_train < len(ids) else x
            inner.train(sample)
            inner.nprobe = self.ivf_params.nprobe
        index = faiss.IndexIDMap2(inner)
        store = _Store(index, index_type)
        store.built_size = len(ids)
        chunk = 65_536 if index_type != "hnsw" else 16_384
        for start in range(0, len(ids), chunk):
            store.add(ids[start : start + chunk], x[start : start + chunk])
            if progress is not None:
                progress(min(start + chunk, len(ids)), len(ids))
        return store

    def _chunk(self, store: _Store) -> int:
        if self._add_chunk:
            return self._add_chunk
        # HNSW inserts cost ~0.2-0.5 ms each on 2 cores: small chunks keep search stalls short.
        return 256 if store.index_type == "hnsw" else 8192

    # ------------------------------------------------------------ mutations
    def add(self, ids: Any, vectors: Any) -> None:
        """Add (or replace) vectors. Crossing `approx_threshold` converts the index to
        the approximate type: built aside while searches keep using the exact one."""
        ids = self._ids(ids)
        x = self._vectors(vectors)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        if not len(ids):
            return
        ids, x = self._dedupe_last(ids, x)
        with self._writer:
            if self._journal is not None:
                self._journal.append(("add", ids, x))
            store = self._store
            target = self._resolve_type(store.live + len(ids))
            # Only upwards: going back to exact happens on rebuild/compact, so an index
            # hovering around the threshold does not flip-flop between types.
            if store.index_type == "flat" and target != "flat":
                old_ids, old_x = self._snapshot(store)
                keep = ~np.isin(old_ids, ids)
                new = self._build_store(np.concatenate([old_ids[keep], ids]), np.concatenate([old_x[keep], x]), target)
                log.info("vector index %s: %s -> %s at %d vectors", self.kind, store.index_type, target, new.live)
                with self._lock.write():
                    self._store = new
                return
            faiss.omp_set_num_threads(self.batch_threads)
            step = self._chunk(store)
            for start in range(0, len(ids), step):
                with self._lock.write():
                    store.add(ids[start : start + step], x[start : start + step])
            # IVF lists trained on a much smaller collection get long and slow: retrain.
            regrow = store.index_type == "ivf" and store.live > _IVF_REGROW * max(store.built_size, _IVF_MIN_TRAIN)
        if regrow and self._journal is None:
            self.compact()

    def remove(self, ids: Any) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed.

        Exact index: removed in place. Approximate: tombstoned, and compacted once
        tombstones exceed `tombstone_rebuild_fraction`.
        """
        ids = np.unique(self._ids(ids))
        if not len(ids):
            return 0
        with self._writer:
            if self._journal is not None:
                self._journal.append(("remove", ids, None))
            store = self._store
            with self._lock.write():
                removed = store.remove_positions(store.positions(ids))
            needs_compaction = store.index_type != "flat" and store.n_dead > self.tombstone_rebuild_fraction * max(
                store.ntotal, 1
            )
        if needs_compaction and self._journal is None:
            self.compact()
        return removed

    def _snapshot(self, store: _Store) -> tuple[np.ndarray, np.ndarray]:
        with self._lock.read():
            return store.all_live()

    def rebuild(self, ids: Any, vectors: Any, *, progress: Callable[[int, int], None] | None = None) -> None:
        """Replace the whole content (e.g. from PostgreSQL), choosing the type by size.

        Built aside: searches keep answering from the current index until the new one
        is complete; adds and removes made meanwhile are replayed onto it before the swap.
        Peak memory is about twice the index size. `progress(done, total)` is called
        as vectors are inserted (HNSW builds of 1M vectors take minutes).
        """
        ids = self._ids(ids)
        x = self._vectors(vectors)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        ids, x = self._dedupe_last(ids, x)
        self._rebuild_from(lambda: (ids, x), progress)

    def compact(self) -> None:
        """Rebuild from the live entries, dropping tombstones."""
        self._rebuild_from(lambda: self._snapshot(self._store))

    def _rebuild_from(self, source, progress: Callable[[int, int], None] | None = None) -> None:
        with self._rebuilding:
            with self._writer:
                self._journal = []
                ids, x = source()
            try:
                new = self._build_store(ids, x, progress=progress)
                with self._writer:
                    journal, self._journal = self._journal, None
                    for op, j_ids, j_x in journal:
                        if op == "add":
                            new.add(j_ids, j_x)
                        else:
                            new.remove_positions(new.positions(j_ids))
                    with self._lock.write():
                        self._store = new
            finally:
                self._journal = None

    # ------------------------------------------------------------ search
    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        allowed_ids: Any | None = None,
        exclude_ids: Any | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Top-k by inner product for each query row (a 1-D query is one row).

        allowed_ids: only these ids may be returned (the ids that pass metadata filters).
        exclude_ids: these ids are never returned (e.g. the query's own patient).
        Returns exactly min(k, number of eligible ids) results per query: selective
        filters are answered exactly over the eligible vectors; broad ones through the
        approximate index with an ID selector, retried with a wider search and finally
        exactly if the traversal found fewer than k.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError("k must be an integer")
        k = int(k)
        if k < 1:
            raise ValueError("k must be >= 1")
        q = self._vectors(queries, what="queries")
        allowed = None if allowed_ids is None else _unique(self._ids(allowed_ids))
        exclude = None if exclude_ids is None else _unique(self._ids(exclude_ids))
        faiss.omp_set_num_threads(self.search_threads if len(q) == 1 else self.batch_threads)
        with self._lock.read():
            store = self._store
            ef = int(ef_search or self.hnsw_params.ef_search)
            probes = int(nprobe or self.ivf_params.nprobe)
            return self._search_store(store, q, k, allowed, exclude, ef, probes)

    def _search_store(self, store, q, k, allowed, exclude, ef, probes) -> SearchResult:
        nq = len(q)
        if store.live == 0 or nq == 0:
            return _padded(nq, k)
        elig = _Eligible(store, allowed, exclude)
        if elig.count == 0:
            return _padded(nq, k)
        if elig.positions is not None:  # few candidates: exact over just them
            return self._exact_gather(store, q, k, elig.positions)
        if self.use_gpu and k <= GPU_MAX_K:  # pragma: no cover - GPU only
            result = self._gpu_search(store, q, k, elig)
            if result is not None:
                return result
        if store.index_type == "flat" or (allowed is not None and elig.count <= self.exact_subset_max):
            return self._exact_scan(store, q, k, elig)
        return self._approx(store, q, k, elig, ef, probes)

    def _finish(self, store: _Store, D: np.ndarray, P: np.ndarray) -> SearchResult:
        ids = np.where(P >= 0, store.labels[np.maximum(P, 0)], -1).astype(np.int64)
        scores = np.where(P >= 0, D, -np.inf).astype(np.float32)
        return SearchResult(scores, ids)

    def _exact_gather(self, store: _Store, q: np.ndarray, k: int, positions: np.ndarray) -> SearchResult:
        """Exact over few candidates: copy their vectors, brute force with faiss (which
        keeps to the OpenMP threads set for this call; numpy's BLAS would start its own
        threads and stall on a busy 2-core machine)."""
        vecs = np.ascontiguousarray(store.vectors(positions))
        kk = min(k, len(positions))
        d, i = faiss.knn(q, vecs, kk, metric=faiss.METRIC_INNER_PRODUCT)
        D = np.full((len(q), k), -np.inf, np.float32)
        P = np.full((len(q), k), -1, np.int64)
        D[:, :kk] = d
        P[:, :kk] = np.where(i >= 0, positions[np.maximum(i, 0)], -1)
        return self._finish(store, D, P)

    def _exact_scan(self, store: _Store, q: np.ndarray, k: int, elig: _Eligible) -> SearchResult:
        """Exact over every eligible position, without copying vectors: the selector is
        tested per vector and only members cost a dot product."""
        sel = elig.selector()
        flat = store._flat_storage()
        if flat is not None:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
            D, P = flat.search(q, k, params=params)
        else:
            params = faiss.SearchParametersIVF(nprobe=int(store.inner.nlist))
            if sel is not None:
                params.sel = sel
            D, P = store.inner.search(q, k, params=params)
        return self._finish(store, D, P)

    def _approx(self, store: _Store, q: np.ndarray, k: int, elig: _Eligible, ef: int, probes: int) -> SearchResult:
        """HNSW/IVF with the eligibility selector applied during traversal; rows that
        come back short (possible with filters or many tombstones) are retried wider,
        then answered exactly."""
        sel = elig.selector()
        want = min(k, elig.count)
        rows = np.arange(len(q))
        D = np.empty((len(q), k), np.float32)
        P = np.empty((len(q), k), np.int64)
        # A filter passing a fraction s of the entries leaves ~s of each neighbourhood
        # usable: widen the search up to 10x as s drops below 20% (measured at 100k x 512:
        # s=5%, efSearch 64 -> recall 0.93, 256 -> 0.99).
        widen = min(10.0, max(1.0, 0.2 * store.live / max(elig.count, 1)))
        width_ef, width_probes = int(max(ef, k) * widen), int(probes * widen)
        for _attempt in range(3):
            if store.index_type == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=width_ef)
            else:
                params = faiss.SearchParametersIVF(nprobe=min(width_probes, int(store.inner.nlist)))
            if sel is not None:
                params.sel = sel
            d, i = store.inner.search(q[rows], k, params=params)
            D[rows], P[rows] = d, i
            short = (i >= 0).sum(axis=1) < want
            if not short.any():
                return self._finish(store, D, P)
            rows = rows[short]
            width_ef, width_probes = width_ef * 4, width_probes * 4
        exact = self._exact_scan(store, q[rows], k, elig)
        result = self._finish(store, D, P)
        result.scores[rows], result.ids[rows] = exact.scores, exact.ids
        return result

    def _gpu_search(
        self, store: _Store, q: np.ndarray, k: int, elig: _Eligible
    ) -> SearchResult | None:  # pragma: no cover
        """Search the GPU mirror, over-fetching to make up for ineligible positions.
        Returns None to fall back to the CPU when the over-fetch cannot cover them."""
        if self._gpu is None:
            self._gpu = _GpuMirror(self.dim)
        mask = elig.mask()
        fetch = k + (0 if mask is None else store.ntotal - elig.count)
        if fetch > GPU_MAX_K:
            return None
        D, P = self._gpu.search(store, q, fetch)
        if mask is not None:
            valid = (P >= 0) & mask[np.maximum(P, 0)]
            order = np.argsort(~valid, axis=1, kind="stable")  # valid first, rank kept
            D = np.take_along_axis(D, order, axis=1)[:, :k]
            P = np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(P, order, axis=1), -1)[:, :k]
        return self._finish(store, D, P)

    def get_vectors(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, their stored vectors), in sorted id order."""
        ids = np.unique(self._ids(ids))
        with self._lock.read():
            store = self._store
            pos = store.positions(ids)
            return store.labels[pos].copy(), store.vectors(pos)

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str], *, encoder_version: str | None = None) -> IndexManifest:
        """Write index, tombstones and manifest atomically (each file temp + fsync +
        rename; the manifest last, holding the index file's sha256, so a crash between
        renames is detected on load as a mismatch). Only the CPU master is written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if encoder_version is not None:
            self.encoder_version = encoder_version
        with self._writer, self._lock.read():  # a consistent snapshot; searches go on
            store = self._store
            _atomic_write(directory / INDEX_FILE, lambda tmp: faiss.write_index(store.index, tmp))
            dead = np.flatnonzero(~store.alive).astype(np.int64)

            def write_tombstones(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, dead)

            _atomic_write(directory / TOMBSTONES_FILE, write_tombstones)
            manifest = IndexManifest(
                format_version=FORMAT_VERSION,
                encoder_version=self.encoder_version,
                kind=self.kind,
                dim=self.dim,
                count=store.live,
                index_type=store.index_type,
                params=self.params(),
                ids_sha256=ids_checksum(store.live_ids()),
                index_sha256=file_sha256(directory / INDEX_FILE),
                created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            )
            text = manifest.to_json()
            _atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(text))
        return manifest

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> IndexManifest:
        """The manifest alone (cheap): lets a caller decide staleness before loading."""
        path = Path(directory) / MANIFEST_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise IndexFileError(f"no index manifest at {path}") from None
        except OSError as exc:
            raise IndexFileError(f"cannot read index manifest {path}: {exc}") from exc
        try:
            manifest = IndexManifest.from_json(text)
        except (ValueError, TypeError) as exc:
            raise IndexFileError(f"corrupt index manifest {path}: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise IndexFileError(
                f"index manifest {path} has format version {manifest.format_version}, expected {FORMAT_VERSION}"
            )
        return manifest

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, verify: bool = True, **options: Any
    ) -> tuple[VectorIndex, IndexManifest]:
        """Load a saved index; `options` are constructor arguments (thresholds, GPU...).

        Raises IndexFileError when a file is missing or unreadable, when the index file's
        checksum (verify=True) or the ids' checksum disagree with the manifest.
        """
        directory = Path(directory)
        manifest = cls.read_manifest(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise IndexFileError(f"index file missing: {index_path}")
        if verify and file_sha256(index_path) != manifest.index_sha256:
            raise IndexFileError(f"index file {index_path} does not match its manifest (corrupt or partly written)")
        try:
            raw = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise IndexFileError(f"cannot read index file {index_path}: {str(exc).strip()[:300]}") from exc
        index = raw  # read_index already returns the concrete type (and owns it: keep this proxy)
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexFileError(f"{index_path} is not an IndexIDMap2 ({type(index).__name__})")
        if index.d != manifest.dim:
            raise IndexFileError(f"{index_path} has dim {index.d}, manifest says {manifest.dim}")
        try:
            dead = np.load(directory / TOMBSTONES_FILE, allow_pickle=False)
        except FileNotFoundError:
            raise IndexFileError(f"tombstone file missing: {directory / TOMBSTONES_FILE}") from None
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"corrupt tombstone file in {directory}: {exc}") from exc
        alive = np.ones(index.ntotal, bool)
        if len(dead):
            if dead.min() < 0 or dead.max() >= index.ntotal:
                raise IndexFileError(f"tombstones in {directory} point outside the index")
            alive[dead] = False

        params = manifest.params or {}
        options.setdefault("kind", manifest.kind)
        options.setdefault("encoder_version", manifest.encoder_version)
        if manifest.index_type == "hnsw" and "hnsw" not in options:
            inner = faiss.downcast_index(index.index)
            options["hnsw"] = HNSWParams(
                m=int(params.get("m", HNSWParams.m)),
                ef_construction=int(inner.hnsw.efConstruction),
                ef_search=int(params.get("ef_search", HNSWParams.ef_search)),
            )
        if manifest.index_type == "ivf" and "ivf" not in options:
            options["ivf"] = IVFParams(nlist=params.get("nlist"), nprobe=int(params.get("nprobe", IVFParams.nprobe)))
        self = cls(manifest.dim, **options)
        store = _Store(index, manifest.index_type, alive)  # type: ignore[arg-type]
        if store.live != manifest.count or ids_checksum(store.live_ids()) != manifest.ids_sha256:
            raise IndexFileError(f"index in {directory} does not match its manifest's ids")
        self._store = store
        return self, manifest


def _unique(ids: np.ndarray) -> np.ndarray:
    """np.unique, skipping the sort when the caller already passes sorted ids
    (e.g. `ORDER BY id` from PostgreSQL): O(m) instead of O(m log m) per query."""
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids
    return np.unique(ids)


def _padded(nq: int, k: int) -> SearchResult:
    return SearchResult(np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64))
