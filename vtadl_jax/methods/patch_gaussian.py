"""Patch Gaussians on a frozen pretrained backbone (Dini & Rahtu, VISAPP 2023; PaDiM,
Defard et al. 2021).

No training of the network. For every feature-grid position (i, j) one multivariate
Gaussian N(mu_ij, Sigma_ij) is fitted to the normal training features; a test feature
is scored by its Mahalanobis distance sqrt((x - mu)^T Sigma^-1 (x - mu)), computed as a
batched triangular solve against the Cholesky factor (or the precomputed whitening
matrix L^-1). The distance map is bilinearly up-sampled to the input size, smoothed with
a Gaussian filter (sigma 4, 33 taps) and its maximum is the image score.

The fit is streaming (`vtadl_jax.kernels.gaussian`): memory is O(positions * C^2),
independent of the number of training images. With several devices the positions are
sharded over them (`shard_positions=True`), so covariances that do not fit one device
are split without any communication (each position's statistics are independent).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vtadl_jax import multihost
from vtadl_jax.kernels import filters, gaussian

FeatureFn = Callable[[jax.Array], Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class PatchGaussianSpec:
    """Everything besides the fitted arrays that scoring needs (saved with the model).

    Attributes:
      backbone: registry name of the frozen backbone ("efficientnet_lite0", "contnet_b").
      stages: backbone outputs concatenated, in order; the first one's grid is the grid
        of the Gaussians (the paper: ConTNet-B stages 3 and 4).
      upsample: how other stages are brought to that grid: "bilinear" or "nearest".
      channel_indices: optional random channel subset (PaDiM), fixed by `seed`.
      eps: covariance regulariser, Sigma + eps * I (PaDiM: 0.01).
      input_size: side of the square network input.
      blur_sigma: Gaussian filter of the up-sampled map (0 disables).
      score_path: "solve" (triangular solve) or "whiten" (one batched matmul with L^-1).
    """

    backbone: str
    stages: tuple[str, ...]
    upsample: str = "bilinear"
    channel_indices: tuple[int, ...] | None = None
    eps: float = 0.01
    input_size: int = 224
    blur_sigma: float = 4.0
    score_path: str = "whiten"
    seed: int = 0

    def __post_init__(self):
        if self.upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample: expected 'bilinear' or 'nearest', got {self.upsample!r}")
        if self.score_path not in ("solve", "whiten"):
            raise ValueError(f"score_path: expected 'solve' or 'whiten', got {self.score_path!r}")
        if not self.stages:
            raise ValueError("stages: expected at least one backbone stage name")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        d["channel_indices"] = None if self.channel_indices is None else list(self.channel_indices)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "PatchGaussianSpec":
        d = dict(d)
        d["stages"] = tuple(d["stages"])
        if d.get("channel_indices") is not None:
            d["channel_indices"] = tuple(int(i) for i in d["channel_indices"])
        return cls(**d)


def random_channel_subset(total: int, keep: int, seed: int) -> tuple[int, ...]:
    """PaDiM's random channel selection: `keep` distinct sorted indices of `total`."""
    if not 0 < keep <= total:
        raise ValueError(f"channel subset: expected 0 < keep <= {total} channels, got {keep}")
    rng = np.random.default_rng(seed)
    return tuple(int(i) for i in np.sort(rng.choice(total, size=keep, replace=False)))


def combine_stages(features: Mapping[str, jax.Array], stages: Sequence[str], upsample: str,
                   channel_indices: Sequence[int] | None = None) -> jax.Array:
    """Concatenate backbone stage maps on the first stage's grid.

    Args:
      features: stage name -> (B, h_s, w_s, C_s) feature map.
      stages: names to use; the grid is that of stages[0].
    Returns:
      (B, h, w, sum C_s) (or the channel subset of it).
    """
    missing = [s for s in stages if s not in features]
    if missing:
        raise ValueError(f"stages: {missing} not among the backbone's outputs {sorted(features)}")
    first = features[stages[0]]
    grid = first.shape[1:3]
    maps = []
    for name in stages:
        f = features[name]
        if f.shape[1:3] != grid:
            f = (filters.resize_bilinear(f, grid) if upsample == "bilinear"
                 else filters.resize_nearest(f, grid))
        maps.append(f)
    out = jnp.concatenate(maps, axis=-1)
    if channel_indices is not None:
        out = out[..., jnp.asarray(channel_indices)]
    return out


@dataclasses.dataclass
class PatchGaussianModel:
    """Fitted Gaussians: grid (h, w), mean (P, C), chol (P, C, C), whiten (P, C, C) = L^-1."""

    spec: PatchGaussianSpec
    grid: tuple[int, int]
    mean: jax.Array
    chol: jax.Array
    whiten: jax.Array
    num_images: int


