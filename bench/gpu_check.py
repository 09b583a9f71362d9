"""What a lent GPU says about the real path: correctness of the partial head on CUDA, and the
rates that the LAION-400M cost table (docs/costs.md) extrapolates (training and embedding images/s,
GEMM throughput for k-means and assignment, head memory at 1M classes); and the train and embed
stages themselves at LAION's settings, today's against the speed options (``gpu_stages``).

Needs only torch and timm (a lent machine has no faiss, open_clip or Snakemake, and no network:
every model is randomly initialised). Each check prints its numbers or why it failed, and the
next one runs anyway.

    python bench/gpu_check.py [--device cuda] [--quick]

``--quick`` shrinks every size (a CPU smoke run of the script itself).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from gpu_stages import (  # noqa: E402
    check_embed_stage_speed,
    check_matmul_rates,
    check_train_stage_speed,
    stage_env,
)

from unicom.train.losses import ArcFaceLoss  # noqa: E402  (torch + numpy only)
from unicom.train.mlcd import MLCDLoss  # noqa: E402
from unicom.train.partial_fc import PartialFC  # noqa: E402

GB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_environment(device: torch.device, sizes: dict) -> None:
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, device {device}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"{props.name}: {props.total_memory / GB:.0f} GiB, capability {props.major}.{props.minor},"
            f" {props.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()},"
            f" {torch.cuda.device_count()} visible"
        )
    try:
        import timm

        print(f"timm {timm.__version__}")
    except ImportError:
        print("timm: not installed")
    for name in ("faiss", "open_clip", "snakemake"):
        try:
            __import__(name)
            print(f"{name}: importable")
        except ImportError:
            print(f"{name}: not installed (its checks are skipped)")


def check_head_matches_cpu(device: torch.device, sizes: dict) -> None:
    """The sampled head on ``device`` (fp32) against the same head in float64 on the CPU:
    same seed, same sampled classes and dims, so loss and gradients must agree. Once with one
    label per row (ArcFace) and once with two (MLCD, ``train.positives: 2``)."""
    classes, dim, batch = sizes["check_classes"], 512, 256
    for positives in (1, 2):
        torch.manual_seed(0)
        embeddings = torch.randn(batch, dim, dtype=torch.float64)
        labels = torch.randint(0, classes, (batch, positives)).squeeze(1)
        results = []
        for where, dtype in ((torch.device("cpu"), torch.float64), (device, torch.float32)):
            loss_kind = MLCDLoss if positives > 1 else ArcFaceLoss
            head = PartialFC(loss_kind(), classes, dim, sample_rate=0.1, feature_rate=0.5, seed=0)
            head = head.to(device=where, dtype=dtype)
            x = embeddings.to(head.weight.device, dtype).detach().clone().requires_grad_(True)
            loss = head(x, labels.to(head.weight.device))
            loss.backward()
            selected = (head.last_selected_classes.cpu(), head.last_selected_dims.cpu())
            grads = (x.grad.double().cpu(), head.weight.grad.double().cpu())
            results.append((loss.item(), *grads, *selected))
        (ref_loss, ref_x, ref_w, ref_cls, ref_dims), (loss, gx, gw, cls, dims) = results
        same_draws = torch.equal(ref_cls, cls) and torch.equal(ref_dims, dims)
        rel_x = (gx - ref_x).norm().item() / ref_x.norm().item()
        rel_w = (gw - ref_w).norm().item() / ref_w.norm().item()
        print(
            f"head C={classes} r1=0.1 r2=0.5 positives {positives}: same sampled classes/dims "
            f"{same_draws}, loss {loss:.6f} vs float64 {ref_loss:.6f} "
            f"(|diff| {abs(loss - ref_loss):.2e}), gradient relative error embeddings "
            f"{rel_x:.2e}, prototypes {rel_w:.2e}"
        )


def head_step(
    device, classes, dim, batch, sample_rate, feature_rate, autocast
) -> tuple[float, float]:
    head = PartialFC(
        ArcFaceLoss(), classes, dim, sample_rate=sample_rate, feature_rate=feature_rate
    )
    head = head.to(device)
    x = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = head(x, labels)
        loss.backward()
        head.weight.grad = None

    reset_peak(device)
    seconds = timed(step, device, repeats=5)
    return seconds, peak_gb(device)


def check_head_at_scale(device: torch.device, sizes: dict) -> None:
    """One head step at the paper's 1M classes: partial (r1 0.1, r2 0.5) against full."""
    classes, dim, batch = sizes["classes"], 512, sizes["head_batch"]
    autocast = device.type == "cuda"
    for r1, r2 in ((0.1, 0.5), (1.0, 1.0)):
        seconds, peak = head_step(device, classes, dim, batch, r1, r2, autocast)
        print(
            f"head C={classes} d={dim} B={batch} r1={r1} r2={r2}: {seconds * 1e3:.1f} ms/step, "
            f"peak {peak:.2f} GiB (weights {classes * dim * 4 / GB:.2f} GiB)"
        )


