"""The trainer's speed options on a CPU: torch.compile gives the eager step's loss and gradients
and resumes from its checkpoints (and back), the fused optimizer and multi-tensor clipping agree
with the per-tensor ones, the decoding paths crop the same boxes, and metrics.jsonl tells a
loader-bound run from a compute-bound one.

torch.compile runs with backend aot_eager here: dynamo's capture and AOTAutograd's joint graph
(what can break a step: graph breaks, guards, mutated buffers, state-dict names) in ~4 s,
where inductor's C++ build of a tiny ViT's forward and backward took 61-75 s cold on this
2-core machine, and a CPU's C++ kernels are not the Triton ones a GPU runs anyway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import unicom.train.batches as loader_module
from unicom.decoding import PendingImages
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError
from unicom.report.plots import plot_training
from unicom.synthetic import write_synthetic_set
from unicom.train.augment import TrainTransform
from unicom.train.batches import TrainBatches, make_loader
from unicom.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from unicom.train.inputs import pair_inputs, prepare_rank_data
from unicom.train.optim import clip_gradients
from unicom.train.train import main, train_options
from unicom.train.trainer import Trainer

SINGLE = WorldInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")
CPU = torch.device("cpu")
CLASSES = 64
OPTIONS = {
    "model": "test_vit",
    "model_kwargs": {"img_size": 32},
    "pretrained": None,
    "dim": 16,
    "image_size": 32,
    "batch_size": 8,
    "steps": 4,
    "lr": 0.01,
    "scale": 16.0,
    "sample_rate": 0.25,  # r1 < 1: 16 of the 64 prototypes a step
    "feature_rate": 0.5,  # r2 < 1
    "warmup_fraction": 0.0,
    "device": "cpu",
}


def batches(steps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "labels": torch.randint(0, CLASSES, (8,), generator=generator),
        }
        for _ in range(steps)
    ]


def make_trainer(compiled: bool) -> Trainer:
    options = train_options({**OPTIONS, "compile": compiled, "fused_optimizer": compiled})
    return Trainer(options, CLASSES, 4, SINGLE, CPU, compile_backend="aot_eager")


def record_gradients(trainer: Trainer) -> list[list[torch.Tensor]]:
    """Every step's gradients as the optimizers see them (after clipping)."""
    seen: list[list[torch.Tensor]] = []
    for optimizer in (trainer.optimizer, trainer.head_optimizer):

        def hook(opt, args, kwargs):
            grads = [p.grad.clone() for group in opt.param_groups for p in group["params"]]
            if opt is trainer.optimizer:
                seen.append(grads)
            else:
                seen[-1].extend(grads)

        optimizer.register_step_pre_hook(hook)
    return seen


def save(trainer: Trainer, root: Path) -> Path:
    header = {"format": CHECKPOINT_FORMAT, "step": trainer.step, "world_size": 1}
    header.update(signature={}, data_position={})
    return save_checkpoint(root, trainer.step, trainer, header, {}, keep=0)


def resume(compiled: bool, path: Path) -> Trainer:
    trainer = make_trainer(compiled)
    shared, own = load_checkpoint(path, 0, {})
    trainer.load(shared, own, int(shared["step"]))
    return trainer


