"""bench/gpu_check.sh, the one prepared run for a lent GPU machine, as far as a CPU can run it:
every check at tiny sizes (``--quick``), none failing, and its output file written."""

from __future__ import annotations

import os
import subprocess

from helpers import REPO


def test_every_check_runs_on_a_cpu_at_tiny_sizes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        ["bash", str(REPO / "bench/gpu_check.sh"), "--quick"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    output = (tmp_path / "gpu_check.txt").read_text()
    assert result.returncode == 0, output[-3000:]
    assert "12 checks ran, 0 failed" in output, output[-3000:]
    for line in (
        "head C=",
        "train ",
        "positives 2: same sampled classes/dims True",
        "trainer test_vit 32px batch 8 positives 2",
        "embed ",
        "GEMM+argmax",
        "torch k-means n 4096 k 256 d 512 bf16",
        "vs torch.matmul tf32",
        "matmul 256^3: fp32",
        "in-process, batch on the device:",
        "median phases (ms): input",
        "train stage, today (compile False, fused_optimizer False, decode pil):",
        "train stage, speed options + GPU decoding",
        "of bf16 matmul",
        "embed stage ViT-B-32 batch 4, decode torchvision, 8 workers:",
    ):
        assert line in output, (line, output[-3000:])


def test_only_runs_the_named_checks(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        ["bash", str(REPO / "bench/gpu_check.sh"), "--quick", "--only", "check_nccl",
         "check_environment"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    output = (tmp_path / "gpu_check.txt").read_text()
    assert result.returncode == 0, output[-3000:]
    assert "2 checks ran, 0 failed" in output, output[-3000:]
    ran = [line for line in output.splitlines() if line.startswith("== ")]
    assert ran == ["== check_environment", "== check_nccl"]  # in the script's order
