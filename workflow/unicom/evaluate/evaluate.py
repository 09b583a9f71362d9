"""Evaluate one model on one retrieval benchmark: embed its images, score R@K / MAP@R / R-Precision.

Models: ``base`` is the image side of the encoder used for clustering (the zero-shot baseline,
as the paper compares against CLIP); any other value is a folder exported by ``unicom.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from unicom import formats
from unicom.cli import parse_options_json, run_cli, setup_logging
from unicom.config import section_options
from unicom.devices import resolve_device
from unicom.encoders import build_encoder
from unicom.errors import UnicomError
from unicom.evaluate import benchmarks, metrics, sets
from unicom.io import write_json

log = logging.getLogger("unicom.evaluate.evaluate")


@dataclasses.dataclass
class ImageEmbedder:
    """What evaluation needs of a model: a per-image transform and a batched embedding."""

    name: str
    transform: Callable[[Any], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    identity: dict[str, Any]


def base_embedder(embed_options: dict[str, Any], device: torch.device) -> ImageEmbedder:
    encoder = build_encoder(embed_options, device)
    return ImageEmbedder(
        "base",
        encoder.image_transform,
        encoder.encode_images,
        {"kind": "base encoder", **encoder.identity},
    )


def trained_embedder(model_dir: str, device: torch.device) -> ImageEmbedder:
    # torch-heavy training module: imported only when a trained model is evaluated
    from unicom.models import load_trained_model, trained_transform

    model = load_trained_model(model_dir, device)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.encode(images.to(device))

    return ImageEmbedder(
        "trained", trained_transform(model.info), embed, {"kind": "trained", **model.info}
    )


class _Images(Dataset):
    def __init__(self, items: Sequence[Any], transform: Callable[[Any], torch.Tensor]):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(sets.load_image(self.items[index]))


def embed_items(
    embedder: ImageEmbedder, items: Sequence[Any], batch_size: int, num_workers: int
) -> np.ndarray:
    """(n, d) float32 L2-normalised embeddings of ``items``, in order."""
    loader = DataLoader(
        _Images(items, embedder.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    chunks = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"embed {embedder.name}", unit="batch", mininterval=5):
            chunks.append(embedder.embed(batch).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def stratified_subset(labels: Sequence[str], limit: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``limit`` items, the same fraction of every label (seeded)."""
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    fraction = limit / len(labels)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def cap_set(dataset: sets.RetrievalSet, limit: int | None, seed: int):
    """Subsample a benchmark for quick runs: all items (single set) or the queries only."""
    if limit is None:
        return dataset
    if dataset.protocol == sets.SINGLE:
        idx = stratified_subset(dataset.labels, limit, seed)
        return dataclasses.replace(
            dataset,
            items=tuple(dataset.items[i] for i in idx),
            labels=tuple(dataset.labels[i] for i in idx),
            num_queries=len(idx),
        )
    idx = stratified_subset(dataset.query_labels, limit, seed)
    return dataclasses.replace(
        dataset,
        items=tuple(dataset.items[i] for i in idx) + dataset.gallery_items,
        labels=tuple(dataset.labels[i] for i in idx) + dataset.gallery_labels,
        num_queries=len(idx),
    )


def evaluate(
    embedder: ImageEmbedder, dataset: sets.RetrievalSet, options: dict[str, Any]
) -> dict[str, Any]:
    start = time.perf_counter()
    embeddings = embed_items(embedder, dataset.items, options["batch_size"], options["num_workers"])
    embed_seconds = time.perf_counter() - start
    dims = [d if d == "full" else int(d) for d in options["dims"]]
    scores = metrics.evaluate_dims(
        **dataset.metric_inputs(embeddings), dims=dims, ks=tuple(options["ks"])
    )
    return {
        "model": embedder.name,
        "model_identity": embedder.identity,
        "dataset": dataset.summary(),
        "embed_seconds": round(embed_seconds, 2),
        "images_per_second": round(len(dataset.items) / max(embed_seconds, 1e-9), 1),
        **scores,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.evaluate.evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="'base' or a unicom.train export folder")
    parser.add_argument("--dataset", required=True, choices=sorted(benchmarks.BENCHMARKS))
    parser.add_argument("--dataset-path", help="the benchmark's folder (or file)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--options-json", required=True, help="the evaluate config section")
    parser.add_argument("--embed-options-json", required=True, help="the embed config section")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the job's cores)")
    parser.add_argument(
        "--protocol", default=formats.ZERO_SHOT, help="what the summary calls the result"
    )
    parser.add_argument("--name", help="the model's name in the results (default: base, trained)")
    args = parser.parse_args(argv)
    setup_logging()
    options = section_options("evaluate", parse_options_json(args.options_json))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(options["device"], "evaluate.device")
    ok, why = benchmarks.available(args.dataset, args.dataset_path)
    if not ok:
        raise UnicomError(why)
    dataset = cap_set(
        benchmarks.load(args.dataset, args.dataset_path), options["max_images"], options["seed"]
    )
    if args.model == "base":
        embedder = base_embedder(parse_options_json(args.embed_options_json), device)
    else:
        embedder = trained_embedder(args.model, device)
    if args.name:
        embedder = dataclasses.replace(embedder, name=args.name)
    result = {"protocol": args.protocol, **evaluate(embedder, dataset, options)}
    write_json(args.out, result)
    full = result["results"]["full"]
    log.info(
        "%s on %s: R@1 %.4f MAP@R %.4f (%d images, %.0f img/s)",
        embedder.name,
        args.dataset,
        full["recall@1"],
        full["map@r"],
        len(dataset.items),
        result["images_per_second"],
    )


if __name__ == "__main__":
    run_cli(main)
