"""gpu_check's checks of the stages themselves at LAION-400M's settings (imported by
gpu_check.py, which lists them in CHECKS):

- ``check_matmul_rates``: torch.matmul's TFLOP/s in fp32, tf32 and bf16, the yardsticks;
- ``check_train_stage_speed``: the LAION trainer (ViT-B/16, 224 px, batch 128, 1M classes,
  r1 0.1, r2 0.5) in-process on batches already on the device, its step split into phases
  (input, forward, head, head backward, backward, clipping, optimizer); then the real train
  stage (``python -m unicom.train.train``, 8 loader workers, >= 8 shards of photo-like 256 px
  JPEGs made here) with today's settings and with the speed options: images/s, the share of
  time waiting for data, and TFLOP/s against the bf16 matmul of the same run;
- ``check_embed_stage_speed``: the real embed stage (open_clip ViT-B-32, random weights) on
  the same shards, PIL decoding and GPU decoding: images/s and the share waiting for data.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_SHARDS: dict[str, list[str]] = {}  # made once per run, shared by the stage checks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, precision: str, n: int, repeats: int = 5) -> float:
    """TFLOP/s of an n x n x n torch.matmul in ``precision`` (fp32: TF32 off, tf32, bf16)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    if precision == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for _ in range(2):
            a @ b
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / min(times) / 1e12


def check_matmul_rates(device: torch.device, sizes: dict) -> None:
    """The matmul rates the stage checks compare with: fp32 (TF32 off), tf32 and bf16."""
    n = sizes["matmul_n"]
    rates = {p: matmul_tflops(device, p, n) for p in ("fp32", "tf32", "bf16")}
    print(f"matmul {n}^3: " + ", ".join(f"{p} {r:.1f} TFLOP/s" for p, r in rates.items()))


# --------------------------------------------------------------------------- the train stage


