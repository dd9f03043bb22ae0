"""Atomic file writes for run records (config, metrics, scores, model specs).

A record is written to a temporary file in the same directory, flushed to disk, then
renamed over the target: a crash or a full disk leaves the old file or the new one,
never half of either.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator


def _umask() -> int:
    """The process umask, read without changing it (Linux), else via os.umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable(directory: str, what: str = "output directory") -> str:
    """Create ``directory`` if needed and check that a file can be created and removed in
    it (a probe), so that a read-only mount or missing permission is reported before any
    long work starts. Raises ``PermissionError``/``OSError`` naming the directory."""
    path = os.path.abspath(directory)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        error = type(err)(f"{what} {path} is not writable ({err.strerror or err}); expected a "
                          "directory where files can be created")
        error.errno = err.errno  # (no filename: str() would drop the message)
        raise error from None
    return path


def remove_if_empty(directory: str) -> bool:
    """Remove ``directory`` if it exists and is empty (a failed run's fresh output
    directory); True if removed. Never removes anything with content."""
    try:
        os.rmdir(directory)
        return True
    except OSError:  # missing, not empty, or not ours to remove
        return False


def write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path, suffix=".json")


def write_text_atomic(text: str, path: str, suffix: str = "") -> None:
    """Write ``text`` through a temporary file and a rename (see the module docstring)."""
    with atomic_file(path, "w", suffix=suffix) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", suffix: str = "",
                newline: str | None = None) -> Iterator[IO]:
    """A file object (``mode`` "w" or "wb") whose content appears at ``path`` only when
    the block ends without an error: written to a temporary file in the same directory,
    flushed to disk, then renamed over ``path`` (see the module docstring); on an error
    the temporary file is removed and ``path`` is untouched. ``newline`` as for open()."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, mode, newline=newline) as f:
            # mkstemp creates the file 0600; give it the mode open() would (0666 & ~umask).
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
