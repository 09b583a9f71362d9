"""The training run's seed streams, by name: each kind of random draw takes its own seed from
the run's ``train.seed`` and its stream (``derived_seed``), so no two kinds share a sequence.
The data's order and augmentation draw from their own keys (``unicom.train.streams``)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class SeedStream(IntEnum):
    """The key after the run's seed in ``derived_seed``. A stream's number is part of what a
    seed trains (a new number draws other prototypes or samples), so these never change."""

    PROTOTYPE_INIT = 0  # the head's initial prototypes, per block of classes
    CLASS_DRAWS = 1  # the head's sampled negative classes, per rank
    DIM_DRAWS = 2  # the head's sampled feature dimensions, the same on every rank
    TORCH_GLOBAL = 3  # torch's global generator (dropout, drop-path), per rank


def derived_seed(seed: int, stream: SeedStream, *keys: int) -> int:
    """An independent 63-bit seed for ``stream`` of the run's ``seed``, split further by
    ``keys`` (a block, a rank)."""
    entropy = [int(seed), int(stream), *(int(key) for key in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