def stage_env(device: torch.device) -> dict[str, str]:
    """``python -m unicom...``'s environment: our package first, then the carried wheels; no
    GPU visible when checking a CPU."""
    paths = [str(REPO / "workflow"), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    if device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def scratch() -> Path:
    """A folder for checkpoints and shards that goes at exit: in memory where there is room
    (a LAION checkpoint with its 1M-class head and AdamW moments is ~7 GB)."""
    memory = Path("/dev/shm")
    roomy = memory.is_dir() and os.access(memory, os.W_OK) and shutil.disk_usage(memory).free
    folder = tempfile.mkdtemp(
        prefix="gpu_check_stages_", dir=memory if roomy > 32 * 2**30 else None
    )
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


def photo_shards(sizes: dict) -> dict[str, list[str]]:
    """>= 8 shards of photo-like 256 px JPEGs (~25 KB each, as img2dataset writes LAION's),
    labels over 1M classes; made once, on every core."""
    if not _SHARDS:
        sys.path.insert(0, str(REPO / "workflow"))
        from unicom.synthetic import write_synthetic_set

        per_shard, count = sizes["stage_per_shard"], sizes["stage_shards"]
        started = time.perf_counter()
        shards, assignments = write_synthetic_set(
            scratch(), per_shard * count, sizes["classes"], 256, per_shard, photo=True,
            processes=os.cpu_count() or 1,
        )  # fmt: skip
        _SHARDS.update(shards=shards, assignments=assignments)
        megabytes = sum(os.path.getsize(s) for s in shards) / 1e6
        print(
            f"{count} shards of {per_shard} photo-like 256 px JPEGs ({megabytes:.0f} MB) made in "
            f"{time.perf_counter() - started:.1f} s"
        )
    return _SHARDS


def laion_options(sizes: dict, **changes) -> dict:
    size = sizes["image_size"]
    return {
        "model": sizes["train_model"], "model_kwargs": {"img_size": size}, "pretrained": None,
        "dim": 512, "image_size": size, "batch_size": sizes["train_batch"],
        "sample_rate": 0.1, "feature_rate": 0.5, "steps": sizes["stage_steps"],
        "log_every": sizes["stage_log_every"], "checkpoint_every": 10**6, "num_workers": 8,
        "streams": 8, **changes,
    }  # fmt: skip


def flops_per_image(trainer, sizes: dict) -> float:
    """Training FLOPs per image: 3 x the forward's (torch's FLOP counter: matmuls,
    convolutions, attention) plus the head's cosine product, 3 x 2 K D'."""
    from torch.utils.flop_counter import FlopCounterMode

    size, device = sizes["image_size"], trainer.device
    images = torch.zeros(2, 3, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trainer.model.eval()(images)
    trainer.model.train()
    head = 2 * trainer.head.num_sampled * trainer.head.num_dims
    return 3 * (counter.get_total_flops() / 2 + head)


class PhaseClock:
    """Marks in a step's timeline, from hooks on the trainer's modules and optimizers: CUDA
    events on a GPU (the GPU's own time between them), the host clock on a CPU."""

    ORDER = ("start", "forward", "backbone", "head", "head backward", "backward", "clipped")

    def __init__(self, trainer):
        self.device = trainer.device
        self.marks: dict[str, object] = {}
        model = trainer.forward_model
        model.register_forward_pre_hook(lambda module, args: self.mark("forward"))
        model.register_forward_hook(self._after_backbone)
        trainer.head.register_forward_hook(lambda module, args, out: self.mark("head"))
        for param in trainer.model.parameters():  # the last one accumulated ends the backward
            param.register_post_accumulate_grad_hook(lambda p: self.mark("backward"))
        trainer.optimizer.register_step_pre_hook(lambda *args: self.mark("clipped"))

    def _after_backbone(self, module, args, output):
        self.mark("backbone")
        output.register_hook(lambda grad: self.mark("head backward"))

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def phases(self) -> dict[str, float]:
        """Seconds from each mark to the next, the optimizer up to "end"."""
        synchronize(self.device)
        names = [*self.ORDER, "end"]
        spans = {}
        for first, second in zip(names[:-1], names[1:], strict=True):
            a, b = self.marks[first], self.marks[second]
            spans[first] = a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a
        return dict(zip(PHASES, spans.values(), strict=True))


PHASES = ("input", "forward", "head", "head backward", "backward", "clip", "optimizer")


def trainer_phases(device: torch.device, sizes: dict, options: dict) -> tuple[dict, float, float]:
    """Median phase seconds and images/s of the real Trainer on one batch kept on the device,
    and its training FLOPs per image."""
    sys.path.insert(0, str(REPO / "workflow"))
    from unicom.distributed import WorldInfo
    from unicom.train.train import train_options
    from unicom.train.trainer import Trainer

    single = WorldInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # see tests/test_train_speed
    trainer = Trainer(train_options(options), sizes["classes"], 1000, single, device, backend)
    batch_size, size = sizes["train_batch"], sizes["image_size"]
    batch = {
        "images": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
        "labels": torch.randint(0, sizes["classes"], (batch_size,)),
    }
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
    clock = PhaseClock(trainer)
    started = time.perf_counter()
    trainer.train_step([batch])  # compiles when the options say so
    synchronize(device)
    first = time.perf_counter() - started
    steps, walls = [], []
    for _ in range(sizes["phase_steps"]):
        start = time.perf_counter()
        clock.mark("start")
        trainer.train_step([batch])
        clock.mark("end")
        steps.append(clock.phases())
        walls.append(time.perf_counter() - start)
    median = {name: statistics.median(step[name] for step in steps) for name in PHASES}
    rate = batch_size / statistics.median(walls)
    print(
        f"  in-process, batch on the device: {rate:.0f} img/s (first step {first:.1f} s); "
        "median phases (ms): "
        + ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in median.items())
    )
    return median, rate, flops_per_image(trainer, sizes)


def run_train_stage(device, sizes, options: dict, name: str) -> dict:
    """One run of the train stage on the photo shards; its steady metrics (the first
    window, with start-up and compilation, left out)."""
    data = photo_shards(sizes)
    out_dir = scratch() / f"train-{name}"
    command = [
        sys.executable, "-m", "unicom.train.train", "--shards", *data["shards"],
        "--assignments", *data["assignments"], "--num-classes", str(sizes["classes"]),
        "--out-dir", str(out_dir), "--options-json", json.dumps(options), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command, env=stage_env(device), capture_output=True, text=True,
        timeout=sizes["stage_timeout"],
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"train exited {result.returncode}: {result.stderr[-1500:]}")
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out_dir, ignore_errors=True)
    steady = lines[1:] or lines
    return {
        "rate": statistics.mean(line["samples_per_s"] for line in steady),
        "wait": statistics.mean(line["data_wait_share"] for line in steady),
        "step_ms": 1e3 * statistics.mean(line["step_s"] for line in steady),
        "wait_ms": 1e3 * statistics.mean(line["data_wait_s"] for line in steady),
        "first_window_s": lines[0]["step_s"] * sizes["stage_log_every"],
        "seconds": seconds,
    }


