"""Errors for anticipated user mistakes and damaged run files.

The command line (``vtadl_jax/cli.py``) turns these, ``OSError`` and the data errors
(``vtadl_jax/data/errors.py``) into one message and exit status 2; every message names
the config field, file or path concerned and what was expected.
"""
from __future__ import annotations

__all__ = ["ConfigError", "ConfigFieldError", "CheckpointError", "RunRecordError"]


class ConfigError(ValueError):
    """A config file, a config value or an override is not what the code expects."""

    def __str__(self) -> str:  # the message itself, also for ConfigFieldError (a KeyError)
        return str(self.args[0]) if self.args else ""


class ConfigFieldError(ConfigError, KeyError):
    """An override names a config field that does not exist."""


class CheckpointError(ValueError):
    """No checkpoint of a work directory can be restored (missing, damaged or mismatched)."""


class RunRecordError(ValueError):
    """A run record of a work directory (metrics.jsonl, run.json) is damaged."""


class PeerProcessError(RuntimeError):
    """In a multi-process run, another process failed at a step this one was waiting for:
    process 0 at a step it runs first or alone (``vtadl_jax.multihost.process_0_first``,
    ``process_0_only``), or any process while scoring its share
    (``multihost.gather_to_process_0``); its error is in the message."""
