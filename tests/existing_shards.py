"""Shards as users already have them: written by the real img2dataset (its own keys, its own
Parquet status table beside each tar), from seeded pictures, so that the committed
clip-retrieval fixture (tests/fixtures/clip_retrieval/) and a test build the same samples.

Also run as a script by tests/fixtures/clip_retrieval/make_fixture.sh:
``python tests/existing_shards.py OUT_DIR`` writes OUT_DIR/shards and OUT_DIR/vit-b-32.safetensors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The pictures: 3 categories x 8, one per row, and 2 rows that fail (a missing file and bytes
# that are no image): 26 rows, 10 per shard -> 3 shards (10, 10, 6 rows).
CATEGORIES = {"apples": 8, "boats": 8, "cubes": 8}
ROWS_PER_SHARD = 10
SHARDS = 3
SUCCESSES = sum(CATEGORIES.values())
ROWS = SUCCESSES + 2
IMAGE_SIZE = 64
# LAION's metadata columns beside similarity (config/existing.yaml's filters read NSFW): the
# same samples, keys and embeddings, with the status tables LAION-400M's shards have.
LAION_COLUMNS = {"NSFW": "UNLIKELY", "LICENSE": "?"}


def url_list(root: Path, laion_columns: bool = False) -> Path:
    """The URL list (file:// URLs to seeded PNGs; one missing, one not an image)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers.images import make_image_folder

    folder = make_image_folder(root / "pictures", CATEGORIES, size=96, seed=3)
    pictures = sorted(folder.rglob("*.png"))
    broken = root / "pictures/broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    urls = [p.resolve().as_uri() for p in pictures]
    captions = [f"a {p.parent.name} picture, {p.stem.replace('_', ' ')}" for p in pictures]
    # the two failures inside the first and the last shard
    urls.insert(3, (root / "pictures/missing.png").resolve().as_uri())
    captions.insert(3, "a picture that is not there")
    urls.insert(ROWS - 2, broken.resolve().as_uri())
    captions.insert(ROWS - 2, "bytes that are no picture")
    path = root / "urls.parquet"
    table = pa.table(
        {
            "url": urls,
            "caption": captions,
            "similarity": pa.array([0.30 + i / 100 for i in range(len(urls))], pa.float64()),
            **{
                name: [value] * len(urls)
                for name, value in (LAION_COLUMNS.items() if laion_columns else ())
            },
        }
    )
    pq.write_table(table, path)
    return path


def build_shards(root: Path, laion_columns: bool = False) -> Path:
    """img2dataset's webdataset output for the URL list, as a user would have it:
    ``root/shards/0000{0,1,2}.tar`` with ``.parquet`` and ``_stats.json`` beside each (with
    ``laion_columns``, LAION's NSFW and LICENSE columns in the tables too)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import img2dataset

    out = root / "shards"
    with contextlib.redirect_stdout(sys.stderr):
        img2dataset.download(
            url_list=str(url_list(root, laion_columns)),
            output_folder=str(out),
            input_format="parquet",
            output_format="webdataset",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["similarity", *(LAION_COLUMNS if laion_columns else ())],
            number_sample_per_shard=ROWS_PER_SHARD,
            processes_count=1,
            thread_count=1,  # one thread: members in row order, the same tar every time
            image_size=IMAGE_SIZE,
            resize_mode="border",
            compute_hash="sha256",
            enable_wandb=False,
            distributor="multiprocessing",
        )
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == SHARDS, tars
    return out


def write_random_clip(path: Path) -> Path:
    """open_clip ViT-B-32 with seeded random weights (what test_rehearsal.py writes too)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    build_shards(target)
    write_random_clip(target / "vit-b-32.safetensors")
