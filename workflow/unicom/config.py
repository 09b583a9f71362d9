"""Configuration: JSON-Schema validation with defaults, and checks across keys.

The Snakefile calls :func:`validate_config` before any job runs, so a wrong config fails
with one line naming the key, not halfway through a cluster run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from unicom.io import UnicomError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def _extend_with_defaults(validator_class):
    """A validator that fills in each property's ``default`` before validating it."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    default = subschema["default"]
                    instance[name] = dict(default) if isinstance(default, dict) else default
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: dict, schema: Mapping | None = None) -> dict:
    """Fill defaults into ``config`` (in place) and validate it; return it.

    Raises UnicomError with one line: the key path and what is wrong with it.
    """
    schema = load_schema() if schema is None else schema
    validator = _Validator(schema)
    # Fill defaults first (nested sections appear only after their parent got its default).
    for _ in range(3):
        for _error in validator.iter_errors(config):
            pass
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        message = error.message
        if error.validator == "additionalProperties":
            message = message.replace("Additional properties are not allowed", "unknown key")
        raise UnicomError(f"config key {_key_path(error)}: {message}")
    check_consistency(config)
    return config


def check_consistency(config: Mapping[str, Any]) -> None:
    """Checks that involve more than one key."""
    demo, data = config["demo"], config["data"]
    if not demo["enabled"] and not data["url_list"]:
        raise UnicomError(
            "config key data.url_list: empty, and demo.enabled is false: nothing to do"
        )
    if config["fuse"]["mode"] == "mean" and config["embed"]["encoder"] != "open_clip":
        raise UnicomError(
            "config key fuse.mode: 'mean' needs image and text in one shared space (a single CLIP "
            f"model), but embed.encoder is '{config['embed']['encoder']}'; use 'concat'"
        )
