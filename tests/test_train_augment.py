"""unicom.train.augment and .randaugment: crops inside the image, and every transform seeded per
sample."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from unicom.train.augment import TrainTransform, crop_box
from unicom.train.randaugment import OPERATIONS, random_erase


def test_crop_box_stays_inside_and_transform_is_seeded():
    rng = np.random.default_rng(0)
    for width, height in ((40, 30), (10, 200), (300, 7)):
        for _ in range(50):
            top, left, h, w = crop_box(width, height, (0.08, 1.0), (0.75, 4 / 3), rng)
            assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
            assert h > 0 and w > 0
    transform = TrainTransform(24, color_jitter=0.3)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8))
    first = transform(image, np.random.default_rng(5))
    assert first.shape == (3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(first, transform(image, np.random.default_rng(5)))
    assert not torch.equal(first, transform(image, np.random.default_rng(6)))


def test_rand_augment_and_erasing_are_seeded_per_sample():
    """Fine-tuning's RandAugment (2 ops, magnitude 9) and random erasing: every operation runs,
    the same generator gives the same tensor, erasing puts noise in one rectangle."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8))
    for name, operation in OPERATIONS.items():
        out = operation(image, 1.0, np.random.default_rng(0))
        assert out.size == image.size and out.mode == "RGB", name
    transform = TrainTransform(24, rand_augment_ops=2, random_erasing=1.0)
    first = transform(image, np.random.default_rng(5))
    assert first.shape == (3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(first, transform(image, np.random.default_rng(5)))
    assert not torch.equal(first, transform(image, np.random.default_rng(6)))
    flat = torch.full((3, 24, 24), 7, dtype=torch.uint8)
    erased = random_erase(flat, np.random.default_rng(2), 1.0)
    changed = (erased != flat).any(dim=0)
    rows, cols = changed.nonzero(as_tuple=True)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 576 * 0.8 <= changed.sum() <= box <= 576 / 3 + 24
    assert torch.equal(random_erase(flat, np.random.default_rng(2), 0.0), flat)
