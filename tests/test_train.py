"""Trainer (unicom.train): data plan, 2-rank torchrun training with kill/resume and SIGTERM, bad
input, export. The data are tiny real shards (32 px JPEGs) and the model timm's test_efficientnet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unicom.cli import run_cli
from unicom.errors import UnicomError
from unicom.models import EmbeddingModel, build_model, load_trained_model, trained_transform
from unicom.synthetic import write_synthetic_shard
from unicom.train.inputs import ShardInput, partition_shards, read_shard_labels
from unicom.train.optim import lr_factor
from unicom.train.streams import StreamPlan, batches_before, epoch_shard_order, stream_samples
from unicom.train.train import main, train_options

from helpers.ranks import TORCHRUN_TWO_RANKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_CLASSES = 8
PER_SHARD = [30, 26, 34, 22]  # kept samples; each shard also holds 2 unlabelled ones
UNLABELLED = 2
STEPS = 16
OPTIONS = {
    "model": "test_efficientnet",
    "pretrained": None,
    "dim": 16,
    "image_size": 32,
    "batch_size": 8,
    "steps": STEPS,
    "lr": 0.01,
    "scale": 16.0,
    "margin": 0.2,
    "sample_rate": 0.5,
    "feature_rate": 0.5,
    "streams": 2,
    "num_workers": 0,
    "checkpoint_every": 1,
    "keep_checkpoints": 0,
    "log_every": 1,
}
RUN_TIMEOUT = 120
# metrics.jsonl keys that measure time: they differ between two runs of the same training.
TIMINGS = ("samples_per_s", "data_wait_s", "step_s", "data_wait_share")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("train_data")
    shards, assignments = [], []
    for i, count in enumerate(PER_SHARD):
        part = f"{i:05d}"
        shards.append(str(root / "shards" / f"{part}.tar"))
        assignments.append(str(root / "assign" / f"{part}.parquet"))
        write_synthetic_shard(
            shards[-1], assignments[-1], part, count, NUM_CLASSES, unlabelled=UNLABELLED
        )
    return {"shards": shards, "assignments": assignments}


def cli_args(dataset, out_dir, options, num_classes=NUM_CLASSES, extra=()) -> list[str]:
    return [
        "--shards",
        *dataset["shards"],
        "--assignments",
        *dataset["assignments"],
        "--num-classes",
        str(num_classes),
        "--out-dir",
        str(out_dir),
        "--options-json",
        json.dumps(options),
        "--threads",
        "2",
        "--no-progress",
        *extra,
    ]


def launch(dataset, out_dir: Path, **overrides) -> subprocess.Popen:
    """2 ranks under real torchrun, in their own process group (so that a kill reaches all)."""
    command = [
        *TORCHRUN_TWO_RANKS,
        "-m",
        "unicom.train.train",
        *cli_args(dataset, out_dir, {**OPTIONS, **overrides}),
    ]
    log = open(out_dir.parent / f"{out_dir.name}.log", "ab")
    return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)


def finish(process: subprocess.Popen, out_dir: Path) -> int:
    try:
        return process.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"training did not finish in {RUN_TIMEOUT} s: {log_tail(out_dir)}")


def log_tail(out_dir: Path) -> str:
    return (out_dir.parent / f"{out_dir.name}.log").read_text(errors="replace")[-3000:]


def wait_for(condition, process: subprocess.Popen, out_dir: Path, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if process.poll() is not None:
            rc = process.returncode
            pytest.fail(f"training ended (rc {rc}) before {what}: {log_tail(out_dir)}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def metric_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


def checkpoint_steps(out_dir: Path) -> list[int]:
    root = out_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with a checkpoint after every step."""
    out_dir = tmp_path_factory.mktemp("reference") / "train"
    rc = finish(launch(dataset, out_dir), out_dir)
    assert rc == 0, log_tail(out_dir)
    return out_dir


# --- data plan ----------------------------------------------------------------------------------


