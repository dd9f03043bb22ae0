"""Hostile and broken image files: decompression bombs are refused from the header
(bounded time and memory), every decode failure names the file, and the CLI exits 2.

Bad files are written by hand here (PNG chunks, zlib streams); the reference for the good
ones is what the test itself wrote.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtadl_jax import cli
from vtadl_jax.data import (DatasetError, ImageTooLargeError, InvalidImageError,
                            InvalidMaskError, MissingDataError, load_image, load_mask,
                            make_synthetic_mvtec, scan_folder, verify_records)
from vtadl_jax.data.image_files import image_size

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "configs" / "patch_gaussian_synthetic.py") + ":object"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, *, bit_depth: int = 1, colour: int = 0,
         idat: bytes | None = None) -> bytes:
    """A PNG of zeros, written chunk by chunk (grey, 1 bit per pixel by default)."""
    if idat is None:
        row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte + packed pixels
        c = zlib.compressobj(9)
        idat = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """30000 x 30000 pixels (900 M) in ~110 kB: the red-team file."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png(30000, 30000))
    assert path.stat().st_size < 200_000
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_synthetic_mvtec(tmp_path / "syn", categories=("object",), num_train=2,
                                num_test_good=1, num_test_defect=1, image_size=32) / "object"


_CHILD = r"""
import json, resource, sys, time
from vtadl_jax.data import scan_folder, verify_records
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2 ** 20, resource.RLIM_INFINITY))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()
try:
    verify_records(scan_folder(sys.argv[1])["train"])
    error, message = None, ""
except Exception as e:
    error, message = type(e).__name__, str(e)
print(json.dumps({"error": error, "message": message, "seconds": time.process_time() - start,
                  "rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def test_bomb_in_train_good_is_refused_in_bounded_time_and_memory(folder, bomb):
    target = folder / "train" / "good" / "001.png"
    target.write_bytes(bomb.read_bytes())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("VTADL_MAX_IMAGE_PIXELS", None)
    out = subprocess.run([sys.executable, "-W", "error", "-c", _CHILD, str(folder)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] == "ImageTooLargeError", result
    for needle in (str(target), "900000000 pixels", "VTADL_MAX_IMAGE_PIXELS"):
        assert needle in result["message"], result
    assert result["seconds"] < 2 and result["rss_mib"] < 32, result


@pytest.mark.parametrize("reader", [load_image, load_mask, image_size])
def test_every_reader_refuses_the_bomb(bomb, reader):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageTooLargeError, match=str(bomb)):
            reader(bomb)


def test_bomb_below_pils_own_error_threshold(tmp_path):
    # 10000 x 10000 = 1e8 pixels: PIL only warns (limit 89 M, error at 179 M); we refuse
    path = tmp_path / "big.png"
    path.write_bytes(_png(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError, match=r"10000 x 10000 = 100000000 pixels"):
            load_image(path)


def test_limit_argument_and_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((200, 300), 7, np.uint8)).save(path)
    with pytest.raises(ImageTooLargeError, match="limit of 59999"):
        load_image(path, max_image_pixels=59_999)
    assert load_image(path, max_image_pixels=60_000).shape == (200, 300, 3)
    monkeypatch.setenv("VTADL_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageTooLargeError, match="limit of 1000"):
        verify_records(_records_of(path))
    assert load_image(path, max_image_pixels=60_000).shape == (200, 300, 3)  # arg wins
    monkeypatch.setenv("VTADL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DatasetError, match="VTADL_MAX_IMAGE_PIXELS must be a positive"):
        load_image(path)


def _records_of(path: Path):
    root = path.parent / "ds"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    for split in ("train", "test"):
        (root / split / "good" / "a.png").write_bytes(path.read_bytes())
    return scan_folder(root)["train"]


def test_raising_the_limit_past_pils_threshold(bomb, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    assert image_size(bomb, max_image_pixels=10 ** 9) == (30000, 30000)  # header only


def _truncated_png(path: Path) -> None:
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
                    ).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])


def _bad_crc(path: Path) -> None:
    raw = bytearray(_png(8, 8))
    raw[29] ^= 0xFF  # inside the IHDR CRC
    path.write_bytes(bytes(raw))


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
                    ).save(path, format="JPEG")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


BROKEN_FILES = {
    "truncated.png": _truncated_png,
    "text.png": lambda p: p.write_bytes(b"not an image at all\n" * 10),
    "empty.png": lambda p: p.write_bytes(b""),
    "zero_width.png": lambda p: p.write_bytes(_png(0, 8, idat=zlib.compress(b""))),
    "bad_crc.png": _bad_crc,
    "truncated.jpg": _truncated_jpeg,
    "header_only.tiff": lambda p: p.write_bytes(b"II*\x00\x08\x00\x00\x00\xff\xff"),
    "bogus.bmp": lambda p: p.write_bytes(b"BM" + b"\xff" * 60),
    "a_directory.png": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
@pytest.mark.parametrize("reader", [load_image, load_mask, image_size])
def test_decode_failures_name_the_file(tmp_path, name, reader):
    path = tmp_path / name
    BROKEN_FILES[name](path)
    if reader is image_size and name in ("truncated.png", "truncated.jpg"):
        assert image_size(path) == (64, 64)  # the header is intact
        return
    with pytest.raises(InvalidImageError) as err:
        reader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(MissingDataError, match=str(tmp_path / "absent.png")):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize("name, write, match", [
    ("m16.png", lambda p: Image.fromarray(np.array([[0, 65535]], np.uint16)).save(p),
     "values {0, 65535}"),
    ("red.png", lambda p: _palette(p, [(0, 0, 0), (255, 0, 0)]), "not binary"),
    ("grey.png", lambda p: Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(p),
     "not binary"),
    ("float.tiff", lambda p: Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(p),
     "not binary"),
    ("rgb.png", lambda p: Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(p), None),
], ids=["16_bit", "red_palette", "grey", "float", "rgb"])
def test_mask_modes_name_the_file(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    if match is None:  # colour masks are read as grey
        np.testing.assert_array_equal(load_mask(path), np.zeros((2, 2), np.uint8))
        return
    with pytest.raises(InvalidMaskError, match=match) as err:
        load_mask(path)
    assert str(path) in str(err.value)


def _palette(path: Path, colours) -> None:
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([c for rgb in colours for c in rgb])
    img.save(path)


def test_palette_and_16_bit_images_decode(tmp_path):
    # the accepted modes give what was written: a black/white palette mask, 16-bit grey
    _palette(tmp_path / "m.png", [(0, 0, 0), (255, 255, 255)])
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), [[0, 1], [1, 0]])
    grey16 = np.array([[0, 256, 65535]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", channels=1)[..., 0],
                                  grey16 >> 8)


def test_cli_fit_on_a_folder_with_a_bomb_exits_2(folder, bomb, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.delenv("VTADL_MAX_IMAGE_PIXELS", raising=False)
    target = folder / "train" / "good" / "000.png"
    target.write_bytes(bomb.read_bytes())
    code = cli.main(["fit", "--config", CONFIG, "--workdir", str(tmp_path / "run"),
                     f"data.root={folder}", "data.backend=direct", "data.image_size=32",
                     "backbone.weights=random"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(target) in err and "VTADL_MAX_IMAGE_PIXELS" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- MNIST idx files: the header bounds what is inflated ------------------------------------

def _gzip_bomb(head: bytes, zeros: int) -> bytes:
    """gzip member of ``head`` + ``zeros`` zero bytes, from a repeated 1 MiB deflate block
    (no trailer: a reader that stops at the declared size never needs it)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(2 ** 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + first + block * (zeros >> 20)


def test_idx_gzip_bomb_reads_only_what_the_header_declares(tmp_path):
    from vtadl_jax.data import read_idx

    head = struct.pack(">IIII", 0x0803, 1000, 28, 28)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_bomb(head, 2 ** 30))  # 1 GiB of zeros in ~1 MB
    assert path.stat().st_size < 2 * 2 ** 20
    with pytest.raises(DatasetError, match=rf"{path} has 784017\+ bytes inflated"):
        read_idx(path)
    huge = tmp_path / "huge-images-idx3-ubyte"
    huge.write_bytes(struct.pack(">IIII", 0x0803, 2 ** 30, 2 ** 10, 2 ** 10))
    with pytest.raises(DatasetError, match=f"{huge}: its header .* expected at most"):
        read_idx(huge)
    with pytest.raises(DatasetError, match=f"idx file {tmp_path} is not a regular file"):
        read_idx(tmp_path)
