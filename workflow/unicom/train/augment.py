"""Training augmentation: a random resized crop (torchvision's sampling rule, drawn from the
sample's own generator so it is reproducible), a flip, colour jitter, RandAugment and random
erasing (``unicom.train.randaugment``; off unless configured, on for fine-tuning) -> uint8 tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from unicom.decoding import resized_crop
from unicom.images import to_rgb
from unicom.train.randaugment import rand_augment, random_erase


def crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop (top, left, height, width) covering ``scale`` of the area with aspect
    ratio in ``ratio`` (log-uniform); after ``attempts`` misses, the largest central crop
    whose ratio is in range."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    aspect = width / height
    crop_w, crop_h = width, height
    if aspect < ratio[0]:
        crop_h = round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_w = round(height * ratio[1])
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop, horizontal flip, optional colour jitter -> uint8 (3, size, size).

    Normalisation happens on the training device: uint8 batches are a quarter of the bytes
    to pass from the workers and to copy to the GPU.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    rand_augment_ops: int = 0
    rand_augment_magnitude: float = 9.0
    rand_augment_std: float = 0.5
    random_erasing: float = 0.0

    def draw(
        self, width: int, height: int, rng: np.random.Generator
    ) -> tuple[tuple[int, int, int, int], bool]:
        """The crop (top, left, height, width) and the flip, the first draws of every path."""
        box = crop_box(width, height, self.scale, self.ratio, rng)
        return box, bool(rng.random() < self.hflip)

    def crop_tensor(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The same draws on a decoded uint8 (3, H, W) tensor (train.decode torchvision)."""
        box, flip = self.draw(image.shape[-1], image.shape[-2], rng)
        return random_erase(resized_crop(image, box, self.size, flip), rng, self.random_erasing)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = to_rgb(image)
        (top, left, height, width), flip = self.draw(image.width, image.height, rng)
        image = TF.resized_crop(
            image,
            top,
            left,
            height,
            width,
            [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if flip:
            image = TF.hflip(image)
        if self.color_jitter > 0:
            low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
            image = TF.adjust_brightness(image, rng.uniform(low, high))
            image = TF.adjust_contrast(image, rng.uniform(low, high))
            image = TF.adjust_saturation(image, rng.uniform(low, high))
        if self.rand_augment_ops:
            image = rand_augment(
                image,
                rng,
                self.rand_augment_ops,
                self.rand_augment_magnitude,
                self.rand_augment_std,
            )
        return random_erase(TF.pil_to_tensor(image), rng, self.random_erasing)
