"""VT-ADL test-time scores: per-patch NLL, anomaly maps and image scores.

Mishra et al. 2021 (VT-ADL). For test images (no noise, BatchNorm running statistics):

- patch NLL on the patch grid (B, gh, gw): the mixture NLL of every patch embedding
  under its own predicted mixture (``head="vtadl_code"``: the code's per-patch
  Jensen-bound value);
- anomaly map (B, H, W): the patch NLL bilinearly up-sampled to the image size
  (``align_corners=True`` as the code's ``UpsamplingBilinear2d``; False as an option)
  then Gaussian-smoothed (sigma 4, truncate 4, reflect border as
  ``scipy.ndimage.gaussian_filter``; ``map_sigma=0`` disables);
- image score: ``"default"`` MSE + (1 - SSIM) + max patch NLL; ``"vtadl_code"`` the
  code's MSE + SSIM + max patch NLL (its ``loss1 - loss2`` with ``loss2 = -SSIM``);
  ``"reconstruction"`` MSE + (1 - SSIM), the paper's MNIST score.
MSE and SSIM are per image (mean over pixels; SSIM window 11, sigma 1.5, "same").

``nll_normalization="per_position"`` (a DEVIATION from paper and code, default "none"):
before the map and the max, the patch NLL at grid position (i, j) is standardised,
(nll - mean_ij) / std_ij, with the mean and standard deviation of that position's NLL
over the training images (``position_statistics``). The patch embeddings carry the
position embedding, so the NLL's level can depend on the position more than on the
content (measured on real MVTec AD bottle: experiments/ablate_vtadl_bottle.py); the
standardisation compares each patch only with the same position in normal images.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtadl_jax.kernels.filters import gaussian_blur, resize_bilinear
from vtadl_jax.kernels.ssim import ssim
from vtadl_jax.models.mdn import patch_nll
from vtadl_jax.train.step import ssim_window

SCORE_FORMS = ("default", "vtadl_code", "reconstruction")
NLL_NORMALIZATIONS = ("none", "per_position")
STD_EPS = 1e-6  # added to the per-position std (positions whose NLL never varies)


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """Test-time options (hashable, static under jit)."""

    map_sigma: float = 4.0
    map_truncate: float = 4.0
    align_corners: bool = True
    score_form: Literal["default", "vtadl_code", "reconstruction"] = "default"
    ssim_max_val: float = 2.0  # 2 for [-1, 1] images, 1 for [0, 1]
    ssim_filter_size: int = 11
    ssim_sigma: float = 1.5
    k_chunk: int | None = None
    nll_normalization: Literal["none", "per_position"] = "none"


def anomaly_map(patch_nll_grid: jax.Array, size: tuple[int, int], *,
                align_corners: bool = True, sigma: float = 4.0,
                truncate: float = 4.0) -> jax.Array:
    """(B, gh, gw) patch scores -> (B, H, W): bilinear up-sampling, then Gaussian blur."""
    m = resize_bilinear(patch_nll_grid, size, align_corners=align_corners)
    return gaussian_blur(m, sigma, truncate=truncate) if sigma and sigma > 0 else m


def image_score(mse: jax.Array, ssim_value: jax.Array, max_nll: jax.Array,
                form: str = "default") -> jax.Array:
    """Image scores (B,) from per-image MSE, SSIM and max patch NLL (see module doc)."""
    if form == "default":
        return mse + (1.0 - ssim_value) + max_nll
    if form == "vtadl_code":
        return mse + ssim_value + max_nll
    if form == "reconstruction":
        return mse + (1.0 - ssim_value)
    raise ValueError(f"score_form must be one of {SCORE_FORMS}, got {form!r}")


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def predict_batch(model: nn.Module, variables: Any, images: jax.Array,
                  cfg: ScoringConfig = ScoringConfig(),
                  position_stats: tuple[jax.Array, jax.Array] | None = None
                  ) -> dict[str, jax.Array]:
    """Scores of one batch images (B, H, W, C) (jitted).

    position_stats: (mean, std), each (gh, gw), needed by
    ``cfg.nll_normalization="per_position"`` (ignored otherwise).
    Returns dict: patch_nll (B, gh, gw) (standardised when asked), anomaly_map
    (B, H, W), image_score (B,), mse (B,), ssim (B,), max_nll (B,), recon (B, H, W, C).
    """
    out = model.apply(variables, images, train=False)
    b, h, w = images.shape[:3]
    gh, gw = h // model.patch_size, w // model.patch_size
    nll = patch_nll(out["embeddings"], out["mixture"], head=model.mdn_head,
                    k_chunk=cfg.k_chunk).reshape(b, gh, gw)
    if cfg.nll_normalization == "per_position":
        mean, std = position_stats
        nll = (nll - mean) / (std + STD_EPS)
    recon = out["recon"]
    mse = jnp.mean(jnp.square(recon - images), axis=(1, 2, 3))
    fs = ssim_window(cfg.ssim_filter_size, h, w)
    s = ssim(images, recon, max_val=cfg.ssim_max_val, filter_size=fs,
             filter_sigma=cfg.ssim_sigma, padding="same")
    max_nll = jnp.max(nll, axis=(1, 2))
    amap = anomaly_map(nll, (h, w), align_corners=cfg.align_corners, sigma=cfg.map_sigma,
                       truncate=cfg.map_truncate)
    return {"patch_nll": nll, "anomaly_map": amap,
            "image_score": image_score(mse, s, max_nll, cfg.score_form),
            "mse": mse, "ssim": s, "max_nll": max_nll, "recon": recon}


def position_statistics(model: nn.Module, variables: Any, images: np.ndarray, *,
                        batch_size: int = 16, k_chunk: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-grid-position mean and std (ddof 0) of the raw patch NLL of ``images``.

    images: (N, H, W, C) normal (training) images in the model's input range.
    Returns (mean, std), each (gh, gw) float32, for ``nll_normalization="per_position"``.
    """
    nll = predict(model, variables, images, batch_size=batch_size, k_chunk=k_chunk)["patch_nll"]
    nll = nll.astype(np.float64)
    return nll.mean(axis=0).astype(np.float32), nll.std(axis=0).astype(np.float32)


