"""Host memory: let glibc's malloc back XLA:CPU's large buffers with transparent huge pages.

XLA:CPU allocates the temporary buffers of every execution afresh. glibc serves
allocations above its mmap threshold (at most 32 MiB) with a new anonymous mapping and
unmaps it on free, so every train step touches hundreds of MiB of new pages, one
4 KiB page fault each: the VT-ADL code-equivalent step at 512 px took about 106,000
page faults and 0.26 s of system time per step at batch 2 (1.43 s per step), 359,000
at batch 8, on the project's 2-core CPU. With glibc's ``glibc.malloc.hugetlb=1``
tunable (glibc >= 2.35) malloc marks those mappings for transparent huge pages
(madvise), and the same step took 389 page faults, 0.05 s of system time and 1.17 s.

Tunables are read only when a process starts, so :func:`reexec_with_hugepage_malloc`
restarts the current process (``os.execve``: same pid, arguments, standard streams)
with the tunable added to ``GLIBC_TUNABLES``. The ``vtadl-jax`` command and the
experiment scripts call it first thing; a program that imports the library can call
it at its own start. It does nothing (returns False) when:

* ``VTADL_JAX_HUGEPAGE_MALLOC=0`` is set (the opt-out), or the process was already
  restarted by it;
* ``GLIBC_TUNABLES`` already names ``glibc.malloc.hugetlb`` (the user's choice stands);
* the platform is not Linux with glibc >= 2.35;
* the kernel's transparent huge pages are not in ``madvise`` mode (``always``: malloc's
  mappings already get huge pages; ``never``: the tunable cannot help);
* the interpreter was not started from a command line that can be replayed
  (``sys.orig_argv`` or ``sys.executable`` empty, an interactive session, a script
  read from standard input).
"""
from __future__ import annotations

import os
import platform
import sys

OPT_OUT_ENV = "VTADL_JAX_HUGEPAGE_MALLOC"
_DONE_ENV = "VTADL_JAX_HUGEPAGE_REEXEC"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = _THP_MODE) -> str | None:
    """The bracketed mode of the kernel's THP setting ("always", "madvise", "never")."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_at_least(major: int, minor: int) -> bool:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        have = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def hugepage_malloc_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart would not help (see the
    module docstring). Pure apart from reading the platform and the THP setting."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(OPT_OUT_ENV, "1").strip() == "0" or environ.get(_DONE_ENV):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    if not sys.platform.startswith("linux") or not _glibc_at_least(2, 35):
        return None
    if _thp_mode() != "madvise":
        return None
    environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    environ[_DONE_ENV] = "1"
    return environ


def reexec_with_hugepage_malloc() -> bool:
    """Restart this process with huge-page malloc where that helps (module docstring).

    Returns False when nothing was done; otherwise it does not return (the process image
    is replaced). Call it before any work: whatever ran before is run again.
    """
    env = hugepage_malloc_env()
    argv = list(getattr(sys, "orig_argv", []) or [])
    if env is None or not argv or not sys.executable or bool(getattr(sys.flags, "interactive", 0)):
        return False
    if len(argv) == 1 or sys.argv[:1] in ([""], ["-"]):  # bare REPL or a script on stdin
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return True  # pragma: no cover - execve does not return
