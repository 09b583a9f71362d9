"""A stage's config section on its command line, documented by the schema.

``StageOptions("evaluate")`` gives a stage's parser one flag per key of the section that the
stage receives (``unicom.config.section_options``: no x-scheduler or x-planning key), each with
the schema's description and default in ``--help``; nested sections get dotted flags
(``--augment.hflip``). ``--options-json`` takes the whole section as the workflow passes it.
Both build one dict (flags over the JSON), which the schema then fills and checks, so a stage
run by hand with ``--batch-size 32`` gets exactly what ``--options-json '{"batch_size": 32}'``
gives; ``--print-options`` prints that dict and exits.

A flag's value is read as JSON when that gives a value the key accepts (``64``, ``null``,
``true``, ``["full", 64]``), else kept as text (``auto``, ``ViT-B-32``); a value the schema
refuses is one line naming the key, as in a config file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from textwrap import fill
from typing import Any

import jsonschema

from unicom.cli import parse_options_json
from unicom.config import PLANNING, SCHEDULER, in_schema_order, section_options, subschema
from unicom.errors import UnicomError

DEST_PREFIX = "option__"


@dataclass(frozen=True)
class Flag:
    """One command-line flag: the key's place in the options dict and its schema."""

    path: tuple[str, ...]  # keys from the options dict's top down
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return "--" + ".".join(part.replace("_", "-") for part in self.path)

    @property
    def dest(self) -> str:
        return DEST_PREFIX + "__".join(self.path)


def render(value: Any) -> str:
    """A value as one would type it after a flag: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def flag_value(text: str, spec: Mapping[str, Any]) -> Any:
    """A flag's text as the value its key takes: JSON when that fits the schema, else text."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    validator = jsonschema.Draft202012Validator(spec)
    if validator.is_valid(parsed) or not validator.is_valid(text):
        return parsed  # what fits, or the JSON value the schema's error will name
    return text


def _metavar(spec: Mapping[str, Any]) -> str:
    if "enum" in spec:
        return "{" + ",".join(render(v) for v in spec["enum"]) + "}"
    declared = spec.get("type", [])
    types = [declared] if isinstance(declared, str) else list(declared)
    names = {"integer": "INT", "number": "NUMBER", "string": "TEXT", "null": "null"}
    shown = [names.get(t, "JSON") for t in types] or ["JSON"]
    return "|".join(dict.fromkeys(shown))


def _help(spec: Mapping[str, Any]) -> str:
    text = " ".join(str(spec.get("description", "")).split())
    return f"{text} (default: {render(spec.get('default'))})".replace("%", "%%").lstrip()


class StageOptions:
    """The options one stage command receives: a config section (``section``) or a few keys
    named by their dotted schema paths (``fields``: option key -> schema path)."""

    def __init__(self, section: str | None = None, fields: Mapping[str, str] | None = None):
        if (section is None) == (fields is None):
            raise ValueError("give a section or fields")
        self.section = section
        if section is not None:
            visible = section_options(section, {})
            fields = {key: f"{section}.{key}" for key in visible}
        self.fields: dict[str, str] = dict(fields or {})
        self.flags = [flag for key in self.fields for flag in self._flags((key,), self.fields[key])]

    def _flags(self, path: tuple[str, ...], schema_path: str) -> list[Flag]:
        spec = subschema(schema_path)
        if "properties" not in spec:
            return [Flag(path, spec)]
        return [
            flag
            for key, sub in spec["properties"].items()
            if not (sub.get(SCHEDULER) or sub.get(PLANNING))
            for flag in self._flags((*path, key), f"{schema_path}.{key}")
        ]

    def what(self) -> str:
        if self.section is not None:
            return f"the config section {self.section}"
        named = (path if path == key else f"{path} as {key}" for key, path in self.fields.items())
        return "config keys " + ", ".join(named)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """``--options-json``, ``--print-options`` and one flag per key, in their own group."""
        about = (
            "Each flag is a config key, with the schema's description and default. Flags "
            "override --options-json; the default fills what neither gives." + self._not_here()
        )  # wrapped here: stages with RawDescriptionHelpFormatter print it as it is
        group = parser.add_argument_group(f"{self.what()} (config/schema.yaml)", fill(about, 78))
        group.add_argument(
            "--options-json",
            metavar="JSON",
            help="all of them as one JSON object (what the workflow passes)",
        )
        group.add_argument(
            "--print-options",
            action="store_true",
            help="print the options this command would run with (JSON) and exit",
        )
        for flag in self.flags:
            if flag.spec.get("type") == "boolean":
                group.add_argument(
                    flag.name, dest=flag.dest, action=argparse.BooleanOptionalAction,
                    help=_help(flag.spec),
                )  # fmt: skip
            else:
                group.add_argument(
                    flag.name, dest=flag.dest, metavar=_metavar(flag.spec), help=_help(flag.spec)
                )

    def _not_here(self) -> str:
        """The section's keys Snakemake reads instead of the stage, named so none is missed."""
        if self.section is None:
            return ""
        others = [key for key in subschema(self.section)["properties"] if key not in self.fields]
        if not others:
            return ""
        return f" Read by Snakemake, not by this command: {', '.join(others)}."

    def from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The options of a parsed command line, filled and checked by the schema."""
        given = {} if args.options_json is None else parse_options_json(args.options_json)
        for flag in self.flags:
            text = getattr(args, flag.dest)
            if text is not None:
                value = text if isinstance(text, bool) else flag_value(text, flag.spec)
                _put(given, flag.path, value)
        options = self.resolve(given)
        if args.print_options:
            print(json.dumps(self.in_schema_order(options), indent=2))
            raise SystemExit(0)
        return options

    def in_schema_order(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` ordered as the schema lists the keys (for people to read)."""
        if self.section is not None:
            return in_schema_order(options, subschema(self.section))
        return {
            key: in_schema_order(value, subschema(self.fields[key]))
            if isinstance(value, Mapping)
            else value
            for key, value in options.items()
        }

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` (possibly partial) with the schema's defaults, checked."""
        if self.section is not None:
            return section_options(self.section, given)
        unknown = sorted(set(given) - set(self.fields))
        if unknown:
            raise UnicomError(
                f"--options-json: unknown key {unknown[0]} (this command takes "
                f"{', '.join(self.fields)})"
            )
        return {
            key: _key_options(path, key in given, given.get(key))
            for key, path in self.fields.items()
        }


def _key_options(path: str, given: bool, value: Any) -> Any:
    """One key (or section) at ``path`` as its stage sees it, checked within its section."""
    if "properties" in subschema(path):
        return section_options(path, value if given else None)
    parent, _, key = path.rpartition(".")
    return section_options(parent, {key: value} if given else {})[key]


def _put(options: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = options
    for index, key in enumerate(path[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            dotted = ".".join(path[: index + 1])
            raise UnicomError(
                f"--options-json: {dotted} is not an object, but a flag sets a key in it"
            )
    node[path[-1]] = value