def predict(model: nn.Module, variables: Any, images: np.ndarray, *, batch_size: int = 16,
            keep_recon: bool = False,
            position_stats: tuple[np.ndarray, np.ndarray] | None = None,
            **options: Any) -> dict[str, np.ndarray]:
    """Scores of many images (N, H, W, C), ``batch_size`` at a time (one compilation).

    Args:
      model: the ``VTADL`` module.
      variables: {"params", "batch_stats"} (e.g. from a restored TrainState).
      images: (N, H, W, C) in the model's input range.
      batch_size: images per jitted call; the last chunk is padded.
      keep_recon: also return the reconstructions (N, H, W, C).
      position_stats: (mean, std) of ``position_statistics``; required by
        ``nll_normalization="per_position"``.
      **options: ``ScoringConfig`` fields (map_sigma, align_corners, score_form, ...).

    Returns:
      dict of NumPy arrays, see ``predict_batch`` (without "recon" unless asked).
    """
    cfg = ScoringConfig(**options)
    if cfg.score_form not in SCORE_FORMS:
        raise ValueError(f"score_form must be one of {SCORE_FORMS}, got {cfg.score_form!r}")
    if cfg.nll_normalization not in NLL_NORMALIZATIONS:
        raise ValueError(f"nll_normalization must be one of {NLL_NORMALIZATIONS}, "
                         f"got {cfg.nll_normalization!r}")
    stats = None
    if cfg.nll_normalization == "per_position":
        if position_stats is None:
            raise ValueError("nll_normalization='per_position' needs position_stats "
                             "(position_statistics of the training images)")
        stats = tuple(jnp.asarray(a, jnp.float32) for a in position_stats)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images: empty batch (N = 0)")
    chunks: list[dict[str, np.ndarray]] = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out = jax.device_get(predict_batch(model, variables, jnp.asarray(chunk), cfg, stats))
        if not keep_recon:
            out.pop("recon")
        chunks.append({k: v[:batch_size - pad] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
