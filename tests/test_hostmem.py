"""vtadl_jax.hostmem: the restart with glibc's huge-page malloc tunable."""
import os
import subprocess
import sys

import pytest

from vtadl_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import os, sys; from vtadl_jax.hostmem import reexec_with_hugepage_malloc; "
         "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
         "done = reexec_with_hugepage_malloc(); print('end', done, sys.argv[1:])")


@pytest.fixture
def applicable(monkeypatch):
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(hostmem, "_glibc_at_least", lambda *a: True)
    monkeypatch.setattr(hostmem.sys, "platform", "linux")


def test_env_added_to_existing_tunables(applicable):
    env = hostmem.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert env["A"] == "1"
    assert hostmem.hugepage_malloc_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ", [
    {"VTADL_JAX_HUGEPAGE_MALLOC": "0"},                    # opt-out
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},          # the user's own choice
    {"VTADL_JAX_HUGEPAGE_REEXEC": "1"},                    # already restarted once
])
def test_no_restart_when_not_wanted(applicable, environ):
    assert hostmem.hugepage_malloc_env(environ) is None


@pytest.mark.parametrize("mode", ["always", "never", None])
def test_no_restart_unless_thp_is_madvise(applicable, monkeypatch, mode):
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: mode)
    assert hostmem.hugepage_malloc_env({}) is None


def test_jemalloc_opt_in(applicable, tmp_path, capsys, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": f"jemalloc:{lib}",
                                       "LD_PRELOAD": "/x/other.so"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so"
    assert env["MALLOC_CONF"] == hostmem.JEMALLOC_CONF and "retain:true" in env["MALLOC_CONF"]
    assert "GLIBC_TUNABLES" not in env and env["VTADL_JAX_HUGEPAGE_REEXEC"] == "1"
    mine = hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": f"jemalloc:{lib}",
                                        "MALLOC_CONF": "narenas:2"})
    assert mine["MALLOC_CONF"] == "narenas:2"  # the user's own configuration stands
    assert hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": f"jemalloc:{lib}",
                                        "LD_PRELOAD": str(lib)}) is None  # already loaded
    assert hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": f"jemalloc:{lib}",
                                        "VTADL_JAX_HUGEPAGE_MALLOC": "0"}) is None
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "never")  # jemalloc still keeps memory
    assert hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": f"jemalloc:{lib}"})[
        "LD_PRELOAD"] == str(lib)
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "madvise")
    # A missing library or an unknown value: said on stderr, glibc's tunable instead.
    for value, says in ((f"jemalloc:{tmp_path / 'none.so'}", "not found"),
                        ("tcmalloc", "not understood")):
        env = hostmem.hugepage_malloc_env({"VTADL_JAX_MALLOC": value})
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "LD_PRELOAD" not in env
        err = capsys.readouterr().err
        assert "VTADL_JAX_MALLOC" in err and says in err


JEMALLOC = next((p for p in hostmem._JEMALLOC_PATHS if os.path.isfile(p)), None)
MAPS_PROBE = ("import os; from vtadl_jax.hostmem import reexec_with_hugepage_malloc; "
              "reexec_with_hugepage_malloc(); "
              "print('jemalloc' in open('/proc/self/maps').read(), os.environ['MALLOC_CONF'])")


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 not installed (apt: libjemalloc2)")
def test_jemalloc_restart_loads_it():
    out = _run(["-c", MAPS_PROBE, "x"], VTADL_JAX_MALLOC="jemalloc").split()
    assert out == ["True", hostmem.JEMALLOC_CONF]


def test_thp_mode_parsing(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem._thp_mode(str(f)) == "madvise"
    assert hostmem._thp_mode(str(tmp_path / "missing")) is None


def _run(args, stdin=None, **env):
    """stdout of ``python *args`` in this environment without any hostmem setting."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "VTADL_JAX_HUGEPAGE_MALLOC",
                         "VTADL_JAX_HUGEPAGE_REEXEC", "VTADL_JAX_MALLOC", "LD_PRELOAD",
                         "MALLOC_CONF")}
    full.update(env, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True,
                          text=True, env=full, timeout=60, check=True).stdout


@pytest.mark.skipif(hostmem.hugepage_malloc_env({}) is None,
                    reason="huge-page malloc does not apply on this machine")
def test_restart_keeps_pid_and_arguments():
    lines = _run(["-c", PROBE, "x", "--y"]).split("\n")
    first, second, end = lines[0].split(), lines[1].split(), lines[2]
    assert first[0] == second[0] == "start" and first[1] == second[1]  # same process
    assert first[2] == "None" and second[2] == "glibc.malloc.hugetlb=1"
    assert end == "end False ['x', '--y']"  # the restarted process does not restart again
    assert len([ln for ln in lines if ln.startswith("end")]) == 1


def test_opt_out_and_stdin_scripts_run_once():
    lines = _run(["-c", PROBE], VTADL_JAX_HUGEPAGE_MALLOC="0").split("\n")
    assert lines[0].split()[2] == "None" and lines[1] == "end False []"
    out = _run(["-"], stdin=PROBE)  # a script read from stdin cannot be replayed
    assert out.count("start") == 1 and "end False" in out


def _script_order(path: str) -> tuple[int | None, int | None]:
    """(line of the top-level ``if __name__ == "__main__"`` block that calls
    reexec_with_hugepage_malloc, line of the first top-level import that can load jax)."""
    import ast

    tree = ast.parse(open(path).read())
    call = first_heavy = None
    light = sys.stdlib_module_names  # what cannot load jax
    for node in tree.body:
        if (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                and "reexec_with_hugepage_malloc()" in ast.unparse(node) and call is None):
            call = node.lineno
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if first_heavy is None and any(n.split(".")[0] not in light for n in names):
            first_heavy = node.lineno
    return call, first_heavy


def test_experiment_scripts_restart_before_importing_jax():
    """Every experiment script with a main block restarts itself (huge-page malloc) before
    any import that can load jax, so a run does not import jax twice."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = [p for p in sorted(glob.glob(os.path.join(root, "experiments", "*.py"))
                                 + glob.glob(os.path.join(root, "experiments", "benchmarks",
                                                          "*.py")))
               if '__name__ == "__main__"' in open(p).read()]
    assert len(scripts) >= 20
    for path in scripts:
        call, first_heavy = _script_order(path)
        assert call is not None, f"{path}: no early reexec_with_hugepage_malloc() block"
        assert first_heavy is None or call < first_heavy, (
            f"{path}: line {first_heavy} imports before the restart at line {call}")
