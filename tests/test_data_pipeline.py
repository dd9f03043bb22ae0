"""Batches (determinism, resume, sharding), whole-split arrays, and preprocessing."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from vtadl_jax.data import DatasetError, batches, load_arrays, num_batches, preset
from vtadl_jax.data.sources import ArrayReader, Source


def _toy_source(n: int = 10, size: int = 4) -> Source:
    images = np.stack([np.full((size, size), i, np.uint8) for i in range(n)])
    reader = ArrayReader(images, np.arange(n) % 2, [f"d{i % 3}" for i in range(n)],
                         [f"img_{i:02d}" for i in range(n)])
    return Source(reader, preset("none", scale="zero_one"), name="toy", split="train",
                  backend="direct")


def _ids(batch) -> list[int]:
    return [int(name[4:]) for name in np.asarray(batch["filename"]).reshape(-1)]


def test_batch_contents_and_types() -> None:
    src = _toy_source()
    batch = next(batches(src, 4, seed=1))
    assert batch["image"].shape == (4, 4, 4, 1) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (4, 4, 4) and batch["mask"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["filename"].dtype == object
    for k, i in enumerate(_ids(batch)):
        assert batch["image"][k, 0, 0, 0] == np.float32(i / 255.0)
        assert batch["label"][k] == i % 2 and batch["defect"][k] == f"d{i % 3}"


def test_deterministic_order_and_epochs_are_permutations() -> None:
    src = _toy_source(12)
    run = lambda seed: [_ids(b) for b in batches(src, 4, seed=seed, epochs=3)]  # noqa: E731
    first = run(0)
    assert first == run(0) and first != run(1) and len(first) == 9
    for epoch in range(3):
        assert sorted(sum(first[3 * epoch:3 * epoch + 3], [])) == list(range(12))
    assert first[:3] != first[3:6]  # a new order every epoch
    assert [_ids(b) for b in batches(src, 4, shuffle=False, epochs=1)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_resume_at_any_step_matches_uninterrupted_stream() -> None:
    src = _toy_source(10)
    full = [_ids(b) for b in batches(src, 3, seed=7, epochs=4)]  # 3 batches per epoch
    assert len(full) == 12
    for start in (1, 3, 5, 11):
        resumed = [_ids(b) for b in batches(src, 3, seed=7, epochs=4, start_step=start)]
        assert resumed == full[start:]
    infinite = batches(src, 3, seed=7, start_step=4)
    assert [_ids(b) for b in itertools.islice(infinite, 5)] == full[4:9]


def test_device_axes_and_process_slices() -> None:
    src = _toy_source(16)
    glob = next(batches(src, 8, seed=2))
    sharded = next(batches(src, 8, seed=2, num_devices=4))
    assert sharded["image"].shape == (4, 2, 4, 4, 1) and sharded["filename"].shape == (4, 2)
    assert sharded["label"].shape == (4, 2)
    assert _ids(sharded) == _ids(glob)
    parts = [next(batches(src, 8, seed=2, process_index=p, process_count=2, num_devices=2))
             for p in range(2)]
    assert all(p["image"].shape == (2, 2, 4, 4, 1) for p in parts)
    assert _ids(parts[0]) + _ids(parts[1]) == _ids(glob)


def test_divisibility_and_size_errors() -> None:
    src = _toy_source(10)
    with pytest.raises(ValueError, match="not divisible by num_devices 4"):
        next(batches(src, 6, num_devices=4))
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        next(batches(src, 6, process_count=4, process_index=1))
    with pytest.raises(ValueError, match="process_index"):
        next(batches(src, 6, process_count=2, process_index=2))
    with pytest.raises(DatasetError, match="fewer than one batch of 16"):
        next(batches(src, 16))


def test_no_drop_remainder_pads_and_marks_valid() -> None:
    src = _toy_source(10)
    assert num_batches(10, 4, drop_remainder=False) == 3 and num_batches(10, 4) == 2
    out = list(batches(src, 4, shuffle=False, drop_remainder=False, epochs=1, num_devices=2))
    assert len(out) == 3
    assert out[-1]["valid"].tolist() == [[True, True], [False, False]]
    assert _ids(out[-1]) == [8, 9, 9, 9]
    assert all(b["valid"].all() for b in out[:-1])


def test_load_arrays_in_order() -> None:
    arrays = load_arrays(_toy_source(5))
    assert arrays["image"].shape == (5, 4, 4, 1)
    assert arrays["filename"].tolist() == [f"img_{i:02d}" for i in range(5)]
    assert arrays["label"].tolist() == [0, 1, 0, 1, 0]


def test_preset_vtadl_mvtec_matches_pil_reference() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(600, 600, 3), dtype=np.uint8)
    img[0, 0] = 0
    mask = np.zeros((600, 600), np.uint8)
    mask[100:103, 200:400] = 1
    p = preset("vtadl_mvtec")
    out_img, out_mask = p(img, mask)
    ref = np.asarray(Image.fromarray(img).resize((550, 550), Image.Resampling.BILINEAR))
    ref = ref[19:531, 19:531].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(out_img, ref)
    assert out_img.shape == (512, 512, 3) and out_mask.shape == (512, 512)
    assert set(np.unique(out_mask)) == {0, 1}
    ref_mask = np.asarray(Image.fromarray(mask * 255).resize((550, 550),
                                                             Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out_mask, (ref_mask[19:531, 19:531] > 0).astype(np.uint8))


def test_presets_sizes_scales_channels() -> None:
    small = preset("vtadl_mvtec", size=128)
    assert small.resize == (138, 138) and small.crop == (128, 128)
    assert preset("vtadl_btad", size=64).output_size(600, 800) == (64, 64)
    assert preset("patch_gaussian").resize == (224, 224)
    grey = np.zeros((30, 30, 1), np.uint8)
    grey[:, :15] = 255
    img = preset("patch_gaussian", size=30)(grey, np.zeros((30, 30), np.uint8))[0]
    assert img.shape == (30, 30, 3)
    np.testing.assert_allclose(img[0, 0], (1 - np.array([0.485, 0.456, 0.406])) /
                               np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    ends = preset("vtadl_btad", size=30)(grey, grey[..., 0])[0]
    assert ends.min() == -1.0 and ends.max() == 1.0 and ends.shape == (30, 30, 3)
    zero_one = preset("vtadl_btad", size=30, scale="zero_one")(grey, grey[..., 0])[0]
    assert zero_one.min() == 0.0 and zero_one.max() == 1.0
    digit = np.full((28, 28, 1), 255, np.uint8)
    padded = preset("mnist", size=32)(digit, np.zeros((28, 28), np.uint8))
    assert padded[0].shape == (32, 32, 1) and padded[1].shape == (32, 32)
    assert padded[0][0, 0, 0] == -1.0 and padded[0][2, 2, 0] == 1.0
    with pytest.raises(ValueError, match="Unknown preset"):
        preset("vtadl_mnist")
    with pytest.raises(ValueError, match="even"):
        preset("mnist", size=31)
