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

Opt-in alternative, ``VTADL_JAX_MALLOC=jemalloc`` (or ``jemalloc:/path/to/libjemalloc.so.2``):
restart with jemalloc preloaded (``LD_PRELOAD``; Debian/Ubuntu package libjemalloc2),
configured (``MALLOC_CONF``, unless set) to back its memory with transparent huge pages
and to keep freed memory for reuse (``JEMALLOC_CONF``), so a step after the first maps
no new memory at all. Measured on the project's 2-core CPU, each configuration in its own
process, VT-ADL at 512 px: code-equivalent step, batch 2, 0.864-0.879 s against 0.887-1.146 s
with the glibc tunable (and as steady as 0.86-0.89 s from step to step), batch 8 3.30 vs
3.40 s; the "paper" variant, batch 2, 1.64 vs 1.72 s, its system time 0.36 -> 0.01 s per
step (2,151 page faults -> 0). Not the default: it needs a system library outside pip.
Without the library it says so on stderr and falls back to the glibc tunable. Under
``VTADL_JAX_HUGEPAGE_MALLOC=0`` neither is applied. It does not depend on the kernel's
THP mode (with THP off, jemalloc still keeps its memory).
"""
from __future__ import annotations

import os
import platform
import sys

OPT_OUT_ENV = "VTADL_JAX_HUGEPAGE_MALLOC"
MALLOC_ENV = "VTADL_JAX_MALLOC"
JEMALLOC_CONF = "thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"
_JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                   "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                   "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
                   "/usr/local/lib/libjemalloc.so.2")
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


def _jemalloc_library(choice: str) -> str | None:
    """The library ``VTADL_JAX_MALLOC`` names ("jemalloc[:path]"), if it is a file."""
    _, _, path = choice.partition(":")
    candidates = (path,) if path else _JEMALLOC_PATHS
    return next((os.path.abspath(p) for p in candidates if os.path.isfile(p)), None)


def hugepage_malloc_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart would not help (see the
    module docstring). Pure apart from reading the platform, the THP setting and, under
    ``VTADL_JAX_MALLOC=jemalloc``, whether the library exists (a warning if not)."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(OPT_OUT_ENV, "1").strip() == "0" or environ.get(_DONE_ENV):
        return None
    choice = environ.get(MALLOC_ENV, "").strip()
    if choice and choice.split(":")[0] != "jemalloc":
        print(f"vtadl_jax.hostmem: {MALLOC_ENV}={choice!r} not understood (expected "
              "'jemalloc' or 'jemalloc:/path/to/libjemalloc.so.2'); ignored", file=sys.stderr)
    elif choice and sys.platform.startswith("linux"):  # without THP it still keeps memory
        library = _jemalloc_library(choice)
        if library is None:
            looked = choice.split(":", 1)[1] if ":" in choice else ", ".join(_JEMALLOC_PATHS)
            print(f"vtadl_jax.hostmem: {MALLOC_ENV}={choice}: libjemalloc.so.2 not found "
                  f"(looked for {looked}); using glibc's huge-page tunable instead",
                  file=sys.stderr)
        elif library not in environ.get("LD_PRELOAD", "").split(":"):
            preload = environ.get("LD_PRELOAD", "")
            environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
            environ.setdefault("MALLOC_CONF", JEMALLOC_CONF)
            environ[_DONE_ENV] = "1"
            return environ
        else:  # already preloaded by the user
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
