"""Every stage command documents its options and takes them as flags or as JSON (unicom.options).

For each stage the workflow runs with ``--options-json``: ``--help`` lists every key of the
config section it receives with the schema's description and default, and a change to every key
at once, given as flags or as ``--options-json``, reaches the stage as the same options
(``--print-options`` shows them after the stage's own parsing). In-process, through each stage's
real ``main``.
"""

from __future__ import annotations

import ast
import importlib
import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import pytest
import yaml

from unicom.config import PLANNING, SCHEDULER, section_options, subschema
from unicom.errors import UnicomError
from unicom.options import flag_value, render
from unicom.train.train import train_options

from helpers import REPO

# command -> (module with main, the arguments the stage requires, what its options are: a
# section name, or option key -> schema path)
STAGES: dict[str, tuple[str, list[str], str | dict[str, str]]] = {
    "data.download": (
        "unicom.data.download", ["--part", "p", "--out-dir", "o", "--summary", "s"], "download"
    ),
    "encoders prefetch": ("unicom.encoders.__main__", ["prefetch"], "embed"),
    "embed.embed": ("unicom.embed.embed", ["--shard", "s", "--out", "o", "--skipped", "k"], "embed"),
    "embed.fuse": ("unicom.embed.fuse", ["--embeddings", "e", "--out", "o"], "fuse"),
    "hygiene.screen": (
        "unicom.hygiene.screen",
        ["t", "--out", "o", "--out-summary", "s", "--work-dir", "w"],
        {"content": "dedup.content", "filters": "filters"},
    ),
    "hygiene.near scatter": (
        "unicom.hygiene.near",
        ["scatter", "--assignments", "a", "--spaces", "s", "--groups", "1", "--out", "o"],
        {"space": "dedup.space"},
    ),
    "hygiene.near dedup": (
        "unicom.hygiene.near",
        ["dedup", "x", "--group", "0", "--out", "o", "--out-stats", "s"],
        "dedup",
    ),
    "cluster.kmeans": (
        "unicom.cluster.kmeans", ["f", "--out-centroids", "c", "--out-stats", "s"], "kmeans"
    ),
    "cluster.assign": (
        "unicom.cluster.assign", ["--fused", "f", "--centroids", "c", "--out", "o"], "assign"
    ),
    "cluster.diagnostics": (
        "unicom.cluster.diagnostics",
        ["--assignments", "a", "--shards", "s", "--shard-tables", "t", "--embeddings", "e",
         "--kmeans-options-json", "{}", "--out-grid", "g", "--out-agreement", "a",
         "--out-agreement-png", "p"],
        "assign.diagnostics",
    ),
    "train.train": (
        "unicom.train.train",
        ["--shards", "s", "--assignments", "a", "--num-classes", "2", "--out-dir", "o"],
        "train",
    ),
    "evaluate.evaluate": (
        "unicom.evaluate.evaluate",
        ["--model", "base", "--dataset", "cub", "--out", "o", "--embed-options-json", "{}"],
        "evaluate",
    ),
    "supervised.linear_probe": (
        "unicom.supervised.linear_probe",
        ["--model", "base", "--dataset", "cub", "--train-path", "a", "--test-path", "b",
         "--out", "o", "--embed-options-json", "{}"],
        "linear_probe",
    ),
    "supervised.finetune_data": (
        "unicom.supervised.finetune_data",
        ["--dataset", "cub", "--path", "p", "--out-dir", "o"],
        "finetune",
    ),
}  # fmt: skip

# Values the generic choice below cannot make up (an array of rule objects).
CHOSEN = {"filters.columns": [{"column": "NSFW", "op": "!=", "value": "NSFW"}]}


def fields_of(options: str | dict[str, str]) -> dict[str, str]:
    """Option key -> schema path, a section's keys being those its stage receives."""
    if isinstance(options, str):
        return {key: f"{options}.{key}" for key in section_options(options, {})}
    return dict(options)


