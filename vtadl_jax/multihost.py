"""Multi-process helpers on JAX's own runtime (``jax.distributed``); no-ops in one process.

One process per host, every process runs the same command. ``maybe_initialize_distributed``
joins the processes (the coordinator, process count and id come from the environment,
e.g. ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or from a
cluster JAX detects); ``share`` splits a dataset into the processes' contiguous shares;
``barrier`` waits for every process, ``process_0_first`` runs a step on process 0
before the others, ``process_0_only`` on process 0 while the others wait for it, and
``gather_to_process_0`` brings every process's share of results to process 0 (all
through ``jax.distributed``'s coordination service).
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax

from vtadl_jax.config_checks import require_bool
from vtadl_jax.errors import ConfigError, PeerProcessError
from vtadl_jax.records import atomic_file

T = TypeVar("T")


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {text!r}") from None


def maybe_initialize_distributed(config: Any, asked_by: str = "distributed=True") -> None:
    """``jax.distributed.initialize()`` when ``config.distributed`` or the environment asks.

    The coordinator comes from ``JAX_COORDINATOR_ADDRESS`` (read by JAX) and the process
    count and id from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read here: JAX itself
    takes them only as arguments), or all three from a cluster JAX detects (SLURM, Open
    MPI, Cloud TPU, ...): that needs ``config.distributed``, since a cluster's variables
    are also set around a single process (a batch script's own commands). On CPUs also
    set ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``. ``asked_by`` names the setting in
    errors (the CLI's ``--distributed``). A no-op once joined.
    """
    if "distributed" in config:  # checked before it is used: a string would be truthy
        require_bool(config, "distributed")
    wanted = bool(config.get("distributed", False))
    if wanted or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if not jax.distributed.is_initialized():
            num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
            try:
                jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
            except (ValueError, RuntimeError, TypeError) as err:
                why = asked_by if wanted else "JAX_COORDINATOR_ADDRESS is set"
                hint = (" (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID,"
                        " or run under a cluster JAX detects: SLURM, Open MPI, Cloud TPU)"
                        if "must be defined" in str(err) or "should be defined" in str(err)
                        else "")
                raise ConfigError(f"{why}, but jax.distributed.initialize() failed: {err}"
                                  f"{hint}") from err


def share_bounds(num_examples: int, index: int | None = None,
                 count: int | None = None) -> tuple[int, int]:
    """[start, stop) of process ``index``'s contiguous share of ``num_examples`` among ``count``
    (defaults: ``jax.process_index()/process_count()``).

    Shares differ in size by at most one; with fewer examples than processes some are
    empty (start == stop).
    """
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need 0 <= index ({index}) < count ({count})")
    return index * num_examples // count, (index + 1) * num_examples // count


class SourceShare:
    """A contiguous range of a random-access source (``len`` + ``[i]``), itself one.

    Other attributes (``name``, ``split``, ...) are the wrapped source's.
    """

    def __init__(self, source, start: int, stop: int):
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"share [{start}, {stop}) outside a source of {len(source)} examples")
        self._source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} outside a share of {len(self)} examples")
        return self._source[self.start + i]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)


def share(source, index: int | None = None, count: int | None = None) -> SourceShare:
    """This process's share of ``source`` (defaults: ``jax.process_index()/process_count()``)."""
    return SourceShare(source, *share_bounds(len(source), index, count))


def progress_label(desc: str, index: int | None = None, count: int | None = None) -> str:
    """``desc`` with " (process i/n)" appended when there are several processes
    (defaults: ``jax.process_index()/process_count()``), for progress bars."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return desc if count == 1 else f"{desc} (process {index}/{count})"


_USES: dict[str, int] = {}


def _unique(name: str) -> str:
    # Every process calls the same barriers in the same order, so the counters agree.
    count = _USES.get(name, 0)
    _USES[name] = count + 1
    return f"vtadl/{name}/{count}"


def _client():
    import orbax.checkpoint as ocp

    return ocp.multihost.get_jax_distributed_client()


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Wait until every process reaches the barrier ``name`` (at most ``timeout_s``);
    returns at once in one process.

    A coordination-service barrier (``jax.distributed``'s client), not a device
    collective: processes may arrive minutes apart (CPU gloo collectives give up after
    30 s, so orbax's default ``sync_global_processes``, a collective, does not suit).
    A name may be reused; each call is its own barrier.
    """
    if jax.process_count() > 1:
        _client().wait_at_barrier(_unique(name), int(timeout_s * 1000))


def _on_process_0(fn: Callable[[], T], name: str, timeout_s: float,
                  key: str | None = None) -> tuple[bool, T | None]:
    """(True, ``fn()``) on process 0, which reports the outcome through the key-value
    store (under ``key``, default a fresh one for ``name``); (False, None) on the others
    once it has reported "ok", else PeerProcessError: its failure, its loss, or no
    answer within ``timeout_s``."""
    key = _unique(name) if key is None else key
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as err:
            _client().key_value_set(key, f"failed: {type(err).__name__}: {err}")
            raise
        _client().key_value_set(key, "ok")
        return True, result
    try:
        status = _client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as err:  # the service's timeout, or process 0 (its host) lost
        status = f"was lost or did not answer within {timeout_s:.0f} s: {err}"
    if status != "ok":
        raise PeerProcessError(f"process 0 {status} ({name}); process "
                               f"{jax.process_index()} stops too")
    return False, None


def process_0_first(fn: Callable[[], T], name: str, timeout_s: float = 3600.0) -> T:
    """``fn()`` on process 0, then, once it has returned, on every other process.

    For work that writes shared files the others then read (building a TFDS dataset in
    a shared data directory: two builders of one dataset collide). If process 0 fails
    (or is lost), the others raise ``PeerProcessError`` with its error at once instead of
    waiting for the timeout. One process: just ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    first, result = _on_process_0(fn, name, timeout_s)
    return result if first else fn()


def process_0_only(fn: Callable[[], T], name: str, timeout_s: float = 3600.0) -> T | None:
    """``fn()`` on process 0; the others return None once it has returned.

    For outputs process 0 alone writes (a report, a table of predictions, thresholds):
    when this returns on any process they exist, so whatever that process does next (a
    ``predict`` that reads the thresholds an ``evaluate`` wrote) sees them. If process 0
    fails (or is lost), the others raise ``PeerProcessError`` with its error at once. One
    process: just ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    return _on_process_0(fn, name, timeout_s)[1]


def _save_arrays(arrays: dict, path: str) -> None:
    """``arrays`` as an .npz, written atomically (``records.atomic_file``); strings as
    unicode arrays, so that reading needs no pickle."""
    import numpy as np

    with atomic_file(path, "wb", suffix=".npz") as f:
        np.savez(f, **{k: (np.asarray(v).astype(str) if np.asarray(v).dtype == object
                           else np.asarray(v)) for k, v in arrays.items()})


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def gather_to_process_0(local: Callable[[], dict], directory: str, name: str,
                        timeout_s: float = 6 * 3600.0) -> dict | None:
    """Every process computes ``local()`` (a dict of arrays with one row per example of
    its share, e.g. its share of a test set's maps and scores); process 0 returns them
    concatenated in process order, the others None. One process: ``local()``.

    The shares travel as .npz files through ``directory``, which every process must
    see (the work directory of a multi-host run lives on a shared file system anyway);
    process 0 deletes them once read. Each process reports through the coordination
    service's key-value store, so a failure anywhere reaches process 0 at once as
    ``PeerProcessError`` (with that process's error) instead of a timeout. The other
    processes return once process 0 has read every share; if it fails instead (its own
    share, a peer's, or the process itself lost), each deletes its own share file and
    raises ``PeerProcessError``, so no share is left behind. String arrays come back as
    object arrays. A process with an empty share (fewer examples than processes)
    contributes no rows.
    """
    if jax.process_count() == 1:
        return local()
    import numpy as np

    key, index, count = _unique(name), jax.process_index(), jax.process_count()
    path = os.path.join(directory, f".{name}-{key.rsplit('/', 1)[-1]}-{{}}-of-{count}.npz")

    def gather() -> list[dict]:  # process 0: its own share (kept in memory), then the others'
        parts = [local()]
        try:
            for peer in range(1, count):
                try:
                    status = _client().blocking_key_value_get(f"{key}/{peer}",
                                                              int(timeout_s * 1000))
                except Exception as err:  # the service's timeout or a lost peer
                    raise PeerProcessError(f"process {peer} did not report within "
                                           f"{timeout_s:.0f} s ({name}): {err}") from err
                if status != "ok":
                    raise PeerProcessError(f"process {peer} {status} ({name}); process 0 "
                                           "stops too")
                with np.load(path.format(peer), allow_pickle=False) as f:
                    parts.append({k: f[k] for k in f.files})
        finally:
            for peer in range(1, count):
                _remove(path.format(peer))
        return parts

    if index:
        try:
            _save_arrays(local(), path.format(index))
        except BaseException as err:
            _client().key_value_set(f"{key}/{index}", f"failed: {type(err).__name__}: {err}")
            raise
        _client().key_value_set(f"{key}/{index}", "ok")
    try:  # the others wait for process 0's outcome; on a failure they delete their share
        first, parts = _on_process_0(gather, name, timeout_s, key=f"{key}/0")
    except BaseException:
        if index:
            _remove(path.format(index))
        raise
    if not first:
        return None
    out = {}
    for k in parts[0]:
        values = [np.asarray(p[k]) for p in parts]
        values = [v for v in values if len(v)] or values[:1]  # empty shares: no rows
        values = [v.astype(object) if v.dtype.kind in "OU" else v for v in values]
        out[k] = np.concatenate(values)
    return out
