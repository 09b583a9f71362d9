"""The trained model: a timm backbone (pooled features) -> ``Linear(features, dim, bias=False)``
-> ``BatchNorm1d(dim)``, the ArcFace/insightface embedding layer: the batch norm keeps every
embedding dimension centred and scaled alike, which suits a cosine head, and makes a bias
redundant. Built here for training, exported as ``model.safetensors`` + ``model.json``, and
loaded back by evaluation and search without importing the trainer (or DDP).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unicom.encoders.base import match_state_dict_in_order
from unicom.encoders.demo import load_lite0_state_dict
from unicom.errors import UnicomError
from unicom.formats import MODEL_FORMAT, read_export_info
from unicom.images import EvalTransform
from unicom.io import atomic_path, write_json

PRETRAINED_TIMM = "timm"


PRETRAINED_LITE0 = "efficientnet-lite0-package"


class EmbeddingModel(nn.Module):
    """timm backbone (pooled) -> Linear(num_features, dim, bias=False) -> BatchNorm1d(dim)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.embedding = nn.Linear(backbone.num_features, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(self.backbone(images)))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (eval mode expected), float32."""
        return nn.functional.normalize(self(images).float(), dim=-1)


def create_backbone(name: str, model_kwargs: Mapping[str, Any], timm_weights: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=timm_weights, num_classes=0, **model_kwargs)
    except (RuntimeError, TypeError, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        what = "timm's pretrained weights of " if timm_weights else ""
        raise UnicomError(f"train.model: cannot create {what}{name!r}: {first}") from None


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def load_backbone_file(backbone: nn.Module, path: str) -> None:
    """Weights from a local .safetensors (a timm checkpoint, or a model.safetensors of ours)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UnicomError(
            f"train.pretrained {path!r}: no such file (nor null, {PRETRAINED_TIMM} or "
            f"{PRETRAINED_LITE0})"
        )
    if not path.endswith(".safetensors"):
        raise UnicomError(f"train.pretrained {path!r}: a local weights file must be .safetensors")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UnicomError(f"train.pretrained {path}: unreadable safetensors ({err})") from None
    if any(key.startswith("backbone.") for key in state):
        prefix = "backbone."  # a model.safetensors of ours: keep the backbone
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    expected = backbone.state_dict()
    classifier = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(classifier)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise UnicomError(f"train.pretrained {path} does not fit the model: {first}") from None


def build_model(options: Mapping[str, Any]) -> EmbeddingModel:
    """Backbone with the configured weights + embedding layer; random parts seeded."""
    pretrained = options["pretrained"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        backbone = create_backbone(
            options["model"], options["model_kwargs"], pretrained == PRETRAINED_TIMM
        )
        if pretrained == PRETRAINED_LITE0:
            source = {k: v for k, v in load_lite0_state_dict().items() if not k.startswith("_fc.")}
            shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
            renamed = match_state_dict_in_order(source, shapes, f"train.model {options['model']}")
            backbone.load_state_dict(renamed, strict=True)
        elif pretrained not in (None, PRETRAINED_TIMM) and not Path(pretrained).is_dir():
            load_backbone_file(backbone, str(pretrained))
        model = EmbeddingModel(backbone, options["dim"])
    if pretrained not in (None, PRETRAINED_TIMM) and Path(pretrained).is_dir():
        load_export(model, str(pretrained), options)  # fine-tuning: backbone and embedding
    return model


def load_export(model: EmbeddingModel, directory: str, options: Mapping[str, Any]) -> None:
    """A trained export's backbone + embedding into ``model`` (built from ``options``)."""
    from safetensors.torch import load_file

    info = read_export_info(directory, "train.pretrained")
    for key in ("model", "dim", "model_kwargs"):
        if (info.get(key) or ({} if key == "model_kwargs" else None)) != options[key]:
            raise UnicomError(
                f"train.pretrained {directory}: exported with {key} {info.get(key)!r}, but "
                f"train.{key} is {options[key]!r}"
            )
    try:
        model.load_state_dict(load_file(str(Path(directory) / info["weights"])), strict=True)
    except (RuntimeError, OSError) as err:
        first = " ".join(str(err).split())[:300]
        raise UnicomError(f"train.pretrained {directory}: weights do not fit ({first})") from None


def preprocessing(model: EmbeddingModel) -> dict[str, Any]:
    cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    return {
        "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
    }


def export_model(out_dir: Path, model: EmbeddingModel, info: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(out_dir / "model.json", dict(info))


def load_trained_model(directory: str | os.PathLike, device: str = "cpu") -> EmbeddingModel:
    """The trained backbone + embedding of a ``unicom.train`` output folder, in eval mode.

    ``model.info`` holds model.json; ``trained_transform(model.info)`` is its preprocessing;
    ``model.encode(images)`` gives L2-normalised embeddings. No weights are downloaded.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    info = read_export_info(directory, "model")
    backbone = create_backbone(info["model"], info.get("model_kwargs") or {}, timm_weights=False)
    model = EmbeddingModel(backbone, int(info["dim"]))
    try:
        model.load_state_dict(load_file(str(directory / info["weights"])), strict=True)
    except (RuntimeError, OSError) as err:
        first = " ".join(str(err).split())[:300]
        raise UnicomError(
            f"{directory / info['weights']}: does not fit model.json ({first})"
        ) from None
    model.info = info
    return model.to(device).eval()


def trained_transform(info: Mapping[str, Any]) -> EvalTransform:
    """The preprocessing of a trained model (``model.info``): PIL image -> float tensor."""
    return EvalTransform(int(info["image_size"]), info["mean"], info["std"])