def flags_of(options: str | dict[str, str]) -> list[tuple[tuple[str, ...], str]]:
    """(path in the options dict, schema path) of every flag the stage should have: nested
    sections down to their keys, less the keys Snakemake reads instead."""
    found = []

    def walk(path: tuple[str, ...], schema_path: str) -> None:
        spec = subschema(schema_path)
        if "properties" not in spec:
            found.append((path, schema_path))
            return
        for key, sub in spec["properties"].items():
            if not (sub.get(SCHEDULER) or sub.get(PLANNING)):
                walk((*path, key), f"{schema_path}.{key}")

    for key, schema_path in fields_of(options).items():
        walk((key,), schema_path)
    return found


def flag_name(path: tuple[str, ...]) -> str:
    return "--" + ".".join(part.replace("_", "-") for part in path)


def run_main(capsys, module: str, argv: list[str]) -> str:
    """What ``main(argv)`` prints before exiting 0 (--help, --print-options)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(argv)
    assert stop.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Each option's help entry, keyed by its first flag, whitespace removed (argparse wraps)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            entries[current] = ""
        elif not line.strip() or not line.startswith(" "):
            current = None
        if current is not None:
            entries[current] += "".join(stripped.split())
    return entries


def squashed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("command", sorted(STAGES))
def test_help_lists_every_key_with_its_description_and_default(capsys, command):
    module, required, options = STAGES[command]
    subcommand = required[:1] if " " in command else []
    entries = help_entries(run_main(capsys, module, [*subcommand, "--help"]))
    assert "--options-json" in entries and "--print-options" in entries
    expected = flags_of(options)
    assert expected
    for path, schema_path in expected:
        spec = subschema(schema_path)
        entry = entries.get(flag_name(path))
        assert entry is not None, f"{command} --help lacks {flag_name(path)} ({schema_path})"
        assert f"(default:{squashed(render(spec['default']))})" in entry, (schema_path, entry)
        assert squashed(spec.get("description", "")) in entry, (schema_path, entry)


def other_value(spec: Mapping[str, Any], default: Any) -> Any:
    """A value the schema accepts for a key, other than its default."""
    declared = spec.get("type", [])
    types = [declared] if isinstance(declared, str) else list(declared)
    candidates: list[Any] = list(spec.get("enum", []))
    if "boolean" in types:
        candidates.append(not default)
    if "null" in types:
        candidates.append(None)
    if "integer" in types or "number" in types:
        base = default if isinstance(default, int | float) and not isinstance(default, bool) else 1
        candidates += [base + 1, base - 1, 2, 1, spec.get("minimum", 1) + 1]
    if "number" in types:
        candidates += [base / 2, 0.25, 0.75]
    if "string" in types:
        candidates.append("other")
    if "array" in types and isinstance(default, list):
        candidates += [default[:1], default[::-1], ["other"]]
    if "object" in types:
        candidates.append({"other": 1})
    validator = jsonschema.Draft202012Validator(spec)
    for candidate in candidates:
        if candidate != default and validator.is_valid(candidate):
            return candidate
    raise AssertionError(f"no value other than the default for {spec}")


def flag_args(path: tuple[str, ...], spec: Mapping[str, Any], value: Any) -> list[str]:
    """The flag setting ``value``: --x / --no-x for a boolean key, else --x VALUE."""
    name = flag_name(path)
    if spec.get("type") == "boolean":
        return [name] if value else ["--no-" + name[2:]]
    return [name, render(value)]


def nested(pairs: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for path, value in pairs:
        node = options
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return options


def pick(options: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        options = options[key]
    return options


@pytest.mark.parametrize("command", sorted(STAGES))
def test_flags_and_options_json_give_the_same_options(capsys, command):
    """Every key changed at once: as flags, as --options-json, the stage prints the same dict."""
    module, required, options = STAGES[command]
    changes, flags = [], []
    for path, schema_path in flags_of(options):
        spec = subschema(schema_path)
        value = CHOSEN.get(schema_path)
        value = other_value(spec, spec["default"]) if value is None else value
        changes.append((path, value))
        flags += flag_args(path, spec, value)
    by_flags = json.loads(run_main(capsys, module, [*required, *flags, "--print-options"]))
    as_json = ["--options-json", json.dumps(nested(changes))]
    by_json = json.loads(run_main(capsys, module, [*required, *as_json, "--print-options"]))
    assert by_flags == by_json
    for path, value in changes:
        assert pick(by_flags, path) == value, path
    defaults = json.loads(run_main(capsys, module, [*required, "--print-options"]))
    assert set(defaults) == set(fields_of(options))
    assert all(pick(defaults, path) != value for path, value in changes)


def test_a_flag_overrides_the_same_key_of_options_json(capsys):
    module, required, _ = STAGES["evaluate.evaluate"]
    argv = [*required, "--options-json", '{"batch_size": 8, "seed": 3}', "--batch-size", "16"]
    printed = json.loads(run_main(capsys, module, [*argv, "--print-options"]))
    assert (printed["batch_size"], printed["seed"]) == (16, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "many"], "config key evaluate.batch_size: 'many' is not of type"),
        (["--options-json", '{"batch_sise": 8}'], "config key evaluate.batch_sise: unknown key"),
        (["--max-images", "0"], "config key evaluate.max_images: 0 is less than the minimum"),
    ],
)
def test_a_bad_option_is_one_line_naming_the_key(argv, message):
    from unicom.evaluate.evaluate import main

    _, required, _ = STAGES["evaluate.evaluate"]
    with pytest.raises(UnicomError) as error:
        main([*required, *argv])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_flag_inside_a_key_json_gave_as_no_object_is_one_line():
    from unicom.train.train import main

    _, required, _ = STAGES["train.train"]
    with pytest.raises(UnicomError) as error:
        main([*required, "--options-json", '{"augment": 3}', "--augment.hflip", "0.25"])
    assert (
        str(error.value) == "--options-json: augment is not an object, but a flag sets a key in it"
    )


@pytest.mark.parametrize(
    "schema_path, text, value",
    [
        ("evaluate.max_images", "null", None),
        ("evaluate.max_images", "500", 500),
        ("evaluate.device", "123", "123"),  # a string key keeps its text
        ("evaluate.dims", '["full", 64]', ["full", 64]),
        ("train.compile", "auto", "auto"),
        ("train.compile", "false", False),
        ("train.pretrained", "null", None),
        ("train.pretrained", "true", "true"),  # no boolean there: the text
        ("embed.open_clip.model", "ViT-B-32", "ViT-B-32"),
        ("evaluate.batch_size", "many", "many"),  # left for the schema to refuse
    ],
)
def test_a_flags_text_becomes_the_value_its_key_takes(schema_path, text, value):
    assert flag_value(text, subschema(schema_path)) == value


def stage_option_modules() -> set[str]:
    """Modules that build StageOptions or still take --options-json by hand."""
    found = set()
    for path in sorted((REPO / "workflow/unicom").rglob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            builds = isinstance(node, ast.Call) and getattr(node.func, "id", "") == "StageOptions"
            if builds or (isinstance(node, ast.Constant) and node.value == "--options-json"):
                parts = path.relative_to(REPO / "workflow").with_suffix("").parts
                found.add(".".join(parts))
    return found


def test_every_stage_with_options_is_checked_here():
    assert stage_option_modules() == {module for module, _, _ in STAGES.values()}


# --- the trainer's options ---------------------------------------------------------------------


def test_options_come_from_the_schema():
    properties = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
    spec = properties["train"]["properties"]
    options = train_options({"steps": 3})
    assert options["steps"] == 3 and options["model"] == spec["model"]["default"]
    assert options["augment"]["hflip"] == spec["augment"]["properties"]["hflip"]["default"]
    # Job resources never reach the trainer: changing them cannot rerun or refuse a resume.
    assert not {"threads", "gpus", "mem_mb", "runtime"} & set(options)
    assert all(s.get("description") for s in spec.values())
    with pytest.raises(UnicomError, match="config key train.batchsize: unknown key"):
        train_options({"batchsize": 3})
    with pytest.raises(UnicomError, match="config key train.batch_size: 1 is less than"):
        train_options({"batch_size": 1})
