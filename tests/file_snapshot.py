"""`snapshot(path)`: {relative path: bytes} of every file under a folder, to assert that a
failed command changed nothing already written (shared by the hardening tests)."""
import os


def snapshot(path) -> dict:
    """{relative path: bytes} of every file under `path` (empty if it does not exist)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out
