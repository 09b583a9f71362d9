"""Time and memory of one PartialFC head step (forward + backward) on CPU, world size 1.

Each configuration runs in a fresh subprocess; its step's peak RSS is read from Linux's VmHWM,
reset just before the step (``/proc/self/clear_refs``), minus the RSS before the step.
Memory is reported in three parts:
  weight   the prototypes, C x dim x 4 bytes (an optimizer's momentum would add as much again);
  grad     weight.grad after the step: dense C x dim, or sparse K x dim rows with sparse_grad;
  working  the step's other peak memory: activations (B x K logits...) and temporaries.

    python bench/partial_fc.py [--classes 1000000] [--dim 512] [--batch 256] [--steps 2]
                               [--low-sample-rate 0.1] [--low-feature-rate 0.5] [--threads 2]
                               [--json results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import re
import statistics
import subprocess
import sys
import time

import psutil
import torch

from unicom.cli import run_cli, setup_logging
from unicom.io import write_json
from unicom.train.losses import ArcFaceLoss
from unicom.train.partial_fc import PartialFC

log = logging.getLogger("unicom.bench.partial_fc")
MB = 2**20


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux >= 4.0).

    Freed heap memory glibc keeps resident is returned first; else the step could reuse memory
    that the RSS before it already counted.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def tensor_bytes(tensor: torch.Tensor) -> int:
    if tensor.is_sparse:
        tensor = tensor.coalesce()
        return tensor_bytes(tensor.values()) + tensor_bytes(tensor.indices())
    return tensor.numel() * tensor.element_size()


def measure(
    classes: int,
    dim: int,
    batch: int,
    steps: int,
    sample_rate: float,
    feature_rate: float,
    sparse_grad: bool,
) -> dict:
    """Build the head, run ``steps`` steps; memory from the first, time from the others."""
    head = PartialFC(
        ArcFaceLoss(),
        classes,
        dim,
        sample_rate=sample_rate,
        feature_rate=feature_rate,
        sparse_grad=sparse_grad,
    )
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, dim, generator=generator).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=generator)

    times = []
    for _ in range(steps):
        head.weight.grad, embeddings.grad = None, None
        if not times:
            reset_peak_rss()
            rss_before = psutil.Process().memory_info().rss
        start = time.perf_counter()
        head(embeddings, labels).backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            step_peak = peak_rss_bytes() - rss_before
            grad = tensor_bytes(head.weight.grad)
    return {
        "sample_rate": sample_rate,
        "feature_rate": feature_rate,
        "sparse_grad": sparse_grad,
        "selected_classes": len(head.last_selected_classes),
        "selected_dims": len(head.last_selected_dims),
        "weight_mb": tensor_bytes(head.weight) / MB,
        "grad_mb": grad / MB,
        "working_mb": (step_peak - grad) / MB,
        "step_peak_mb": step_peak / MB,
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:] or times),
    }


def run_isolated(args: argparse.Namespace, sample_rate: float, feature_rate: float, sparse: bool):
    """``measure`` in a fresh interpreter, so peak RSS belongs to this configuration alone."""
    config = {
        "classes": args.classes,
        "dim": args.dim,
        "batch": args.batch,
        "steps": args.steps,
        "sample_rate": sample_rate,
        "feature_rate": feature_rate,
        "sparse_grad": sparse,
    }
    command = [
        sys.executable,
        __file__,
        "--threads",
        str(args.threads),
        "--worker",
        json.dumps(config),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--steps", type=int, default=2, help="memory from step 1, time: median of the rest"
    )
    parser.add_argument("--low-sample-rate", type=float, default=0.1)
    parser.add_argument("--low-feature-rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    setup_logging()

    r1, r2 = args.low_sample_rate, args.low_feature_rate
    # (sample_rate, feature_rate, sparse_grad); the last shows what a dense gradient costs.
    configs = [
        (1.0, 1.0, False),
        (r1, 1.0, True),
        (1.0, r2, False),
        (r1, r2, True),
        (r1, 1.0, False),
    ]
    results = []
    for sample_rate, feature_rate, sparse in configs:
        log.info("r1=%s r2=%s sparse_grad=%s ...", sample_rate, feature_rate, sparse)
        results.append(run_isolated(args, sample_rate, feature_rate, sparse))

    print(
        f"PartialFC head step, C={args.classes:,} dim={args.dim} batch={args.batch}, "
        f"{args.threads} threads, world size 1"
    )
    print(
        f"{'r1':>5} {'r2':>5} {'grad':>6} {'K':>9} {'weight MB':>10} {'grad MB':>9} "
        f"{'working MB':>11} {'step peak MB':>13} {'step s':>8}"
    )
    for r in results:
        print(
            f"{r['sample_rate']:>5} {r['feature_rate']:>5} "
            f"{'sparse' if r['sparse_grad'] and r['sample_rate'] < 1 else 'dense':>6} "
            f"{r['selected_classes']:>9,} {r['weight_mb']:>10.0f} {r['grad_mb']:>9.0f} "
            f"{r['working_mb']:>11.0f} {r['step_peak_mb']:>13.0f} {r['step_s']:>8.3f}"
        )
    full, low_r1, low_r2, low_both, _ = results
    print("ratios (step peak = grad + working; goal for r1: <= 0.2)")
    for name, a, b in (
        (f"r1 {r1}/1.0 at r2=1.0", low_r1, full),
        (f"r1 {r1}/1.0 at r2={r2}", low_both, low_r2),
        (f"r2 {r2}/1.0 at r1=1.0", low_r2, full),
        (f"r2 {r2}/1.0 at r1={r1}", low_both, low_r1),
    ):
        print(
            f"  {name:<22} time {a['step_s'] / b['step_s']:.3f}  "
            f"step peak memory {a['step_peak_mb'] / b['step_peak_mb']:.3f}"
        )
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    run_cli(main)
