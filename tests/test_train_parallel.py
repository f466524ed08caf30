"""Training on 1 device and on 8 (data x fsdp) gives the same run; GradCache equals the plain
step; checkpoints fall back past a damaged one; non-finite steps are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reasonembed_jax.model import DecoderConfig, init_params, make_mesh
from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like
from reasonembed_jax.training.memory_plan import memory_report
from reasonembed_jax.training.monitoring import NanGuard
from reasonembed_jax.training.step import (
    StepConfig,
    grad_cache_loss_and_grads,
    make_optimizer,
    make_train_step,
    plain_loss_and_grads,
)
from reasonembed_jax.training.trainer import Trainer, TrainingError
from train_configs import random_batch, tiny_train_config


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def test_one_device_and_eight_devices_train_identically(tmp_path):
    runs = {}
    for name, mesh in (("one", dict(data=1, fsdp=1, tensor=1)), ("eight", dict(data=4, fsdp=2, tensor=1))):
        c = tiny_train_config(steps=5, devices=8)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
        trainer = Trainer(c, str(tmp_path / name))
        assert trainer.mesh.size == (1 if name == "one" else 8)
        runs[name] = trainer.run()
    one, eight = runs["one"], runs["eight"]
    losses_one = [h["loss"] for h in one["history"]]
    losses_eight = [h["loss"] for h in eight["history"]]
    assert len(losses_one) == 5
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    # RI weights were active (warm-up 2 steps) and the global batch had 8 queries x 4 passages.
    for a, b in zip(jax.tree.leaves(eight["state"]["params"]), jax.tree.leaves(one["state"]["params"]),
                    strict=True):
        # Summation orders differ between the layouts (sharded contractions reduce in parts):
        # through 5 Adam steps that is at most 1.02e-5 of a leaf with the 2-D projections
        # (decoder.project_matmul), as in test_multihost.py; a wrong gather or sharding moves a
        # leaf by O(1) of its update.
        assert _rel(a, b) <= 5e-5, a.shape
    shard = eight["state"]["params"]["layers.q_proj"].sharding
    assert "fsdp" in str(shard.spec)
    # Parameters really moved.
    assert losses_one[0] != losses_one[-1]


def _tiny_model_config():
    import json
    import pathlib

    from reasonembed_jax.tiny_model import shrink_hf_config

    root = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "hf_configs"
    hf = json.loads((root / "Qwen3-0.6B" / "config.json").read_text())
    hf = shrink_hf_config(hf, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    hf["vocab_size"] = 300
    return DecoderConfig.from_hf(hf)


def test_grad_cache_equals_plain_gradients_and_saves_memory():
    cfg = _tiny_model_config()
    mesh = make_mesh(data=8)
    params = init_params(cfg, 0)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = {k: jax.device_put(v, rows) for k, v in random_batch(16, 4, 12, 0).items()}
    plain_cfg = StepConfig(model=cfg, loss="ri_infonce", ri_warmup_steps=0, mesh=mesh)
    gc_cfg = StepConfig(model=cfg, loss="ri_infonce", ri_warmup_steps=0, mesh=mesh, grad_cache=True,
                        chunk_rows_per_device=2)
    step = jnp.asarray(5)
    rng = jax.random.key_data(jax.random.key(0))
    loss_p, aux_p, grads_p = jax.jit(lambda p, b: plain_loss_and_grads(plain_cfg, p, {}, b, step, rng))(
        params, batch)
    loss_g, aux_g, grads_g = jax.jit(lambda p, b: grad_cache_loss_and_grads(gc_cfg, p, {}, b, step, rng))(
        params, batch)
    np.testing.assert_allclose(loss_g, loss_p, rtol=1e-6)
    # atol: the smallest RI weights (~5e-5) differ by float32 rounding of chunked vs whole matmuls
    np.testing.assert_allclose(aux_g["weights"], aux_p["weights"], rtol=1e-5, atol=1e-8)
    assert float(jnp.std(aux_p["weights"])) > 0  # RI weighting active
    for name in grads_p:
        assert _rel(grads_g[name], grads_p[name]) <= 1e-5, name

    # Peak memory of the full update at a batch and at 4x that batch.
    optimizer = make_optimizer(1e-3)
    peaks = {}
    for label, c in (("plain", plain_cfg), ("gradcache", gc_cfg)):
        fn = jax.jit(make_train_step(c, optimizer, lambda s: 1e-3))
        for mult in (1, 4):
            b = {k: jax.device_put(v, rows) for k, v in random_batch(16 * mult, 4, 64, 1).items()}
            state = {"step": step, "params": params, "opt_state": optimizer.init(params), "rng": rng}
            peaks[label, mult] = memory_report(fn.lower(state, {}, b).compile())["temp_gib"]
    growth = {k: peaks[k, 4] / peaks[k, 1] for k in ("plain", "gradcache")}
    print(f"\ncompiled temp memory per device (GiB): plain {peaks['plain', 1]:.4f} -> "
          f"{peaks['plain', 4]:.4f} (x{growth['plain']:.2f}); GradCache {peaks['gradcache', 1]:.4f}"
          f" -> {peaks['gradcache', 4]:.4f} (x{growth['gradcache']:.2f}) when the batch grows 4x")
    assert growth["plain"] > 2.5
    assert growth["gradcache"] < growth["plain"] / 2


def test_non_finite_step_is_skipped():
    cfg = _tiny_model_config()
    params = init_params(cfg, 0)
    params["norm"] = params["norm"].at[0].set(jnp.nan)
    optimizer = make_optimizer(1e-3)
    state = {"step": jnp.asarray(0), "params": params, "opt_state": optimizer.init(params),
             "rng": jax.random.key_data(jax.random.key(0))}
    step_fn = jax.jit(make_train_step(StepConfig(model=cfg, loss="infonce"), optimizer, lambda s: 1e-3))
    new, metrics = step_fn(state, {}, random_batch(4, 2, 8, 3))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    guard = NanGuard(3)
    guard.update(0, True, float("nan"))
    guard.update(1, False, 1.0)
    guard.update(2, True, float("nan"))
    guard.update(3, True, float("nan"))
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        guard.update(4, True, float("nan"))


def test_damaged_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(0)}
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1, keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step, "step": jnp.asarray(step)}, {"grain": {"n": step}})
    ckpt.wait()
    # Damage every file of the newest checkpoint.
    for f in (tmp_path / "ck" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    restored = Checkpointer(str(tmp_path / "ck"), every=1, keep=3).restore_latest(abstract_like(state))
    step, got, data = restored
    assert step == 1 and data == {"grain": {"n": 1}}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))
    assert "checkpoint at step 2" in caplog.text and "falling back" in caplog.text


def test_lora_training_keeps_base_and_exports_merged(tmp_path):
    """LoRA on 8 devices: the base weights stay bit-identical, the adapters move, and the
    exported (merged) model computes what base + adapters compute."""
    from reasonembed_jax import hf_io
    from reasonembed_jax.lora import lora_project
    from reasonembed_jax.model.encoder import forward

    c = tiny_train_config(steps=3, devices=8, arg="lora")
    c.lora.dropout = 0.0
    c.train.export_at_end = True
    c.export.dtype = "float32"
    trainer = Trainer(c, str(tmp_path / "lora"))
    before = jax.tree.map(np.asarray, trainer._initial_state(make_optimizer(1e-3))[1])
    result = trainer.run()
    frozen, adapters = result["frozen"], result["state"]["params"]
    assert set(adapters) and all(".lora_" in k for k in adapters)
    for name, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(value), before[name], err_msg=name)
    assert any(float(jnp.abs(v).max()) > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12) * 97
    mask = np.ones_like(ids)
    adapted = forward(trainer.model_cfg, {**frozen, **adapters}, ids, mask,
                      project=lora_project(trainer.lora, train=False))
    exported = hf_io.load_encoder(result["export"], dtype=trainer.model_cfg.dtype)
    np.testing.assert_allclose(np.asarray(exported(ids, mask)), np.asarray(adapted), atol=2e-4)
