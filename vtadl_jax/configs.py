"""Configs are code: Python files with `get_config(arg=None) -> ml_collections.ConfigDict`.

`load_config("experiments/configs/vtadl_mnist.py:3", ["train.epochs=2", "model.k=64"])` imports
the file, calls get_config("3") and applies the overrides with the types of the fields
they replace (an override of a missing field, or of the wrong type, is an error that
names it). This is the big_vision / Flax-examples convention without absl flags.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "vtadl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path}: expected a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path}: expected a function get_config()")
    return module


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    value = ast.literal_eval(text)
    if isinstance(value, bool) and isinstance(current, (int, float)):
        # ConfigDict would silently store True in an int field (and 1.0 in a float one).
        raise ValueError(f"expected a {type(current).__name__}, got the boolean {text!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply "dotted.key=value" strings to `config` in place (and return it)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise KeyError(f"override {item!r}: config has no field {part!r}")
            node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                raise KeyError(f"override {item!r}: config field {'.'.join(parts[:i + 1])!r} "
                               f"is a value, not a section with field {parts[i + 1]!r}")
        leaf = parts[-1]
        if leaf not in node:
            raise KeyError(f"override {item!r}: config has no field {key!r}; "
                           f"fields here: {sorted(node.keys())}")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, SyntaxError, TypeError) as err:
            raise ValueError(f"override {item!r}: {err}") from err
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path[:arg]` and apply overrides."""
    path, _, arg = spec.partition(":")
    module = _import_file(path)
    config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides)
