"""The conda environments (envs/*.yaml, `snakemake --sdm conda`) ask for the versions CI tests:
requirements/constraints.txt, which `make setup` installs. A text comparison: the conda channels
are out of reach here, so the environments themselves are never built by the tests."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

ENVS = sorted((REPO / "envs").glob("*.yaml"))
# faiss-gpu has no PyPI wheel: it comes from conda at the faiss release CI tests as faiss-cpu.
SAME_RELEASE = {"faiss-gpu": "faiss-cpu"}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)$")


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements/constraints.txt").read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalized(match.group(1))] = match.group(2)
    return pins


def env_entries(path: Path) -> tuple[list[str], list[str]]:
    """(conda dependencies, pip dependencies) of one environment file, options left out."""
    conda, pip = [], []
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(entry, dict):
            pip += [item for item in entry["pip"] if not item.startswith("-")]
        else:
            conda.append(entry)
    return conda, pip


def wrong_pins(path: Path, tested: dict[str, str]) -> list[str]:
    """Each package of ``path`` that is not pinned to the version CI tests."""
    conda, pip = env_entries(path)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    problems = []
    for entry in conda + pip:
        if entry == "pip":
            continue
        if entry.startswith("python="):
            if entry != f"python={python}":
                problems.append(f"{path.name}: {entry}, CI tests python {python}")
            continue
        match = PIN.match(entry)
        if match is None:
            problems.append(f"{path.name}: {entry!r} is not pinned (name==version)")
            continue
        name = normalized(match.group(1))
        version = tested.get(normalized(SAME_RELEASE.get(name, name)))
        if version != match.group(2):
            problems.append(f"{path.name}: {entry}, CI tests {version or 'no such package'}")
    return problems


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_every_package_of_an_environment_is_the_version_ci_tests(path):
    assert not wrong_pins(path, constraints())


def test_torch_comes_from_pypi_at_the_tested_release():
    tested = constraints()
    for path in ENVS:
        conda, pip = env_entries(path)
        assert not [e for e in conda if re.match(r"(pytorch|torch|torchvision)\b", e)], path.name
        if path.name.startswith("torch-"):
            assert f"torch=={tested['torch']}" in pip, path.name
            assert f"torchvision=={tested['torchvision']}" in pip, path.name


def test_an_unpinned_or_untested_version_is_named(tmp_path):
    env = tmp_path / "env.yaml"
    env.write_text(
        "dependencies:\n  - python=3.9\n  - pip\n  - faiss-gpu==1.7.4\n"
        "  - pip:\n      - --extra-index-url https://example.org\n      - timm>=1.0\n"
        "      - open-clip-torch==3.3.0\n      - numpy==1.26.4\n"
    )
    tested = {"faiss-cpu": "1.15.1", "open-clip-torch": "3.3.0", "numpy": "2.4.6", "timm": "1"}
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert wrong_pins(env, tested) == [
        f"env.yaml: python=3.9, CI tests python {python}",
        "env.yaml: faiss-gpu==1.7.4, CI tests 1.15.1",
        "env.yaml: 'timm>=1.0' is not pinned (name==version)",
        "env.yaml: numpy==1.26.4, CI tests 2.4.6",
    ]
