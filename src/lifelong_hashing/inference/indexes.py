"""Approximate search for large catalogues: faiss binary indexes built at export, per modality.

The exact code store stays the reference (and ``serving.index.kind: flat`` serves it). An
inverted file (``IndexBinaryIVF``: codes bucketed by their nearest of ``ivf_lists`` trained
centroids, ``ivf_probes`` buckets scanned per query) or multi-index hashing
(``IndexBinaryMultiHash``: ``multihash_tables`` hash tables on disjoint substrings, buckets within
``multihash_flips`` bits probed) scans a fraction of the codes. Both rank their candidates by exact
Hamming distance, so a hit's distance is true; what they can miss is recall, which export
measures against the exact search and writes into the manifest with the build time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lifelong_hashing.config import IndexConfig
from lifelong_hashing.engine.codestore import MODALITIES, CodeStore, faiss_bytes

IVF_MIN_POINTS_PER_LIST = 39  # faiss' k-means warns (and clusters badly) below this
RECALL_K, RECALL_QUERIES = 100, 1000


def index_file(modality: str) -> str:
    return f"index_{modality}.faiss"


def build_index(codes: np.ndarray, bits: int, cfg: IndexConfig, seed: int = 0):
    """The faiss index of ``cfg.kind`` over packed uint64 ``codes``, items in store order."""
    import faiss

    data = faiss_bytes(codes, bits)
    if cfg.kind == "ivf":
        lists = max(1, min(cfg.ivf_lists, len(data) // IVF_MIN_POINTS_PER_LIST))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, lists)
        index.cp.seed = seed
        sample = np.random.default_rng(seed).permutation(len(data))[: lists * 100]  # plenty for k-means
        index.train(data[np.sort(sample)])
    elif cfg.kind == "multihash":
        per_table = bits // cfg.multihash_tables
        if not 1 <= per_table <= 64:
            raise ValueError(f"serving.index.multihash_tables={cfg.multihash_tables} leaves {per_table} bits per "
                             f"table of a {bits}-bit code; faiss needs 1 to 64")
        index = faiss.IndexBinaryMultiHash(bits, cfg.multihash_tables, per_table)
    else:
        raise ValueError(f"no faiss index to build for kind {cfg.kind!r}")
    index.add(data)
    set_search_parameters(index, cfg)
    return index


def set_search_parameters(index, cfg: IndexConfig) -> None:
    """What a saved index does not keep: the probes of an inverted file, the flips of multihash."""
    if cfg.kind == "ivf":
        index.nprobe = min(cfg.ivf_probes, index.nlist)
    else:
        index.nflip = cfg.multihash_flips


def search_index(index, query_codes: np.ndarray, bits: int, k: int,
                 radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``CodeStore.search``'s contract on an approximate index: (indices, distances), (Q, k),
    -1 where there is no hit (fewer candidates, beyond ``radius``)."""
    distances, indices = index.search(faiss_bytes(query_codes, bits), k)
    indices, distances = indices.astype(np.int64), distances.astype(np.int32)
    missing = indices < 0
    if radius is not None:
        missing |= distances > radius
    indices[missing], distances[missing] = -1, -1
    return indices, distances


def tie_aware_recall(exact_distances: np.ndarray, found_distances: np.ndarray) -> float:
    """Share of the k slots filled with an item as near as the exact k-th: with ties at the k-th
    distance any of them is a right answer, so sets of ids would understate recall."""
    kth = exact_distances[:, -1:]
    right = (found_distances >= 0) & (found_distances <= kth)
    return float(right.sum(axis=1).mean() / exact_distances.shape[1])


def build_indexes(store: CodeStore, cfg: IndexConfig, out_dir: Path, seed: int = 0) -> dict:
    """Both modalities' indexes into ``out_dir``; the manifest entry: files, settings, build
    seconds, and recall@100 against exact search for up to 1,000 of the store's codes as queries."""
    import faiss

    entry: dict = {"kind": cfg.kind, **cfg.model_dump(exclude={"kind"}), "modalities": {}}
    rng = np.random.default_rng(seed)
    for modality in MODALITIES:
        start = time.perf_counter()
        index = build_index(store.codes[modality], store.bits, cfg, seed)
        seconds = time.perf_counter() - start
        faiss.write_index_binary(index, str(out_dir / index_file(modality)))
        k = min(RECALL_K, len(store))
        other = "text" if modality == "image" else "image"
        queries = store.codes[other][rng.permutation(len(store))[:RECALL_QUERIES]]  # cross-modal, as served
        _, exact = store.search(queries, modality, k)
        _, found = search_index(index, queries, store.bits, k)
        entry["modalities"][modality] = {"file": index_file(modality), "build_seconds": round(seconds, 3),
                                         f"recall_at_{k}": round(tie_aware_recall(exact, found), 4),
                                         **({"lists": index.nlist} if cfg.kind == "ivf" else {})}
    return entry


def load_indexes(version_dir: Path, entry: dict) -> dict:
    """The per-modality indexes a manifest's ``index`` entry names, ready to search."""
    import faiss

    cfg = IndexConfig(**{key: entry[key] for key in IndexConfig.model_fields})
    indexes = {}
    for modality in MODALITIES:
        index = faiss.read_index_binary(str(version_dir / entry["modalities"][modality]["file"]))
        set_search_parameters(index, cfg)
        indexes[modality] = index
    return indexes
