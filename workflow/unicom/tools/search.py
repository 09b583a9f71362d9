"""Image search with a trained model: index a folder (or webdataset shards), query with an image.

    python -m unicom.tools.search --model results/train --index results/shards/*.tar \\
        --query my.jpg --top 8 --out matches.png

Prints the top matches with their cosine similarity and draws them as a PNG strip. The index is
exact (faiss inner product on L2-normalised embeddings); ``--save-index`` keeps it for reuse.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from unicom.cli import parse_options_json, run_cli, setup_logging
from unicom.embedders import embed_items, load_embedder
from unicom.errors import UnicomError
from unicom.images import to_rgb
from unicom.io import write_png
from unicom.shards import iter_tar_members

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
log = logging.getLogger("unicom.tools.search")


def collect_images(sources: list[str]) -> tuple[list[str], list[Image.Image | str]]:
    """(names, items) of every image in the given folders, image files and webdataset tars."""
    names: list[str] = []
    items: list[Image.Image | str] = []
    for source in map(Path, sources):
        if source.suffix == ".tar":
            for member, data in iter_tar_members(source):
                if Path(member).suffix.lower() in IMAGE_SUFFIXES:
                    names.append(f"{source.name}:{member}")
                    items.append(to_rgb(Image.open(io.BytesIO(data))))
        elif source.is_dir():
            for path in sorted(source.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    names.append(str(path))
                    items.append(str(path))
        elif source.is_file():
            names.append(str(source))
            items.append(str(source))
        else:
            raise UnicomError(f"--index: {source} is neither an image, a folder nor a .tar shard")
    if not items:
        raise UnicomError(f"--index: no images found in {', '.join(sources)}")
    return names, items


def top_matches(index: faiss.Index, query: np.ndarray, top: int) -> list[tuple[int, float]]:
    """(gallery position, cosine) of the ``top`` nearest items, best first."""
    scores, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), top)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]


def draw_strip(query: Image.Image, matches: list[tuple[Image.Image, float]], path: str) -> None:
    """The query, then the matches left to right, each captioned with its similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matches) + 1, figsize=(2 * (len(matches) + 1), 2.4))
    for ax, (image, title) in zip(
        axes, [(query, "query")] + [(im, f"{s:.3f}") for im, s in matches], strict=True
    ):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    write_png(path, fig, 100)


def _as_image(item: Image.Image | str) -> Image.Image:
    return item if isinstance(item, Image.Image) else to_rgb(Image.open(item))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.tools.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="unicom.train.train export folder, or 'base' (needs --embed-options-json)",
    )
    parser.add_argument("--embed-options-json", help="embed config section, for --model base")
    parser.add_argument("--index", nargs="+", required=True, help="folders, images or .tar shards")
    parser.add_argument("--query", required=True, help="the query image")
    parser.add_argument("--top", type=int, default=8, help="matches to show")
    parser.add_argument("--out", help="PNG strip of the query and its matches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    import torch

    device = torch.device(args.device)
    if args.model == "base" and not args.embed_options_json:
        raise UnicomError("--model base needs --embed-options-json (the embed config section)")
    embed_options = parse_options_json(args.embed_options_json) if args.embed_options_json else None
    embedder = load_embedder(args.model, embed_options, device)
    try:
        query_image = to_rgb(Image.open(args.query))  # transparency onto white, as in training
    except OSError as err:
        raise UnicomError(f"--query {args.query}: not a readable image ({err})") from None
    names, items = collect_images(args.index)
    gallery = embed_items(embedder, items, args.batch_size, num_workers=0)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    query = embed_items(embedder, [query_image], 1, num_workers=0)
    matches = top_matches(index, query, min(args.top, len(items)))
    for rank, (position, score) in enumerate(matches, 1):
        print(f"{rank:2d}  {score:.4f}  {names[position]}")
    if args.out:
        draw_strip(query_image, [(_as_image(items[p]), s) for p, s in matches], args.out)
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    run_cli(main)
