"""HF import/export: round trips, sharded files, refusal of pickles, real-config parameter trees,
and loading the export with transformers and sentence-transformers."""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_models
from reasonembed_jax import hf_io
from reasonembed_jax.encode import TextEncoder
from reasonembed_jax.model import DecoderConfig, init_params, param_specs
from reasonembed_jax.safetensors_io import SafetensorsError

INSTRUCTION = "Given a Biology post, retrieve relevant passages that help answer the post."
DOCS = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "x",
    "Insects use the moon for navigation; artificial lights confuse this steering reflex, so "
    "they spiral around lamps rather than flying straight past them.",
    "The mitochondrion is where most cellular ATP is produced by oxidative phosphorylation.",
    "Short text.",
]


def _all_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family,dtype", [("qwen3", torch.float32), ("qwen2", torch.bfloat16),
                                          ("llama", torch.float32)])
def test_round_trip_is_bit_identical(family, dtype, hf_configs_dir, tmp_path):
    """HF causal LM (sharded files, untied lm_head) -> JAX -> HF (sharded) keeps every
    encoder tensor bit for bit, in the source dtype."""
    cfg = hf_models.tiny_hf_config(hf_configs_dir, family, tie_word_embeddings=False)
    torch_model = hf_models.build_hf_model(cfg, causal_lm=True, dtype=dtype)
    src = hf_models.save_hf_model(torch_model, tmp_path / "src", max_shard_size="200KB")
    assert (src / "model.safetensors.index.json").exists()
    model = hf_io.load_encoder(src)
    out = tmp_path / "out"
    hf_io.export_hf(model.params, model.config, out, tokenizer_dir=None,
                    max_shard_bytes=200 * 2**10)
    assert (out / "model.safetensors.index.json").exists()
    original = {k.removeprefix("model."): v for k, v in _all_tensors(src).items()
                if k != "lm_head.weight"}
    exported = _all_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(exported[name], tensor), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)


def test_pickled_weights_are_refused(tmp_path, hf_configs_dir):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(SafetensorsError, match="pickled weights.*pytorch_model.bin"):
        hf_io.load_encoder(tmp_path)


def test_mismatched_checkpoint_names_the_tensor(tmp_path, hf_configs_dir):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    src = hf_models.save_hf_model(hf_models.build_hf_model(cfg), tmp_path / "src")
    bad = dict(cfg, intermediate_size=96)
    (src / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.weight' has shape \(128, 64\)"):
        hf_io.load_encoder(src)


def test_truncated_safetensors_is_reported(tmp_path, hf_configs_dir):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "llama")
    src = hf_models.save_hf_model(hf_models.build_hf_model(cfg), tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="truncated or corrupt"):
        hf_io.load_encoder(src)


@pytest.mark.parametrize("folder", ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Llama-3.1-8B"])
def test_abstract_parameters_match_hf_one_to_one(folder, hf_configs_dir):
    """Shape-only parameter tree of the real config (no memory) vs HF's model on the meta
    device: the same tensor names and shapes, one to one."""
    from transformers import AutoConfig, AutoModel

    hf_cfg = json.loads((hf_configs_dir / folder / "config.json").read_text())
    config = DecoderConfig.from_hf(hf_cfg)
    abstract = jax.eval_shape(lambda: init_params(config))
    ours = {}
    specs = param_specs(config)
    for path, value in abstract.items():
        spec = specs[path]
        assert tuple(value.shape) == spec.shape
        layer_shape = tuple(value.shape[1:]) if spec.stacked else tuple(value.shape)
        hf_shape = jax.eval_shape(spec.to_hf, jax.ShapeDtypeStruct(layer_shape, np.float32)).shape
        for i in range(config.num_layers) if spec.stacked else [None]:
            ours[spec.hf_name.format(layer=i)] = tuple(hf_shape)
    with torch.device("meta"):
        reference = AutoModel.from_config(AutoConfig.for_model(**hf_cfg))
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    n_params = sum(int(np.prod(s)) for s in theirs.values())
    assert len(abstract) == len(specs)
    assert n_params > 4e8


@pytest.fixture(scope="module")
def qwen3_export(hf_configs_dir, qwen3_tokenizer_dir, tmp_path_factory):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    src = hf_models.save_hf_model(hf_models.build_hf_model(cfg, causal_lm=True),
                                  tmp_path_factory.mktemp("src"))
    model = hf_io.load_encoder(src)
    outs = {}
    for append_eos in (False, True):
        out = tmp_path_factory.mktemp(f"export_eos{append_eos}")
        hf_io.export_hf(model.params, model.config, out,
                        tokenizer_dir=qwen3_tokenizer_dir, append_eos=append_eos,
                        query_instruction=INSTRUCTION, max_length=128)
        outs[append_eos] = out
    return src, outs


@pytest.mark.parametrize("append_eos", [False, True])
def test_sentence_transformers_loads_export_and_agrees(qwen3_export, append_eos):
    from sentence_transformers import SentenceTransformer

    _, outs = qwen3_export
    encoder = TextEncoder.from_pretrained(outs[append_eos], batch_size=4)
    assert encoder.append_eos is append_eos
    st = SentenceTransformer(str(outs[append_eos]), device="cpu")
    ours_docs = encoder.encode(DOCS, progress=False)
    st_docs = st.encode(DOCS, batch_size=3, convert_to_numpy=True)
    assert (ours_docs * st_docs).sum(-1).min() >= 0.9999
    ours_q = encoder.encode(DOCS[:2], instruction=INSTRUCTION, progress=False)
    st_q = st.encode(DOCS[:2], prompt_name="query", convert_to_numpy=True)
    assert (ours_q * st_q).sum(-1).min() >= 0.9999
    # The EOS really is the pooled token when asked for.
    ids = st.tokenizer(["hello"])["input_ids"][0]
    assert (ids[-1] == 151643) is append_eos


def test_transformers_automodel_loads_export(qwen3_export):
    from transformers import AutoModel

    src, outs = qwen3_export
    exported = AutoModel.from_pretrained(outs[False]).eval()
    original = hf_io.load_encoder(src)
    ids = np.array([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], np.int32)
    mask = (np.arange(5)[None] >= np.array([[2], [0]])).astype(np.int32)
    with torch.no_grad():
        ref = exported(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours = np.asarray(original(ids, mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
