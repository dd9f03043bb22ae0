"""From anomaly scores to decisions: thresholds, normalised scores, their file.

A model's raw scores (a Mahalanobis distance, a negative log-likelihood) have a scale
of their own. Calibration picks an image threshold and a pixel threshold and a spread
for each, stored beside the model in `<workdir>/thresholds.json`. An image (a pixel) is
predicted anomalous when its score (map value) is >= the threshold, the convention of
`vtadl_jax.metrics`.

Three ways to calibrate (`mode` in the file):

- "f1_max_test": labelled images. The image threshold is the F1-max threshold of the
  image scores against the labels; the pixel threshold is the F1-max threshold of all
  pixels' map values against the masks (`metrics.f1_max`: every distinct score is a
  candidate; the one with the largest F1, the lowest of equal ones).
- "normal_fpr": normal images only, and a target false-positive rate `fpr` in (0, 1).
  Rule (`fpr_threshold`): with the n calibration scores sorted, s_(1) <= ... <= s_(n),
  and k = floor(fpr * n) the number of false positives allowed, the threshold is the
  smallest float t with #{s >= t} <= k, i.e. the next float above s_(n-k) (in the
  values' dtype: float32 for maps, whose comparisons NumPy does in float32). So the
  calibration set's false-positive rate is at most `fpr`, and no lower threshold keeps
  it so. With fewer than 1 / fpr images k = 0: t lies just above the highest normal
  score. The pixel threshold is the same rule applied to every pixel of the normal
  images' maps (the pixel false-positive rate on normal images is at most `fpr`).
- "user": thresholds given by the user.

Normalised scores (`normalise`): u = 1 / (1 + exp(-(s - t) / scale)), so that the
threshold maps to 0.5, the order of the scores (hence AUROC) is kept, and values lie in
(0, 1). `scale` is the standard deviation of the normal calibration values (normal
images' scores; normal pixels' map values), so one standard deviation of normal
variation above the threshold gives 0.73, below it 0.27, whatever the model's raw units
(and 0.9975 at six: clearly anomalous images saturate near 1). When all normal values
are equal there is no scale, and no normalised score.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from vtadl_jax import metrics, records

FILE_NAME = "thresholds.json"
MODES = ("f1_max_test", "normal_fpr", "user")
NORMALISATION = "1 / (1 + exp(-(s - threshold) / scale))"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of one model (None where not calibrated) and their spreads."""

    mode: str
    image_threshold: float | None
    pixel_threshold: float | None
    image_scale: float | None = None
    pixel_scale: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "normalisation": NORMALISATION,
                "rule": "anomalous when score >= threshold"}


def check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:  # also rejects NaN
        raise ValueError(f"--fpr: expected a false-positive rate strictly between 0 and 1 "
                         f"(e.g. 0.01), got {fpr!r}")
    return fpr


def _values(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what}: no values to calibrate on (expected at least one normal image)")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a


def fpr_threshold(normal_scores: Any, fpr: float) -> float:
    """The smallest t with #{s >= t} <= floor(fpr * n) over the n normal scores."""
    fpr = check_fpr(fpr)
    s = _values(normal_scores, "normal scores")
    n = s.size
    allowed = math.floor(fpr * n)  # < n because fpr < 1
    kth = np.partition(s, n - allowed - 1)[n - allowed - 1]  # s_(n-k), 1-based
    # The next float of the values' own dtype: NumPy compares float32 maps with a Python
    # float in float32, where the next float64 above s_(n-k) would round back onto it.
    return float(np.nextafter(kth, np.array(np.inf, dtype=kth.dtype)))


def spread(normal_values: Any, what: str) -> float | None:
    """Standard deviation of normal values: the scale of the normalisation; None when
    all are equal (one normal image, say): then no normalised scores are given."""
    v = _values(normal_values, what).astype(np.float64)
    scale = float(v.std())
    return scale if scale > 0 else None


