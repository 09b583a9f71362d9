"""Encoders: a tiny random-init open_clip model, local weight files, and the offline demo pair."""

from __future__ import annotations

import json
import os
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from unicom.encoders import build_encoder
from unicom.encoders.__main__ import main
from unicom.encoders.base import match_state_dict_in_order, uint8_transform
from unicom.errors import UnicomError
from unicom.images import normalise_pixels, to_rgb

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = "unicom-test-tiny"
# A CLIP small enough to build in a fraction of a second (open_clip 3.3.0 config format).
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_MODEL


def open_clip_options(model: str, pretrained: str | None) -> dict:
    return {"encoder": "open_clip", "open_clip": {"model": model, "pretrained": pretrained}}


def pil_images(count: int = 3) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 20)]
    images = []
    for i in range(count):
        image = Image.new("RGB", (40, 56), colours[i])
        image.paste((255 - colours[i][0], 90, 40 * i), (5, 5, 25, 30))  # some structure
        images.append(image)
    return images


def sample_images(transform, count: int = 3) -> torch.Tensor:
    return torch.stack([transform(image) for image in pil_images(count)])


CAPTIONS = ["a red square", "a photo of a cat", "stock market report for tuesday"]


def test_open_clip_random_init_is_seeded_and_shared_space(tiny_clip):
    first = build_encoder(open_clip_options(tiny_clip, None), CPU)
    second = build_encoder(open_clip_options(tiny_clip, None), CPU)
    assert first.identity == second.identity
    assert first.identity["shared_space"] is True
    assert first.identity["image"]["dim"] == first.identity["text"]["dim"] == 16
    json.dumps(first.identity)  # stored in Parquet metadata as JSON

    pickle.loads(pickle.dumps(first.image_transform))  # DataLoader workers receive it pickled
    images = sample_images(first.image_transform)
    image_emb, text_emb = first.encode_images(images), first.encode_texts(CAPTIONS)
    assert image_emb.shape == (3, 16) and text_emb.shape == (3, 16)
    assert image_emb.dtype == text_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(3))
    assert torch.equal(image_emb, second.encode_images(images))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_local_weights_round_trip(tiny_clip, tmp_path, suffix):
    torch.manual_seed(1234)  # different from the encoder's seeded random init
    original = open_clip.create_model(tiny_clip, pretrained=None).eval()
    path = tmp_path / f"tiny{suffix}"
    state = original.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)

    encoder = build_encoder(open_clip_options(tiny_clip, str(path)), CPU)
    images = sample_images(encoder.image_transform)
    assert images.dtype == torch.uint8  # workers pass uint8; encode_images normalises
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_clip, pretrained=None)
    reference = torch.stack([preprocess(image) for image in pil_images()])
    with torch.no_grad():
        expected_image = F.normalize(original.encode_image(reference), dim=-1)
        tokens = open_clip.get_tokenizer(tiny_clip)(CAPTIONS)
        expected_text = F.normalize(original.encode_text(tokens), dim=-1)
    torch.testing.assert_close(encoder.encode_images(images), expected_image)
    torch.testing.assert_close(encoder.encode_texts(CAPTIONS), expected_text)
    assert encoder.identity["image"]["weights"] == f"file:tiny{suffix}"

    random_init = build_encoder(open_clip_options(tiny_clip, None), CPU)
    assert random_init.identity["image"]["fingerprint"] != encoder.identity["image"]["fingerprint"]
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_images(reference)


