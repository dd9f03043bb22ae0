"""Shared defaults of the patch-Gaussian configs (imported by the experiment files)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "patch_gaussian"
    c.seed = 0
    c.batch_size = 16
    # True (or JAX_COORDINATOR_ADDRESS set): jax.distributed.initialize(); each process
    # fits its share of the training images, process 0 writes (vtadl_jax.multihost).
    c.distributed = False
    c.data = ml_collections.ConfigDict(dict(
        name="folder", root=None, preset="patch_gaussian", image_size=224,
        scale="zero_one",  # the backbone applies its own normalisation
        backend="tfds", data_dir=None, max_examples=None))
    c.backbone = ml_collections.ConfigDict(dict(
        name="efficientnet_lite0", weights=None, stages=("block3", "block5")))
    c.gaussian = ml_collections.ConfigDict(dict(
        upsample="bilinear", channel_subset=0, eps=0.01, blur_sigma=4.0,
        score_path="whiten", shard_positions=False))
    return c
