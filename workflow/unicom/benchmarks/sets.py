"""What a retrieval benchmark is once loaded: items (image paths or in-memory images) with string
labels, and the protocol the metrics use (``unicom.evaluate.metrics.retrieval_metrics``):

- ``single``: every image queries all the others;
- ``query_gallery``: queries search a separate gallery.

``cap_set`` takes a stratified, seeded subset for quick runs (evaluate's ``max_images``, the
probes' and fine-tuning's ``max_train``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unicom.errors import UnicomError
from unicom.images import to_rgb

SINGLE = "single"


QUERY_GALLERY = "query_gallery"


# An item is an image file path or an image already in memory.
Item = str | Image.Image


@dataclass(frozen=True)
class RetrievalSet:
    """An evaluation split: ``items``/``labels`` hold the queries first, then the gallery.

    For ``protocol == "single"`` every item is a query and the gallery is the same set
    (``num_queries == len(items)``). Embed ``items`` once, in order, then pass
    ``metric_inputs(embeddings)`` to ``unicom.evaluate.metrics.retrieval_metrics``.
    """

    name: str
    protocol: str
    split: str
    items: tuple[Item, ...]
    labels: tuple[str, ...]
    num_queries: int
    root: str

    @property
    def query_items(self) -> tuple[Item, ...]:
        return self.items[: self.num_queries]

    @property
    def query_labels(self) -> tuple[str, ...]:
        return self.labels[: self.num_queries]

    @property
    def gallery_items(self) -> tuple[Item, ...]:
        return self.items if self.protocol == SINGLE else self.items[self.num_queries :]

    @property
    def gallery_labels(self) -> tuple[str, ...]:
        return self.labels if self.protocol == SINGLE else self.labels[self.num_queries :]

    def metric_inputs(self, embeddings: np.ndarray) -> dict[str, Any]:
        """Keyword arguments of ``retrieval_metrics`` for embeddings of ``items``, in order."""
        if len(embeddings) != len(self.items):
            raise UnicomError(
                f"{self.name}: {len(embeddings)} embeddings for {len(self.items)} items"
            )
        if self.protocol == SINGLE:
            return {"query_emb": embeddings, "query_labels": list(self.labels)}
        return {
            "query_emb": embeddings[: self.num_queries],
            "query_labels": list(self.query_labels),
            "gallery_emb": embeddings[self.num_queries :],
            "gallery_labels": list(self.gallery_labels),
        }

    def summary(self) -> dict[str, Any]:
        summary = {
            "name": self.name,
            "protocol": self.protocol,
            "split": self.split,
            "root": self.root,
            "items": len(self.items),
            "classes": len(set(self.labels)),
        }
        if self.protocol == QUERY_GALLERY:
            summary["queries"] = self.num_queries
            summary["gallery"] = len(self.items) - self.num_queries
        return summary


def single_set(
    name: str, split: str, items: Sequence[Item], labels: Sequence[str], root: Path
) -> RetrievalSet:
    return RetrievalSet(name, SINGLE, split, tuple(items), tuple(labels), len(items), str(root))


def query_gallery_set(
    name: str,
    split: str,
    queries: Sequence[Item],
    query_labels: Sequence[str],
    gallery: Sequence[Item],
    gallery_labels: Sequence[str],
    root: Path,
) -> RetrievalSet:
    return RetrievalSet(
        name,
        QUERY_GALLERY,
        split,
        tuple(queries) + tuple(gallery),
        tuple(query_labels) + tuple(gallery_labels),
        len(queries),
        str(root),
    )


def load_image(item: Item) -> Image.Image:
    """An item as an RGB image (grayscale Fashion-MNIST is replicated to three channels)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    with Image.open(item) as image:
        image.load()  # the file closes on leaving the block; an RGB image is returned as is
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb


def stratified_subset(labels: Sequence[str], limit: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``limit`` items, the same fraction of every label (seeded)."""
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    fraction = limit / len(labels)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def cap_set(dataset: RetrievalSet, limit: int | None, seed: int) -> RetrievalSet:
    """Subsample a benchmark for quick runs: all items (single set) or the queries only."""
    if limit is None:
        return dataset
    if dataset.protocol == SINGLE:
        idx = stratified_subset(dataset.labels, limit, seed)
        return dataclasses.replace(
            dataset,
            items=tuple(dataset.items[i] for i in idx),
            labels=tuple(dataset.labels[i] for i in idx),
            num_queries=len(idx),
        )
    idx = stratified_subset(dataset.query_labels, limit, seed)
    return dataclasses.replace(
        dataset,
        items=tuple(dataset.items[i] for i in idx) + dataset.gallery_items,
        labels=tuple(dataset.labels[i] for i in idx) + dataset.gallery_labels,
        num_queries=len(idx),
    )
