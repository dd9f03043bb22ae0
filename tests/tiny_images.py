"""`smooth_disc_images(n)`: the tiny VT-ADL tests' training images (shared by test_train
and test_mixed_precision)."""
import numpy as np


def smooth_disc_images(n: int = 32) -> np.ndarray:
    """n smooth 32x32x3 images in [-1, 1]: a disc on a colour gradient, varying per image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float64)
        col = rng.uniform(-0.6, 0.6, 3)
        out.append(np.clip(0.5 * (xx - yy)[..., None] + col + 0.6 * disc[..., None], -1, 1))
    return np.asarray(out, np.float32)
