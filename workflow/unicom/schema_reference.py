"""The configuration reference page, written from the schema: every key with its type, default
and description, one section per config section.

``python -m unicom.config reference > docs/configuration-reference.md`` writes the committed
page; a test compares it with this module's output, so the page cannot drift from the schema.
A key without a description or a default is an error here: the schema is where both live.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from unicom.errors import UnicomError

SCHEDULER = "x-scheduler"
PLANNING = "x-planning"
COMMAND = "python -m unicom.config reference > docs/configuration-reference.md"
HEADER = f"""\
# Configuration reference

<!-- Written by `{COMMAND}` from config/schema.yaml: edit the schema, then run it again
(tests/test_docs.py fails while this page and the schema differ). -->

Every key of `config/schema.yaml`, the only place a default lives. A run sees these defaults
overlaid with its `--configfile` layers and `--config` (see [Configuration](configuration.md));
`python -m unicom.config show` prints what a run will use. **Job resource** marks an
`x-scheduler` key (Snakemake reads it, the stage never does, so changing it reruns nothing);
**Planning** marks an `x-planning` key (Snakemake plans with it, or another rule reads it).
"""
# Outside code spans, what Markdown would read as markup: emphasis, tags, table cells.
_CODE_SPAN = re.compile(r"(`[^`]*`)")
_MARKUP = {"*": r"\*", "|": r"\|", "<": "&lt;", ">": "&gt;"}


def plain(text: str) -> str:
    """``text`` on one line with Markdown's markup characters escaped (code spans kept)."""
    text = " ".join(text.split())
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = "".join(_MARKUP.get(char, char) for char in parts[i])
    return "".join(parts)


def value_text(value: Any) -> str:
    """A default or enum value as a code span, written as YAML would take it."""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _bounds(spec: Mapping[str, Any]) -> str:
    signs = {
        "minimum": "≥",
        "exclusiveMinimum": ">",
        "maximum": "≤",
        "exclusiveMaximum": "<",
        "minItems": "items ≥",
        "maxItems": "items ≤",
        "minLength": "length ≥",
    }
    found = [f"{sign} {spec[key]}" for key, sign in signs.items() if key in spec]
    return f" ({', '.join(found)})" if found else ""


def type_text(spec: Mapping[str, Any]) -> str:
    """What a key accepts, in words: its type(s), choices, bounds and list items."""
    if "const" in spec:
        return value_text(spec["const"])
    if "enum" in spec:
        return "one of " + ", ".join(value_text(v) for v in spec["enum"])
    if "anyOf" in spec:
        return " or ".join(type_text(option) for option in spec["anyOf"])
    types = spec.get("type")
    if types is None:
        return "any"
    names = [types] if isinstance(types, str) else list(types)
    words = []
    for name in names:
        if name == "array" and "items" in spec:
            words.append(f"list of {_items_text(spec['items'])}")
        elif name == "object" and isinstance(spec.get("additionalProperties"), Mapping):
            words.append(f"mapping of name → {type_text(spec['additionalProperties'])}")
        elif name == "object":
            words.append("mapping")
        else:
            words.append(name)
    return " or ".join(words) + _bounds(spec)


def _items_text(items: Mapping[str, Any]) -> str:
    if "properties" in items:
        fields = ", ".join(
            f"{name} ({type_text(spec)})" for name, spec in items["properties"].items()
        )
        return f"mappings with {fields}"
    return type_text(items)


def is_section(spec: Mapping[str, Any]) -> bool:
    """A key whose value is a mapping of named keys of its own (gets its own table)."""
    return "properties" in spec and spec.get("type") == "object"


def _description(path: str, spec: Mapping[str, Any]) -> str:
    if "description" not in spec:
        raise UnicomError(f"config key {path}: the schema gives no description")
    marks = []
    if spec.get(SCHEDULER):
        marks.append("**Job resource.**")
    if spec.get(PLANNING):
        marks.append("**Planning.**")
    return " ".join([*marks, plain(spec["description"])])


def _key_row(path: str, spec: Mapping[str, Any]) -> str:
    if "default" not in spec:
        raise UnicomError(f"config key {path}: the schema gives no default")
    cells = [f"`{path}`", plain(type_text(spec)), value_text(spec["default"])]
    return f"| {' | '.join(cells)} | {_description(path, spec)} |"


def _section(path: str, spec: Mapping[str, Any], level: int) -> list[str]:
    """The heading, description and key table of one section, then its sub-sections."""
    lines = [f"{'#' * level} `{path}`", "", _description(path, spec), ""]
    keys = {name: sub for name, sub in spec["properties"].items() if not is_section(sub)}
    if keys:
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [_key_row(f"{path}.{name}", sub) for name, sub in keys.items()]
        lines.append("")
    for name, sub in spec["properties"].items():
        if is_section(sub):
            lines += _section(f"{path}.{name}", sub, level + 1)
    return lines


def reference(schema: Mapping[str, Any]) -> str:
    """The Markdown page: top-level keys first, then one section per config section."""
    lines = [HEADER, plain(schema["description"]), ""]
    top = {name: spec for name, spec in schema["properties"].items() if not is_section(spec)}
    if top:
        lines += ["## Top level", ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [_key_row(name, spec) for name, spec in top.items()]
        lines.append("")
    for name, spec in schema["properties"].items():
        if is_section(spec):
            lines += _section(name, spec, 2)
    return "\n".join(lines).rstrip("\n") + "\n"
