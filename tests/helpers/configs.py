"""Config layering computed here, independently of unicom.config: what a test compares the
effective config with."""

from __future__ import annotations


def schema_defaults(node: dict) -> dict:
    """Every default of the schema, computed here without unicom.config."""
    defaults = {}
    for name, spec in node.get("properties", {}).items():
        if spec.get("type") == "object" and "properties" in spec:
            defaults[name] = {**spec.get("default", {}), **schema_defaults(spec)}
        elif "default" in spec:
            defaults[name] = spec["default"]
    return defaults


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = deep_merge(base[key], value) if both_dicts else value
    return merged


def leaves(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
