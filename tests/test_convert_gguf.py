"""GGUF -> HF conversion on tiny random llama / qwen2 / qwen3 models written as GGUF files.

References: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``, which
dequantizes and un-permutes independently of us) and, for F32 files, the original PyTorch
weights. Bad inputs: truncated file, other architecture, unsupported tensor type, wrong shape.
"""

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import hf_models
from gguf_models import VOCAB_SIZE, write_gguf
from reasonembed_jax import hf_io
from reasonembed_jax.convert_gguf import GGUFConversionError, convert
from reasonembed_jax.safetensors_io import CheckpointReader
from reasonembed_jax.text import load_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3")
TEXTS = ["the cat sat on the mat", "hi", "at the theatre, she sat near the rear <|im_end|> end"]


def _tiny_cfg(hf_configs_dir, family):
    # transformers' qwen3 GGUF loader ignores qwen3.attention.key_length and takes Qwen3's default
    # head_dim (128), so the tiny qwen3 uses 128 (still != hidden / heads = 16: key_length is read).
    extra = {"head_dim": 128} if family == "qwen3" else {}
    return hf_models.tiny_hf_config(hf_configs_dir, family, vocab_size=VOCAB_SIZE, **extra)


@pytest.fixture(scope="module")
def tiny_gguf(hf_configs_dir, tmp_path_factory):
    """{(family, qtype): (torch model, gguf folder, our converted folder)}, built lazily."""
    cache = {}

    def get(family, qtype):
        if (family, qtype) not in cache:
            model = hf_models.build_hf_model(_tiny_cfg(hf_configs_dir, family))
            folder = tmp_path_factory.mktemp(f"{family}-{qtype}")
            write_gguf(folder / "m.gguf", model, model.config.to_dict(), qtype=qtype)
            out = convert(folder / "m.gguf", folder / "hf")
            cache[family, qtype] = (model, folder, out)
        return cache[family, qtype]

    return get


