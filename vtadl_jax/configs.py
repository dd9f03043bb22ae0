"""Configs are code: Python files with `get_config(arg=None) -> ml_collections.ConfigDict`.

`load_config("experiments/configs/vtadl_mnist.py:3", ["train.epochs=2", "model.k=64"])` imports
the file, calls get_config("3") and applies the overrides with the types of the fields
they replace (an override of a missing field, or of the wrong type, is an error that
names it). This is the big_vision / Flax-examples convention without absl flags.

A config file is Python and is executed when loaded: never load an untrusted one.

Open sections: a section whose keys are the fields of some class (e.g. `model.overrides`,
the VTADL fields to change) may start empty. `register_open_section(path, fields_fn)`
(done by vtadl_jax/train/config.py, which every VT-ADL config imports) or the
`open_sections` argument maps its dotted path to `config -> {field: current value}`;
an override of a field listed there is parsed with the type of that current value
(None: any Python literal) and added.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from vtadl_jax.errors import ConfigError, ConfigFieldError

OpenSections = Mapping[str, Callable[[ml_collections.ConfigDict], Mapping[str, Any]]]
_OPEN_SECTIONS: dict[str, Callable[[ml_collections.ConfigDict], Mapping[str, Any]]] = {}


def register_open_section(path: str, fields_fn: Callable[[ml_collections.ConfigDict],
                                                         Mapping[str, Any]]) -> None:
    """Let overrides add fields to the section at dotted `path` (see the module doc)."""
    _OPEN_SECTIONS[path] = fields_fn


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "vtadl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path}: expected a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"config file {path}: invalid Python at line {err.lineno}: "
                          f"{err.msg}") from err
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path}: expected a function get_config()")
    return module


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError from None


def _describe(current) -> str:
    kind = type(current).__name__
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _parse_value(text: str, current, key: str = "value"):
    """`text` as a value of the type of `current` (the field's present value)."""
    if isinstance(current, str):
        return text
    if current is None:
        try:
            return _literal(text)
        except ValueError:
            return text
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {text!r}")
    expected = f"{key}: expected {_describe(current)}, got {text!r}"
    try:
        value = _literal(text)
    except ValueError:
        if not isinstance(current, float):
            raise ValueError(expected) from None
        try:  # "inf", "nan", "1e-3": refused below or by the config checks where not finite
            value = float(text)
        except ValueError:
            raise ValueError(expected) from None
    if isinstance(value, bool) and isinstance(current, (int, float)):
        # ConfigDict would silently store True in an int field (and 1.0 in a float one).
        raise ValueError(f"{expected} (a boolean)")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, (int, float, tuple, list, dict)) and not isinstance(value, type(current)):
        raise ValueError(expected)
    if isinstance(value, float) and not math.isfinite(value) and math.isfinite(current):
        raise ValueError(f"{key}: expected a finite number, got {text!r}")
    return value


def _section(config, parts, item):
    """The section holding the last of `parts` (all but the last must be sections)."""
    node = config
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            raise ConfigFieldError(f"override {item!r}: config has no field {part!r}")
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigFieldError(f"override {item!r}: config field {'.'.join(parts[:i + 1])!r} "
                                   f"is a value, not a section with field {parts[i + 1]!r}")
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    open_sections: OpenSections | None = None) -> ml_collections.ConfigDict:
    """Apply "dotted.key=value" strings to `config` in place (and return it)."""
    open_sections = {**_OPEN_SECTIONS, **(open_sections or {})}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = _section(config, parts, item)
        leaf, section = parts[-1], ".".join(parts[:-1])
        if leaf in node:
            current = node[leaf]
        elif section in open_sections:
            fields = open_sections[section](config)
            if leaf not in fields:
                raise ConfigFieldError(f"override {item!r}: {section} has no field {leaf!r}; "
                                       f"settable: {sorted(fields)}")
            current = fields[leaf]
        else:
            raise ConfigFieldError(f"override {item!r}: config has no field {key!r}; "
                                   f"fields here: {sorted(node.keys())}")
        try:
            value = _parse_value(text, current, key)
            if leaf in node:
                node[leaf] = value
            else:
                with node.unlocked():
                    node[leaf] = value
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{err} (override {item!r})") from err
    return config


def load_config(spec: str, overrides: Sequence[str] = (),
                open_sections: OpenSections | None = None) -> ml_collections.ConfigDict:
    """Load `path[:arg]` and apply overrides."""
    path, _, arg = spec.partition(":")
    module = _import_file(path)
    params = [p for p in inspect.signature(module.get_config).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.KEYWORD_ONLY)]
    takes_arg = bool(params)
    needs_arg = takes_arg and params[0].default is inspect.Parameter.empty \
        and params[0].kind is not params[0].VAR_POSITIONAL
    if arg and not takes_arg:
        raise ConfigError(f"config {spec}: get_config() of {path} takes no argument; "
                          f"use --config {path} (without ':{arg}')")
    if needs_arg and not arg:
        raise ConfigError(f"config {spec}: get_config() of {path} requires an argument "
                          f"({params[0].name}); use --config {path}:<{params[0].name}>")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config {spec}: {err}") from err
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config {spec}: get_config() returned {type(config).__name__}, "
                          "expected an ml_collections.ConfigDict")
    return apply_overrides(config, overrides, open_sections)
