"""Synthetic embedding vectors for benchmarks (numpy only: no faiss, no torch, no Django).

Clustered vectors with a low intrinsic dimension (Gaussian clusters in a `latent_dim`
space, randomly projected to `dim`, plus a little isotropic noise, then L2-normalised),
which is how CNN embeddings behave; uneven cluster sizes. Queries are fresh draws from
the same mixture, never copies of database vectors. `bench_search` and
`bench/gpu_check.py` (which runs where faiss may be missing) share them.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    n: int,
    dim: int,
    *,
    n_queries: int = 1000,
    n_clusters: int | None = None,
    latent_dim: int = 64,
    spread: float = 0.5,
    noise: float = 0.02,
    seed: int = 0,
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """(database (n, dim), queries (n_queries, dim)), float32, L2-normalised, deterministic.

    Generated in chunks so 1M x 512 needs the output array (2 GB) and little else.
    """
    if n < 1 or dim < 1:
        raise ValueError("n and dim must be positive")
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or max(16, int(np.sqrt(n)))
    latent = min(latent_dim, dim)
    proj = (rng.standard_normal((latent, dim), dtype=np.float32) / np.float32(np.sqrt(latent))).astype(np.float32)
    centers = rng.standard_normal((n_clusters, latent), dtype=np.float32)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))  # uneven cluster sizes

    def sample(m: int, r: np.random.Generator) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, chunk):
            size = min(chunk, m - start)
            which = r.choice(n_clusters, size, p=weights)
            z = centers[which] + np.float32(spread) * r.standard_normal((size, latent), dtype=np.float32)
            block = z @ proj
            block += np.float32(noise) * r.standard_normal((size, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)  # per chunk: no second 2 GB array
            out[start : start + size] = block
        return out

    database = sample(n, np.random.default_rng([seed, 1]))
    queries = sample(n_queries, np.random.default_rng([seed, 2]))
    return database, queries
