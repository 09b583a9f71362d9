"""The package's layout rule: stage packages over a library layer, imports in one direction.

A stage package (``unicom.data``, ``unicom.embed``, ...) may import the library layer (every
other module of ``unicom``) and itself, never another stage; the library imports no stage.
Every import counts, function-level ones included, and so do ``importlib.import_module`` /
``__import__`` calls with a literal name.

The tests' layout: a test file is named after what it tests (``test_<module>.py``, the rule at
``module_tested``) or is one of the listed cross-cutting files; what test files share lives in
tests/helpers/, and no file imports conftest.py or a test file.
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


# --------------------------------------------------------------------------- the tests' layout

TESTS = REPO / "tests"
# Test files that test no one module: the pipeline end to end, the documents, the repository's
# other files. Every other test_*.py is named after the module it tests (``module_tested``).
CROSS_CUTTING = {
    "test_workflow.py": "the whole DAG on the small config, and its rerun guarantees",
    "test_hygiene_workflow.py": "data hygiene through the real DAG",
    "test_sources_workflow.py": "existing shards and embeddings through the real DAG",
    "test_bad_inputs.py": "bad input files through the real DAG",
    "test_slurm.py": "the DAG on a real one-node SLURM",
    "test_hard_kill.py": "a run killed hard, then resumed",
    "test_finetune.py": "fine-tuning: supervised.finetune_data, then train and evaluate",
    "test_train_speed.py": "the trainer's speed options across train.* and unicom.decoding",
    "test_readme.py": "the command blocks of README.md and docs/",
    "test_docs.py": "the docs site's pages",
    "test_rules.py": "the Snakemake rules' files",
    "test_envs.py": "the conda environments (envs/)",
    "test_gpu_check.py": "bench/gpu_check.sh",
    "test_layout.py": "the package's and the tests' layout",
    "test_suite_guard.py": "conftest.py's guard of the suite",
}


def module_names() -> list[str]:
    return sorted({module_name(path) for path in package_modules()} - {"unicom"})


def module_tested(test_file: str, modules: list[str]) -> str | None:
    """The module ``test_<name>.py`` is named after: ``<name>`` is its dotted path below
    ``unicom`` with ``_`` for ``.`` (test_train_augment.py: unicom.train.augment, test_embed.py:
    unicom.embed), or its own name when no other module has it (test_partial_fc.py:
    unicom.train.partial_fc). None when nothing fits, or the short name is ambiguous."""
    name = test_file.removeprefix("test_").removesuffix(".py")
    by_path = [m for m in modules if m.removeprefix("unicom.").replace(".", "_") == name]
    by_name = [m for m in modules if m.rpartition(".")[2] == name]
    matches = by_path or by_name
    return matches[0] if len(matches) == 1 else None


def test_every_test_file_is_named_after_its_module_or_is_cross_cutting():
    modules = module_names()
    test_files = sorted(path.name for path in TESTS.glob("test_*.py"))
    unnamed = [
        f"{name}: names no module of workflow/unicom (see module_tested), and is not cross-cutting"
        for name in test_files
        if name not in CROSS_CUTTING and module_tested(name, modules) is None
    ]
    assert not unnamed, "\n".join(unnamed)
    # The list names only files that exist and that the rule does not already cover.
    assert set(CROSS_CUTTING) <= set(test_files), set(CROSS_CUTTING) - set(test_files)
    assert not [name for name in CROSS_CUTTING if module_tested(name, modules)]


@pytest.mark.parametrize(
    "test_file, module",
    [
        ("test_train.py", "unicom.train"),
        ("test_embed.py", "unicom.embed"),  # the package, not unicom.embed.embed
        ("test_train_augment.py", "unicom.train.augment"),
        ("test_partial_fc.py", "unicom.train.partial_fc"),
        ("test_evaluate_metrics.py", "unicom.evaluate.metrics"),
        ("test_metrics.py", None),  # evaluate.metrics or train.metrics?
        ("test_speed.py", None),
        ("test_download_summary.py", None),  # a rule's name; the module is data.summary
    ],
)
def test_the_naming_rule(test_file, module):
    assert module_tested(test_file, module_names()) == module


def forbidden_imports(source: str) -> list[str]:
    """The modules ``source`` imports that a test file must not: conftest (pytest's, not a
    library) and test files (whose tests would run again wherever they are imported)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
    return sorted(n for n in names if n == "conftest" or n.split(".")[-1].startswith("test_"))


def test_no_test_file_imports_conftest_or_another_test_file():
    wrong = {
        str(path.relative_to(TESTS)): found
        for path in sorted(TESTS.rglob("*.py"))
        if (found := forbidden_imports(path.read_text()))
    }
    assert not wrong, wrong


@pytest.mark.parametrize(
    "source, found",
    [
        ("from conftest import REPO\n", ["conftest"]),
        ("def f():\n    from test_workflow import write_config\n", ["test_workflow"]),
        ("import test_kmeans as k\n", ["test_kmeans"]),
        ("from helpers.workflow import write_config\nimport unicom.train\n", []),
    ],
    ids=["conftest", "a-test-file-in-a-function", "import-as", "helpers"],
)
def test_the_import_check(source, found):
    assert forbidden_imports(source) == found
