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
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    identity: dict[str, Any]
    device: torch.device

    @abstractmethod
    def _image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Stacked ``image_transform`` outputs, uint8 (n, 3, H, W) -> (n, d_img) unit-norm
        float32 on the CPU. Pixels are scaled and normalised here, on the device."""
        if images.dtype != torch.uint8:
            raise ValueError(f"encode_images expects uint8 images, got {images.dtype}")
        with torch.inference_mode():
            pixels = images.to(self.device, non_blocking=True)
            features = self._image_features(
                normalise_pixels(pixels, self.pixel_mean, self.pixel_std)
            )
            return F.normalize(features.float(), dim=-1).cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (n, d_txt) unit-norm float32 on the CPU."""
        with torch.inference_mode():
            features = self._text_features(list(texts))
            return F.normalize(features.float(), dim=-1).cpu()

    @property
    def image_dim(self) -> int:
        return int(self.identity["image"]["dim"])

    @property
    def text_dim(self) -> int:
        return int(self.identity["text"]["dim"])