class Embedder(nn.Module):
    """The trainer's model: timm backbone, pooled features -> Linear -> BatchNorm1d."""

    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(backbone.num_features, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.backbone(images)))


def check_training_rate(device: torch.device, sizes: dict) -> None:
    """Images/s of one optimizer step of the LAION trainer: ViT-B/16 at 224 px, bf16 autocast,
    embedding 512, partial head over 1M classes (r1 0.1, r2 0.5), AdamW."""
    import timm

    model_name, size, batch = sizes["train_model"], sizes["image_size"], sizes["train_batch"]
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=size)
    model = Embedder(backbone, 512).to(device)
    head = PartialFC(ArcFaceLoss(), sizes["classes"], 512, sample_rate=0.1, feature_rate=0.5)
    head = head.to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, sizes["classes"], (batch,), device=device)
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = head(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    seconds = timed(step, device, repeats=sizes["repeats"])
    print(
        f"train {model_name} {size}px batch {batch} (+ head C={sizes['classes']}): "
        f"{batch / seconds:.0f} img/s, {seconds * 1e3:.0f} ms/step, peak {peak_gb(device):.1f} GiB"
    )
    laion_samples = 32 * 400e6
    print(
        f"  -> 32 epochs of 400M images: {laion_samples / (batch / seconds) / 3600:.0f} GPU-h "
        "at this rate on one GPU"
    )


def embedding_model(sizes: dict, device: torch.device) -> tuple[str, Callable, int]:
    """open_clip ViT-B-32's image tower (random init) as the embed stage runs it, when open_clip
    is installed (carried as a wheel, see gpu_check.sh); else timm's ViT-B/32 of the same shape."""
    size = sizes["image_size"]
    try:
        import open_clip
    except ImportError:
        import timm

        name = sizes["embed_model"]
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size)
        return f"timm {name} (no open_clip here)", model.to(device).eval(), size
    name = sizes["open_clip_model"]
    model = open_clip.create_model(name, pretrained=None, device=device).eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return f"open_clip {name}", model.encode_image, int(image_size)


def run_train_stage(
    root: Path, data: dict, options: dict, device: torch.device
) -> tuple[Path, float, str]:
    """One run of the train stage; returns its folder, its seconds and its log."""
    import json
    import subprocess

    out_dir = root / f"train-positives-{options['positives']}"
    command = [
        sys.executable, "-m", "unicom.train.train", "--shards", *data["shards"],
        "--assignments", *data["assignments"], "--num-classes", str(data["classes"]),
        "--out-dir", str(out_dir), "--options-json", json.dumps(options), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command, env=stage_env(device), capture_output=True, text=True, timeout=240
    )
    if result.returncode != 0:
        raise RuntimeError(f"train exited {result.returncode}: {result.stderr[-1500:]}")
    return out_dir, time.perf_counter() - started, result.stderr