def test_partition_balances_rows_and_needs_a_shard_per_rank():
    rows = [100, 10, 60, 50, 40, 5]
    parts = partition_shards(rows, 2)
    loads = [sum(rows[i] for i in p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert max(loads) <= 140  # largest first onto the lightest rank; every other shard: 200
    assert [len(p) for p in partition_shards([10] * 7, 3)] == [3, 2, 2]
    with pytest.raises(UnicomError, match="2 shards for 3 ranks"):
        partition_shards([5, 5], 3)


@pytest.mark.parametrize("shuffle_shards", [1, 2])
def test_stream_resumes_at_any_position(dataset, shuffle_shards):
    shards = [
        read_shard_labels(ShardInput(i, s, a), NUM_CLASSES)[0]
        for i, (s, a) in enumerate(zip(dataset["shards"], dataset["assignments"], strict=True))
    ]
    plan = StreamPlan(tuple(len(s) for s in shards), 1, 0, 2, shuffle_shards)
    full = stream_samples(shards, plan, stream=1, skip=0)
    reference = [(s.key, s.rng.random()) for s in (next(full) for _ in range(150))]
    assert len({key for key, _ in reference}) > 60  # crosses block and epoch boundaries
    for skip in (0, 7, 64, 101):
        resumed = stream_samples(shards, plan, stream=1, skip=skip)
        assert [(s.key, s.rng.random()) for s in (next(resumed) for _ in range(20))] == (
            reference[skip : skip + 20]
        )
    # Micro-batch b comes from stream b % streams: count what each stream served before b.
    assert [batches_before(7, v, 3) for v in range(3)] == [3, 2, 2]
    assert not np.array_equal(epoch_shard_order(9, 0, 0, 0), epoch_shard_order(9, 0, 0, 1))


def test_a_block_mixes_its_shards(dataset):
    shards = [
        read_shard_labels(ShardInput(i, s, a), NUM_CLASSES)[0]
        for i, (s, a) in enumerate(zip(dataset["shards"], dataset["assignments"], strict=True))
    ]
    plan = StreamPlan(tuple(len(s) for s in shards), 0, 0, 1, 4)
    stream = stream_samples(shards, plan, stream=0, skip=0)
    sources = [next(stream).shard for _ in range(16)]
    assert len(set(sources)) >= 3  # one block of all 4 shards, shuffled as one


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


# --- 2 ranks under torchrun ---------------------------------------------------------------------


def test_two_ranks_train_and_account_for_every_sample(reference):
    lines = metric_lines(reference / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    losses = [line["loss"] for line in lines]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    info = json.loads((reference / "model.json").read_text())
    assert info["training"]["world_size"] == 2 and info["dim"] == 16
    report = json.loads((reference / "data.json").read_text())
    assert report["totals"]["kept"] == sum(PER_SHARD)
    assert {c["rank"] for c in report["shards"].values()} == {0, 1}
    for shard, count in zip(report["shards"].values(), PER_SHARD, strict=True):
        assert (shard["kept"], shard["unlabelled"], shard["tar_samples"]) == (
            count,
            UNLABELLED,
            count + UNLABELLED,
        )
    assert not list((reference / "checkpoints").glob(".step-*.tmp"))
    live, final = (reference / name for name in ("metrics.partial.jsonl", "metrics.jsonl"))
    assert live.read_text() == final.read_text()
    assert checkpoint_steps(reference) == list(range(1, STEPS + 1))


def test_killed_run_resumes_to_the_same_weights(dataset, reference, tmp_path):
    out_dir = tmp_path / "train"
    # The first attempt decodes in a worker process, the resumed one in the main process: the
    # data order does not depend on it.
    process = launch(dataset, out_dir, checkpoint_every=4, keep_checkpoints=2, num_workers=1)
    wait_for(lambda: checkpoint_steps(out_dir), process, out_dir, "the first checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out_dir / "model.safetensors").exists()
    assert max(checkpoint_steps(out_dir)) < STEPS

    rc = finish(launch(dataset, out_dir, checkpoint_every=4, keep_checkpoints=2), out_dir)
    assert rc == 0, log_tail(out_dir)
    resumed, uninterrupted = (load_file(d / "model.safetensors") for d in (out_dir, reference))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert metric_lines(out_dir / "metrics.jsonl") == metric_lines(reference / "metrics.jsonl")
    assert checkpoint_steps(out_dir) == [12, 16]  # keep_checkpoints


def test_sigterm_on_one_rank_checkpoints_both_and_exits(dataset, reference, tmp_path):
    out_dir = tmp_path / "train"
    process = launch(dataset, out_dir, checkpoint_every=1000)
    live = out_dir / "metrics.partial.jsonl"

    def trained_two_steps() -> bool:
        return live.is_file() and len(live.read_text().splitlines()) >= 2

    wait_for(trained_two_steps, process, out_dir, "two steps")
    rank1 = [
        child
        for child in psutil.Process(process.pid).children()
        if child.environ().get("RANK") == "1"
    ]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    rc = finish(process, out_dir)
    assert rc != 0
    assert "stopped by signal 15" in log_tail(out_dir)
    (step,) = checkpoint_steps(out_dir)
    assert 2 <= step < STEPS
    assert not (out_dir / "model.safetensors").exists()
    # The checkpoint is the reference run's state at that step, on both ranks.
    for name in ("model.pt", "rank-00000.pt", "rank-00001.pt"):
        saved, expected = (
            torch.load(d / "checkpoints" / f"step-{step:08d}" / name, weights_only=True)
            for d in (out_dir, reference)
        )
        key = "model" if name == "model.pt" else "head"
        for tensor_name, tensor in saved[key].items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, expected[key][tensor_name]), (name, tensor_name)


# --- bad input: one line each -------------------------------------------------------------------


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unicom:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("statistics", [True, False])
def test_label_out_of_range_names_the_assignment_file(dataset, tmp_path, capsys, statistics):
    # With statistics the footer check finds it; without, reading the labels does.
    bad = tmp_path / "00001.parquet"
    table = pa.table(
        {"key": ["00001_000000000", "00001_000000001"], "label": pa.array([3, 9], pa.int32())}
    )
    pq.write_table(table, bad, write_statistics=statistics)
    inputs = {"shards": dataset["shards"][:2], "assignments": [dataset["assignments"][0], str(bad)]}
    line = error_line(capsys, cli_args(inputs, tmp_path / "out", OPTIONS))
    assert str(bad) in line and "label 9" in line and "[0, 8)" in line


def test_assignment_of_another_shard_is_one_line(dataset, tmp_path, capsys):
    foreign = tmp_path / "00000.parquet"
    shutil.copyfile(dataset["assignments"][1], foreign)
    inputs = {"shards": dataset["shards"][:1], "assignments": [str(foreign)]}
    line = error_line(capsys, cli_args(inputs, tmp_path / "out", OPTIONS))
    assert str(foreign) in line and "is not in" in line and dataset["shards"][0] in line


def test_ambiguous_labels_are_dropped_and_counted(dataset):
    item = ShardInput(0, dataset["shards"][0], dataset["assignments"][0])
    labels, counts = read_shard_labels(item, NUM_CLASSES, min_label_margin=0.3)
    assert counts["assigned"] == PER_SHARD[0] and 0 < counts["ambiguous"] < PER_SHARD[0]
    assert len(labels) + counts["ambiguous"] == PER_SHARD[0]


def test_positives_read_the_nearest_labels_and_train(dataset, tmp_path, capsys):
    """train.positives 2: each sample carries assign's two nearest labels, the MLCD head trains
    on them (finite, falling loss); 3 is more than the files hold: one line naming the key."""
    item = ShardInput(0, dataset["shards"][0], dataset["assignments"][0])
    single, _ = read_shard_labels(item, NUM_CLASSES)
    double, _ = read_shard_labels(item, NUM_CLASSES, positives=2)
    assert double.labels.shape == (PER_SHARD[0], 2)
    np.testing.assert_array_equal(double.labels[:, 0], single.labels)
    assert np.all(double.labels[:, 0] != double.labels[:, 1])
    out_dir = tmp_path / "train"
    main(cli_args(dataset, out_dir, {**OPTIONS, "steps": 6, "positives": 2, "lr": 0.05}))
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").open()]
    assert len(losses) == 6 and np.isfinite(losses).all() and losses[-1] < losses[0]
    line = error_line(capsys, cli_args(dataset, tmp_path / "out3", {**OPTIONS, "positives": 3}))
    assert "nearest 2 centroids per row, but train.positives is 3" in line


def test_k_mismatch_is_one_line(dataset, tmp_path, capsys):
    line = error_line(capsys, cli_args(dataset, tmp_path / "out", OPTIONS, num_classes=9))
    assert "k=8 centroids" in line and "9 classes" in line
    centroids = tmp_path / "centroids.npy"
    np.save(centroids, np.zeros((7, 4), np.float32))
    line = error_line(
        capsys, cli_args(dataset, tmp_path / "out", OPTIONS, extra=["--centroids", str(centroids)])
    )
    assert "7 centroids" in line and "--num-classes is 8" in line


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory) -> Path:
    """A quick in-process world-1 run (no process group)."""
    out_dir = tmp_path_factory.mktemp("single") / "train"
    options = {**OPTIONS, "steps": 3, "checkpoint_every": 2, "log_every": 1}
    main(cli_args(dataset, out_dir, options))
    return out_dir


def test_corrupt_checkpoint_is_one_line(dataset, single_run, tmp_path, capsys):
    out_dir = tmp_path / "train"
    shutil.copytree(single_run, out_dir)
    model_pt = out_dir / "checkpoints" / "step-00000003" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:1000])
    line = error_line(capsys, cli_args(dataset, out_dir, {**OPTIONS, "steps": 3}))
    assert f"checkpoint {model_pt} is corrupt" in line


