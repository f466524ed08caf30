"""Axis rules come from the config and are complete: an unknown logical axis, a bad rule, or a
state leaf no parameter row covers is an error, never a silent replication; the ``fsdp`` rule set
lays parameters out exactly as a mesh with every device on the ``fsdp`` axis did."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reasonembed_jax.model.sharding import (
    DEFAULT_RULES,
    FSDP_RULES,
    batch_sharding,
    data_parallel_size,
    logical_to_spec,
    make_mesh,
)
from reasonembed_jax.training.config import axis_rules
from reasonembed_jax.training.state import (
    TrainingError,
    abstract_state,
    build_setup,
    make_optimizer_from_config,
    with_shardings,
)
from train_configs import tiny_train_config


def test_an_unknown_logical_axis_raises():
    with pytest.raises(ValueError, match="logical axis 'embedd' has no sharding rule"):
        logical_to_spec(("vocab", "embedd"), DEFAULT_RULES)
    mesh = make_mesh(data=-1)
    with pytest.raises(ValueError, match="no sharding rule"):
        batch_sharding(mesh, [r for r in DEFAULT_RULES if r[0] != "activation_batch"])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rules", "zero3", "mesh.rules must be one of"),
    ("rule_overrides", (("embed", "model"),), "mesh axes are"),
    ("rule_overrides", (("embed",),), "an axis rule must be"),
    ("rule_overrides", (("embed", None), ("embed", "fsdp")), "given twice"),
])
def test_bad_rules_in_the_config_are_user_errors(tmp_path, field, value, message):
    c = tiny_train_config()
    c.mesh[field] = value
    with pytest.raises(TrainingError, match=message):
        build_setup(c)


def test_rule_overrides_replace_and_add_entries():
    c = tiny_train_config()
    c.mesh.rule_overrides = (("vocab", None), ("extra_axis", "tensor"))
    rules = dict(axis_rules(c))
    assert rules["vocab"] is None and rules["extra_axis"] == "tensor"
    assert {k: v for k, v in rules.items() if k not in ("vocab", "extra_axis")} == {
        k: v for k, v in DEFAULT_RULES if k != "vocab"}


def test_a_state_leaf_without_a_rule_raises():
    setup = build_setup(tiny_train_config())
    _, optimizer = make_optimizer_from_config(setup.config, 10)
    state, _ = abstract_state(setup, optimizer)
    with_shardings(setup, state)  # the real state is covered
    bad = {**state, "opt_state": (state["opt_state"], {"unlisted_matrix": jnp.zeros((4, 4))})}
    with pytest.raises(TrainingError, match="unlisted_matrix.*no sharding rule"):
        with_shardings(setup, bad)
    wrong_rank = {**state, "params": {**state["params"],
                                      next(iter(state["params"])): jnp.zeros((3,))}}
    with pytest.raises(TrainingError, match="logical axes"):
        with_shardings(setup, wrong_rank)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of every sharded leaf (shard shapes from the shardings)."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("lora", [True, False])
def test_fsdp_rules_lay_out_the_state_as_an_fsdp_mesh_did(lora):
    """Second code path: the old ``fsdp`` variant put every device on the mesh's fsdp axis; the
    rule swap keeps the data mesh and maps parameters onto it. Same shard shapes, leaf by leaf,
    and 1/8 of the replicated bytes for the sharded leaves."""
    layouts = {}
    for name, (data, fsdp, rules) in {"old": (1, -1, "default"), "new": (-1, 1, "fsdp"),
                                      "replicated": (-1, 1, "default")}.items():
        c = tiny_train_config()
        c.lora.enabled = lora
        c.mesh.data, c.mesh.fsdp, c.mesh.rules = data, fsdp, rules
        setup = build_setup(c)
        assert data_parallel_size(setup.mesh, setup.rules) == 8
        _, optimizer = make_optimizer_from_config(c, 10)
        layouts[name] = abstract_state(setup, optimizer)
    shard = jax.tree.map(lambda a: a.sharding.shard_shape(a.shape), layouts["old"])
    assert jax.tree.map(lambda a: a.sharding.shard_shape(a.shape), layouts["new"]) == shard
    assert _per_device_bytes(layouts["new"]) < _per_device_bytes(layouts["replicated"])
    assert dict(FSDP_RULES)["embed"] == ("data", "fsdp")
