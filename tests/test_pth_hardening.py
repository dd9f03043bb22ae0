"""Hostile and broken .pth files: every one is refused fast, in bounded memory, with a
message that names the file (vtadl_jax.convert.pth and the converters).

Every bad file is written by hand here (zip records, deflate streams and pickle opcodes),
so no torch is needed. Bombs run in a child process under RLIMIT_AS and report their
time and peak-RSS growth.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from vtadl_jax.convert.pth import PthFormatError, UnsafePickleError, load_pth

REPO = Path(__file__).resolve().parents[1]
GiB = 2 ** 30

# -- pickle opcodes, written by hand -----------------------------------------------------


def _int(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(key: str, numel: int, offset: int, size, stride, stype="FloatStorage") -> bytes:
    pid = _tuple([_str("storage"), _global("torch", stype), _str(key), _str("cpu"),
                  _int(numel)]) + b"Q"  # BINPERSID
    args = _tuple([pid, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)),
                   b"\x89", _global("collections", "OrderedDict") + b")R"])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state(entries: dict[str, bytes]) -> bytes:
    """Protocol-2 pickle of {key: <pickled value>} (EMPTY_DICT, MARK, ..., SETITEMS)."""
    return b"\x80\x02}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u."


# -- zip archives, written by hand (so sizes and streams can lie) ------------------------


def _zip(path: Path, records: list[tuple[str, bytes, int, int, int]]) -> Path:
    """records: (name, stored bytes, method (0 stored / 8 deflate), crc, declared size)."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in records:
        offset, raw = len(out), name.encode()
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc, len(data),
                           size, len(raw), 0) + raw + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc,
                               len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records),
                                 len(central), len(out), 0)
    path.write_bytes(bytes(out))
    return path


def _stored(name: str, data: bytes):
    return (name, data, 0, zlib.crc32(data), len(data))


def _zeros_deflate(nbytes: int) -> bytes:
    """A raw deflate stream of ``nbytes`` zeros built from one repeated 1 MiB block
    (after a full flush the compressor's output for the same input repeats)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(2 ** 20)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(2 ** 20)) + c.flush(zlib.Z_FULL_FLUSH)
    assert again == block
    return block * (nbytes // 2 ** 20) + c.flush()


def _checkpoint(path: Path, pkl: bytes, data: dict[str, bytes] | None = None,
                extra: list | None = None) -> Path:
    data = {"0": np.arange(6, dtype="<f4").tobytes()} if data is None else data
    records = [_stored("archive/data.pkl", pkl), _stored("archive/byteorder", b"little")]
    records += [_stored(f"archive/data/{k}", v) for k, v in data.items()]
    return _zip(path, records + (extra or []) + [_stored("archive/version", b"3\n")])


SIX = _state({"w": _tensor("0", 6, 0, (2, 3), (3, 1))})


def test_hand_written_checkpoint_reads(tmp_path):
    # the helpers above write a valid file: the refusals below are about the defect only
    sd = load_pth(_checkpoint(tmp_path / "ok.pth", SIX))
    np.testing.assert_array_equal(sd["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def _refused(path: Path, match: str = "", error=PthFormatError, **kwargs) -> str:
    start = time.process_time()  # CPU time: the work done, whatever the machine's load
    with pytest.raises(error, match=match) as err:
        load_pth(path, **kwargs)
    assert time.process_time() - start < 5
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


# -- bombs: a child process under RLIMIT_AS measures time and peak memory -----------------

_CHILD = r"""
import json, resource, sys, time
from vtadl_jax.convert.pth import load_pth
status = open("/proc/self/status").read()
vm = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * 2 ** 20, resource.RLIM_INFINITY))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()
try:
    load_pth(sys.argv[1])
    error, message = None, ""
except Exception as e:
    error, message = type(e).__name__, str(e)
