"""Image helpers shared by the stages: RGB conversion and the one evaluation resize.

Every model sees an image the same way at inference: the shorter side resized to the model's
size (bicubic), a centred square cropped, pixels scaled to [0, 1] and normalised. Encoders keep
the uint8 square (``SquareTransform``, 4x less to move from the loader's workers) and normalise
whole batches on the device (``normalise_pixels``); ``EvalTransform`` does both per image.
Either way the floats are bit-identical (tests/test_images.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

# img2dataset composites transparency onto white; every other reader of images does the same,
# so a transparent clip-art PNG looks alike in training, embedding and evaluation.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency onto a white background."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class SquareTransform:
    """Resize the shorter side to ``size`` (bicubic), centre-crop a square -> uint8 tensor."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if min(image.size) != self.size:
            image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
        if image.size != (self.size, self.size):
            image = TF.center_crop(image, [self.size, self.size])
        return TF.pil_to_tensor(image)

    def describe(self) -> dict[str, Any]:
        return {
            "resize": "shorter side, bicubic",
            "crop": "center",
            "size": self.size,
            "alpha": "composited on white",
        }


def normalise_pixels(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 ``(x / 255 - mean) / std`` (as ToTensor + Normalize).
    ``mean`` and ``std`` already on the images' device spare a blocking copy per call."""
    pixels = images.float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


class EvalTransform:
    """Evaluation preprocessing of one image: ``SquareTransform`` then ``normalise_pixels``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.square = SquareTransform(size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise_pixels(self.square(image)[None], self.mean, self.std)[0]
