"""Code-learning objectives shared by the methods, and OrthoHash's extendable codebook."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def extend_codebook(codebook: np.ndarray, new_rows: int, bits: int, min_distance: float,
                    seed: int, tries: int = 2000) -> np.ndarray:
    """Append ``new_rows`` ±1 target codes, each at least ``min_distance``·K bits from every row
    (old and new), relaxing the bound one bit at a time when no candidate fits. Old rows never
    change, which is what makes the codebook safe to extend for lifelong learning. Seeded by the
    row count so the same history gives the same codebook."""
    rng = np.random.default_rng([seed, len(codebook)])
    rows = [r for r in codebook]
    bound = int(round(min_distance * bits))
    for _ in range(new_rows):
        while True:
            cand = rng.choice(np.array([-1, 1], np.int8), size=(tries, bits))
            if not rows:
                rows.append(cand[0])
                break
            dist = (bits - cand.astype(np.int32) @ np.stack(rows).astype(np.int32).T) // 2
            fits = np.flatnonzero(dist.min(axis=1) >= bound)
            if fits.size:
                rows.append(cand[fits[0]])
                break
            bound -= 1
    return np.stack(rows).astype(np.int8) if rows else np.zeros((0, bits), np.int8)


def orthohash_logits(v: torch.Tensor, codebook: torch.Tensor, labels: torch.Tensor | None,
                     scale: float, margin: float) -> torch.Tensor:
    """s · (cos(v, o_c) − m · [c is a label]); the margin only applies while training."""
    cos = F.normalize(v, dim=1) @ F.normalize(codebook, dim=1).T
    if labels is not None:
        cos = cos - margin * labels
    return scale * cos


def orthohash_loss(v: torch.Tensor, codebook: torch.Tensor, labels: torch.Tensor,
                   scale: float, margin: float) -> torch.Tensor:
    """Cross-entropy to the label vector divided by its label count (OrthoHash's label smoothing
    for multi-label; plain cross-entropy for single-label)."""
    logits = orthohash_logits(v, codebook, labels, scale, margin)
    target = labels / labels.sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def graded_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DLCH's multi-label similarity: cosine of label vectors, in [0, 1]."""
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def pairwise_cosine_loss(a: torch.Tensor, b: torch.Tensor, similarity: torch.Tensor,
                         rectify: bool = True) -> torch.Tensor:
    """DLCH's J(a, b): mean over pairs of (relu(cos(a_i, b_j)) − S_ij)². Without ``rectify``
    dissimilar pairs are pulled to cosine 0 exactly (K/2 bits apart) instead of anywhere ≤ 0."""
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return (((F.relu(cos) if rectify else cos) - similarity) ** 2).mean()


def straight_through_sign(h: torch.Tensor) -> torch.Tensor:
    """sign(h) forward, identity backward: lets a loss see the binary code it will produce."""
    return h + (torch.sign(h) - h).detach()


def bit_balance(u: torch.Tensor) -> torch.Tensor:
    """Mean squared per-bit average: zero when every bit is +1 and −1 equally often."""
    return (u.mean(dim=0) ** 2).mean()


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(old ‖ new) of temperature-softened distributions, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(new_logits / t, dim=1), F.log_softmax(old_logits / t, dim=1),
                    log_target=True, reduction="batchmean") * t * t
