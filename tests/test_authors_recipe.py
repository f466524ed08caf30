"""The `authors` recipe variant: each difference from our recipe against an independent reference
(PyTorch DDP arithmetic, a numpy reading of DeepSpeed's WarmupDecayLR, PEFT's LoRA init)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reasonembed_jax import losses
from reasonembed_jax.lora import LoraConfig, init_lora, lora_param_shapes
from reasonembed_jax.model.encoder import config_from_hf
from reasonembed_jax.tiny_model import shrink_hf_config
from reasonembed_jax.train import config_differences
from reasonembed_jax.training.step import (
    StepConfig,
    compute_loss,
    deepspeed_warmup_decay_schedule,
    make_optimizer,
    plain_loss_and_grads,
)
from train_configs import load_config_file, load_config_module

AUTHORS_SETTINGS = load_config_module("common").AUTHORS_SETTINGS

WORLD, B, G, D_IN, D = 8, 2, 3, 12, 6
TAU = 0.05


# ---------------------------------------------------------------------------------------------
# Clipping relative to a reference world size
# ---------------------------------------------------------------------------------------------


def _torch_ddp_gradient(w: np.ndarray, xq: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """FlagEmbedding's arithmetic over WORLD ranks, in PyTorch: every rank gathers all
    embeddings into the global-batch InfoNCE (mean over all queries) but only its own carry a
    gradient; DDP averages the WORLD gradients."""
    grads = []
    for rank in range(WORLD):
        wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        q = torch.nn.functional.normalize(torch.tensor(xq, dtype=torch.float64) @ wt, dim=-1)
        p = torch.nn.functional.normalize(torch.tensor(xp, dtype=torch.float64) @ wt, dim=-1)
        own_q = slice(rank * B, (rank + 1) * B)
        own_p = slice(rank * B * G, (rank + 1) * B * G)
        q = torch.cat([q[:own_q.start].detach(), q[own_q], q[own_q.stop:].detach()])
        p = torch.cat([p[:own_p.start].detach(), p[own_p], p[own_p.stop:].detach()])
        scores = q @ p.T / TAU
        targets = torch.arange(WORLD * B) * G
        torch.nn.functional.cross_entropy(scores, targets).backward()
        grads.append(wt.grad.numpy())
    return np.mean(grads, axis=0)


def _global_mean_gradient(w: np.ndarray, xq: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """Ours: the gradient of the global-batch mean loss (what the jitted step computes)."""
    def loss(w):
        q = xq @ w
        p = xp @ w
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
        return losses.infonce_loss(q, p, group_size=G, temperature=TAU)[0]

    with jax.enable_x64():
        return np.asarray(jax.grad(loss)(jnp.asarray(w, jnp.float64)))


def test_ddp_gradient_is_global_mean_over_world_and_clipping_matches_at_reference_size():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D_IN, D)) * 0.1  # small weights: large gradients, clipping active
    xq = rng.normal(size=(WORLD * B, D_IN)) * 3
    xp = rng.normal(size=(WORLD * B * G, D_IN)) * 3
    ddp = _torch_ddp_gradient(w, xq, xp)
    ours = _global_mean_gradient(w, xq, xp)
    # The documented equivalence: their averaged gradient is 1/WORLD of the global-mean one.
    np.testing.assert_allclose(ddp, ours / WORLD, rtol=1e-9, atol=1e-12)
    # Clipping must be active on their side for the comparison to mean anything.
    assert np.linalg.norm(ddp) > 1.0 and np.linalg.norm(ours) > WORLD * 1.0

    # Their update: torch clip_grad_norm_(1.0) + AdamW(eps 1e-8) on the DDP gradient, 3 steps with
    # the gradient rescaled per step (clipped, not clipped, clipped): a constant gradient would
    # hide the clipping, since Adam divides out a uniform scale.
    lr, scales = 1e-2, (1.0, 0.05, 3.0)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([wt], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for s in scales:
        wt.grad = torch.tensor(ddp * s)
        torch.nn.utils.clip_grad_norm_([wt], 1.0)
        opt.step()
    theirs = wt.detach().numpy()

    def ours_after(reference_world_size: int) -> np.ndarray:
        with jax.enable_x64():
            tx = make_optimizer(lr, clip_norm=1.0, eps=1e-8, reference_world_size=reference_world_size)
            params = {"w": jnp.asarray(w)}
            state = tx.init(params)
            for s in scales:
                updates, state = tx.update({"w": jnp.asarray(ours * s)}, state, params)
                params = jax.tree.map(jnp.add, params, updates)
            return np.asarray(params["w"])

    np.testing.assert_allclose(ours_after(WORLD), theirs, rtol=1e-6, atol=1e-8)
    # Clipping our gradient at 1.0 instead is a different run.
    assert np.max(np.abs(ours_after(1) - theirs)) > 1e-4


# ---------------------------------------------------------------------------------------------
# DeepSpeed WarmupDecayLR
# ---------------------------------------------------------------------------------------------


class _NumpyWarmupDecayLR:
    """A plain reading of DeepSpeed's WarmupDecayLR, driven as DeepSpeed drives it: the lr is set
    at construction (iteration -1) and the scheduler steps after every optimizer update."""

    def __init__(self, total, min_lr, max_lr, warmup, warmup_type):
        self.total, self.min_lr, self.delta = total, min_lr, max_lr - min_lr
        self.warmup = max(2, warmup)
        self.warmup_type = warmup_type
        self.it = -1
        self.lr = self._lr()

    def _gamma(self):
        if self.it < self.warmup:
            if self.warmup_type == "log":
                return math.log(self.it + 1) / math.log(self.warmup)
            return self.it / self.warmup
        return max(0.0, (self.total - self.it) / max(1.0, self.total - self.warmup))

    def _lr(self):
        return self.min_lr if self.it < 0 else self.min_lr + self.delta * self._gamma()

    def step(self):
        self.it += 1
        self.lr = self._lr()


@pytest.mark.parametrize("total,ratio,warmup_type", [(317, 0.1, "log"), (40, 0.1, "linear"),
                                                     (12, 0.1, "log"), (5, 0.0, "log")])
def test_deepspeed_schedule_equals_numpy_reading_of_deepspeed(total, ratio, warmup_type):
    peak = 1e-4
    # HF Trainer's fill of ds_stage1.json: warmup_min_lr 0, warmup_max_lr lr,
    # warmup_num_steps = max(1, ceil(ratio * total)), total_num_steps = total.
    ref = _NumpyWarmupDecayLR(total, 0.0, peak, max(1, math.ceil(ratio * total)), warmup_type)
    expected = []
    for _ in range(total):
        expected.append(ref.lr)  # the lr this update runs with
        ref.step()
    schedule = deepspeed_warmup_decay_schedule(peak, total, warmup_ratio=ratio,
                                               warmup_type=warmup_type)
    got = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    if warmup_type == "log":
        assert got[0] == got[1] == 0.0


# ---------------------------------------------------------------------------------------------
# LoRA A initialisation vs PEFT
# ---------------------------------------------------------------------------------------------


def _tiny_model(hf_configs_dir, hidden, layers=4):
    import json

    hf = json.loads((hf_configs_dir / "Qwen3-0.6B" / "config.json").read_text())
    hf = shrink_hf_config(hf, layers=layers, hidden=hidden, heads=4, kv_heads=2, head_dim=16,
                          intermediate=96)
    return config_from_hf(hf, dtype="float32", param_dtype="float32")


def test_lora_a_init_has_peft_distribution(hf_configs_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from scipy.stats import ks_2samp

    hidden, rank = 64, 32
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(hidden, 40) for _ in range(8)])
    peft_model = get_peft_model(base, PeftLoraConfig(r=rank, lora_alpha=64,
                                                     target_modules=[str(i) for i in range(8)]))
    peft_a = np.concatenate([m.lora_A["default"].weight.detach().numpy().ravel()
                             for m in peft_model.modules() if hasattr(m, "lora_A")])
    peft_a = peft_a * math.sqrt(hidden)  # PEFT's lora_A is [r, fan_in]

    cfg = _tiny_model(hf_configs_dir, hidden)

    def ours(init_a):
        lora = LoraConfig(rank=rank, targets=("q_proj", "gate_proj"), init_a=init_a)
        a = init_lora(cfg, lora, jax.random.key(1))
        shapes = lora_param_shapes(cfg, lora)
        # both projections read the hidden state: fan_in = hidden
        assert all(s[0][1] == hidden for p, s in shapes.items() if p.endswith("lora_a"))
        return np.concatenate([np.asarray(v).ravel() * math.sqrt(hidden)
                               for p, v in a.items() if p.endswith("lora_a")])

    default = ours(LoraConfig().init_a)
    assert LoraConfig().init_a == "kaiming_uniform"
    assert ks_2samp(default, peft_a).pvalue > 0.01
    assert np.max(np.abs(default)) <= 1.0 and np.max(np.abs(peft_a)) <= 1.0
    np.testing.assert_allclose(default.var(), peft_a.var(), rtol=0.05)  # both 1/(3 fan_in)
    # The other option is N(0, 1/fan_in): the same test tells it apart.
    normal = ours("normal")
    assert ks_2samp(normal, peft_a).pvalue < 1e-6
    np.testing.assert_allclose(normal.var(), 1.0, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Duplicate-positive mask and the reasoning-query pass
# ---------------------------------------------------------------------------------------------


def _numpy_infonce(q, p, group):
    s = q @ p.T / 0.02
    s = s - s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(q)), np.arange(len(q)) * group])


def test_without_duplicate_mask_a_shared_positive_stays_a_negative(hf_configs_dir):
    cfg = _tiny_model(hf_configs_dir, 64)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, 8))
    p = rng.normal(size=(8, 8))
    p[4] = p[0]  # query 2's positive is query 0's positive
    q, p = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, p))
    keys = jnp.asarray([0, 1, 2, 3, 0, 5, 6, 7])
    step = jnp.asarray(0)
    ref = _numpy_infonce(q, p, 2)
    off = StepConfig(model=cfg, loss="infonce", mask_duplicate_positives=False)
    on = StepConfig(model=cfg, loss="infonce", mask_duplicate_positives=True)
    loss_off = compute_loss(off, jnp.asarray(q), jnp.asarray(p), None, step, 2, keys)[0]
    loss_on = compute_loss(on, jnp.asarray(q), jnp.asarray(p), None, step, 2, keys)[0]
    np.testing.assert_allclose(float(loss_off), ref, rtol=1e-5)
    assert abs(float(loss_on) - ref) > 1e-3


def test_reasoning_pass_dropout_field(hf_configs_dir):
    """With LoRA dropout on, the field changes the reasoning-query losses (and so the RI weights);
    the query/passage side uses the same keys either way."""
    cfg = _tiny_model(hf_configs_dir, 32, layers=1).replace(scan_layers=False, remat_policy="none")
    from reasonembed_jax.model.params import init_param_value, param_specs
    from train_configs import random_batch

    specs = param_specs(cfg)
    keys = jax.random.split(jax.random.key(0), len(specs))
    frozen = {p: init_param_value(s, k, cfg) for k, (p, s) in zip(keys, specs.items(), strict=True)}
    batch = {k: jnp.asarray(v) for k, v in random_batch(4, 2, 8, seed=3).items()}
    rng = jax.random.key_data(jax.random.key(7))

    def run(dropout, reasoning_dropout):
        lora = LoraConfig(rank=4, dropout=dropout)
        adapters = init_lora(cfg, lora, jax.random.key(1))
        adapters = {p: (v + 0.3 if p.endswith("lora_b") else v) for p, v in adapters.items()}
        sc = StepConfig(model=cfg, loss="ri_infonce", ri_warmup_steps=0, lora=lora,
                        reasoning_dropout=reasoning_dropout, mask_duplicate_positives=False)
        fn = jax.jit(plain_loss_and_grads, static_argnums=0)
        loss, aux, _ = fn(sc, adapters, frozen, batch, jnp.asarray(5), rng)
        return float(loss), np.asarray(aux["reasoning_loss"]), np.asarray(aux["weights"])

    off, on = run(0.5, False), run(0.5, True)
    assert np.max(np.abs(off[1] - on[1])) > 1e-4  # reasoning-query losses differ
    assert np.max(np.abs(off[2] - on[2])) > 1e-5  # and so do the RI weights


# ---------------------------------------------------------------------------------------------
# The variant itself
# ---------------------------------------------------------------------------------------------


def test_authors_variant_sets_every_listed_setting_and_nothing_else():
    ours = load_config_file("reasonembed_qwen3_8b")
    theirs = load_config_file("reasonembed_qwen3_8b", "authors")
    diffs = {field: (a, b) for field, a, b in config_differences(ours, theirs)}
    for field, (value, why) in AUTHORS_SETTINGS.items():
        group, key = field.split(".")
        assert theirs[group][key] == value and why
    assert set(diffs) == {f for f, (v, _) in AUTHORS_SETTINGS.items()
                          if ours[f.split(".")[0]][f.split(".")[1]] != v}
    assert theirs.optim.clip_norm == 1.0 and theirs.optim.eps == 1e-8


# ---------------------------------------------------------------------------------------------
# The released data layout: a folder of {domain}-formatted.jsonl
# ---------------------------------------------------------------------------------------------


def _released_folder(tmp_path, names):
    """One file per name holding the demo's biology records twice (96: leetcode's batch is 64)."""
    import gzip
    import json

    from reasonembed_jax.data.pipeline import DEMO_DATA_DIR

    folder = tmp_path / "reason-embed-data-0928"
    folder.mkdir()
    with gzip.open(f"{DEMO_DATA_DIR}/biology.jsonl.gz", "rt") as f:
        records = [json.loads(line) for line in f if line.strip()] * 2
    for r in records:
        r.pop("domain", None)  # the file name says it
    for name in names:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "README.md").write_text("not a record file")
    return folder


def _recipe_data(folder, tokenizer):
    """The ``authors`` variant's data block on ``folder``, with 32-token rows."""
    c = load_config_file("reasonembed_qwen3_8b", "authors").data
    c.sources = (str(folder),)
    c.tokenizer = str(tokenizer)
    c.query_max_length = c.passage_max_length = c.reasoning_max_length = 32
    return c


