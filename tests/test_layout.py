"""The package's layout rule: stage packages over a library layer, imports in one direction.

A stage package (``unicom.data``, ``unicom.embed``, ...) may import the library layer (every
other module of ``unicom``) and itself, never another stage; the library imports no stage.
Every import counts, function-level ones included, and so do ``importlib.import_module`` /
``__import__`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "workflow/unicom"
# Pipeline stages, then the stages off the main line (supervised protocols, the ablation grid)
# and the standalone tools: all are top-layer packages over the library.
STAGES = (
    "data",
    "embed",
    "hygiene",
    "cluster",
    "train",
    "evaluate",
    "demo",
    "report",
    "supervised",
    "ablations",
    "tools",
)
# "No module over ~400 lines": long modules are where unrelated things pile up.
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str | None:
    """The stage package a ``unicom.*`` module belongs to, None for the library layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every ``unicom`` module ``source`` may import, wherever the import statement is.
    ``from unicom.x import y`` counts as ``unicom.x`` and ``unicom.x.y`` (y may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                found.add(str(first.value))
    return {name for name in found if name == "unicom" or name.startswith("unicom.")}


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that break the layering rule."""
    own = stage_of(module)
    wrong = []
    for target in sorted(imported_modules(source, module, is_package)):
        other = stage_of(target)
        if other is not None and other != own:
            layer = f"stage {own}" if own else "the library layer"
            wrong.append(f"{module} ({layer}) imports {target} (stage {other})")
    return wrong


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_package_exists():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_no_stage_imports_another_and_the_library_imports_no_stage():
    wrong = []
    for path in package_modules():
        name = module_name(path)
        wrong += violations(name, path.read_text(), is_package=path.name == "__init__.py")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "module, source",
    [
        # a function-level import, as evaluate once imported the trainer to load a model
        ("unicom.evaluate.evaluate", "def f():\n    from unicom.train import loop\n"),
        ("unicom.cluster.assign", "import unicom.embed.fuse\n"),
        ("unicom.train.inputs", "from unicom import embed\n"),
        ("unicom.tools.search", "from ..embed.embed import shard_batches\n"),
        ("unicom.benchmarks.sets", "from unicom.evaluate import metrics\n"),
        ("unicom.supervised.linear_probe", "from unicom.evaluate.evaluate import evaluate\n"),
        ("unicom.shards", "from unicom.data.rekey import member_key\n"),
        ("unicom.models", "import importlib\nimportlib.import_module('unicom.train.trainer')\n"),
    ],
)
def test_the_check_catches_a_forbidden_import(module, source):
    assert violations(module, source)


@pytest.mark.parametrize(
    "module, source",
    [
        ("unicom.train.loop", "from unicom.train.trainer import Trainer\n"),
        ("unicom.evaluate.evaluate", "from unicom.models import load_trained_model\n"),
        ("unicom.cluster.kmeans", "from . import report\nfrom unicom import vectors\n"),
        ("unicom.vectors", "from unicom.formats import EMBEDDING_COLUMN\n"),
        ("unicom.supervised.linear_probe", "from unicom.embedders import embed_items\n"),
        ("unicom.evaluate.evaluate", "from unicom.benchmarks.sets import cap_set\n"),
    ],
)
def test_the_check_allows_the_library_and_the_own_stage(module, source):
    assert violations(module, source) == []


def test_no_module_is_over_the_line_limit():
    long = {
        module_name(path): lines
        for path in package_modules()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
