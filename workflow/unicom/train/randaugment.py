"""RandAugment (Cubuk et al. 2020) and random erasing (Zhong et al. 2020), drawn from the
sample's own generator so that a resumed run augments exactly as the uninterrupted one.

RandAugment as timm's ``rand-m{M}-mstd{S}-inc1`` (what deepglint/unicom's retrieval fine-tuning
uses): ``num_ops`` operations drawn uniformly per image, each at magnitude ``M`` of 10 plus
Gaussian noise of std ``S`` (clipped to [0, 10]); the "increasing" variants, where a larger
magnitude is always a stronger change. Random erasing as timm's ``re_mode="pixel"``: with
probability ``p``, one rectangle of 2-33 % of the image, aspect ratio 0.3-3.3 (log-uniform),
filled with per-pixel random values (here uint8, before normalisation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

MAX_MAGNITUDE = 10.0


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


def _enhance(level: float, rng: np.random.Generator) -> float:
    """A factor around 1: 1 +- 0.9 at the full magnitude (increasing variant)."""
    return 1.0 + _signed(0.9 * level, rng)


def _affine(image: Image.Image, **kwargs) -> Image.Image:
    defaults = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    return TF.affine(
        image, interpolation=InterpolationMode.BILINEAR, fill=[128] * 3, **(defaults | kwargs)
    )


# name -> f(image, level in [0, 1], rng)
OPERATIONS = {
    "auto_contrast": lambda im, lv, rng: ImageOps.autocontrast(im),
    "equalize": lambda im, lv, rng: ImageOps.equalize(im),
    "invert": lambda im, lv, rng: ImageOps.invert(im),
    "rotate": lambda im, lv, rng: _affine(im, angle=_signed(30.0 * lv, rng)),
    "posterize": lambda im, lv, rng: ImageOps.posterize(im, max(1, 8 - round(4 * lv))),
    "solarize": lambda im, lv, rng: ImageOps.solarize(im, round(256 - 256 * lv)),
    "solarize_add": lambda im, lv, rng: _solarize_add(im, round(110 * lv)),
    "color": lambda im, lv, rng: TF.adjust_saturation(im, _enhance(lv, rng)),
    "contrast": lambda im, lv, rng: TF.adjust_contrast(im, _enhance(lv, rng)),
    "brightness": lambda im, lv, rng: TF.adjust_brightness(im, _enhance(lv, rng)),
    "sharpness": lambda im, lv, rng: TF.adjust_sharpness(im, _enhance(lv, rng)),
    "shear_x": lambda im, lv, rng: _affine(im, shear=[math.degrees(math.atan(_signed(0.3 * lv, rng))), 0.0]),
    "shear_y": lambda im, lv, rng: _affine(im, shear=[0.0, math.degrees(math.atan(_signed(0.3 * lv, rng)))]),
    "translate_x": lambda im, lv, rng: _affine(im, translate=[round(_signed(0.45 * lv, rng) * im.width), 0]),
    "translate_y": lambda im, lv, rng: _affine(im, translate=[0, round(_signed(0.45 * lv, rng) * im.height)]),
}  # fmt: skip


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """Add ``add`` to the pixels below ``threshold`` (clipped)."""
    array = np.asarray(image).astype(np.int16)
    array = np.where(array < threshold, np.minimum(array + add, 255), array)
    return Image.fromarray(array.astype(np.uint8), image.mode)


def rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    num_ops: int,
    magnitude: float,
    magnitude_std: float = 0.0,
) -> Image.Image:
    """``num_ops`` random operations of ``OPERATIONS`` on an RGB image, from ``rng``."""
    names = list(OPERATIONS)
    for _ in range(num_ops):
        name = names[int(rng.integers(len(names)))]
        level = magnitude + (rng.normal(0.0, magnitude_std) if magnitude_std > 0 else 0.0)
        level = min(max(level, 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
        image = OPERATIONS[name](image, level, rng)
    return image


def random_erase(
    pixels: torch.Tensor,
    rng: np.random.Generator,
    probability: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """With ``probability``, one rectangle of a uint8 ``(3, H, W)`` image becomes noise."""
    if probability <= 0 or rng.random() >= probability:
        return pixels
    _, height, width = pixels.shape
    for _ in range(attempts):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            erased = pixels.clone()
            noise = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
            erased[:, top : top + h, left : left + w] = torch.from_numpy(noise)
            return erased
    return pixels