def _position_sharding(num_positions: int) -> NamedSharding | None:
    # This process's devices: with several processes each one fits its own rows, and
    # `merge_across_processes` combines the per-process statistics at the end.
    devices = jax.local_devices()
    if len(devices) == 1 or num_positions % len(devices):
        return None
    mesh = Mesh(np.asarray(devices), ("pos",))
    return NamedSharding(mesh, PartitionSpec("pos"))


def _update_in_place(stats: gaussian.PatchStats, feats: jax.Array) -> gaussian.PatchStats:
    """`gaussian.update`, one position at a time into the (donated) statistics.

    `gaussian.update` materialises the batch's (P, C, C) second moments and a new merged
    (P, C, C) array next to the old one: ~3 P C^2 floats at the peak (1.4 GB for the
    paper's 7 x 7 x 1536 in float32). Looping over positions with in-place
    dynamic_update_slice on a donated carry keeps one (C, C) temporary instead
    (~1 P C^2 at the peak), at the same speed. Same arithmetic per position.
    """
    def body(p, st):
        sub = gaussian.PatchStats(stats.count, lax.dynamic_slice_in_dim(st.mean, p, 1, 0),
                                  lax.dynamic_slice_in_dim(st.m2, p, 1, 0))
        new = gaussian.update(sub, lax.dynamic_slice_in_dim(feats, p, 1, 1))
        return gaussian.PatchStats(st.count,
                                   lax.dynamic_update_slice_in_dim(st.mean, new.mean, p, 0),
                                   lax.dynamic_update_slice_in_dim(st.m2, new.m2, p, 0))

    out = lax.fori_loop(0, stats.mean.shape[0], body, stats)
    return out._replace(count=stats.count + jnp.asarray(feats.shape[0], stats.count.dtype))


def _with_token(update: Callable) -> Callable:
    """update -> (new stats, a scalar output that is not fed back (to wait on))."""
    def fn(stats, feats):
        new = update(stats, feats)
        return new, new.count + 0
    return fn


# Module-level, so that the compiled updates are reused by every fit in the process.
_UPDATE_SHARDED = jax.jit(_with_token(gaussian.update))
_UPDATE_LOCAL = jax.jit(_with_token(_update_in_place), donate_argnums=0)


def fit_statistics(feature_batches: Iterable[jax.Array], *, shard_positions: bool = False,
                   dtype=jnp.float32) -> tuple[gaussian.PatchStats, tuple[int, int]]:
    """Stream (B, h, w, C) feature batches into per-position statistics.

    With `shard_positions` and several devices the statistics live sharded along the
    position axis (when the device count divides the number of positions), so each
    device holds only its positions' C x C second moments.
    """
    stats, grid, sharding = None, None, None
    # Sharded statistics: the plain update (each device already holds only its P / n
    # positions; a loop over positions would gather them). Otherwise the in-place one.
    update_sharded, update_local = _UPDATE_SHARDED, _UPDATE_LOCAL
    # Asynchronous dispatch would let the producer run ahead and queue every batch in
    # memory (the features would pile up, O(N) again): at most two updates in flight.
    pending = None
    for feats in feature_batches:
        feats = jnp.asarray(feats, dtype)
        if feats.ndim != 4:
            raise ValueError(f"features: expected (B, h, w, C), got shape {feats.shape}")
        b, h, w, c = feats.shape
        if b == 0:
            raise ValueError(f"features: got an empty batch {feats.shape}")
        if stats is None:
            grid = (h, w)
            stats = gaussian.init(h * w, c, dtype=dtype)
            if shard_positions:
                sharding = _position_sharding(h * w)
                if sharding is not None:
                    stats = jax.device_put(stats, gaussian.PatchStats(
                        count=NamedSharding(sharding.mesh, PartitionSpec()),
                        mean=sharding, m2=sharding))
        elif (h, w) != grid:
            raise ValueError(f"features: grid changed from {grid} to {(h, w)} between batches")
        elif c != stats.mean.shape[-1]:
            raise ValueError(f"features: channels changed from {stats.mean.shape[-1]} to {c} "
                             "between batches")
        flat = feats.reshape(b, h * w, c)
        if sharding is not None:
            flat = jax.device_put(flat, NamedSharding(sharding.mesh, PartitionSpec(None, "pos")))
        # The per-position loop saves memory but serialises P small updates: worth it on
        # a CPU; on accelerators the vectorised update is the fast one.
        vectorised = sharding is not None or jax.default_backend() != "cpu"
        stats, token = (update_sharded if vectorised else update_local)(stats, flat)
        if pending is not None:
            pending.block_until_ready()
        pending = token
    if stats is None:
        raise ValueError("feature_batches: expected at least one batch of training features")
    return stats, grid


