"""Train-state creation in one jit and its abstract (eval_shape) twin for restores."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vtadl_jax.models.variants import get_variant
from vtadl_jax.train import checkpoint as ckpt
from vtadl_jax.train.optim import make_optimizer
from vtadl_jax.train.state import abstract_train_state, create_train_state, init_variables
from vtadl_jax.train.step import make_mesh

SHAPE = (32, 32, 3)


def test_state_equals_separate_inits_and_is_placed():
    model, tx = get_variant("tiny"), make_optimizer(1e-3, 1e-4)
    mesh = make_mesh()
    sharding = NamedSharding(mesh, P())
    state = create_train_state(model, tx, 3, SHAPE, sharding=sharding)
    key = jax.random.PRNGKey(3)
    ref = init_variables(model, jax.random.fold_in(key, 0), SHAPE)  # the module's own init
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(tx.init(ref["params"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(state.rng),
                                  np.asarray(jax.random.fold_in(key, 1)))
    assert int(state.step) == 0
    assert all(x.sharding == sharding for x in jax.tree.leaves(state))


def test_abstract_state_matches_and_restores(tmp_path):
    model, tx = get_variant("tiny"), make_optimizer(1e-3, 1e-4)
    state = create_train_state(model, tx, 0, SHAPE)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_train_state(model, tx, SHAPE, device)
    assert jax.tree.structure(target) == jax.tree.structure(state)
    for t, s in zip(jax.tree.leaves(target), jax.tree.leaves(state)):
        assert isinstance(t, jax.ShapeDtypeStruct)
        assert (t.shape, t.dtype, t.sharding) == (s.shape, s.dtype, device)
    manager = ckpt.make_manager(str(tmp_path), async_save=False)
    try:
        ckpt.save_state(manager, state)
        restored = ckpt.restore_state(manager, target)
    finally:
        manager.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
