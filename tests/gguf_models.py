"""Tiny GGUF checkpoints written with ``gguf.GGUFWriter`` from random HF (PyTorch) models.

The writer follows llama.cpp's conventions independently of ``reasonembed_jax.convert_gguf``:
its tensor names, dimensions listed fastest first, and the llama q/k row permutation (per head,
the two rotary halves interleaved). A small byte-level BPE vocabulary goes into the metadata so
both our converter and transformers' GGUF loader can build a tokenizer.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

VOCAB_SIZE = 320

_HF_TO_GGUF = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("layers."):
        _, layer, rest = hf.split(".", 2)
        return f"blk.{layer}.{_HF_TO_GGUF[rest]}"
    return _HF_TO_GGUF[hf]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's storage order for llama q/k rows: per head, [first half; second half] becomes
    interleaved (h0, h_half, h1, h_half+1, ...)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab(size: int = VOCAB_SIZE) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, padding tokens and three
    control tokens at the end (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"]
    tokens = alphabet + [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"[PAD{i}]" for i in range(size - len(tokens) - len(specials))] + specials
    types = [1] * (size - len(specials)) + [3] * len(specials)  # 1 normal, 3 control
    return tokens, types, merges


def write_gguf(path: pathlib.Path, model, cfg: dict, *, qtype: str = "F32",  # noqa: ANN001
               architecture: str | None = None, tensor_hook=None,  # noqa: ANN001
               lm_head: np.ndarray | None = None) -> pathlib.Path:
    """Writes the HF ``model`` (base model, config dict ``cfg``) as a GGUF file. ``qtype`` is the
    storage of 2-D weights (F32, F16 or Q8_0); norms and biases stay F32 as llama.cpp keeps them.
    ``architecture`` overrides the metadata's (bad-input tests); ``tensor_hook(name, array)``
    may replace a tensor (or return None to drop it); ``lm_head`` ([vocab, hidden]) is written as
    an untied ``output.weight``."""
    arch = architecture or cfg["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    tokens, types, merges = byte_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    tensors = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    for hf, arr in tensors.items():
        name = gguf_name(hf)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = llama_permute(arr, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = llama_permute(arr, kv_heads)
        if tensor_hook is not None:
            arr = tensor_hook(name, arr)
            if arr is None:
                continue
        if arr.ndim == 2 and qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.ndim == 2 and qtype == "Q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    if lm_head is not None:
        w.add_tensor("output.weight", np.asarray(lm_head, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
