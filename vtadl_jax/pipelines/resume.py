"""Resuming a VT-ADL run: which config changes are allowed, and the config history.

`vtadl-jax train --resume` compares the new config with the one recorded in the work
directory (run.json, else config.json). Fields that only extend or display a run
(`FREE_FIELDS`: num_steps, ...) may change; any other change (seed, learning rate,
model, data, ...) is refused with the list of changed keys unless
`--allow-config-change`. Whenever the config differs at all, the previous record is kept
in `config_history/<n>-until-step-<step>.json` before run.json is rewritten, so every
config a run used stays on disk.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections

from vtadl_jax import records
from vtadl_jax.errors import ConfigError, RunRecordError

FREE_FIELDS = frozenset({"num_steps", "resume", "progress", "distributed",
                         "checkpoint.async_save"})
HISTORY_DIR = "config_history"
_ABSENT = "(absent)"


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in `workdir`/checkpoints (orbax names a
    finished step directory by its number; temporary ones carry a suffix)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path)
                  if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(path, n)))


def recorded_config(workdir: str) -> tuple[str, dict] | None:
    """(path, config dict) of the run's record: run.json's config, else config.json."""
    for name, key in (("run.json", "config"), ("config.json", None)):
        path = os.path.join(workdir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                record = json.load(f)
            return path, (record[key] if key else record)
        except (ValueError, KeyError, TypeError) as err:
            raise RunRecordError(f"{path}: damaged run record ({err}); expected the JSON "
                                 "written by `vtadl-jax train`") from None
    return None


def check_method(workdir: str, method: str) -> None:
    """Refuse to write a run of `method` over another method's run in `workdir`."""
    path = os.path.join(workdir, "run.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f).get("method")
    except (ValueError, AttributeError) as err:
        raise RunRecordError(f"{path}: damaged run record ({err}); expected the JSON "
                             "written by `vtadl-jax train` or `fit`") from None
    if recorded != method:
        raise FileExistsError(f"{workdir} holds a {recorded!r} run ({path}); expected an "
                              f"empty directory or a {method!r} run: choose another --workdir "
                              "(nothing was overwritten)")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(previous: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{dotted key: (previous value, new value)} of every field that differs."""
    new = json.loads(json.dumps(config.to_dict(), default=list))
    old, new = _flatten(previous), _flatten(new)
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        allow_config_change: bool) -> tuple[dict, dict] | None:
    """Refuse a changed config (ConfigError listing the keys) unless allowed.

    Returns (previous config, changes) when the config differs, else None.
    """
    record = recorded_config(workdir)
    if record is None:
        return None
    path, previous = record
    changes = config_changes(previous, config)
    restricted = {k: v for k, v in changes.items() if k not in FREE_FIELDS}
    if restricted and not allow_config_change:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in restricted.items())
        raise ConfigError(
            f"--resume with a config that differs from {path} in {sorted(restricted)} "
            f"({listed}). Expected the run's own config (num_steps may change); pass "
            "--allow-config-change to continue with the new one (the old one is kept in "
            f"{os.path.join(workdir, HISTORY_DIR)}/), or train into another --workdir")
    return (previous, changes) if changes else None


def archive_config(workdir: str, previous: dict, changes: dict) -> str:
    """Keep the replaced config in `workdir`/config_history/ (never overwritten), named
    by a counter and the newest checkpoint step on disk when it was replaced."""
    directory = os.path.join(workdir, HISTORY_DIR)
    steps = checkpoint_steps(workdir)
    index = len(os.listdir(directory)) if os.path.isdir(directory) else 0
    path = os.path.join(directory, f"{index:03d}-until-step-{steps[-1] if steps else 0}.json")
    while os.path.exists(path):
        index += 1
        path = os.path.join(directory, f"{index:03d}-until-step-{steps[-1] if steps else 0}.json")
    records.write_json_atomic(
        {"config": previous, "until_step": steps[-1] if steps else 0,
         "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}, path)
    return path
