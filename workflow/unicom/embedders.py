"""A frozen model as evaluation, linear probes and search see it: ``base`` (the image side of
the encoder used for clustering, the zero-shot baseline) or a folder exported by
``unicom.train``, and the batched, L2-normalised embedding of a list of images
(``unicom.benchmarks.sets`` items: paths or images in memory)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from unicom.benchmarks import sets
from unicom.encoders import build_encoder


@dataclasses.dataclass
class ImageEmbedder:
    """What evaluation needs of a model: a per-image transform and a batched embedding."""

    name: str
    transform: Callable[[Any], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    identity: dict[str, Any]


def base_embedder(embed_options: dict[str, Any], device: torch.device) -> ImageEmbedder:
    encoder = build_encoder(embed_options, device)
    return ImageEmbedder(
        "base",
        encoder.image_transform,
        encoder.encode_images,
        {"kind": "base encoder", **encoder.identity},
    )


def trained_embedder(model_dir: str, device: torch.device) -> ImageEmbedder:
    # torch-heavy training module: imported only when a trained model is evaluated
    from unicom.models import load_trained_model, trained_transform

    model = load_trained_model(model_dir, device)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.encode(images.to(device))

    return ImageEmbedder(
        "trained", trained_transform(model.info), embed, {"kind": "trained", **model.info}
    )


class _Images(Dataset):
    def __init__(self, items: Sequence[Any], transform: Callable[[Any], torch.Tensor]):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(sets.load_image(self.items[index]))


def embed_items(
    embedder: ImageEmbedder, items: Sequence[Any], batch_size: int, num_workers: int
) -> np.ndarray:
    """(n, d) float32 L2-normalised embeddings of ``items``, in order."""
    loader = DataLoader(
        _Images(items, embedder.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    chunks = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"embed {embedder.name}", unit="batch", mininterval=5):
            chunks.append(embedder.embed(batch).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def load_embedder(
    model: str, embed_options: dict[str, Any] | None, device: torch.device
) -> ImageEmbedder:
    """``model`` is ``base`` (built from the embed section ``embed_options``) or an export."""
    if model == "base":
        return base_embedder(dict(embed_options or {}), device)
    return trained_embedder(model, device)