def check_trainer(device: torch.device, sizes: dict) -> None:
    """The train stage itself (``python -m unicom.train.train``, one rank, device auto, precision
    auto) on synthetic striped shards: it must finish and its exported model load and encode on
    ``device``; prints the loss at the start and the end (too few steps at --quick to fall
    reliably). With one label per row and with two (MLCD). Its files go in a temporary folder."""
    import json
    import re
    import tempfile

    from unicom.models import load_trained_model
    from unicom.synthetic import write_synthetic_set

    size = sizes["trainer_image_size"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        root = Path(tmp)
        per_shard, classes = sizes["trainer_per_shard"], 16
        shards, assignments = write_synthetic_set(root, 4 * per_shard, classes, size, per_shard)
        data = {"classes": classes, "shards": shards, "assignments": assignments}
        for positives in (1, 2):
            options = {
                "model": sizes["trainer_model"],
                "model_kwargs": {"img_size": size},
                "pretrained": None,
                "dim": 64,
                "image_size": size,
                "batch_size": sizes["trainer_batch"],
                "steps": sizes["trainer_steps"],
                "lr": 1e-3,
                "warmup_fraction": 0.1,
                "positives": positives,
                "num_workers": 2,
                "log_every": 1,
                "checkpoint_every": sizes["trainer_steps"],
                # A minute of compilation per run: check_train_stage_speed measures it.
                "compile": False,
            }
            out_dir, seconds, log = run_train_stage(root, data, options, device)
            lines = (out_dir / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines]
            losses = [m["loss"] for m in metrics]
            rates = [m["samples_per_s"] for m in metrics[len(metrics) // 2 :]]
            model = load_trained_model(out_dir, device=str(device)).eval()
            embedding = model.encode(torch.rand(8, 3, size, size, device=device))
            ran_on = re.search(r"ranks on (\S+)", log)
            print(
                f"trainer {options['model']} {size}px batch {options['batch_size']} positives "
                f"{positives}: {len(losses)} steps in {seconds:.0f} s (startup included), loss "
                f"{sum(losses[:3]) / 3:.3f} (first 3) -> {sum(losses[-3:]) / 3:.3f} (last 3), "
                f"{sum(rates) / len(rates):.0f} samples/s (second half); exported model encodes "
                f"on {embedding.device} -> {tuple(embedding.shape)}, finite "
                f"{bool(torch.isfinite(embedding).all())}; trained on "
                f"{ran_on[1] if ran_on else '?'}"
            )


def check_embedding_rate(device: torch.device, sizes: dict) -> None:
    """Images/s of the embed stage's image model forward, bf16 autocast on a GPU."""
    batch = sizes["embed_batch"]
    name, encode, size = embedding_model(sizes, device)
    images = torch.randn(batch, 3, size, size, device=device)
    autocast = device.type == "cuda"

    @torch.no_grad()
    def forward() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            F.normalize(encode(images), dim=1)

    seconds = timed(forward, device, repeats=sizes["repeats"])
    print(
        f"embed {name} batch {batch}: {batch / seconds:.0f} img/s "
        f"-> 400M images: {400e6 / (batch / seconds) / 3600:.0f} GPU-h (image tower only)"
    )


def check_gemm_rate(device: torch.device, sizes: dict) -> None:
    """fp32 GEMM of vectors x centroids, the work unit of k-means and assignment (u = one
    vector x centroid = 2 d flops), TF32 off as faiss's exact search."""
    torch.backends.cuda.matmul.allow_tf32 = False
    n, k, d = sizes["gemm_n"], sizes["gemm_k"], 512
    x = torch.randn(n, d, device=device)
    c = torch.randn(k, d, device=device)
    seconds = timed(lambda: torch.mm(x, c.T).max(dim=1), device, repeats=5)
    units = n * k
    ns_per_unit = seconds / units * 1e9
    print(
        f"GEMM+argmax {n}x{d} by {k} centroids fp32: {2 * units * d / seconds / 1e9:.0f} GFLOP/s, "
        f"{ns_per_unit:.4f} ns per vector x centroid"
    )
    kmeans_units = 1_000_000 * 32 * 1_000_000 * 25  # k 1M, ppc 32, 25 iterations
    assign_units = 400e6 * 1_000_000
    print(
        f"  -> LAION-400M at this rate: k-means (k 1M, ppc 32, 25 it.) "
        f"{kmeans_units * ns_per_unit / 1e9 / 3600:.1f} GPU-h, assignment "
        f"{assign_units * ns_per_unit / 1e9 / 3600:.1f} GPU-h"
    )


def check_torch_kmeans(device: torch.device, sizes: dict) -> None:
    """The kmeans.backend: torch iteration (unicom.cluster.torch_kmeans, one rank) against a
    bare matmul of the same shapes in its own precision (fp32 with TF32 off, tf32, bf16): how
    much of the GEMM rate k-means keeps. Report-only."""
    from unicom.cluster.torch_kmeans import kmeans

    n, k, d, niter = sizes["kmeans_n"], sizes["kmeans_k"], 512, sizes["kmeans_niter"]
    generator = torch.Generator(device=device).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1)
    init = x[torch.randperm(n, device=device, generator=generator)[:k]]
    flops = 2 * n * d * k
    chunk = sizes["kmeans_chunk"]
    for precision in ("fp32", "tf32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        block, centroids = x[:chunk].to(dtype), init.to(dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            product = lambda a=block, b=centroids: a @ b.T  # noqa: E731
            matmul = timed(product, device, repeats=5) * (n / chunk)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        result = kmeans(x, init, niter, seed=0, chunk=chunk, precision=precision)
        best = min(it["time"] for it in result.iterations)
        print(
            f"torch k-means n {n} k {k} d {d} {precision}: {flops / best / 1e9:.0f} GFLOP/s per "
            f"iteration vs torch.matmul {precision} {flops / matmul / 1e9:.0f} (ratio "
            f"{matmul / best:.2f}); objective {result.iterations[0]['obj']:.0f} -> "
            f"{result.iterations[-1]['obj']:.0f}"
        )


def check_nccl(device: torch.device, sizes: dict) -> None:
    """A one-rank process group as the trainer makes it on GPUs (unicom.distributed: nccl for
    CUDA tensors, gloo for host ones) and a collective of each kind: the labels' gather and
    the stop signal go over gloo, DDP over NCCL."""
    import torch.distributed as dist

    if device.type != "cuda":
        print("nccl: skipped (no CUDA device)")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group(
        "cpu:gloo,cuda:nccl",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
        device_id=device,
    )
    try:
        value = torch.ones(4, device=device)
        dist.all_reduce(value)
        host = [torch.zeros(3, dtype=torch.long)]
        dist.all_gather(host, torch.arange(3))
        print(
            f"nccl {torch.cuda.nccl.version()}: one-rank all_reduce {value.tolist()}; "
            f"gloo all_gather of a host tensor {host[0].tolist()}"
        )
    finally:
        dist.destroy_process_group()


CHECKS = (
    check_environment,
    check_head_matches_cpu,
    check_head_at_scale,
    check_training_rate,
    check_trainer,
    check_embedding_rate,
    check_gemm_rate,
    check_matmul_rates,
    check_torch_kmeans,
    check_nccl,
    check_train_stage_speed,
    check_embed_stage_speed,
)
SIZES = {
    "check_classes": 10_000,
    "classes": 1_000_000,
    "head_batch": 256,
    "train_model": "vit_base_patch16_224",
    "embed_model": "vit_base_patch32_224",
    "open_clip_model": "ViT-B-32",
    "image_size": 224,
    "train_batch": 128,
    "embed_batch": 256,
    "gemm_n": 65_536,
    "gemm_k": 100_000,
    "kmeans_n": 4_000_000,
    "kmeans_k": 100_000,
    "kmeans_niter": 3,
    "kmeans_chunk": 16_384,
    "repeats": 10,
    "trainer_model": "vit_small_patch16_224",
    "trainer_image_size": 96,
    "trainer_batch": 64,
    "trainer_steps": 60,
    "trainer_per_shard": 128,
    "matmul_n": 8192,
    "stage_shards": 8,
    "stage_per_shard": 512,
    "stage_steps": 60,
    "stage_log_every": 10,
    "stage_timeout": 240,
    "phase_steps": 10,
    "embed_repeats": 8,
}
QUICK = {
    **SIZES,
    "check_classes": 2_000,
    "classes": 20_000,
    "head_batch": 64,
    "train_model": "vit_tiny_patch16_224",
    "embed_model": "vit_tiny_patch16_224",
    "image_size": 64,
    "train_batch": 4,
    "embed_batch": 4,
    "gemm_n": 1024,
    "gemm_k": 2048,
    "kmeans_n": 4096,
    "kmeans_k": 256,
    "kmeans_niter": 2,
    "kmeans_chunk": 1024,
    "repeats": 2,
    "trainer_model": "test_vit",
    "trainer_image_size": 32,
    "trainer_batch": 8,
    "trainer_steps": 6,
    "trainer_per_shard": 16,
    "matmul_n": 256,
    "stage_per_shard": 4,
    "stage_steps": 4,
    "stage_log_every": 2,
    "phase_steps": 2,
    "embed_repeats": 1,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on a CPU")
    parser.add_argument(
        "--only", nargs="+", choices=[check.__name__ for check in CHECKS], metavar="CHECK",
        help="run only these checks (a rerun that fits in what is left of a device budget)",
    )  # fmt: skip
    args = parser.parse_args()
    checks = [check for check in CHECKS if not args.only or check.__name__ in args.only]
    device = torch.device(args.device)
    sizes = QUICK if args.quick else SIZES
    if device.type == "cuda":
        if device.index is None:  # torch 2.11's set_device wants an index
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    failed = 0
    for check in checks:
        print(f"== {check.__name__}", flush=True)
        started = time.perf_counter()
        try:
            check(device, sizes)
        except Exception:  # report and go on: one run should tell as much as it can
            failed += 1
            print(traceback.format_exc(limit=3).rstrip())
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"{len(checks) - failed} checks ran, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
