"""Evaluate one model on one retrieval benchmark: embed its images, score R@K / MAP@R / R-Precision.

Models: ``base`` is the image side of the encoder used for clustering (the zero-shot baseline,
as the paper compares against CLIP); any other value is a folder exported by ``unicom.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Any

import torch

from unicom import benchmarks, formats
from unicom.benchmarks import sets
from unicom.cli import add_model_arguments, parse_options_json, run_cli, setup_logging
from unicom.devices import resolve_device
from unicom.embedders import ImageEmbedder, embed_items, load_embedder
from unicom.errors import UnicomError
from unicom.evaluate import metrics
from unicom.io import write_json
from unicom.options import StageOptions

log = logging.getLogger("unicom.evaluate.evaluate")
OPTIONS = StageOptions("evaluate")


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
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, choices=sorted(benchmarks.BENCHMARKS))
    parser.add_argument("--dataset-path", help="the benchmark's folder (or file)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument(
        "--protocol", default=formats.ZERO_SHOT, help="what the summary calls the result"
    )
    parser.add_argument("--name", help="the model's name in the results (default: base, trained)")
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(options["device"], "evaluate.device")
    ok, why = benchmarks.available(args.dataset, args.dataset_path)
    if not ok:
        raise UnicomError(why)
    dataset = sets.cap_set(
        benchmarks.load(args.dataset, args.dataset_path), options["max_images"], options["seed"]
    )
    embedder = load_embedder(args.model, parse_options_json(args.embed_options_json), device)
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
