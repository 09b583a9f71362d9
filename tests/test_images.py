"""The image transforms every stage shares, pinned pixel for pixel.

The demo encoder (embedding, base evaluation) feeds uint8 squares to its model and normalises
on the device; a trained model's evaluation normalises per image. Both resize the shorter side
with bicubic and centre-crop, but a square already at the target size is left untouched by the
first and resampled by neither. The hashes were recorded before the package was reorganised
(issue 11): a merge of the two that changed a pixel would fail here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.images import EvalTransform, SquareTransform, normalise_pixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def random_image(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(7)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


CASES = [("RGB", (97, 61)), ("RGBA", (40, 120)), ("L", (64, 64)), ("RGB", (300, 300))]
# (uint8 square, normalised eval tensor) sha256 prefixes, recorded before the move.
PINNED = {
    ("RGB", (97, 61)): ("2c089390eec8185c", "cd72b721a8fa66a5"),
    ("RGBA", (40, 120)): ("6147c50b7b807116", "dbb2d9c565d38b07"),
    ("L", (64, 64)): ("500f3cd3c2754cac", "f50db687fc7fa267"),
    ("RGB", (300, 300)): ("a8fd0e3514f78706", "00e641f27b4c06cc"),
}


@pytest.mark.parametrize("mode,size", CASES)
def test_square_and_eval_transforms_are_pinned(mode, size):
    image = random_image(mode, size)
    square = SquareTransform(64)(image)
    assert square.dtype == torch.uint8 and square.shape == (3, 64, 64)
    evaluated = EvalTransform(64, MEAN, STD)(image)
    assert evaluated.dtype == torch.float32 and evaluated.shape == (3, 64, 64)
    assert (digest(square), digest(evaluated)) == PINNED[(mode, size)]


def test_normalising_a_square_batch_matches_the_eval_transform():
    """Where both resample alike (a non-square input), the uint8 path + batched normalisation
    gives the eval transform's floats."""
    image = random_image("RGB", (97, 61))
    batched = normalise_pixels(SquareTransform(64)(image)[None], MEAN, STD)[0]
    torch.testing.assert_close(batched, EvalTransform(64, MEAN, STD)(image), rtol=0, atol=1e-6)
