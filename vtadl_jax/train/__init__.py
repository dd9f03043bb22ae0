"""VT-ADL training: train state, data-parallel step, loop and orbax checkpoints."""
from vtadl_jax.train.checkpoint import make_manager, restore_config, restore_state, save_state
from vtadl_jax.train.loop import build_model, load_trained, loss_config, train
from vtadl_jax.train.optim import make_optimizer
from vtadl_jax.train.state import TrainState, count_params, create_train_state
from vtadl_jax.train.step import (LossConfig, make_mesh, make_train_step, replicate,
                                  shard_batch, train_step, vtadl_losses)

__all__ = ["LossConfig", "TrainState", "build_model", "count_params", "create_train_state",
           "load_trained", "loss_config", "make_manager", "make_mesh", "make_optimizer",
           "make_train_step", "replicate", "restore_config", "restore_state", "save_state",
           "shard_batch", "train", "train_step", "vtadl_losses"]