print(json.dumps({"error": error, "message": message, "seconds": time.process_time() - start,
                  "rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def _run_child(path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bounded(path: Path, match: str) -> dict:
    result = _run_child(path)
    assert result["error"] == "PthFormatError", result
    assert result["message"].startswith(str(path)) and match in result["message"], result
    assert result["seconds"] < 3 and result["rss_mib"] < 64, result
    return result


BOMB = 3 * GiB  # inflated size; the file is ~3 MB


@pytest.fixture(scope="module")
def bomb_stream():
    return _zeros_deflate(BOMB)


def test_zip_bomb_storage_declaring_its_size(tmp_path, bomb_stream):
    # the pickle says 6 floats; the record declares (and inflates to) 3 GiB
    path = _zip(tmp_path / "bomb.pth", [
        _stored("archive/data.pkl", SIX), ("archive/data/0", bomb_stream, 8, 0, BOMB)])
    assert path.stat().st_size < 4 * 2 ** 20
    _bounded(path, f"declares {BOMB} bytes, expected 24")


def test_zip_bomb_consistent_with_the_pickle(tmp_path, bomb_stream):
    # the pickle agrees (3 GiB of floats): refused by the reading limit, before inflating
    pkl = _state({"w": _tensor("0", BOMB // 4, 0, (BOMB // 4,), (1,))})
    path = _zip(tmp_path / "bomb2.pth", [
        _stored("archive/data.pkl", pkl), ("archive/data/0", bomb_stream, 8, 0, BOMB)])
    _bounded(path, "reading limit")


def test_zip_bomb_in_the_pickle_record(tmp_path, bomb_stream):
    path = _zip(tmp_path / "bomb3.pth", [("archive/data.pkl", bomb_stream, 8, 0, BOMB)])
    _bounded(path, "reading limit")


def test_zip_bomb_in_the_byteorder_record(tmp_path, bomb_stream):
    path = _zip(tmp_path / "bomb4.pth", [_stored("archive/data.pkl", SIX),
                                         ("archive/byteorder", bomb_stream, 8, 0, BOMB)])
    _bounded(path, "byteorder")


def test_zip_record_understating_its_size_is_bounded(tmp_path, bomb_stream):
    # declares the 24 bytes the pickle expects, but the stream would inflate to 3 GiB:
    # only 24 (+1) bytes are ever inflated, and the CRC of the claimed record is checked
    path = _zip(tmp_path / "liar.pth", [_stored("archive/data.pkl", SIX),
                                        ("archive/data/0", bomb_stream, 8, 12345, 24)])
    _bounded(path, "corrupt or truncated")


def test_stride_zero_view_of_a_terabyte_is_bounded(tmp_path):
    # shape (1e6, 1e6) with strides (0, 0) over 6 floats: every element is in bounds
    pkl = _state({"w": _tensor("0", 6, 0, (10 ** 6, 10 ** 6), (0, 0))})
    result = _bounded(_checkpoint(tmp_path / "view.pth", pkl), "reading limit")
    assert "(1000000, 1000000)" in result["message"]


def test_overlapping_view_beyond_the_limit(tmp_path):
    # 24 MB of storage viewed as (6e6, 64) with strides (1, 1): 1.5 GB once copied
    n = 6 * 10 ** 6
    pkl = _state({"w": _tensor("0", n, 0, (n - 64, 64), (1, 1))})
    data = {"0": bytes(4 * n)}
    _bounded(_checkpoint(tmp_path / "overlap.pth", pkl, data), "reading limit")


def test_raising_the_limit_reads_a_legitimately_expanded_view(tmp_path):
    pkl = _state({"w": _tensor("0", 6, 0, (1000, 6), (0, 1))})
    path = _checkpoint(tmp_path / "expand.pth", pkl)
    _refused(path, "max_bytes=", max_bytes=10_000)
    np.testing.assert_array_equal(load_pth(path, max_bytes=10 ** 6)["w"],
                                  np.tile(np.arange(6, dtype=np.float32), (1000, 1)))


# -- tensor geometry -----------------------------------------------------------------------

@pytest.mark.parametrize("numel, offset, size, stride, match", [
    (6, 0, (7,), (1,), "reads element 6"),
    (6, 6, (1,), (1,), "reads element 6"),
    (6, 0, (2, 3), (3,), "bad tensor geometry"),
    (6, 0, (3,), (-1,), "bad tensor stride"),
    (6, -1, (3,), (1,), "bad tensor geometry"),
    (6, 0, (-2, 3), (3, 1), "bad tensor size"),
    (6, 0, (1,) * 65, (1,) * 65, "at most 64"),
    (6, 0, (2 ** 62, 2 ** 62), (0, 0), "reading limit"),  # int64 overflow of the numel
], ids=["past_end", "offset_past_end", "stride_rank", "negative_stride", "negative_offset",
        "negative_size", "65_dims", "int64_overflow"])
def test_bad_geometry(tmp_path, numel, offset, size, stride, match):
    pkl = _state({"w": _tensor("0", numel, offset, size, stride)})
    _refused(_checkpoint(tmp_path / "geom.pth", pkl), match)


@pytest.mark.parametrize("value, match", [
    (_global("torch._utils", "_rebuild_tensor_v2") + _tuple([_int(1), _int(0), _tuple([]),
                                                              _tuple([])]) + b"R",
     "not a storage"),
    (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + _tuple([
        _str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(6)])
     + b"Q" + _int(0) + _tuple([b"G@\x00\x00\x00\x00\x00\x00\x00"]) + _tuple([_int(1)])
     + b"tR", "bad tensor size"),  # a float dimension
    (_tuple([_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"),
             _int(-6)]) + b"Q", "persistent id"),
    (_tuple([_str("file"), _str("/etc/passwd")]) + b"Q", "persistent id"),
    (b"Pxyz\n", "persistent id"),
], ids=["int_as_storage", "float_dimension", "negative_numel", "foreign_pid", "text_pid"])
def test_bad_tensor_records(tmp_path, value, match):
    _refused(_checkpoint(tmp_path / "t.pth", _state({"w": value})), match)


# -- zip structure -------------------------------------------------------------------------

def test_missing_data_record(tmp_path):
    _refused(_checkpoint(tmp_path / "m.pth", SIX, data={}), "missing record 'archive/data/0'")


def test_short_data_record(tmp_path):
    _refused(_checkpoint(tmp_path / "s.pth", SIX, data={"0": bytes(20)}),
             "declares 20 bytes, expected 24")


def test_no_pickle_record(tmp_path):
    path = _zip(tmp_path / "nopkl.pth", [_stored("archive/version", b"3\n")])
    _refused(path, "no '<archive>/data.pkl'")


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_zip(tmp_path, cut):
    raw = _checkpoint(tmp_path / "full.pth", SIX).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(raw[: int(len(raw) * cut)])
    _refused(path, "corrupt or truncated")


def test_encrypted_record(tmp_path):
    raw = bytearray(_checkpoint(tmp_path / "c.pth", SIX).read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 8] |= 1  # the "encrypted" flag of the first record
    path = tmp_path / "enc.pth"
    path.write_bytes(bytes(raw))
    _refused(path, "corrupt or truncated")


def test_storage_used_with_two_sizes(tmp_path):
    pkl = _state({"a": _tensor("0", 6, 0, (6,), (1,)), "b": _tensor("0", 5, 0, (5,), (1,))})
    _refused(_checkpoint(tmp_path / "two.pth", pkl), "two types/sizes")


# -- pickle amplification, depth and disallowed globals -----------------------------------

def _laughs(levels: int, container: str = "list") -> bytes:
    """x0 = 0; x(i+1) = [xi, xi] (memoised), ``levels`` times: 2**levels leaves."""
    out = b"K\x00"
    for i in range(levels):
        out += b"q" + bytes([i % 256]) + b"0"  # BINPUT, POP
        pair = b"h" + bytes([i % 256]) + b"h" + bytes([i % 256])  # BINGET twice
        out += {"list": b"]" + b"(" + pair + b"e",  # EMPTY_LIST, MARK, ..., APPENDS
                "tuple": pair + b"\x86",  # TUPLE2
                "dict": b"}(" + _str("a") + b"h" + bytes([i % 256]) + _str("b")
                + b"h" + bytes([i % 256]) + b"u"}[container]
    return out


@pytest.mark.parametrize("container", ["list", "tuple", "dict"])
def test_billion_laughs_value(tmp_path, container):
    pkl = b"\x80\x02}(" + _str("w") + _laughs(60, container) + b"u."
    path = _checkpoint(tmp_path / "laughs.pth", pkl)
    assert path.stat().st_size < 2000
    _refused(path, "not a state dict")


def test_billion_laughs_key_is_not_hashed(tmp_path):
    pkl = b"\x80\x02}(" + _laughs(60, "tuple") + _int(1) + b"u."
    _refused(_checkpoint(tmp_path / "key.pth", pkl), "not a flat value")


def test_quadratic_build_is_cut_off(tmp_path):
    # one memoised 20000-entry dict applied as the state of 20000 OrderedDicts: 4e8 copies
    # from a 400 kB pickle
    n = 20000
    state = b"}q\x00(" + b"".join(_str(f"k{i}") + b"N" for i in range(n)) + b"u"
    new = _global("collections", "OrderedDict") + b")R" + b"h\x00b0"  # BINGET, BUILD, POP
    pkl = b"\x80\x02" + state + b"0" + b"]q\x01" + new * n + b"h\x01."
    _refused(_checkpoint(tmp_path / "quad.pth", pkl), "more work")


def test_deep_nesting_no_recursion_error(tmp_path):
    depth = 200_000
    deep = b"N" + b"\x85" * depth  # TUPLE1 of TUPLE1 of ... of None
    _refused(_checkpoint(tmp_path / "deep.pth", b"\x80\x02" + deep + b"."), "got tuple")
    nested = b"\x80\x02" + b"}(" + _str("w") + (b"}(" + _str("a")) * depth + b"N" \
        + b"u" * depth + b"u."
    _refused(_checkpoint(tmp_path / "deep2.pth", nested), "not a state dict")


@pytest.mark.parametrize("payload, match", [
    (pickle.dumps(os.system, protocol=2), "posix.system"),
    (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93."
     , "builtins.eval"),
    (_global("numpy", "ndarray") + _tuple([_tuple([_int(10 ** 6), _int(10 ** 6)])]) + b"R.",
     "calls numpy.ndarray"),  # calling numpy.ndarray directly: a 1e12-element array
    (_global("torch", "device") + _tuple([_laughs(60, "tuple")]) + b"R.", "torch.device"),
], ids=["os_system", "builtins_eval", "ndarray_call", "device_of_laughs"])
def test_disallowed_globals_and_calls(tmp_path, payload, match):
    if not payload.startswith(b"\x80"):
        payload = b"\x80\x02" + payload
    error = UnsafePickleError if match in ("posix.system", "builtins.eval") else PthFormatError
    _refused(_checkpoint(tmp_path / "evil.pth", payload), match, error=error)


@pytest.mark.parametrize("top", [b"]", b"K\x07", b"N", _str("weights"), _tuple([_int(1)])],
                         ids=["list", "int", "none", "str", "tuple"])
def test_non_dict_top_level(tmp_path, top):
    _refused(_checkpoint(tmp_path / "top.pth", b"\x80\x02" + top + b"."), "dict-like")


def test_non_str_key_in_state_dict(tmp_path):
    pkl = b"\x80\x02}(" + _int(3) + _tensor("0", 6, 0, (6,), (1,)) + b"u."
    _refused(_checkpoint(tmp_path / "intkey.pth", pkl), "str key -> tensor")


# -- legacy format and file kinds ----------------------------------------------------------

def _legacy(path: Path, obj: bytes, keys: bytes, tail: bytes) -> Path:
    head = b"".join(pickle.dumps(x, protocol=2) for x in
                    (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(head + obj + keys + tail)
    return path


def test_legacy_huge_storage_count_is_bounded(tmp_path):
    obj = _state({"w": _tensor("0", 6, 0, (6,), (1,))})
    keys = b"\x80\x02]" + _str("0") + b"a."
    path = _legacy(tmp_path / "legacy.pth", obj, keys, struct.pack("<q", 2 ** 62) + bytes(24))
    _refused(path, "truncated or inconsistent")
    ok = _legacy(tmp_path / "ok.pth", obj, keys, struct.pack("<q", 6) + bytes(24))
    np.testing.assert_array_equal(load_pth(ok)["w"], np.zeros(6, np.float32))
    huge = _state({"w": _tensor("0", 2 ** 40, 0, (6,), (1,))})
    _refused(_legacy(tmp_path / "huge.pth", huge, keys, struct.pack("<q", 2 ** 40)),
             "truncated or inconsistent")


def test_legacy_missing_key_list_and_bad_magic(tmp_path):
    obj = _state({"w": _tensor("0", 6, 0, (6,), (1,))})
    _refused(_legacy(tmp_path / "nokeys.pth", obj, b"\x80\x02]." , b""), "not in the key list")
    bad = tmp_path / "magic.pth"
    bad.write_bytes(pickle.dumps(12345, protocol=2) + pickle.dumps(1001, protocol=2))
    _refused(bad, "not a PyTorch checkpoint")


def test_directory_missing_file_and_fifo(tmp_path):
    _refused(tmp_path, "is a directory")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.pth")):
        load_pth(tmp_path / "absent.pth")
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")  # checked before opening (which would block)


def test_converters_name_the_file(tmp_path):
    from vtadl_jax.convert.contnet import CheckpointMismatchError, load_contnet_pth
    from vtadl_jax.convert.efficientnet_lite import load_efficientnet_lite0

    path = _checkpoint(tmp_path / "other.pth", SIX)
    for loader, match in ((load_contnet_pth, "not a ConTNet"),
                          (load_efficientnet_lite0, "not a EfficientNetLite0")):
        with pytest.raises(CheckpointMismatchError, match=match) as err:
            loader(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# -- through the command line: exit status 2 and one line naming the file ------------------

CONFIG = str(REPO / "experiments" / "configs" / "patch_gaussian_synthetic.py") + ":object"


@pytest.mark.parametrize("case", ["directory", "bomb", "not_contnet", "not_lite0", "view"])
def test_cli_fit_with_bad_weights_exits_2(tmp_path, capsys, case, bomb_stream):
    from vtadl_jax import cli

    name = "contnet_b" if case == "not_contnet" else "efficientnet_lite0"
    if case == "directory":
        weights, needle = tmp_path, "is a directory"
    elif case == "bomb":
        weights = _zip(tmp_path / "bomb.pth", [
            _stored("archive/data.pkl", SIX), ("archive/data/0", bomb_stream, 8, 0, BOMB)])
        needle = "expected 24"
    elif case == "view":
        pkl = _state({"w": _tensor("0", 6, 0, (10 ** 6, 10 ** 6), (0, 0))})
        weights, needle = _checkpoint(tmp_path / "view.pth", pkl), "reading limit"
    else:
        weights = _checkpoint(tmp_path / "other.pth", SIX)
        needle = "not a ConTNet" if case == "not_contnet" else "not a EfficientNetLite0"
    code = cli.main(["fit", "--config", CONFIG, "--workdir", str(tmp_path / "run"),
                     f"data.root={tmp_path / 'no_data'}", f"backbone.name={name}",
                     f"backbone.weights={weights}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {weights}" in err and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bytearray_declaring_terabytes_is_bounded(tmp_path):
    pkl = b"\x80\x05\x96" + struct.pack("<Q", 2 ** 40) + b"abc."  # BYTEARRAY8
    _refused(_checkpoint(tmp_path / "ba.pth", pkl), "reading limit")


def test_plain_python_and_numpy_values_still_load(tmp_path):
    # what training scripts put next to the weights: the restrictions must not refuse it
    import argparse

    meta = {"epoch": 3, "args": argparse.Namespace(lr=0.1, name="b"), "acc": np.float64(0.5),
            "hist": np.arange(4.0), "ids": {(1, "a"): [1.5, None], 2: b"\x00\xff"}}
    pkl = pickle.dumps(meta, protocol=2)[:-1]  # drop STOP: add a tensor under "w"
    pkl += _str("w") + _tensor("0", 6, 0, (6,), (1,)) + b"s."  # SETITEM, STOP
    from vtadl_jax.convert.pth import read_pth

    got = read_pth(_checkpoint(tmp_path / "meta.pth", pkl))
    assert got["epoch"] == 3 and vars(got["args"]) == {"lr": 0.1, "name": "b"}
    assert got["acc"] == 0.5 and type(got["acc"]) is np.float64
    np.testing.assert_array_equal(got["hist"], np.arange(4.0))
    assert got["ids"] == {(1, "a"): [1.5, None], 2: b"\x00\xff"}
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32))


def test_limit_environment_variable(tmp_path, monkeypatch):
    pkl = _state({"w": _tensor("0", 6, 0, (1000, 6), (0, 1))})  # 24 kB once expanded
    path = _checkpoint(tmp_path / "expand.pth", pkl)
    monkeypatch.setenv("VTADL_MAX_CHECKPOINT_BYTES", "10000")
    _refused(path, "VTADL_MAX_CHECKPOINT_BYTES")
    monkeypatch.setenv("VTADL_MAX_CHECKPOINT_BYTES", "100000")
    assert load_pth(path)["w"].shape == (1000, 6)
    monkeypatch.setenv("VTADL_MAX_CHECKPOINT_BYTES", "-1")
    with pytest.raises(ValueError, match="VTADL_MAX_CHECKPOINT_BYTES must be a positive"):
        load_pth(path)