def test_released_folder_gives_each_file_its_domain_and_recipe_shape(tmp_path, qwen3_tokenizer_dir):
    from reasonembed_jax.data import build_pipeline

    shapes = load_config_module("common").RECIPE_DOMAIN_SHAPES
    folder = _released_folder(tmp_path, [f"{d.replace('_', '-')}-formatted.jsonl" for d in shapes])
    pipe = build_pipeline(_recipe_data(folder, qwen3_tokenizer_dir), process_index=0,
                          process_count=1, num_devices=1)
    assert {d.name: (d.group_size, d.batch_size, d.num_records) for d in pipe.domains} == {
        name: (g, b, 96) for name, (g, b) in shapes.items()}
    batch = pipe.batch_at(0)
    g, b = shapes[pipe.domain_names[int(batch["domain_index"])]]
    assert batch["passage_input_ids"].shape[0] == g * b


def test_released_folder_with_an_unknown_file_name_lists_known_domains(tmp_path, qwen3_tokenizer_dir):
    from reasonembed_jax.data import build_pipeline
    from reasonembed_jax.data.pipeline import default_data_config

    folder = _released_folder(tmp_path, ["biology-formatted.jsonl", "chemistry-formatted.jsonl"])
    with pytest.raises(ValueError, match=r"chemistry-formatted.jsonl.*theoremqa_theorems"):
        build_pipeline(_recipe_data(folder, qwen3_tokenizer_dir), process_index=0,
                       process_count=1, num_devices=1)
    # Without data.domains (not a recipe config) no file names a known domain.
    c = default_data_config()
    c.sources, c.tokenizer = (str(folder),), str(qwen3_tokenizer_dir)
    with pytest.raises(ValueError, match=r"biology-formatted.jsonl.*name no domain of data.domains"):
        build_pipeline(c, process_index=0, process_count=1, num_devices=1)


def test_dry_run_prints_the_resolved_differences(capsys):
    """What `train --config FILE:authors --dry_run` prints before the memory plan."""
    from reasonembed_jax.train import print_differences
    from train_configs import ROOT

    spec = f"{ROOT / 'configs' / 'reasonembed_qwen3_8b.py'}:authors"
    config = load_config_file("reasonembed_qwen3_8b", "authors")
    config.data.query_max_length = 32  # a command-line override counts too
    print_differences(spec, config)
    out = capsys.readouterr().out
    assert "(our recipe): 6 difference(s)" in out
    for line in ("optim.reference_world_size: 1 -> 8", "optim.schedule: 'warmup_decay' -> 'deepspeed'",
                 "loss.mask_duplicate_positives: True -> False", "loss.reasoning_dropout: False -> True",
                 "data.query_max_length: 512 -> 32"):
        assert line in out
