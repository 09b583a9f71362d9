"""What every encoder is: uint8 images in, unit-norm float32 embeddings out, and an identity
(models, weights fingerprint, preprocessing) stored in every embedding file so that later stages
can refuse mixed inputs. Plus the helpers the families share."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from unicom.errors import UnicomError
from unicom.images import (
    normalise_pixels,
    to_rgb,  # noqa: F401  (re-exported for train)
)


class RGBThen:
    """Picklable ``to_rgb`` followed by another transform (DataLoader workers pickle it)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))


def uint8_transform(
    transform: T.Compose,
) -> tuple[T.Compose, tuple[float, ...], tuple[float, ...]]:
    """Split an open_clip eval transform ``[..., ToTensor, Normalize]``: uint8 part, mean, std.

    The uint8 part runs in the data workers; scaling and normalising happen batched in
    ``Encoder.encode_images`` with the same operations in the same order, so the result is
    bit-identical while workers do less and pass 4x smaller tensors.
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not (
        isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToTensor)
    ):
        raise RuntimeError(
            f"unexpected open_clip preprocessing (no ToTensor+Normalize): {transform}"
        )
    normalize = steps[-1]
    return (
        T.Compose([*steps[:-2], T.PILToTensor()]),
        tuple(float(v) for v in normalize.mean),
        tuple(float(v) for v in normalize.std),
    )


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of a module (names, dtypes, shapes, bytes).

    Identifies the weights whatever file format or download they came from.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def match_state_dict_in_order(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, tuple[int, ...]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target_shapes`` keys, pairing them by position.

    Used where two implementations of one architecture name their layers differently but
    store them in the same order; every pair must have the same shape.
    """
    if len(source) != len(target_shapes):
        raise UnicomError(
            f"{what}: {len(source)} tensors in the weights file but {len(target_shapes)} in the "
            "model; the architecture does not match these weights"
        )
    renamed = {}
    for (source_key, tensor), (target_key, shape) in zip(
        source.items(), target_shapes.items(), strict=True
    ):
        if tuple(tensor.shape) != tuple(shape):
            raise UnicomError(
                f"{what}: weight {source_key!r} has shape {tuple(tensor.shape)} but model "
                f"parameter {target_key!r} expects {tuple(shape)}; the architecture does not "
                "match these weights"
            )
        renamed[target_key] = tensor
    return renamed


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class Encoder(ABC):
    """Image + text encoder; ``image_transform`` runs in data workers, the rest in the main one."""

    image_transform: Callable[[Image.Image], torch.Tensor]  # -> uint8 (3, H, W)
    # The side when image_transform is SquareTransform's rule (shorter side bicubic, centred
    # square): the tensor decoding paths (embed.decode) can then do it; else None.
    square_size: int | None = None
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    identity: dict[str, Any]
    device: torch.device

    @abstractmethod
    def _image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor: ...

    def _pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on the device, made once (a tensor made from Python numbers at every
        batch is a blocking copy, which waits for the GPU's queue)."""
        stats = getattr(self, "_stats", None)
        if stats is None:
            stats = tuple(
                torch.tensor(v, dtype=torch.float32).to(self.device)
                for v in (self.pixel_mean, self.pixel_std)
            )
            self._stats = stats
        return stats

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Stacked ``image_transform`` outputs, uint8 (n, 3, H, W) on any device -> (n, d_img)
        unit-norm float32 on the device. Pixels are scaled and normalised there."""
        if images.dtype != torch.uint8:
            raise ValueError(f"encode_images expects uint8 images, got {images.dtype}")
        with torch.inference_mode():
            pixels = images.to(self.device, non_blocking=True)
            features = self._image_features(normalise_pixels(pixels, *self._pixel_stats()))
            return F.normalize(features.float(), dim=-1)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (n, d_txt) unit-norm float32 on the device."""
        with torch.inference_mode():
            return F.normalize(self._text_features(list(texts)).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``image_embeddings`` on the CPU."""
        return self.image_embeddings(images).cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """``text_embeddings`` on the CPU."""
        return self.text_embeddings(texts).cpu()

    @property
    def image_dim(self) -> int:
        return int(self.identity["image"]["dim"])

    @property
    def text_dim(self) -> int:
        return int(self.identity["text"]["dim"])
