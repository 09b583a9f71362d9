"""Configuration: one schema with every default, layered config files, stage sections, rehearsal.

A run sees the schema's defaults overlaid with the files given to ``--configfile`` (in order;
``config/config.yaml``, the offline demo, only when none is given) and ``--config`` on top,
and nothing else. The Snakefile and ``python -m unicom.config show`` both call
:func:`layered_config`, so what ``show`` prints is what a run uses.

Every stage reads its section through :func:`section_options`: the schema fills the defaults
and checks the types, and keys marked ``x-scheduler`` (job resources) or ``x-planning`` (read by
Snakemake or another rule) are dropped, so that changing them reruns nothing.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.resources
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from unicom.cli import run_cli
from unicom.errors import UnicomError
from unicom.io import write_text
from unicom.rehearsal import rehearse
from unicom.schema_reference import reference

# The demo's config, applied when no --configfile is given (relative to the working folder,
# which is the repository for `snakemake` and `make demo`).
DEFAULT_CONFIGFILE = Path("config/config.yaml")
# Schema annotations: who reads a key besides (or instead of) the section's stage.
SCHEDULER = "x-scheduler"  # a job resource; Snakemake reads it, the stage never sees it
PLANNING = "x-planning"  # Snakemake plans the DAG with it, or another rule reads it


# ---------------------------------------------------------------------------------------------
# Schema


@functools.cache
def _schema() -> dict:
    """The parsed schema, read once per process (every stage and every rule reads sections);
    package data, so that a non-editable install finds it too. Never changed: see load_schema."""
    text = importlib.resources.files("unicom").joinpath("schema.yaml").read_text()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_schema() -> dict:
    """The schema (a fresh copy: callers may change it)."""
    return copy.deepcopy(_schema())


def subschema(name: str, schema: Mapping | None = None) -> dict:
    """The schema of the section ``name`` (dotted: ``assign.diagnostics``); read only."""
    node = _schema() if schema is None else schema
    for part in name.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise UnicomError(f"config key {name}: no such section in the schema") from None
    return node


def annotated_keys(annotation: str, schema: Mapping | None = None) -> list[str]:
    """Dotted paths of every key that carries ``annotation`` (e.g. ``x-scheduler``)."""
    found: list[str] = []

    def walk(node: Mapping, prefix: str) -> None:
        for name, spec in node.get("properties", {}).items():
            path = f"{prefix}{name}"
            if spec.get(annotation):
                found.append(path)
            walk(spec, path + ".")

    walk(_schema() if schema is None else schema, "")
    return found


def _extend_with_defaults(validator_class):
    """A validator that fills in each property's ``default`` before validating it."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema_ in properties.items():
                if "default" in subschema_ and name not in instance:
                    instance[name] = copy.deepcopy(subschema_["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _fill_and_check(instance: dict, schema: Mapping, prefix: str = "") -> None:
    """Fill defaults into ``instance`` (in place) and validate it against ``schema``."""
    validator = _Validator(schema)
    # Fill defaults first (nested sections appear only after their parent got its default).
    for _ in range(3):
        for _error in validator.iter_errors(instance):
            pass
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        path = [str(p) for p in error.absolute_path]
        message = error.message
        if error.validator == "additionalProperties":
            path.append(sorted(set(error.instance) - set(error.schema.get("properties", {})))[0])
            message = "unknown key"
        key = f"{prefix}{'.'.join(path)}".rstrip(".") or "<top level>"
        raise UnicomError(f"config key {key}: {message}")


def validate_config(config: dict, schema: Mapping | None = None) -> dict:
    """Fill defaults into ``config`` (in place) and validate it; return it.

    Raises UnicomError with one line: the key path and what is wrong with it.
    """
    _fill_and_check(config, _schema() if schema is None else schema)
    check_consistency(config)
    return config


def check_data_sources(config: Mapping[str, Any]) -> None:
    """data.shards / data.embeddings (unicom.sources) with the keys they cannot go with."""
    data = config["data"]
    if data["shards"] and data["url_list"]:
        raise UnicomError(
            "config key data.shards: give data.url_list (to download) or data.shards (already "
            "downloaded), not both"
        )
    if data["embeddings"] is not None and not data["shards"]:
        raise UnicomError(
            "config key data.embeddings: needs data.shards, the images the embeddings were "
            "made from (training reads them; clip-retrieval's files hold no images)"
        )
    if data["shards"] and config["dedup"]["urls"]:
        raise UnicomError(
            "config key dedup.urls: marks repeated URLs before a download, and data.shards "
            "has none; set it false (dedup.content still finds repeated images)"
        )


def check_consistency(config: Mapping[str, Any]) -> None:
    """Checks that involve more than one key."""
    demo, data = config["demo"], config["data"]
    if not demo["enabled"] and not data["url_list"] and not data["shards"]:
        raise UnicomError(
            "config key data.url_list: empty, and demo.enabled is false: nothing to do"
        )
    check_data_sources(config)
    if config["fuse"]["mode"] == "mean" and config["embed"]["encoder"] != "open_clip":
        raise UnicomError(
            "config key fuse.mode: 'mean' needs image and text in one shared space (a single CLIP "
            f"model), but embed.encoder is '{config['embed']['encoder']}'; use 'concat'"
        )
    if config["assign"]["top_labels"] > config["kmeans"]["k"]:
        raise UnicomError(
            f"config key assign.top_labels: {config['assign']['top_labels']} nearest centroids "
            f"of kmeans.k = {config['kmeans']['k']}"
        )
    if (
        config["filters"]["clip_score_min"] is not None
        and config["embed"]["encoder"] != "open_clip"
    ):
        raise UnicomError(
            "config key filters.clip_score_min: needs one CLIP model for image and caption "
            f"(embed.encoder open_clip), but embed.encoder is '{config['embed']['encoder']}'"
        )
    for index, rule in enumerate(config["filters"]["columns"]):
        if rule["column"] not in data["extra_cols"]:
            raise UnicomError(
                f"config key filters.columns[{index}].column: '{rule['column']}' is not in "
                f"data.extra_cols {data['extra_cols']} (only carried columns can be filtered)"
            )
        if rule["op"] in ("in", "not_in") and not isinstance(rule["value"], list):
            raise UnicomError(
                f"config key filters.columns[{index}].value: op {rule['op']} needs a list"
            )
    train = config["train"]
    conflict = decode_conflict(train["decode"], train["augment"])
    if conflict:
        raise UnicomError(conflict)
    positives, kept = config["train"]["positives"], config["assign"]["top_labels"]
    if positives > kept:
        raise UnicomError(
            f"config key train.positives: {positives} positives per image, but assign keeps "
            f"only the nearest {kept} centroids (assign.top_labels)"
        )


def check_output_dir(output_dir: str) -> None:
    """Before any job: ``output_dir`` (relative to the working folder) is a folder or can
    become one; Snakemake would otherwise stop with a NotADirectoryError traceback."""
    path = Path(output_dir)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if existing.is_dir():
            return
        problem = "is a file" if existing == path else f"is below {existing}, a file"
        raise UnicomError(f"config key output_dir: {output_dir} {problem}; name a folder")


def decode_conflict(decode: str, augment: Mapping[str, Any]) -> str | None:
    """Why train.decode cannot run ``augment`` (None when it can): the tensor paths run the
    crop and the flip, torchvision also random erasing; colour jitter and RandAugment are PIL
    operations."""
    unsupported = [key for key in ("color_jitter", "rand_augment_ops") if augment.get(key)]
    if decode == "cuda" and augment.get("random_erasing"):
        unsupported.append("random_erasing")
    if decode == "pil" or not unsupported:
        return None
    return (
        f"config key train.decode: {decode} decoding does not run train.augment."
        f"{unsupported[0]} (use decode pil, or set it to 0)"
    )


# ---------------------------------------------------------------------------------------------
# Sections: what one stage receives


def section_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The section ``name`` as its stage sees it: ``options`` (a possibly partial section)
    with the schema's defaults filled in and checked, without x-scheduler and x-planning keys.
    """
    schema = subschema(name)
    if options is not None and not isinstance(options, Mapping):
        raise UnicomError(f"config key {name}: expected a mapping, got {type(options).__name__}")
    filled = copy.deepcopy(dict(options or {}))
    _fill_and_check(filled, schema, f"{name}.")
    properties = schema["properties"]
    return {
        key: value
        for key, value in filled.items()
        if not (properties[key].get(SCHEDULER) or properties[key].get(PLANNING))
    }


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The section ``name`` (dotted) of a whole config, as its stage sees it."""
    node: Any = config
    for part in name.split("."):
        node = (node or {}).get(part)
    return section_options(name, node)


# ---------------------------------------------------------------------------------------------
# Layers


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else replaces
    (lists too), as Snakemake merges --configfile and --config."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config_file(path: str | Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UnicomError(f"config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UnicomError(f"config file {path}: not YAML ({str(err).splitlines()[0]})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UnicomError(f"config file {path}: expected a mapping, got {type(content).__name__}")
    return content


def layered_config(
    configfiles: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    default_configfile: str | Path = DEFAULT_CONFIGFILE,
) -> dict[str, Any]:
    """The effective config: schema defaults < ``configfiles`` in order (the default file, the
    demo, when there are none) < ``overrides`` (--config); then the rehearsal, if enabled."""
    schema = _schema()
    config: dict[str, Any] = {}
    for path in list(configfiles) or [default_configfile]:
        config = merge(config, load_config_file(path))
    config = validate_config(merge(config, typed_overrides(overrides or {}, schema)))
    if config["rehearsal"]["enabled"]:
        config = validate_config(rehearse(config, annotated_keys(SCHEDULER)))
    return in_schema_order(config, schema)


def typed_overrides(overrides: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """--config values with the types the schema asks for. Snakemake reads a nested value
    (`--config 'kmeans={k: 64}'`) with YAML's base loader, which keeps every leaf a string; such
    a leaf is read again as YAML unless the schema wants a string there."""
    properties = schema.get("properties")
    typed = {}
    for key, value in overrides.items():
        # A free-form object (train.model_kwargs) has no properties: its leaves are YAML.
        spec = properties.get(key, {}) if properties is not None else {}
        typed[key] = _retyped(value, spec)
    return typed


def _retyped(value: Any, spec: Mapping[str, Any]) -> Any:
    if isinstance(value, Mapping):
        return typed_overrides(value, spec)
    if isinstance(value, list):
        return [_retyped(item, spec.get("items", {})) for item in value]
    declared = spec.get("type", [])
    if declared == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # Snakemake reads `--config output_dir=2024` as a number
    if not isinstance(value, str) or "string" in declared or value in spec.get("enum", ()):
        return value  # ("no" is a resize mode, not YAML's false)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value  # left as it is: validation names the key


def in_schema_order(config: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its keys in the schema's order (so config.yaml reads like the schema)."""
    properties = schema.get("properties", {})
    ordered = {}
    for key in [*properties, *(k for k in config if k not in properties)]:
        if key in config:
            value = config[key]
            if isinstance(value, Mapping) and key in properties:
                value = in_schema_order(value, properties[key])
            ordered[key] = value
    return ordered


def parse_overrides(entries: Iterable[str]) -> dict[str, Any]:
    """``--config K=V`` entries, parsed exactly as Snakemake parses them."""
    from snakemake.cli import parse_config  # the same parser as `snakemake --config`

    try:
        return parse_config(list(entries))
    except ValueError as err:
        raise UnicomError(f"--config: {err}") from None


def to_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, width=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the effective config of a run, run nothing")
    show.add_argument("--configfile", nargs="+", default=[], help="as snakemake --configfile")
    show.add_argument(
        "--config", nargs="+", default=[], metavar="K=V", help="as snakemake --config"
    )
    show.add_argument(
        "--default-configfile",
        default=str(DEFAULT_CONFIGFILE),
        help="the config used when no --configfile is given (the demo)",
    )
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    write = commands.add_parser("write", help="write a config given as JSON to a YAML file")
    write.add_argument("--config-json", required=True, help="the effective config as JSON")
    write.add_argument("--out", required=True, help="YAML file to write (atomically)")
    commands.add_parser("reference", help="print the configuration reference page (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "reference":
        sys.stdout.write(reference(_schema()))
        return
    if args.command == "write":
        write_text(args.out, to_yaml(json.loads(args.config_json)))
        return
    config = layered_config(args.configfile, parse_overrides(args.config), args.default_configfile)
    sys.stdout.write(json.dumps(config, indent=2) + "\n" if args.json else to_yaml(config))


if __name__ == "__main__":
    run_cli(main)
