"""The GPU checks of the search and triage issues, as one script for a lent GPU machine.

    python bench/gpu_check.py --json gpu.json                  # on the GPU machine: defaults
    python bench/gpu_check.py --device cpu --n 5000 --dim 32 --images 4 --batch 2 --archs resnet18

Needs only torch, torchvision, numpy and tqdm (no Django, no database); faiss is optional:
points 3 and 4 run only where a faiss build sees a GPU. Where the machine lacks tqdm:
`pip install --target .gpu-deps tqdm` beside the repository and send `.gpu-deps` along
(ignored by git); this script puts it on the path.
It measures:

1. encoder throughput: our encoders (embeddings/encoder.py, random weights) embedding
   1×224×224 inputs through `embed_batch` as the pipeline does (bf16 autocast and
   channels_last on CUDA), batch 256, img/s after a warm-up batch;
2. the GPU search reference: exact inner-product top-10 with torch on the device over
   the clustered synthetic vectors bench_search uses (1M×512 by default), fp32 and fp16:
   single-query p50/p99, batched QPS, and fp16's recall@10 against fp32;
3. faiss on the GPU (flat inner product, `index_cpu_to_gpu`, and with float16 storage)
   on the same vectors, only where faiss with GPU support is installed;
4. our VectorIndex (embeddings/index.py) serving from its GPU mirror, where faiss with GPU
   support sees a GPU: the same operations on a GPU index and on an exact CPU index
   (search, exclusions, removals, adds, k=100, searches during adds, save and load),
   recall@k of each against the CPU's answer, no removed or excluded id ever returned,
   single-query latency and batched QPS of both through `VectorIndex.search`, and what
   keeping the mirror current costs a search (first copy, after a removal, after an add);
5. training on the device: the encoder's contrastive training (`embeddings.training.train`,
   256², bf16) for one epoch, the triage classifier (`triage.training.train_classifier`,
   512² films, 256² patches, bf16) for one epoch over synthetic films, and the FCOS
   detector (`triage.detection.train`) and U-Net segmenter (`triage.segmentation.train`)
   for a fixed number of steps: films/s and steps/s; and the encoder's training rate
   against the number of augmenting DataLoader workers (on CUDA by default).

Prints a table and writes everything to --json. Sizes and defaults follow the issue:
batch 256 at 224², 1M×512 vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu-deps"  # what the GPU machine lacks, sent along (see above)
sys.path[:0] = [str(ROOT), str(ROOT / "platform")] + ([str(DEPS)] if DEPS.is_dir() else [])

import numpy as np  # noqa: E402

try:  # faiss before torch, as everywhere in the project (OpenMP runtimes)
    import faiss
except ImportError:
    faiss = None

import torch  # noqa: E402

from embeddings import encoder as enc  # noqa: E402
from embeddings import training as encoder_training  # noqa: E402
from embeddings.synthetic import clustered_vectors  # noqa: E402
from triage import detection, segmentation, training  # noqa: E402

K = 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    info = {
        "python": _stdlib_platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda": torch.version.cuda,
        "faiss": getattr(faiss, "__version__", None),
        "faiss_gpus": faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def encoder_throughput(archs: list[str], device: torch.device, *, images: int, batch: int, size: int) -> list[dict]:
    """img/s of each encoder over `images` inputs, after one untimed batch."""
    inputs = torch.rand(images, 1, size, size)
    rows = []
    for arch in archs:
        model = enc.build_encoder(arch, dim=512)
        enc.embed_batch(model, inputs[:batch], device, batch_size=batch)  # warm-up: cuDNN autotune, allocator
        sync(device)
        start = time.perf_counter()
        vectors = enc.embed_batch(model, inputs, device, batch_size=batch)
        sync(device)
        seconds = time.perf_counter() - start
        assert vectors.shape == (images, 512) and np.isfinite(vectors).all()
        rows.append(
            {
                "arch": arch,
                "images": images,
                "batch": batch,
                "input": f"{size}x{size}",
                "bf16": enc._use_bf16(device, None),
                "seconds": round(seconds, 4),
                "images_per_s": round(images / seconds, 1),
            }
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _topk(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(queries @ database.T, k, dim=1).indices


def torch_search(
    database: np.ndarray, queries: np.ndarray, device: torch.device, *, single: int, batch: int
) -> tuple[list[dict], np.ndarray]:
    """Exact top-k on the device in fp32 and fp16: latency of one query, QPS in batches.
    Returns the rows and fp32's top-k (the reference every engine's recall is against)."""
    rows, found = [], {}
    for dtype in (torch.float32, torch.float16):
        if dtype == torch.float16 and device.type != "cuda":
            continue  # half-precision matmul is a GPU path
        db = torch.from_numpy(database).to(device, dtype)
        qs = torch.from_numpy(queries).to(device, dtype)
        _topk(db, qs[:1], K)  # warm-up
        sync(device)
        latencies = []
        for i in range(min(single, len(qs))):
            start = time.perf_counter()
            _topk(db, qs[i : i + 1], K).cpu()
            latencies.append((time.perf_counter() - start) * 1000)
        sync(device)
        start = time.perf_counter()
        parts = [_topk(db, qs[i : i + batch], K) for i in range(0, len(qs), batch)]
        result = torch.cat(parts).cpu().numpy()
        seconds = time.perf_counter() - start
        found[dtype] = result
        rows.append(
            {
                "engine": f"torch exact {str(dtype).removeprefix('torch.')}",
                "vectors": len(database),
                "dim": database.shape[1],
                "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                "p99_ms": round(float(np.percentile(latencies, 99)), 3),
                "batched_qps": round(len(qs) / seconds, 1),
                "query_batch": batch,
            }
        )
        del db, qs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    truth = found[torch.float32]
    for row, dtype in zip(rows, found, strict=True):
        row["recall_at_10_vs_fp32"] = round(recall(found[dtype], truth), 4)
    return rows, truth


def faiss_sees_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_gpu_search(database: np.ndarray, queries: np.ndarray, truth: np.ndarray, *, single: int) -> list[dict]:
    """faiss's flat inner-product index on GPU 0, as embeddings/index.py serves it
    (`index_cpu_to_gpu`), and the same with float16 storage (`useFloat16`)."""
    if not faiss_sees_gpu():
        return []
    resources = faiss.StandardGpuResources()
    cpu_index = faiss.IndexFlatIP(database.shape[1])
    cpu_index.add(database)
    rows = []
    for float16 in (False, True):
        if float16:
            config = faiss.GpuIndexFlatConfig()
            config.useFloat16 = True
            index = faiss.GpuIndexFlatIP(resources, database.shape[1], config)
            index.add(database)
        else:
            index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        index.search(queries[:1], K)
        latencies = []
        for i in range(min(single, len(queries))):
            start = time.perf_counter()
            index.search(queries[i : i + 1], K)
            latencies.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        _, found = index.search(queries, K)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "engine": "faiss GPU flat IP" + (" fp16" if float16 else ""),
                "vectors": len(database),
                "dim": database.shape[1],
                "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                "p99_ms": round(float(np.percentile(latencies, 99)), 3),
                "batched_qps": round(len(queries) / seconds, 1),
                "query_batch": len(queries),
                "recall_at_10_vs_fp32": round(recall(found, truth), 4),
            }
        )
        del index
    return rows


def index_check(database: np.ndarray, queries: np.ndarray, *, use_gpu: bool, single: int, seed: int = 0) -> dict:
    """embeddings/index.VectorIndex with `use_gpu` against an exact CPU VectorIndex on the
    same vectors, through the operations search serves: every answer's recall@k against
    the CPU's, no removed or excluded id ever returned, and the timings of both."""
    import threading

    from embeddings.index import VectorIndex, gpu_available

    rng = np.random.default_rng(seed)
    n, dim = database.shape
    ids = np.arange(n, dtype=np.int64) * 3 + 5  # ids unrelated to positions
    cpu = VectorIndex(dim, index_type="flat", use_gpu=False)
    dev = VectorIndex(dim, use_gpu=use_gpu)
    out: dict = {"vectors": n, "dim": dim, "use_gpu": dev.use_gpu, "faiss_gpu": gpu_available(), "checks": {}}
    for index in (cpu, dev):
        index.rebuild(ids, database)
    out["index_type"] = dev.index_type

    def compare(name: str, k: int = K, forbidden: np.ndarray | None = None, **kwargs) -> None:
        want = cpu.search(queries, k, **kwargs).ids
        got = dev.search(queries, k, **kwargs).ids
        row = {"k": k, "recall": round(recall(got, want), 4), "short_rows": int(((got >= 0).sum(1) < k).sum())}
        if forbidden is not None:
            row["forbidden_returned"] = int(np.isin(got, forbidden).sum())
        out["checks"][name] = row

    compare("search")
    compare("k=100", k=100)
    excluded = rng.choice(ids, 200, replace=False)
    compare("exclude 200 ids", forbidden=excluded, exclude_ids=excluded)
    # the queries' own nearest neighbours are the ids most worth removing
    nearest = np.unique(cpu.search(queries[:100], 5).ids)
    removed = np.unique(np.concatenate([nearest, rng.choice(ids, n // 100, replace=False)]))
    for index in (cpu, dev):
        index.remove(removed)
    out["removed"] = len(removed)
    compare("after removing 1%", forbidden=removed)
    new_ids = np.arange(len(queries), dtype=np.int64) * 3 + 3 * n + 5
    near_queries = queries + rng.normal(0, 0.01, queries.shape).astype(np.float32)
    for index in (cpu, dev):
        index.add(new_ids, near_queries)  # each query's own near-copy must now come first
    compare("after adding near-copies")
    out["checks"]["near_copy_first"] = round(float(np.mean(dev.search(queries, 1).ids[:, 0] == new_ids)), 4)

    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                result = dev.search(queries[:16], K)
                assert (result.ids >= 0).all()
        except BaseException as exc:  # reported, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    late_ids = new_ids + 3 * len(queries)
    extra = rng.normal(size=(len(queries), dim)).astype(np.float32)
    for start in range(0, len(late_ids), 64):
        for index in (cpu, dev):
            index.add(late_ids[start : start + 64], extra[start : start + 64])
    stop.set()
    for thread in threads:
        thread.join()
    out["checks"]["searches_during_adds"] = {"errors": [repr(e) for e in errors]}
    compare("after concurrent adds")

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        dev.save(folder)
        loaded, manifest = VectorIndex.load(folder, use_gpu=use_gpu)
        got, want = loaded.search(queries, K).ids, cpu.search(queries, K).ids
        out["checks"]["saved and loaded"] = {"k": K, "recall": round(recall(got, want), 4), "count": manifest.count}

    out["upkeep_ms"] = _upkeep(VectorIndex, database, ids, queries, use_gpu=use_gpu)
    for name, index in (("cpu", cpu), ("device", dev)):
        index.search(queries[:1], K)  # warm-up (the GPU mirror's first copy)
        latencies = []
        for i in range(min(single, len(queries))):
            start = time.perf_counter()
            index.search(queries[i : i + 1], K, exclude_ids=excluded[:5])
            latencies.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        index.search(queries, K)
        seconds = time.perf_counter() - start
        out[name] = {
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "batched_qps": round(len(queries) / seconds, 1),
        }
    out["ok"] = (
        not errors
        and all(
            row.get("recall", 1) >= 0.99 and not row.get("short_rows") and not row.get("forbidden_returned")
            for row in out["checks"].values()
            if isinstance(row, dict) and "recall" in row
        )
        and out["checks"]["near_copy_first"] >= 0.99
    )
    return out


def _upkeep(vector_index, database, ids, queries, *, use_gpu: bool) -> dict:
    """What keeping a fresh index current costs one search (ms): the first search (the
    GPU mirror's first copy), the next, the first after one removal (flat master:
    positions move, the mirror is copied again) and the first after one add."""

    def timed() -> float:
        start = time.perf_counter()
        index.search(queries[:1], K)
        return round((time.perf_counter() - start) * 1000, 2)

    index = vector_index(database.shape[1], use_gpu=use_gpu)
    index.rebuild(ids, database)
    out = {"first_search": timed(), "next_search": timed()}
    index.remove(ids[:1])
    out["after_a_removal"] = timed()
    index.add([int(ids.max()) + 1], queries[:1])
    out["after_an_add"] = timed()
    return out


def _films(count: int, side: int, seed: int = 0) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """Synthetic films: smooth noise with one bright disc each (a lesion to find)."""
    rng = np.random.default_rng(seed)
    films = []
    for _ in range(count):
        grey = rng.normal(1000, 60, (side, side)).astype(np.float32)
        cy, cx, r = rng.integers(side // 4, 3 * side // 4, 2).tolist() + [side // 16]
        yy, xx = np.ogrid[:side, :side]
        grey[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 400
        films.append((grey, (cx - r, cy - r, cx + r, cy + r)))
    return films


def model_training(device: torch.device, *, films: int, side: int, input_size: int, steps: int) -> list[dict]:
    """One epoch of the encoder and the classifier, `steps` steps of the detector and the
    segmenter, all on the same synthetic films."""
    data = _films(films, side)
    batch = min(8, films)
    rows = []
    _, enc_report = encoder_training.train(
        [grey for grey, _ in data], epochs=1, batch_size=max(2, min(32, films)), device=device,
        num_workers=None if device.type == "cuda" else 0, progress=False,
    )  # fmt: skip
    assert all(np.isfinite(enc_report.epoch_losses)), enc_report.epoch_losses
    rows.append(
        {
            "model": "encoder",
            "films": films,
            "input": f"{encoder_training.DEFAULT_INPUT_SIZE}x{encoder_training.DEFAULT_INPUT_SIZE}",
            "seconds": round(enc_report.seconds, 3),
            "films_per_s": round(enc_report.images_per_second, 2),
            "loss": round(enc_report.epoch_losses[-1], 4),
        }
    )
    items = [
        training.TrainingItem(grey, abnormal=i % 2, boxes=[box] if i % 2 else [], key=str(i))
        for i, (grey, box) in enumerate(data)
    ]
    config = training.ClassifierConfig(
        input_size=input_size, patch_size=min(256, input_size), epochs=1, batch_size=batch
    )
    _, report = training.train_classifier(items, config, device=device, progress=False)
    rows.append(
        {
            "model": "classifier",
            "films": films,
            "input": f"{input_size}x{input_size}",
            "seconds": round(report.seconds, 3),
            "films_per_s": round(report.images_per_second, 2),
        }
    )
    samples = [detection.Sample(grey, boxes=[box], labels=[0]) for grey, box in data]
    _, det = detection.train(samples, ["lesion"], input_size=input_size, max_steps=steps, device=device, progress=False)
    rows.append(_steps_row("detector", det.steps, det.seconds, input_size))
    masks = [
        segmentation.Sample(grey, masks={"lesion": segmentation.ellipse_mask(grey.shape, [box])}) for grey, box in data
    ]
    _, seg = segmentation.train(
        masks, ["lesion"], input_size=min(512, input_size), batch_size=batch, max_steps=steps, device=device,
        progress=False,
    )  # fmt: skip
    rows.append(_steps_row("segmenter", seg.steps, seg.seconds, min(512, input_size)))
    return rows


def encoder_workers(
    device: torch.device, workers: list[int], *, films: int, side: int, batch: int, epochs: int = 2
) -> list[dict]:
    """Contrastive training throughput against the number of augmenting DataLoader
    workers (what `embeddings.training.default_num_workers` is set from)."""
    data = [grey for grey, _ in _films(films, side, seed=1)]
    rows = []
    for count in workers:
        _, report = encoder_training.train(
            data, epochs=epochs, batch_size=batch, device=device, num_workers=count, progress=False
        )
        rows.append(
            {
                "workers": count,
                "films": films,
                "film": f"{side}x{side}",
                "batch": batch,
                "epochs": epochs,
                "seconds": round(report.seconds, 3),
                "films_per_s": round(report.images_per_second, 1),
            }
        )
    return rows


def _steps_row(model: str, steps: int, seconds: float, size: int) -> dict:
    return {
        "model": model,
        "steps": steps,
        "input": f"{size}x{size}",
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 2) if seconds else None,
    }


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k per query."""
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    parser.add_argument("--images", type=int, default=4096, help="inputs per encoder (default %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="encoder batch (default %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default %(default)s)")
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors (default %(default)s)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--query-batch", type=int, default=256)
    parser.add_argument("--skip-encoders", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--index-n", type=int, default=None, help="vectors in the VectorIndex check (default --n)")
    parser.add_argument(
        "--index-on-cpu", action="store_true", help="run the VectorIndex check even without a GPU faiss (CPU vs CPU)"
    )
    parser.add_argument("--films", type=int, default=64, help="synthetic films for training")
    parser.add_argument("--film-side", type=int, default=1024)
    parser.add_argument("--triage-input", type=int, default=512, help="triage models' input side")
    parser.add_argument("--steps", type=int, default=50, help="detector and segmenter steps")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=None,
        help="augmenting-worker counts to time encoder training with (default on CUDA: 1 4 8 and every core "
        "but one; none on the CPU)",
    )
    parser.add_argument("--worker-films", type=int, default=384, help="films of the worker sweep")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = enc.pick_device(args.device)
    report: dict = {"environment": environment(device)}
    print(json.dumps(report["environment"]))
    if not args.skip_encoders:
        report["encoders"] = encoder_throughput(
            args.archs, device, images=args.images, batch=args.batch, size=args.size
        )
        for row in report["encoders"]:
            print(
                f"encoder {row['arch']:<12} {row['images_per_s']:>10.1f} img/s "
                f"(batch {row['batch']}, bf16 {row['bf16']})"
            )
    database, queries = clustered_vectors(args.n, args.dim, n_queries=args.queries)
    report["search"], truth = torch_search(database, queries, device, single=args.single, batch=args.query_batch)
    report["search"] += faiss_gpu_search(database, queries, truth, single=args.single)
    for row in report["search"]:
        print(
            f"{row['engine']:<22} {row['vectors']}x{row['dim']}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
            f"{row['batched_qps']} QPS batched, recall@10 vs fp32 {row['recall_at_10_vs_fp32']}"
        )
    if faiss is not None and (faiss_sees_gpu() or args.index_on_cpu):
        n = args.index_n or args.n
        report["index"] = index_check(database[:n], queries, use_gpu=faiss_sees_gpu(), single=min(args.single, 50))
        row = report["index"]
        print(
            f"VectorIndex {row['vectors']}x{row['dim']} use_gpu={row['use_gpu']} ({row['index_type']}): ok={row['ok']}"
        )
        for name, check in row["checks"].items():
            print(f"  {name}: {check}")
        print(f"  upkeep (ms): {row['upkeep_ms']}")
        for name in ("cpu", "device"):
            print(
                f"  {name}: p50 {row[name]['p50_ms']} ms, p99 {row[name]['p99_ms']} ms, {row[name]['batched_qps']} QPS"
            )
    workers = args.workers
    if workers is None:
        cores = len(os.sched_getaffinity(0))
        workers = sorted({1, 4, 8, cores - 1} - {0}) if device.type == "cuda" else []
    if workers and not args.skip_training:
        report["encoder_workers"] = encoder_workers(
            device, workers, films=args.worker_films, side=args.film_side, batch=16
        )
        for row in report["encoder_workers"]:
            print(f"train encoder, {row['workers']:>2} augmenting workers: {row['films_per_s']} films/s")
    if not args.skip_training:
        report["training"] = model_training(
            device, films=args.films, side=args.film_side, input_size=args.triage_input, steps=args.steps
        )
        for row in report["training"]:
            rate = f"{row['films_per_s']} films/s" if "films_per_s" in row else f"{row['steps_per_s']} steps/s"
            print(f"train {row['model']:<10} {row['input']}: {rate} ({row['seconds']} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
