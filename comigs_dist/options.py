"""Typed options: dataclass fields with help texts, and raw YAML / command-line values checked
against them, every problem collected (unknown keys with a did-you-mean, wrong types) rather
than the first one raised.

Owns ``opt``/``sub``, coercion of a value to a declared type, merging a raw mapping into a
dataclass tree, ``describe_options`` (for ``--help``) and ``parse_options`` (a method's
``Options`` from ``method_options``). Knows nothing of the project: it imports none of it, so
the method registry and the run configuration can both build on it without importing each other.

Why hand-written rather than jsonargparse, tyro or OmegaConf (judged on their documentation):
- every problem of a run at once, each naming key, value, rule and fix: their parsers stop at the
  first key that fails (argparse's ``error()`` in jsonargparse and tyro, a ``ValidationError``
  from OmegaConf's merge), and their messages do not say what to do;
- ``method_options`` whose schema is chosen by ``method``: jsonargparse wants the YAML reshaped
  into ``class_path``/``init_args``, tyro turns it into subcommands, OmegaConf has no such node;
  each would change the CLI and every YAML in configs/;
- ``key=value`` dotted overrides (OmegaConf has them; jsonargparse and tyro use ``--key value``),
  ``int | list[int]`` per-user values (OmegaConf only from 2.4), a did-you-mean on unknown keys;
- YAML 1.1 reads ``off``/``true`` as booleans where a choice of words is meant
  (``train.amp=off``, ``model.share_base: true``): a step of our own with any of them.
What is left to own is about 250 lines of plain Python (this file), tested through
tests/test_config.py; a library would add a dependency and an adapter of about the same size.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

import yaml


class OptionsError(ValueError):
    """A value that does not fit its declared type; the message names the key and the value."""


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def sub(cls: type, help: str) -> Any:
    """A nested group of options (a dataclass field holding another options dataclass)."""
    return field(default_factory=cls, metadata={"help": help})


def get_dotted(obj: Any, key: str) -> Any:
    """``obj.a.b`` for ``key = "a.b"``."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def format_errors(errors: list[str]) -> str:
    """One message for one or several configuration problems."""
    if len(errors) == 1:
        return f"invalid configuration: {errors[0]}"
    return "invalid configuration (%d problems):\n  - %s" % (len(errors), "\n  - ".join(errors))


# --------------------------------------------------------------------------------------------
# one value
# --------------------------------------------------------------------------------------------