def normalise(values: Any, threshold: float, scale: float) -> np.ndarray:
    """The logistic 1 / (1 + exp(-(v - threshold) / scale)): threshold -> 0.5."""
    z = (np.asarray(values, np.float64) - threshold) / scale
    # exp(-|z|) never overflows; the two branches are the same function.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def from_labelled(scores: Any, labels: Any, maps: Any | None = None,
                  masks: Any | None = None, **details) -> Thresholds:
    """Mode "f1_max_test": F1-max thresholds of labelled images (and pixels)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if not 0 < labels.sum() < labels.size:
        raise ValueError("calibration from labelled images needs both normal and anomalous "
                         f"images; got {int(labels.sum())} anomalous of {labels.size}")
    image_t = float(metrics.f1_max(scores, labels)[1])
    image_scale = spread(scores[~labels], "normal images' scores")
    pixel_t = pixel_scale = None
    if maps is not None and masks is not None:
        maps, masks = np.asarray(maps), np.asarray(masks) > 0
        if masks.any() and not masks.all():
            pixel_t = float(metrics.f1_max(maps, masks)[1])
            pixel_scale = spread(maps[~masks], "normal pixels' map values")
    return Thresholds("f1_max_test", image_t, pixel_t, image_scale, pixel_scale,
                      {"num_images": int(labels.size), "num_anomalous": int(labels.sum()),
                       **details})


def from_normal(scores: Any, maps: Any | None, fpr: float, **details) -> Thresholds:
    """Mode "normal_fpr": the FPR rule on normal images' scores and map values."""
    fpr = check_fpr(fpr)
    scores = _values(scores, "normal images' scores")
    pixel_t = pixel_scale = None
    if maps is not None:
        pixel_t = fpr_threshold(maps, fpr)
        pixel_scale = spread(maps, "normal pixels' map values")
    return Thresholds("normal_fpr", fpr_threshold(scores, fpr), pixel_t,
                      spread(scores, "normal images' scores"), pixel_scale,
                      {"fpr": fpr, "num_images": int(scores.size), **details})


def from_user(image_threshold: float | None, pixel_threshold: float | None,
              previous: Thresholds | None = None, normal: Thresholds | None = None,
              **details) -> Thresholds:
    """Mode "user": given thresholds; a missing one and the scales are kept from
    `normal` (a calibration on normal images) or else `previous` (the stored one)."""
    if image_threshold is None and pixel_threshold is None:
        raise ValueError("give --image-threshold and/or --pixel-threshold")
    for name, value in (("--image-threshold", image_threshold),
                        ("--pixel-threshold", pixel_threshold)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    base = normal or previous
    get = lambda field: getattr(base, field) if base else None  # noqa: E731
    return Thresholds(
        "user", image_threshold if image_threshold is not None else get("image_threshold"),
        pixel_threshold if pixel_threshold is not None else get("pixel_threshold"),
        get("image_scale"), get("pixel_scale"),
        {"scales_from": base.mode if base else None, **details})


def path(workdir: str) -> str:
    return os.path.join(workdir, FILE_NAME)


def save(workdir: str, thresholds: Thresholds) -> str:
    """Write `<workdir>/thresholds.json` atomically."""
    if thresholds.mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {thresholds.mode!r}")
    record = thresholds.to_json()
    record["details"] = {**record["details"], "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime())}
    records.write_json_atomic(record, path(workdir))
    return path(workdir)


def load(workdir: str) -> Thresholds | None:
    """The stored thresholds, or None for a model saved without them."""
    file = path(workdir)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            raw = json.load(f)
        fields = {f.name for f in dataclasses.fields(Thresholds)}
        thresholds = Thresholds(**{k: v for k, v in raw.items() if k in fields})
    except (ValueError, TypeError) as err:
        raise ValueError(f"{file}: not a thresholds file ({err}); recreate it with "
                         "`vtadl-jax calibrate`") from err
    if thresholds.mode not in MODES:
        raise ValueError(f"{file}: mode {thresholds.mode!r} is not one of {MODES}")
    return thresholds


def discard(workdir: str) -> None:
    """Remove stored thresholds (they belong to a model that is being replaced)."""
    if os.path.isfile(path(workdir)):
        os.remove(path(workdir))