def test_uint8_split_matches_open_clip_preprocessing_exactly(tiny_clip):
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_clip, pretrained=None)
    to_uint8, mean, std = uint8_transform(preprocess)
    images = pil_images(4)
    reference = torch.stack([preprocess(image) for image in images])
    ours = normalise_pixels(torch.stack([to_uint8(image) for image in images]), mean, std)
    assert torch.equal(ours, reference)


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse."""


def test_open_clip_refuses_unsafe_pickle(tiny_clip, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": NotATensor()}, path)
    with pytest.raises(UnicomError, match="weights_only=True") as err:
        build_encoder(open_clip_options(tiny_clip, str(path)), CPU)
    assert "\n" not in str(err.value)


def test_open_clip_bad_names_are_one_line_errors(tiny_clip, tmp_path):
    with pytest.raises(UnicomError, match="list_models") as err:
        build_encoder(open_clip_options("no-such-arch", None), CPU)
    assert "\n" not in str(err.value) and "no-such-arch" in str(err.value)
    with pytest.raises(UnicomError, match="neither a file nor a tag"):
        build_encoder(open_clip_options(tiny_clip, str(tmp_path / "missing.pt")), CPU)
    wrong_suffix = tmp_path / "weights.npz"
    wrong_suffix.write_bytes(b"x")
    with pytest.raises(UnicomError, match="must end with"):
        build_encoder(open_clip_options(tiny_clip, str(wrong_suffix)), CPU)
    offline_tag = {"encoder": "open_clip"}
    offline_tag["open_clip"] = {"model": "RN50", "pretrained": "openai", "cache_dir": str(tmp_path)}
    with pytest.raises(UnicomError, match="cannot fetch open_clip weights RN50/openai") as err:
        build_encoder(offline_tag, CPU)  # HF_HUB_OFFLINE=1 and an empty cache
    assert "\n" not in str(err.value)
    with pytest.raises(UnicomError, match="config key embed.encoder: 'clip' is not one of") as err:
        build_encoder({"encoder": "clip"}, CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(UnicomError, match="unknown key"):
        build_encoder({"encoder": "demo", "demo": {"image_sise": 64}}, CPU)


def test_prefetch_cli_writes_identity(tiny_clip, tmp_path):
    out = tmp_path / "identity.json"
    options = json.dumps(open_clip_options(tiny_clip, None))
    main(["prefetch", "--options-json", options, "--identity-out", str(out)])
    identity = json.loads(out.read_text())
    assert identity["encoder"] == "open_clip" and identity["image"]["model"] == tiny_clip


@pytest.fixture(scope="module")
def demo_encoder():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return build_encoder({"encoder": "demo", "demo": {"image_size": 64}}, CPU)


def test_demo_pair_offline(demo_encoder):
    identity = demo_encoder.identity
    assert identity["shared_space"] is False
    assert identity["image"]["dim"] == 1280 and identity["text"]["dim"] == 384
    assert identity["image"]["preprocessing"]["size"] == 64
    json.dumps(identity)

    transform = pickle.loads(pickle.dumps(demo_encoder.image_transform))
    images = sample_images(transform, 4)
    assert images.shape == (4, 3, 64, 64)
    image_emb = demo_encoder.encode_images(images)
    text_emb = demo_encoder.encode_texts(CAPTIONS)
    assert image_emb.shape == (4, 1280) and text_emb.shape == (3, 384)
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(3))
    assert torch.equal(image_emb, demo_encoder.encode_images(images))
    assert torch.equal(text_emb, demo_encoder.encode_texts(CAPTIONS))
    # Distinct images must not collapse to one vector (weights really loaded and used).
    assert float(image_emb[0] @ image_emb[2]) < 0.999


def test_demo_text_model_is_the_pretrained_one(demo_encoder):
    cat, kitten, stocks = demo_encoder.encode_texts(
        ["a photo of a cat", "a picture of a kitten", "quarterly stock market report"]
    )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.3


def test_demo_transform_composites_alpha_on_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert to_rgb(half).mode == "RGB"


def test_match_state_dict_in_order_checks_each_shape():
    source = {"_a.weight": torch.zeros(2, 3), "_b.bias": torch.zeros(4)}
    renamed = match_state_dict_in_order(source, {"a.weight": (2, 3), "b.bias": (4,)}, "m")
    assert list(renamed) == ["a.weight", "b.bias"]
    with pytest.raises(UnicomError, match="'_b.bias' has shape"):
        match_state_dict_in_order(source, {"a.weight": (2, 3), "b.bias": (5,)}, "m")
    with pytest.raises(UnicomError, match="2 tensors in the weights file but 1"):
        match_state_dict_in_order(source, {"a.weight": (2, 3)}, "m")
