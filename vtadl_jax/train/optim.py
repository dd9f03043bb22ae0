"""Optimiser of VT-ADL training: Adam with COUPLED L2 weight decay (as torch.optim.Adam).

Mishra et al. 2021 (VT-ADL), Table I: Adam, learning rate 1e-4, weight decay 1e-4. In
PyTorch's ``Adam(weight_decay=wd)`` the decay is added to the gradient before the moment
estimates (g <- g + wd * theta), unlike AdamW's decoupled decay; optax's
``chain(add_decayed_weights(wd), adam(lr))`` is the same update. Every parameter is
decayed (biases and LayerNorm/BatchNorm scales included), as in the code.
"""
from __future__ import annotations

import functools

import optax


@functools.lru_cache(maxsize=None)
def make_optimizer(learning_rate: float = 1e-4, weight_decay: float = 1e-4,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
    """Adam (torch defaults b1 0.9, b2 0.999, eps 1e-8) with coupled weight decay.

    Cached: equal arguments give the same (hashable) transformation object, so jitted
    train steps built from it are reused instead of recompiled.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