def merge_across_processes(stats: gaussian.PatchStats) -> gaussian.PatchStats:
    """Combine every process's statistics (multi-host fit); identity with one process.

    Each process passes the statistics of its own share of the training images; every
    process gets the statistics of all of them (k-way Chan et al. merge,
    `gaussian.merge_across`, run by JAX's multi-process runtime over a mesh with one
    device per process). The result lives on this process's first device.
    """
    if jax.process_count() == 1:
        return stats
    firsts = [min((d for d in jax.devices() if d.process_index == i), key=lambda d: d.id)
              for i in range(jax.process_count())]
    mesh = Mesh(np.asarray(firsts), ("hosts",))
    local = jax.tree.map(lambda x: np.asarray(x)[None], stats)
    stacked = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("hosts")), x), local)
    merge = jax.jit(jax.shard_map(lambda s: gaussian.merge_across(
        jax.tree.map(lambda x: x[0], s), "hosts"), mesh=mesh,
        in_specs=PartitionSpec("hosts"), out_specs=PartitionSpec()))
    merge = merge.lower(stacked).compile()
    # Wait for every process (coordination-service barrier) before the collective runs:
    # CPU (gloo) collectives give up when peers arrive more than 30 s apart, and the
    # processes finish their shares at different times.
    multihost.barrier("merge_patch_statistics", timeout_s=3600)
    merged = merge(stacked)
    return jax.tree.map(lambda x: x.addressable_data(0), merged)


_finalize = jax.jit(gaussian.finalize, static_argnames=("eps",))


def _finalize_parts(count, mean, m2, *, eps):
    return gaussian.finalize(gaussian.PatchStats(count=count, mean=mean, m2=m2), eps=eps)


def _factor(cov):
    chol = gaussian.cholesky_factor(cov)
    return chol, gaussian.whitening_matrix(chol)


# Donating variants: the (P, C, C) second moments become the covariance in place, and the
# covariance buffer is reused for one of the factors, so at most two (P, C, C) arrays
# (plus XLA's temporaries) are alive at a time instead of four.
_finalize_donated = jax.jit(_finalize_parts, static_argnames=("eps",), donate_argnums=2)
_factor_kept = jax.jit(_factor)
_factor_donated = jax.jit(_factor, donate_argnums=0)


def finalize_model(stats: gaussian.PatchStats, grid: tuple[int, int],
                   spec: PatchGaussianSpec, *, donate_stats: bool = False) -> PatchGaussianModel:
    """Mean, regularised covariance, its Cholesky factor and whitening matrix.

    With `donate_stats` the buffers of `stats` are reused for the result (peak memory
    about half): `stats` must not be used afterwards.
    """
    count = int(stats.count)
    if count < 2:
        raise ValueError(f"fit: a covariance needs at least 2 training images, got {count}")
    eps = float(spec.eps)
    if donate_stats:
        mean, cov = _finalize_donated(stats.count, stats.mean, stats.m2, eps=eps)
        chol, whiten = _factor_donated(cov)
    else:
        mean, cov = _finalize(stats, eps=eps)
        chol, whiten = _factor_kept(cov)
    del cov
    if not bool(jnp.all(jnp.isfinite(chol))):
        raise FloatingPointError(
            "Cholesky factorisation failed (covariance not positive definite): raise eps "
            f"(now {spec.eps}) or use more training images (now {count})")
    return PatchGaussianModel(spec=spec, grid=grid, mean=mean, chol=chol,
                              whiten=whiten, num_images=count)


def distance_grid(model: PatchGaussianModel, feats: jax.Array) -> jax.Array:
    """(B, h, w, C) test features -> (B, h, w) Mahalanobis distances."""
    b, h, w, c = feats.shape
    if (h, w) != tuple(model.grid) or c != model.mean.shape[-1]:
        raise ValueError(f"features: expected (B, {model.grid[0]}, {model.grid[1]}, "
                         f"{model.mean.shape[-1]}), got {feats.shape}")
    flat = feats.reshape(b, h * w, c).astype(model.mean.dtype)
    if model.spec.score_path == "solve":
        d = gaussian.mahalanobis(flat, model.mean, model.chol)
    else:
        d = gaussian.mahalanobis_whitened(flat, model.mean, model.whiten)
    return d.reshape(b, h, w)


def upsample_and_smooth(grid_maps: jax.Array, size: tuple[int, int], sigma: float,
                        *, align_corners: bool = False) -> jax.Array:
    """(B, h, w) -> (B, H, W): bilinear up-sampling then a Gaussian filter (sigma 0 = none)."""
    maps = filters.resize_bilinear(grid_maps, size, align_corners=align_corners)
    return filters.gaussian_blur(maps, sigma) if sigma > 0 else maps


def anomaly_maps(model: PatchGaussianModel, feats: jax.Array,
                 size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Anomaly maps (B, H, W) at `size` and image scores (B,) = max of each map."""
    maps = upsample_and_smooth(distance_grid(model, feats), size, model.spec.blur_sigma)
    return maps, maps.reshape(maps.shape[0], -1).max(axis=-1)
