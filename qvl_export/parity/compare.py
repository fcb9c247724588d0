"""Numeric comparison of one output against the reference: data, not a bool.

The reference is always the second argument. Errors are computed in float64.
"""

from __future__ import annotations

import numpy as np


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max/mean/p99 abs error, max rel error, overall cosine and the worst row cosine."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "p99_abs": 0.0, "max_rel": 0.0, "cosine": 1.0,
                "min_row_cosine": 1.0, "finite": 1.0}
    diff = np.abs(a - b)
    finite = bool(np.isfinite(a).all())
    scale = np.abs(b).max() or 1.0
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)),
        "max_rel": float(diff.max() / scale),  # relative to the reference's largest magnitude
        "cosine": cosine(a.ravel(), b.ravel()),
        "min_row_cosine": float(min(cosine(x, y) for x, y in zip(a.reshape(a.shape[0], -1),
                                                                 b.reshape(b.shape[0], -1))))
        if a.ndim > 1 else cosine(a, b),
        "finite": 1.0 if finite else 0.0,
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0 or not np.isfinite(na) or not np.isfinite(nb):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def kl_divergence(ours_logits: np.ndarray, ref_logits: np.ndarray) -> float:
    """KL(reference || ours) of the next-token distributions, in nats (0 for identical logits).

    Unlike the cosine of raw logits it stays meaningful when the model is unsure: near-flat logits
    have a small norm, so a small absolute error moves their cosine a lot and their distribution
    hardly at all. Non-finite logits give inf."""
    a = np.asarray(ours_logits, dtype=np.float64).ravel()
    b = np.asarray(ref_logits, dtype=np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    log_p = b - b.max()
    log_p -= np.log(np.exp(log_p).sum())
    log_q = a - a.max()
    log_q -= np.log(np.exp(log_q).sum())
    return float(max(0.0, (np.exp(log_p) * (log_p - log_q)).sum()))


def token_agreement(ours: list[int], ref: list[int]) -> dict[str, float]:
    """Greedy tokens: how many leading tokens match, and where the first divergence is (-1: none)."""
    n = min(len(ours), len(ref))
    first = next((i for i in range(n) if ours[i] != ref[i]), -1)
    if first == -1 and len(ours) != len(ref):
        first = n
    matched = n if first == -1 else first
    return {
        "ours_len": len(ours),
        "ref_len": len(ref),
        "matched_prefix": matched,
        "first_divergence": first,
        "match_fraction": matched / max(len(ref), 1),
    }
