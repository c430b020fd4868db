"""Numbers on inputs and codes, in plain numpy: drift share, PCA projection, bit entropy,
collisions, Hamming distance groups. The monitoring report and its Evidently metrics both import
them; this module imports neither (and nothing of Evidently).
"""

from __future__ import annotations

import numpy as np

KS_P_VALUE = 0.05  # per-dimension drift test level





def ks_drift_share(reference: np.ndarray, current: np.ndarray, p_value: float = KS_P_VALUE) -> tuple[float, np.ndarray]:
    """Share of dimensions whose two-sample K-S test rejects at ``p_value``, and all p-values.
    Dimensions constant and equal in both samples cannot drift and count as not drifted."""
    from scipy.stats import ks_2samp

    p = np.asarray(ks_2samp(reference, current, axis=0).pvalue, dtype=float)
    p = np.where(np.isnan(p), 1.0, p)
    return float((p < p_value).mean()), p


def pca_projection(reference: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top principal axes of the reference, by SVD (deterministic up to sign, which is
    fixed so that each axis' largest loading is positive)."""
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    axes = vt[: min(dims, len(vt))]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return mean, axes


def bit_entropy(bits: np.ndarray) -> np.ndarray:
    """Per-bit entropy (in bits) of ±1 codes: 1 for a balanced bit, 0 for a constant one."""
    p = np.clip((bits > 0).mean(axis=0), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def collision_share(bits: np.ndarray) -> float:
    """Share of items whose code equals another item's."""
    _, inverse, counts = np.unique(bits, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean()) if len(bits) else 0.0


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All Hamming distances between two sets of ±1 codes."""
    k = a.shape[1]
    return ((k - a.astype(np.int32) @ b.T.astype(np.int32)) // 2).astype(np.int32)


def hamming_groups(old: np.ndarray, new: np.ndarray) -> dict[str, np.ndarray]:
    """Distances within old, within new (distinct pairs) and between old and new codes."""
    out = {}
    for name, a, b in (("within old", old, old), ("within new", new, new), ("old vs new", old, new)):
        if len(a) == 0 or len(b) == 0:
            out[name] = np.empty(0, np.int32)
            continue
        d = hamming_matrix(a, b)
        out[name] = d[np.triu_indices(len(a), 1)] if a is b else d.ravel()
    return out