def _transformers_gguf(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, gguf_file="m.gguf", dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_equals_transformers_gguf_loader(tiny_gguf, family, qtype):
    model, folder, out = tiny_gguf(family, qtype)
    ref = _transformers_gguf(folder).state_dict()
    ours = CheckpointReader(out)
    assert set(ours.keys()) == set(ref)
    for name, tensor in ref.items():
        np.testing.assert_array_equal(ours.get(name), tensor.numpy(), err_msg=name)
    original = model.state_dict()
    for name, tensor in original.items():
        if qtype == "F32":  # lossless storage: the original weights come back bit for bit
            np.testing.assert_array_equal(ours.get(name), tensor.numpy(), err_msg=name)
        else:
            np.testing.assert_allclose(ours.get(name), tensor.numpy(), atol=3e-3, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_folder_matches_transformers_hidden_states(tiny_gguf, family):
    """Our loader on the converted folder vs transformers on the GGUF file: left-padded batch."""
    _, folder, out = tiny_gguf(family, "Q8_0")
    tokenizer = load_tokenizer(out)
    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert (mask[:, 0] == 0).any()
    with torch.no_grad():
        ref = _transformers_gguf(folder)(input_ids=torch.tensor(ids).long(),
                                         attention_mask=torch.tensor(mask).long())
    ref = ref.last_hidden_state.numpy()
    ours = np.asarray(hf_io.load_encoder(out)(ids, mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def test_tokenizer_and_settings_match_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    _, folder, out = tiny_gguf("qwen2", "F32")
    ref = AutoTokenizer.from_pretrained(folder, gguf_file="m.gguf")
    ours = load_tokenizer(out)
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids
    assert ours.eos_token == ref.eos_token == "<|im_end|>"
    assert ours.chat_template == ref.chat_template
    assert hf_io.read_encoder_settings(out)["pooling"] == "last_token"


def test_append_eos_tokenizer(tiny_gguf, tmp_path):
    _, folder, _ = tiny_gguf("qwen2", "F32")
    out = convert(folder / "m.gguf", tmp_path / "eos", append_eos=True)
    tokenizer = load_tokenizer(out)
    ids = tokenizer("the cat").input_ids
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert hf_io.read_encoder_settings(out)["append_eos"] is True


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_lm_folder_equals_transformers_gguf_causal_lm(hf_configs_dir, tmp_path, family,
                                                             tied):
    """``--causal-lm`` (the folder vLLM generates with): transformers' GGUF loader as the causal LM
    is the reference for every tensor (LM head included) and for the logits; our own loader reads
    the same encoder from either layout."""
    from transformers import AutoModelForCausalLM

    cfg = _tiny_cfg(hf_configs_dir, family)
    model = hf_models.build_hf_model(cfg)
    head = None if tied else np.random.default_rng(0).normal(
        0, 0.08, (cfg["vocab_size"], cfg["hidden_size"])).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", model, model.config.to_dict(), qtype="Q8_0", lm_head=head)
    base = convert(tmp_path / "m.gguf", tmp_path / "hf")
    out = convert(tmp_path / "m.gguf", tmp_path / "lm", causal_lm=True)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                               dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(ours) is type(ref)
    assert ours.config.architectures == [type(ref).__name__]
    assert ours.config.tie_word_embeddings is tied
    assert not os.path.exists(os.path.join(out, "modules.json"))  # no embedder settings to cap vLLM's context
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert set(our_state) == set(ref_state)
    for name, tensor in ref_state.items():
        np.testing.assert_array_equal(our_state[name].numpy(), tensor.numpy(), err_msg=name)
    if head is not None:  # the GGUF's own head, not the embeddings
        np.testing.assert_allclose(our_state["lm_head.weight"].numpy(), head, atol=3e-3)
    ids = torch.tensor([[5, 80, 17, 200, 3]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(input_ids=ids).logits.numpy(),
                                   ref(input_ids=ids).logits.numpy(), atol=1e-5)
    mask = np.ones((1, 5), np.int32)
    np.testing.assert_array_equal(np.asarray(hf_io.load_encoder(out)(ids.numpy(), mask)),
                                  np.asarray(hf_io.load_encoder(base)(ids.numpy(), mask)))


# --- bad input -----------------------------------------------------------------------------

def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "reasonembed_jax.convert_gguf", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def _assert_refused(path, out, *words):
    proc = _run_cli(path, "--out", out)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in last, last
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}")]
    return last


def test_truncated_file_is_refused(tiny_gguf, tmp_path):
    _, folder, _ = tiny_gguf("llama", "F32")
    data = (folder / "m.gguf").read_bytes()
    for cut in (len(data) - 1000, 24):  # in the tensor data; in the header
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        _assert_refused(bad, tmp_path / f"out{cut}", "trunc")


def test_other_architecture_is_refused(hf_configs_dir, tmp_path):
    model = hf_models.build_hf_model(_tiny_cfg(hf_configs_dir, "qwen2"))
    path = write_gguf(tmp_path / "g.gguf", model, model.config.to_dict(), architecture="gemma3")
    _assert_refused(path, tmp_path / "out", "gemma3", "architecture")


def test_unsupported_tensor_type_is_refused(hf_configs_dir, tmp_path):
    model = hf_models.build_hf_model(_tiny_cfg(hf_configs_dir, "qwen2"))

    def as_int(name, arr):
        return (arr * 100).astype(np.int32) if name == "blk.1.ffn_up.weight" else arr

    path = write_gguf(tmp_path / "i.gguf", model, model.config.to_dict(), tensor_hook=as_int)
    _assert_refused(path, tmp_path / "out", "blk.1.ffn_up.weight", "I32")


def test_wrong_shape_is_refused(hf_configs_dir, tmp_path):
    model = hf_models.build_hf_model(_tiny_cfg(hf_configs_dir, "llama"))

    def shrink(name, arr):
        return arr[:-1] if name == "blk.0.attn_v.weight" else arr

    path = write_gguf(tmp_path / "s.gguf", model, model.config.to_dict(), tensor_hook=shrink)
    _assert_refused(path, tmp_path / "out", "blk.0.attn_v.weight", "shape")


def test_missing_tensor_and_existing_output_are_refused(tiny_gguf, hf_configs_dir, tmp_path):
    model = hf_models.build_hf_model(_tiny_cfg(hf_configs_dir, "qwen3"))
    path = write_gguf(tmp_path / "m.gguf", model, model.config.to_dict(),
                      tensor_hook=lambda n, a: None if n == "blk.1.attn_k_norm.weight" else a)
    with pytest.raises(GGUFConversionError, match="k_norm"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _, folder, out = tiny_gguf("qwen3", "F32")
    with pytest.raises(GGUFConversionError, match="already exists"):
        convert(folder / "m.gguf", out)
    assert gguf.GGUFReader(str(folder / "m.gguf")).fields["general.architecture"].contents() == "qwen3"
