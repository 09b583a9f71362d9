"""The ``open_clip`` encoder: one CLIP model (any open_clip architecture) for both sides, so image
and text embeddings share one space. Weights come from an open_clip tag (downloaded into
``cache_dir``), a local ``.safetensors``/``.pt``/``.pth``/``.bin`` file, or random init."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unicom.encoders.base import (
    Encoder,
    RGBThen,
    _jsonable,
    _package_version,
    state_dict_fingerprint,
    uint8_transform,
)
from unicom.errors import UnicomError
from unicom.images import to_rgb  # noqa: F401  (re-exported for train)

LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# Random initialisation is seeded so that a "pretrained: null" run is reproducible.
RANDOM_INIT_SEED = 0


class OpenClipEncoder(Encoder):
    """One open_clip model for both sides (a shared embedding space)."""

    def __init__(self, options: Mapping[str, Any], device: torch.device):
        import open_clip

        model_name = str(options["model"])
        pretrained = options["pretrained"]
        cache_dir = options["cache_dir"]
        weights = _check_open_clip_source(model_name, pretrained, cache_dir)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                cache_dir=cache_dir,
                device=device,
                weights_only=True,
                # No hidden downloads of base tower weights: "pretrained: null" means random.
                pretrained_image=False,
                pretrained_text=False,
            )
        model.eval()
        self.model = model
        self.device = device
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        to_uint8, self.pixel_mean, self.pixel_std = uint8_transform(preprocess)
        self.image_transform = RGBThen(to_uint8)

        dim = int(self._text_features([""]).shape[-1])
        fingerprint = state_dict_fingerprint(model)
        preprocessing = _jsonable(open_clip.get_model_preprocess_cfg(model))
        self.square_size = square_size(preprocessing)
        preprocessing["alpha"] = "composited on white"
        side = {"model": model_name, "weights": weights, "fingerprint": fingerprint, "dim": dim}
        self.identity = {
            "encoder": "open_clip",
            "shared_space": True,
            "library": f"open_clip_torch=={_package_version('open_clip_torch')}",
            "image": {**side, "preprocessing": preprocessing},
            "text": {
                **side,
                "preprocessing": {
                    "tokenizer": type(self.tokenizer).__name__,
                    "context_length": int(getattr(self.tokenizer, "context_length", 0) or 0),
                },
            },
        }

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
            return self.model.encode_text(tokens)


def square_size(preprocessing: Mapping[str, Any]) -> int | None:
    """The side of open_clip's eval preprocessing when it is SquareTransform's rule (its usual
    ``shortest`` resize, bicubic, then the centred square), else None."""
    size = preprocessing.get("size")
    side = size if isinstance(size, int) else (size[0] if size and size[0] == size[-1] else None)
    usual = preprocessing.get("resize_mode", "shortest") == "shortest"
    return side if usual and preprocessing.get("interpolation") == "bicubic" else None


def _check_open_clip_source(model_name: str, pretrained: str | None, cache_dir: str | None) -> str:
    """Validate the architecture and weights source; return how identity names the weights.

    A tag's weights are fetched here (a no-op when cached) so that a node without internet
    fails with one clear line instead of a download traceback.
    """
    import open_clip

    if model_name.startswith("local-dir:"):
        for checkpoint in Path(model_name.removeprefix("local-dir:")).glob("*"):
            if checkpoint.suffix in (".bin", ".pth", ".pt"):
                _check_pickle_is_weights_only(checkpoint)
        return model_name
    if model_name.startswith("hf-hub:"):
        return model_name
    if model_name.replace("/", "-") not in open_clip.list_models():
        raise UnicomError(
            f"unknown open_clip architecture {model_name!r} (embed.open_clip.model); see the "
            "available names with: python -c 'import open_clip; print(open_clip.list_models())'"
        )
    if pretrained is None:
        return f"random-init(seed={RANDOM_INIT_SEED})"
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        try:
            open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as err:  # network, hub and file-system errors all mean "not available"
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UnicomError(
                f"cannot fetch open_clip weights {model_name}/{pretrained} (cache_dir "
                f"{cache_dir}): {first_line}; run 'python -m unicom.encoders prefetch' where "
                "there is internet, or set embed.open_clip.pretrained to a local file"
            ) from None
        return f"open_clip:{pretrained}"
    path = Path(pretrained)
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UnicomError(
            f"embed.open_clip.pretrained {pretrained!r} is neither a file nor a tag of "
            f"{model_name!r} (tags: {', '.join(tags) or 'none'})"
        )
    if path.suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise UnicomError(
            f"weights file {pretrained} must end with one of {', '.join(LOCAL_WEIGHT_SUFFIXES)}"
        )
    if path.suffix != ".safetensors":
        _check_pickle_is_weights_only(path)
    return f"file:{path.name}"


def _check_pickle_is_weights_only(path: Path) -> None:
    """Refuse a pickled checkpoint that ``torch.load(weights_only=True)`` rejects.

    open_clip 3.3.0 loads with weights_only=True but retries WITHOUT it on a TypeError, which
    a crafted file can provoke; checking here first means its retry is never reached.
    mmap keeps the check cheap (no tensor data is read) for zip-format checkpoints.
    """
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"weights file {path} cannot be loaded with torch.load(weights_only=True): {message}"
        ) from None
