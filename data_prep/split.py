"""Seeded stratified validation split (Section 5: class distribution unchanged)."""

from typing import Tuple

import numpy as np


def stratified_split(labels: np.ndarray, size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with ``size`` held out and every class's share within one image of exact.

    Per-class quotas use the largest-remainder method, so sum(quotas) == size and
    |quota_c - size * n_c / N| < 1; members are drawn from a seeded permutation.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < size < n:
        raise ValueError(f"validation size {size} must be between 1 and {n - 1} for {n} images")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    order = np.lexsort((classes, -remainder))  # largest remainder first, ties by class
    quota[order[: size - int(quota.sum())]] += 1
    rng = np.random.Generator(np.random.PCG64(seed))
    held = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        held.append(members[rng.permutation(len(members))[:q]])
    held_out = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask), held_out