def check_train_stage_speed(device: torch.device, sizes: dict) -> None:
    """Today's train stage against the speed options, at LAION's settings (see module doc)."""
    cuda = device.type == "cuda"
    bf16 = matmul_tflops(device, "bf16", sizes["matmul_n"])
    print(f"bf16 matmul {sizes['matmul_n']}^3: {bf16:.1f} TFLOP/s (the yardstick below)")
    new = {"compile": "auto", "fused_optimizer": "auto"}
    print(
        f"trainer {sizes['train_model']} {sizes['image_size']}px batch {sizes['train_batch']}, "
        f"head C={sizes['classes']} r1 0.1 r2 0.5, compiled "
        f"({'inductor' if cuda else 'aot_eager: a smoke run'}), fused optimizer {cuda}:"
    )
    in_process = laion_options(sizes, compile=True, fused_optimizer="auto")
    phases, rate, flops = trainer_phases(device, sizes, in_process)
    print(
        f"  {flops / 1e9:.1f} GFLOP per image trained -> {rate * flops / 1e12:.1f} TFLOP/s, "
        f"{rate * flops / 1e12 / bf16:.2f} of the bf16 matmul"
    )
    variants = {
        "today": {"compile": False, "fused_optimizer": False, "decode": "pil"},
        "speed options": {**new, "decode": "pil"},
        "speed options + GPU decoding": {**new, "decode": "cuda" if cuda else "torchvision"},
    }
    for name, changes in variants.items():
        options = laion_options(sizes, **changes)
        stage = run_train_stage(device, sizes, options, name.split()[0])
        tflops = stage["rate"] * flops / 1e12
        print(
            f"train stage, {name} ({', '.join(f'{k} {v}' for k, v in changes.items())}): "
            f"{stage['rate']:.0f} img/s, waiting for data {stage['wait']:.0%} of the time "
            f"({stage['wait_ms']:.1f} of {stage['wait_ms'] + stage['step_ms']:.1f} ms a step), "
            f"{tflops:.1f} TFLOP/s = {tflops / bf16:.2f} of bf16 matmul; first window "
            f"{stage['first_window_s']:.0f} s, {stage['seconds']:.0f} s in all"
        )


# --------------------------------------------------------------------------- the embed stage

JOB_LINE = re.compile(r"job: (\d+) images in ([\d.]+) s \(([\d.]+) img/s, (\d+)% of it waiting")


def check_embed_stage_speed(device: torch.device, sizes: dict) -> None:
    """The embed stage (open_clip ViT-B-32, random weights built here, both towers, Parquet)
    on the photo shards, each given ``embed_repeats`` times, with PIL and with GPU decoding."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("embed stage: skipped (open_clip is not installed; carry its wheel, gpu_check.sh)")
        return
    data = photo_shards(sizes)
    shards = data["shards"] * sizes["embed_repeats"]
    for decode in ("pil", "cuda" if device.type == "cuda" else "torchvision"):
        folder = scratch() / f"embed-{decode}"
        outs = [str(folder / f"{index:05d}.parquet") for index in range(len(shards))]
        options = {
            "encoder": "open_clip", "open_clip": {"model": sizes["open_clip_model"],
            "pretrained": None}, "batch_size": sizes["embed_batch"], "num_workers": 8,
            "decode": decode,
        }  # fmt: skip
        command = [
            sys.executable, "-m", "unicom.embed.embed", "--shard", *shards, "--out", *outs,
            "--skipped", str(folder / "skipped.csv"), "--options-json", json.dumps(options),
            "--no-progress",
        ]  # fmt: skip
        result = subprocess.run(
            command, env=stage_env(device), capture_output=True, text=True,
            timeout=sizes["stage_timeout"],
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        job = JOB_LINE.search(result.stderr)
        if result.returncode != 0 or job is None:
            raise RuntimeError(f"embed exited {result.returncode}: {result.stderr[-1500:]}")
        images, seconds, rate, wait = job.groups()
        print(
            f"embed stage {sizes['open_clip_model']} batch {sizes['embed_batch']}, decode "
            f"{decode}, 8 workers: {images} images in {seconds} s, {rate} img/s, waiting for "
            f"data {wait}% of the time (start-up of the loader included)"
        )
