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


def stratified_heldout_mask(
    categories: Sequence[str], fraction: float, seed: int, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Boolean mask of held-out items: about ``fraction`` of each category, seeded.

    ``groups`` (one key per item; default: every item its own) keeps variants of one picture
    on one side: a category permutes its groups and holds out whole groups until it has its
    share, and a group that still spans categories and both sides goes to training. With only
    singleton groups this is exactly the plain per-item draw.
    """
    keys = list(range(len(categories))) if groups is None else list(groups)
    heldout = np.zeros(len(categories), dtype=bool)
    for category, indices in _indices_by_category(categories).items():
        k = heldout_count(len(indices), fraction)
        members: dict = {}
        for index in indices:
            members.setdefault(keys[index], []).append(index)
        # One entry per item of the category (a group repeated as often as it has members),
        # so that all-singleton categories draw the very same permutation as before.
        order = _category_rng(seed, _HELDOUT_SALT, category).permutation(np.asarray(indices))
        taken = 0
        for index in order:
            group = members.get(keys[index])
            if taken >= k or group is None:
                continue
            heldout[group] = True
            taken += len(group)
            del members[keys[index]]
    by_key: dict = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    for indices in by_key.values():
        if len(indices) > 1 and heldout[indices].any() and not heldout[indices].all():
            heldout[indices] = False
    return heldout