def test_mismatched_checkpoint_is_one_line(dataset, single_run, reference, tmp_path, capsys):
    out_dir = tmp_path / "train"
    shutil.copytree(single_run, out_dir)
    line = error_line(capsys, cli_args(dataset, out_dir, {**OPTIONS, "steps": 3, "dim": 12}))
    assert "train.dim is 16 there but 12 now" in line
    # A checkpoint of the 2-rank run cannot be resumed by one process.
    shutil.rmtree(out_dir)
    shutil.copytree(reference, out_dir)
    line = error_line(capsys, cli_args(dataset, out_dir, OPTIONS))
    assert "world_size is 2 there but 1 now" in line


def test_changed_settings_restart_when_asked(dataset, single_run, tmp_path):
    """What the Snakemake rule does: a rerun with other settings sets old checkpoints aside."""
    out_dir = tmp_path / "train"
    shutil.copytree(single_run, out_dir)
    options = {**OPTIONS, "steps": 3, "checkpoint_every": 2, "log_every": 1, "dim": 12}
    main(cli_args(dataset, out_dir, options, extra=("--restart-on-mismatch",)))
    stale = list(tmp_path.glob("train/checkpoints-stale-*/step-00000003"))
    assert len(stale) == 1  # the old run's checkpoints are kept, not deleted
    assert load_file(out_dir / "model.safetensors")["embedding.weight"].shape[0] == 12
    assert len(metric_lines(out_dir / "metrics.jsonl")) == 3


