"""Reading a run configuration: a YAML file and dotted ``key=value`` overrides (later wins) into
a checked ``RunConfig``, and back to YAML.

Owns the file and command-line syntax; the types come from ``schema`` (through ``options``), the
checks from ``validation``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from comigs_dist import options
from comigs_dist.config.schema import ConfigError, RunConfig
from comigs_dist.config.validation import format_errors, validate


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {p} is not a group of options")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.rounds=5)")
    key, value = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from an optional YAML file and ``key=value`` overrides (later wins),
    checked: a ConfigError lists every problem."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of options")
        raw = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> RunConfig:
    """A checked RunConfig from a nested mapping (unknown keys and wrong types first, then the
    rules between values, all in one error)."""
    errors: list[str] = []
    broken: set[str] = set()
    kwargs = options.merge(raw, RunConfig, "", errors, broken)
    if errors:
        # the rules between the values that did parse, in the same error (the keys that did not
        # are left at their defaults for this check only)
        try:
            from comigs_dist.config.validation import collect_errors
            rules = collect_errors(options.build(RunConfig, kwargs))
        except Exception:  # a rule that cannot be judged without the broken keys
            rules = []
        # a rule that names a key which did not parse judged its default, not what the user wrote
        errors += [e for e in rules if e not in errors and not any(re.search(rf"\b{re.escape(k)}\b", e)
                                                                   for k in broken)]
        raise ConfigError(format_errors(errors))
    return validate(options.build(RunConfig, kwargs))


def describe_options(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf option, for ``--help``."""
    return options.describe_options(cls, prefix)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