def test_compiled_step_matches_eager_and_resumes_across(tmp_path):
    started = time.perf_counter()
    data = batches(2)
    runs = {}
    for compiled in (False, True):
        trainer = make_trainer(compiled)
        assert trainer.compiled is compiled and trainer.fused is compiled
        grads = record_gradients(trainer)
        losses = [trainer.train_step([batch])["loss"].item() for batch in data]
        checkpoint = tmp_path / f"compiled-{compiled}"
        runs[compiled] = (losses, grads, trainer)
        # Step 1's checkpoint of each, for the resumptions below.
        resumed = make_trainer(compiled)
        resumed.train_step([data[0]])
        save(resumed, checkpoint)
    (eager_losses, eager_grads, eager), (losses, grads, compiled) = runs[False], runs[True]
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    assert len(grads) == len(eager_grads) == 2
    for step in range(2):
        for got, expected in zip(grads[step], eager_grads[step], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # The compiled trainer's state is the plain module's: nothing saved says _orig_mod.
    state = compiled.shared_state()["model"]
    assert state.keys() == eager.shared_state()["model"].keys()
    assert not [key for key in state if "_orig_mod" in key]
    saved = torch.load(tmp_path / "compiled-True/step-00000001/model.pt", weights_only=True)
    assert not [key for key in saved["model"] if "_orig_mod" in key]
    # Each resumes the other's checkpoint: step 2 as the uninterrupted eager run had it.
    for compiled_now, written_by in ((True, False), (False, True)):
        trainer = resume(compiled_now, tmp_path / f"compiled-{written_by}/step-00000001")
        assert trainer.step == 1
        grads = record_gradients(trainer)
        loss = trainer.train_step([data[1]])["loss"].item()
        assert loss == pytest.approx(eager_losses[1], rel=1e-4)
        for got, expected in zip(grads[0], eager_grads[1], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert time.perf_counter() - started < 90


def test_foreach_clipping_matches_the_per_tensor_one():
    generator = torch.Generator().manual_seed(1)
    model = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(3)]
    head = [torch.nn.Parameter(torch.zeros(40, 8))]
    results = []
    for foreach in (False, True):
        for param in model + head:
            param.grad = torch.randn(param.shape, generator=generator.manual_seed(param.numel()))
        norm = clip_gradients(model, head, 1.0, False, foreach=foreach)
        results.append((norm, [param.grad.clone() for param in model + head]))
    (norm, grads), (foreach_norm, foreach_grads) = results
    assert norm > 1.0  # so that both clipped
    torch.testing.assert_close(foreach_norm, norm, rtol=1e-6, atol=0)
    for got, expected in zip(foreach_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("photos")
    shards, assignments = write_synthetic_set(folder, 48, CLASSES, 96, 12, photo=True)
    return {"shards": shards, "assignments": assignments}


def first_batches(photo_data, decode: str, count: int = 2) -> list[dict]:
    data = prepare_rank_data(
        pair_inputs(photo_data["shards"], photo_data["assignments"]), CLASSES, 0, 1, 2
    )
    dataset = TrainBatches(data.shards, TrainTransform(32), 8, data.streams, 0, 0, decode=decode)
    loader = make_loader(dataset, 0)
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def test_decoding_paths_crop_the_same_boxes(photo_data):
    """torchvision: the PIL path's crops and flips resampled by torch (close, not equal);
    cuda: the workers pass JPEG bytes and crops, and finishing them (here on the CPU) gives
    the torchvision path's pixels exactly."""
    pil, vision, pending = (
        first_batches(photo_data, path) for path in ("pil", "torchvision", "cuda")
    )
    for a, b, c in zip(pil, vision, pending, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["labels"], c["labels"])
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (8, 3, 32, 32)
        difference = (a["images"].float() - b["images"].float()).abs().mean()
        assert difference < 4, difference  # of 255: the same crops, another bicubic
        assert isinstance(c["images"], PendingImages)
        assert torch.equal(c["images"].finish(CPU), b["images"])


def test_trainer_finishes_pending_jpegs_and_names_a_bad_one(photo_data):
    trainer = make_trainer(False)
    batch = first_batches(photo_data, "cuda", 1)[0]
    result = trainer.train_step([batch])
    assert np.isfinite(result["loss"].item())
    pending: PendingImages = batch["images"]
    pending.data[pending.offsets[2] + 400 :] = 0  # the third JPEG's data, and all after it
    pending.data[pending.offsets[2] + 2 : pending.offsets[2] + 400] = 7
    with pytest.raises(UnicomError, match="cannot decode the image of .* in .*00000.tar"):
        trainer.device_images(pending)


def test_tensor_decoding_refuses_pil_augmentations(capsys):
    with pytest.raises(UnicomError, match="torchvision decoding does not run train.augment.color"):
        train_options({"decode": "torchvision", "augment": {"color_jitter": 0.2}})
    with pytest.raises(UnicomError, match="cuda decoding does not run .*random_erasing"):
        train_options({"decode": "cuda", "augment": {"random_erasing": 0.25}})
    assert train_options({"decode": "torchvision", "augment": {"random_erasing": 0.25}})


def cli(photo_data, out_dir: Path, **options) -> list[str]:
    return [
        "--shards", *photo_data["shards"], "--assignments", *photo_data["assignments"],
        "--num-classes", str(CLASSES), "--out-dir", str(out_dir), "--no-progress",
        "--options-json", json.dumps({**OPTIONS, "log_every": 2, "num_workers": 0, **options}),
    ]  # fmt: skip


SLOWER = 0.15  # seconds more to decode an image


def test_a_slow_loader_shows_in_the_metrics(photo_data, tmp_path, monkeypatch):
    """Decoding slowed on purpose (150 ms more an image, in the main process; a step of the
    tiny model takes 30 ms, 250 ms when the machine is busy): most of each window is waiting
    for data, and the training plot shows it."""
    decode = loader_module.decode

    def slow_decode(*args, **kwargs):
        time.sleep(SLOWER)
        return decode(*args, **kwargs)

    monkeypatch.setattr(loader_module, "decode", slow_decode)
    main(cli(photo_data, tmp_path / "train"))
    lines = [json.loads(line) for line in (tmp_path / "train/metrics.jsonl").open()]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert line["data_wait_share"] > 0.5, lines
        assert line["data_wait_s"] >= 8 * SLOWER  # per step: eight images a micro-batch
        assert line["step_s"] > 0
        steps_per_s = 1 / (line["data_wait_s"] + line["step_s"])
        assert line["samples_per_s"] == pytest.approx(8 * steps_per_s, rel=1e-6)
    plot_training(str(tmp_path / "train/metrics.jsonl"), str(tmp_path / "training.png"))
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_cuda_decoding_without_a_gpu_is_one_line(photo_data, tmp_path):
    with pytest.raises(UnicomError, match="train.decode: cuda decodes on the GPU"):
        main(cli(photo_data, tmp_path / "train", decode="cuda"))