def is_options_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the declared type, or raise OptionsError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads true/false/on/off/yes/no as booleans
            words = ("true", "on", "yes") if value else ("false", "off", "no")
            value = next((w for w in words if w in choices), value)
        if value in choices:
            return value
        raise OptionsError(f"{key} ({value!r}) must be one of {', '.join(repr(c) for c in choices)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        if isinstance(value, (list, tuple)):
            for a in args:
                if typing.get_origin(a) is list:
                    return coerce(value, a, key)
        for a in args:
            if a is type(None) or typing.get_origin(a) is list:
                continue
            try:
                return coerce(value, a, key)
            except OptionsError:
                pass
        raise OptionsError(f"{key} ({value!r}) must be of type {type_name(tp)}")
    if origin is dict:
        # a free mapping checked later against its own schema (method_options)
        if value in ("", None) or (isinstance(value, str) and value.strip() in ("{}", "null")):
            return {}
        if not isinstance(value, dict):
            raise OptionsError(f"{key} ({value!r}) must be a mapping; set its entries as {key}.<name>=value")
        return dict(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if is_options_class(inner):
            return _coerce_records(value, inner, key)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise OptionsError(f"{key} ({value!r}) must be a list ({type_name(tp)})")
        return [coerce(v.strip() if isinstance(v, str) else v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise OptionsError(f"{key} ({value!r}) must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise OptionsError(f"{key} ({value!r}) must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise OptionsError(f"{key} ({value!r}) must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise OptionsError(f"{key} ({value!r}) must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise OptionsError(f"{key} ({value!r}) must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise OptionsError(f"{key} ({value!r}) must be a string")
    raise TypeError(f"unsupported option type {tp} for {key}")  # internal: a field declared badly


def _coerce_records(value: Any, cls: type, key: str) -> list:
    """A list of mappings, each checked against a dataclass (e.g. comm.groups)."""
    if value in ("", None):
        return []
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    if not isinstance(value, (list, tuple)):
        raise OptionsError(f"{key} ({value!r}) must be a list of mappings ({cls.__name__}: {names})")
    out, errors = [], []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            errors.append(f"{key}[{i}] ({item!r}) must be a mapping with keys {names}")
            continue
        kwargs = merge(item, cls, f"{key}[{i}].", errors)
        out.append(build(cls, kwargs))
    if errors:
        raise OptionsError("; ".join(errors))
    return out


# --------------------------------------------------------------------------------------------
# a tree of options
# --------------------------------------------------------------------------------------------

def fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """name -> (resolved type, field) of an options dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def close_match(name: str, options: list[str]) -> str:
    m = difflib.get_close_matches(name, options, n=1)
    return repr(m[0]) if m else ""


def merge(raw: dict, cls: type, prefix: str, errors: list[str], broken: set[str] | None = None) -> dict:
    """Check a nested mapping against an options dataclass: returns kwargs with coerced leaves
    (nested groups as mappings), appends every problem to ``errors`` and to ``broken`` the dotted
    keys of the known options whose value did not parse (they keep their defaults in the kwargs;
    an unknown key names no option, so a rule about an option of its name still judges the value
    the user gave that option)."""
    known = fields_of(cls)
    out: dict[str, Any] = {}

    def problem(key: str, text: str) -> None:
        errors.append(text)
        if broken is not None:
            broken.add(key)
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in known:
            hint = close_match(name, list(known))
            e = f"unknown key {key!r}" + (f"; did you mean {hint}?" if hint else "")
            errors.append(e + f" (known under {prefix.rstrip('.') or 'the top level'}: {', '.join(known)})")
            continue
        tp, _ = known[name]
        if is_options_class(tp):
            if not isinstance(value, dict):
                problem(key, f"{key} must be a mapping of options, got {value!r}")
                continue
            out[name] = merge(value, tp, key + ".", errors, broken)
        else:
            try:
                out[name] = coerce(value, tp, key)
            except OptionsError as exc:
                problem(key, str(exc))
    return out


def build(cls: type, kwargs: dict) -> Any:
    """The dataclass tree from what ``merge`` returned (unset options keep their defaults)."""
    known = fields_of(cls)
    args = {}
    for name, value in kwargs.items():
        tp, _ = known[name]
        args[name] = build(tp, value) if is_options_class(tp) else value
    return cls(**args)


def describe_options(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf option, for ``--help``."""
    rows = []
    for name, (tp, f) in fields_of(cls).items():
        key = f"{prefix}{name}"
        if is_options_class(tp):
            rows.extend(describe_options(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, shown, f.metadata.get("help", "")))
    return rows


def parse_options(options_cls: type, raw: dict, owner: str, key: str = "method_options") -> tuple[Any, list[str]]:
    """An owner's typed options (``options_cls``) from the raw mapping set under ``key``:
    (options, []) or (None, problems). ``owner`` names who takes them, e.g. "method 'hetlora'"."""
    if not dataclasses.fields(options_cls) and raw:
        return None, [f"{key} ({raw}) are given but {owner} takes no options; remove them"]
    errors: list[str] = []
    kwargs = merge(raw, options_cls, f"{key}.", errors)
    if errors:
        return None, [f"{err} ({owner})" for err in errors]
    return build(options_cls, kwargs), []


def build_options(options_cls: type, raw: dict, owner: str, key: str = "method_options") -> Any:
    """``parse_options`` or raise OptionsError listing every problem."""
    options, errors = parse_options(options_cls, raw, owner, key)
    if errors:
        raise OptionsError(format_errors(errors))
    return options
