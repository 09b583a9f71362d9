"""Seeded, per-category sampling: the stratified cap on the pool size and the held-out split.

Each category draws from its own generator, so the choice within one category does not change
when other categories are added or removed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

# Salts keep the cap and the held-out split independent draws for the same seed.
_CAP_SALT = 1
_HELDOUT_SALT = 2


def _category_rng(seed: int, salt: int, category: str) -> np.random.Generator:
    # Seeded per category, so one category's draw does not depend on which others exist.
    return np.random.default_rng([seed, salt, zlib.crc32(category.encode())])


def _indices_by_category(categories: Sequence[str]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    return {c: np.asarray(groups[c]) for c in sorted(groups)}


def proportional_quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` across categories in proportion to ``counts`` (largest remainder)."""
    size = sum(counts.values())
    if total >= size:
        return dict(counts)
    exact = {c: total * n / size for c, n in counts.items()}
    quotas = {c: int(q) for c, q in exact.items()}
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: total - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def stratified_cap(categories: Sequence[str], max_n: int | None, seed: int) -> np.ndarray:
    """Boolean mask keeping at most ``max_n`` items, each category in proportion to its size."""
    keep = np.zeros(len(categories), dtype=bool)
    groups = _indices_by_category(categories)
    if max_n is None or max_n >= len(categories):
        keep[:] = True
        return keep
    quotas = proportional_quotas({c: len(ix) for c, ix in groups.items()}, max_n)
    for category, indices in groups.items():
        chosen = _category_rng(seed, _CAP_SALT, category).permutation(indices)[: quotas[category]]
        keep[chosen] = True
    return keep


def heldout_count(n: int, fraction: float) -> int:
    """Images held out of a category of ``n``: rounded share, always leaving one for training."""
    return max(0, min(int(n * fraction + 0.5), n - 1))


def stratified_heldout_mask(categories: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out items: about ``fraction`` of each category, seeded."""
    heldout = np.zeros(len(categories), dtype=bool)
    for category, indices in _indices_by_category(categories).items():
        k = heldout_count(len(indices), fraction)
        chosen = _category_rng(seed, _HELDOUT_SALT, category).permutation(indices)[:k]
        heldout[chosen] = True
    return heldout
