"""Convert a GGUF checkpoint (llama.cpp) of a supported decoder family into an HF model folder.

    python -m reasonembed_jax.convert_gguf FILE.gguf --out HF_DIR [--append-eos] [--max-length 512]
        [--causal-lm]

Supported architectures: llama, qwen2, qwen3 (dense). Tensors are dequantized to float32 with the
``gguf`` package (F32, F16, BF16 and every block type it can dequantize: Q4_0 ... Q8_0, the K
quants, the IQ quants), llama.cpp's row permutation of the llama q/k projections is undone, and
names are mapped through our parameter table (``model/params.py``). The output folder has
safetensors weights, ``config.json``, the tokenizer rebuilt from the GGUF metadata (with its chat
template) and last-token pooling settings, so ``transformers``, ``sentence-transformers`` and our
own loader read it. No PyTorch is needed; nothing in the file is executed.

The folder is assembled under a temporary name beside ``--out`` and renamed when complete, so a
failed conversion never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name -> HF base-model name (one place; "{layer}" as in the parameter table).
GGUF_TO_HF = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "blk.{layer}.attn_norm.weight": "layers.{layer}.input_layernorm.weight",
    "blk.{layer}.ffn_norm.weight": "layers.{layer}.post_attention_layernorm.weight",
    "blk.{layer}.attn_q.weight": "layers.{layer}.self_attn.q_proj.weight",
    "blk.{layer}.attn_k.weight": "layers.{layer}.self_attn.k_proj.weight",
    "blk.{layer}.attn_v.weight": "layers.{layer}.self_attn.v_proj.weight",
    "blk.{layer}.attn_q.bias": "layers.{layer}.self_attn.q_proj.bias",
    "blk.{layer}.attn_k.bias": "layers.{layer}.self_attn.k_proj.bias",
    "blk.{layer}.attn_v.bias": "layers.{layer}.self_attn.v_proj.bias",
    "blk.{layer}.attn_output.weight": "layers.{layer}.self_attn.o_proj.weight",
    "blk.{layer}.attn_output.bias": "layers.{layer}.self_attn.o_proj.bias",
    "blk.{layer}.attn_q_norm.weight": "layers.{layer}.self_attn.q_norm.weight",
    "blk.{layer}.attn_k_norm.weight": "layers.{layer}.self_attn.k_norm.weight",
    "blk.{layer}.ffn_gate.weight": "layers.{layer}.mlp.gate_proj.weight",
    "blk.{layer}.ffn_up.weight": "layers.{layer}.mlp.up_proj.weight",
    "blk.{layer}.ffn_down.weight": "layers.{layer}.mlp.down_proj.weight",
    "blk.{layer}.ffn_gate.bias": "layers.{layer}.mlp.gate_proj.bias",
    "blk.{layer}.ffn_up.bias": "layers.{layer}.mlp.up_proj.bias",
    "blk.{layer}.ffn_down.bias": "layers.{layer}.mlp.down_proj.bias",
}
# The LM head is not part of an embedder; an untied one is left out (tied ones are not stored).
IGNORED_TENSORS = ("output.weight",)
# llama.cpp reorders the rows of these llama tensors (rotary halves interleaved per head).
PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


# sentence-transformers' files in an export, left out of a causal-LM folder.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling", "2_Normalize")


class GGUFConversionError(ValueError):
    """A GGUF file that cannot be converted; the message names the problem in one line."""


def hf_name(gguf_name: str) -> str | None:
    """The HF base-model name of a GGUF tensor name, or None when it has none."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{layer}", *parts[2:]])
        target = GGUF_TO_HF.get(pattern)
        return target.format(layer=int(parts[1])) if target else None
    return GGUF_TO_HF.get(gguf_name)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, its rows were stored as the two rotary
    halves interleaved (row 2i <- i, row 2i+1 <- i + head_dim/2); this puts the halves back."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot un-permute a tensor of {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: str) -> Any:  # noqa: ANN401 (gguf.GGUFReader)
    import gguf

    if not os.path.isfile(path):
        raise GGUFConversionError(f"{path}: no such file")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises many kinds on a cut or corrupt header
        raise GGUFConversionError(
            f"{path}: not a readable GGUF file (truncated or corrupt: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise GGUFConversionError(
                f"{path}: truncated file: tensor '{t.name}' ends at byte "
                f"{int(t.data_offset) + int(t.n_bytes):,} but the file has {size:,} bytes")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:  # noqa: ANN401
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config_from_gguf(reader: Any) -> dict[str, Any]:  # noqa: ANN401
    """The HF ``config.json`` dict of the model in a GGUF file (llama / qwen2 / qwen3)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"unsupported GGUF architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def key(name: str, default: Any = None, required: bool = True) -> Any:  # noqa: ANN401
        value = _field(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise GGUFConversionError(f"GGUF metadata lacks '{arch}.{name}'")
        return value

    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFConversionError(
            f"unsupported rope scaling in the GGUF file ({scaling or 'rope_freqs tensor'}); only "
            "unscaled rotary embeddings convert")
    names = {t.name for t in reader.tensors}
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts
        if len(set(kv_heads)) != 1:
            raise GGUFConversionError(f"per-layer key/value head counts {sorted(set(kv_heads))} "
                                      "are not supported")
        kv_heads = kv_heads[0]
    hidden = int(key("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if tokens is not None else None)
    if "token_embd.weight" in names:  # the embedding table is the authority on the vocabulary
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    head_dim = int(key("attention.key_length", hidden // heads, required=False))
    hf: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0, required=False)),
        "max_position_embeddings": int(key("context_length", 32768, required=False)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
        hf["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    elif arch == "qwen3":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            hf[name] = int(value)
    return hf


def read_params(reader: Any, config: Any) -> dict[str, np.ndarray]:  # noqa: ANN401
    """Every parameter of ``config`` in our layout (stacked per layer), float32, from the file."""

    from reasonembed_jax.model.params import param_specs

    specs = param_specs(config)
    wanted: dict[str, tuple[str, int | None]] = {}  # HF name -> (our path, layer)
    for path, spec in specs.items():
        if spec.stacked:
            for i in range(config.num_layers):
                wanted[spec.hf_name.format(layer=i)] = (path, i)
        else:
            wanted[spec.hf_name] = (path, None)
    hf_cfg = config.hf_config
    layers: dict[str, list[np.ndarray | None]] = {
        p: [None] * config.num_layers for p, s in specs.items() if s.stacked}
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name in IGNORED_TENSORS:
                continue
            raise GGUFConversionError(f"tensor '{t.name}' has no place in a {config.model_type} "
                                      "model")
        if name not in wanted:
            raise GGUFConversionError(f"tensor '{t.name}' ({name}) is not part of this "
                                      f"{config.model_type} configuration")
        path, layer = wanted[name]
        spec = specs[path]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest first
        if shape != spec.hf_shape:
            raise GGUFConversionError(f"tensor '{t.name}' has shape {list(shape)}, expected "
                                      f"{list(spec.hf_shape)} from the metadata")
        value = dequantize(t)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if config.model_type == "llama" and kind in PERMUTED:
            value = unpermute_rows(value, int(hf_cfg[PERMUTED[kind]]))
        value = spec.from_hf(value)
        seen.add(name)
        if layer is None:
            out[path] = value
        else:
            layers[path][layer] = value
    missing = [n for n in wanted if n not in seen]
    if missing:
        raise GGUFConversionError(f"the GGUF file lacks {len(missing)} tensor(s), e.g. "
                                  f"'{missing[0]}' (HF name)")
    for path, values in layers.items():
        out[path] = np.stack(values)
        values.clear()
    return out


def write_tokenizer(reader: Any, out_dir: str) -> None:  # noqa: ANN401
    """The fast tokenizer described by the GGUF metadata (vocabulary, merges, special tokens,
    chat template), saved as HF tokenizer files. transformers' GGUF tokenizer mapping builds it
    from values we read here (no torch)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    arch = _field(reader, "general.architecture")
    groups = {}
    for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {name: _field(reader, f"tokenizer.{k}") for k, name in renames.items()
                         if f"tokenizer.{k}" in reader.fields}
    tok_dict, tok_cfg = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise GGUFConversionError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    for special, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if token_id is not None:
            tok_cfg[special] = tok_dict["tokens"][int(token_id)]
    try:
        backend, extra = mapping.convert_gguf_tokenizer(arch, tok_dict)
    except ValueError as err:
        raise GGUFConversionError(f"cannot build the tokenizer: {err}") from None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tok_cfg, **extra)
    tokenizer.save_pretrained(out_dir)


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, append_eos: bool = False,
            max_length: int = 512, causal_lm: bool = False) -> str:
    """Converts ``gguf_path`` into the HF folder ``out_dir`` (which must not exist) and returns it.

    ``causal_lm``: write the ``*ForCausalLM`` layout (``model.`` prefix, ``lm_head.weight`` when
    the file has an untied head) that generation engines such as vLLM load; our loader reads
    either layout."""
    from reasonembed_jax.hf_io import export_hf
    from reasonembed_jax.model.config import DecoderConfig

    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        raise GGUFConversionError(f"{out_dir} already exists; remove it or choose another --out")
    reader = _open(gguf_path)
    hf = hf_config_from_gguf(reader)
    try:
        config = DecoderConfig.from_hf(hf)
    except ValueError as err:
        raise GGUFConversionError(f"unsupported model settings: {err}") from None
    params = read_params(reader, config)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        tok_dir = os.path.join(tmp, "tokenizer")
        write_tokenizer(reader, tok_dir)
        model_dir = os.path.join(tmp, "model")
        export_hf(params, config, model_dir, tokenizer_dir=tok_dir, pooling="last_token",
                  normalize=True, append_eos=append_eos, max_length=max_length, dtype="float32")
        if causal_lm:
            to_causal_lm(reader, hf, model_dir)
        os.replace(model_dir, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def lm_head(reader: Any) -> np.ndarray | None:  # noqa: ANN401
    """The untied output projection ``[vocab, hidden]`` in float32, or None when it is tied."""
    t = next((t for t in reader.tensors if t.name == "output.weight"), None)
    if t is None:
        return None
    return dequantize(t)


def dequantize(t: Any) -> np.ndarray:  # noqa: ANN401 (gguf.ReaderTensor)
    """A GGUF tensor as float32 in HF's dimension order; a clear error for a type that is no
    float weight or that the ``gguf`` package cannot dequantize."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    try:
        value = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
        raise GGUFConversionError(f"tensor '{t.name}' has quantization type {qtype.name}, "
                                  "which cannot be dequantized") from None
    if not np.issubdtype(value.dtype, np.floating):  # integer tensors are no weights
        raise GGUFConversionError(f"tensor '{t.name}' has unsupported type {qtype.name}")
    # GGUF lists dimensions fastest first
    return np.asarray(value, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def to_causal_lm(reader: Any, hf: dict[str, Any], model_dir: str) -> None:  # noqa: ANN401
    """Rewrites an exported base-model folder in place as ``*ForCausalLM``: every tensor under
    ``model.``, the untied head as ``lm_head.weight``, and the architecture in ``config.json``.
    The sentence-transformers files go (an LM is no embedder; vLLM would also cap its context at
    their ``max_seq_length``)."""
    from reasonembed_jax.hf_io import write_content_hash
    from reasonembed_jax.safetensors_io import SafetensorsFile, save_file

    for name in ST_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    head = lm_head(reader)  # float32, as the export (convert() writes float32)
    weight_map: dict[str, str] = {}
    for i, name in enumerate(files):
        path = os.path.join(model_dir, name)
        st = SafetensorsFile(path)
        tensors = {f"model.{k}": st.get(k) for k in st.keys()}
        if head is not None and i == len(files) - 1:
            tensors["lm_head.weight"] = head
        del st
        save_file(tensors, path, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[hf["model_type"]]
    index = os.path.join(model_dir, "model.safetensors.index.json")  # sharded exports only
    if os.path.exists(index):
        _update_json(index, weight_map=weight_map)
    _update_json(os.path.join(model_dir, "config.json"),
                 architectures=[f"{family}ForCausalLM"])
    _update_json(os.path.join(model_dir, "tokenizer_config.json"),  # the LM's context, not 512
                 model_max_length=int(hf["max_position_embeddings"]))
    write_content_hash(model_dir)


def _update_json(path: str, **changes: Any) -> None:  # noqa: ANN401
    """Sets top-level keys of a JSON file in place."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasonembed_jax.convert_gguf",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("--out", required=True, help="output HF folder (must not exist)")
    parser.add_argument("--append-eos", action="store_true",
                        help="export a tokenizer that appends EOS (pooled by last-token pooling)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="max sequence length written to the tokenizer/encoder settings")
    parser.add_argument("--causal-lm", action="store_true",
                        help="write the *ForCausalLM layout (with the LM head) that generation "
                             "engines such as vLLM load, e.g. for the synthesis stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args.gguf, args.out, append_eos=args.append_eos, max_length=args.max_length,
                      causal_lm=args.causal_lm)
    except GGUFConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