def test_finished_run_reexports_without_training(dataset, single_run, tmp_path):
    out_dir = tmp_path / "train"
    shutil.copytree(single_run, out_dir)
    before = load_file(out_dir / "model.safetensors")
    (out_dir / "model.safetensors").unlink()
    main(cli_args(dataset, out_dir, {**OPTIONS, "steps": 3, "checkpoint_every": 2}))
    after = load_file(out_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(metric_lines(out_dir / "metrics.jsonl")) == 3


def test_export_round_trip_gives_the_same_embeddings(single_run):
    options = train_options({**OPTIONS, "steps": 3})
    trained = build_model(options)
    checkpoint = torch.load(
        single_run / "checkpoints" / "step-00000003" / "model.pt", weights_only=True
    )
    trained.load_state_dict(checkpoint["model"])
    trained.eval()
    loaded = load_trained_model(single_run)
    assert isinstance(loaded, EmbeddingModel) and not loaded.training
    transform = trained_transform(loaded.info)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    batch = torch.stack([transform(image), transform(image.transpose(Image.FLIP_LEFT_RIGHT))])
    assert batch.shape == (2, 3, 32, 32)
    expected, actual = trained.encode(batch), loaded.encode(batch)
    assert actual.shape == (2, 16)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.norm(dim=1), torch.ones(2))


def test_pretrained_from_a_local_safetensors(single_run, tmp_path):
    from safetensors.torch import save_file

    ours = load_trained_model(single_run)
    options = train_options({**OPTIONS, "pretrained": str(single_run / "model.safetensors")})
    for key, value in build_model(options).backbone.state_dict().items():
        assert torch.equal(value, ours.backbone.state_dict()[key]), key
    # A timm checkpoint with its classifier: the classifier is dropped, the rest must fit.
    timm_file = tmp_path / "timm.safetensors"
    state = {k: v.contiguous() for k, v in ours.backbone.state_dict().items()}
    save_file({**state, "classifier.weight": torch.zeros(10, 256)}, str(timm_file))
    build_model({**options, "pretrained": str(timm_file)})
    save_file({k: v for k, v in state.items() if k != "conv_head.weight"}, str(timm_file))
    with pytest.raises(UnicomError, match="does not fit the model"):
        build_model({**options, "pretrained": str(timm_file)})


def test_pretrained_from_a_trained_export_loads_the_embedding_too(single_run, tmp_path):
    """Fine-tuning starts from the whole export (backbone + embedding), checked against it."""
    ours = load_trained_model(single_run)
    options = train_options({**OPTIONS, "pretrained": str(single_run)})
    built = build_model(options).state_dict()
    assert built.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(built[key], value), key
    with pytest.raises(UnicomError, match=r"exported with dim 16, but train.dim is 8"):
        build_model({**options, "dim": 8})
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(UnicomError, match=r"train.pretrained .*model.json is not a unicom-trained"):
        build_model({**options, "pretrained": str(tmp_path)})
