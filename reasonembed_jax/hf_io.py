"""Hugging Face import and export for the encoder of either family (decoder LLMs, BERT).

Import streams tensors from safetensors straight into their target sharding: every device shard
is filled by a callback that reads only the layers and slices it needs, so an 8B model never has
two full host copies. Export writes an HF folder that ``transformers.AutoModel`` and
``sentence_transformers.SentenceTransformer`` both load offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from reasonembed_jax.distributed import is_primary, to_host
from reasonembed_jax.model.encoder import Encoder, ModelConfig, config_from_hf_dir
from reasonembed_jax.model.params import param_specs
from reasonembed_jax.model.sharding import DEFAULT_RULES, Rules, named_sharding
from reasonembed_jax.safetensors_io import CheckpointReader, save_file
from reasonembed_jax.text import QUERY_TEMPLATE, embedding_eos_token_id, load_tokenizer

log = logging.getLogger(__name__)

ENCODER_SETTINGS_FILE = "reasonembed_encoder.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
)
_TORCH_DTYPE_NAMES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def _param_sharding(mesh: Mesh | None, axes: tuple[str, ...], shape: tuple[int, ...],
                    rules: Rules) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return named_sharding(mesh, axes, shape, rules)


def _find_prefix(reader: CheckpointReader, anchor: str) -> str:
    """The prefix in front of base-model tensor names: HF task checkpoints wrap the base model
    (``model.`` for causal LMs, ``bert.`` for BERT heads); base models have none. ``anchor`` is the
    HF name of the token embedding table."""
    for key in reader.keys():
        if key.endswith(anchor):
            return key[: -len(anchor)]
    raise ValueError(f"{reader.model_dir}: no '*{anchor}' tensor; does config.json match the "
                     "weights?")


def load_hf_params(
    model_dir: str | os.PathLike,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> dict[str, jax.Array]:
    """Reads every encoder parameter from an HF safetensors folder, placed in its sharding.

    Returns ``{our dotted path: jax.Array}`` in ``config.param_dtype``. Tensors the encoder does
    not use (``lm_head.weight``, BERT's ``position_ids`` buffer) are skipped with a log line; a
    missing or mis-shaped tensor is an error naming it.
    """
    reader = CheckpointReader(model_dir)
    specs = param_specs(config)
    prefix = _find_prefix(reader, specs["embed_tokens"].hf_name)
    dtype = config.jnp_param_dtype
    used: set[str] = set()
    problems: list[str] = []
    for spec in specs.values():
        names = ([spec.hf_name.format(layer=i) for i in range(config.num_layers)]
                 if spec.stacked else [spec.hf_name])
        for name in names:
            full = prefix + name
            if full not in reader:
                problems.append(f"missing tensor '{full}'")
            elif reader.shape(full) != spec.hf_shape:
                problems.append(f"tensor '{full}' has shape {reader.shape(full)}, the config "
                                f"implies {spec.hf_shape}")
            used.add(full)
    if problems:
        raise ValueError(f"{model_dir} does not match its config.json: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    unused = sorted(set(reader.keys()) - used)
    if unused:
        log.info("ignoring %d tensors the encoder does not use: %s", len(unused), unused[:4])

    params = {}
    for path, spec in specs.items():
        sharding = _param_sharding(mesh, spec.logical_axes, spec.shape, rules)

        def read(index: tuple[slice, ...], spec: Any = spec) -> np.ndarray:
            if spec.stacked:
                layers = range(config.num_layers)[index[0]]
                parts = [spec.from_hf(reader.get(prefix + spec.hf_name.format(layer=i)))[index[1:]]
                         for i in layers]
                return np.stack(parts).astype(dtype)
            return np.asarray(spec.from_hf(reader.get(prefix + spec.hf_name))[index]).astype(dtype)

        params[path] = jax.make_array_from_callback(spec.shape, sharding, read)
    return params


def load_encoder(
    model_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **runtime: Any,
) -> Encoder:
    """An ``Encoder`` (config + parameters) from a local HF folder (config.json + safetensors).

    ``runtime`` sets run-time config fields: ``param_dtype``, ``dtype``, ``attention``,
    ``scan_layers``, ``remat_policy``.
    """
    config = config_from_hf_dir(model_dir, **runtime)
    return Encoder(config, load_hf_params(model_dir, config, mesh=mesh, rules=rules), mesh=mesh,
                   rules=tuple(rules))


def _source_dtype(config: ModelConfig) -> str:
    hf = config.hf_config or {}
    name = hf.get("torch_dtype") or hf.get("dtype") or config.param_dtype
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def _format_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_hf_weights(
    params: Mapping[str, jax.Array],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes the parameters as HF base-model safetensors (sharded above ``max_shard_bytes``).

    Stacked parameters are fetched to the host one layer at a time. With several processes
    every process must call this (the fetches are collectives); only process 0 writes. Returns
    the file names.
    """
    out_dir = os.fspath(out_dir)
    dtype = dtype or _source_dtype(config)
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"export dtype must be one of {sorted(_TORCH_DTYPE_NAMES)}, got {dtype}")
    np_dtype = np.dtype(_TORCH_DTYPE_NAMES[dtype])
    specs = param_specs(config)
    missing = sorted(set(specs) - set(params))
    if missing:
        raise ValueError(f"params lack {missing[:5]}")

    def tensors():  # noqa: ANN202
        for path, spec in specs.items():
            value = params[path]
            if spec.stacked:
                for i in range(config.num_layers):
                    layer = to_host(value[i]).astype(np_dtype)
                    yield spec.hf_name.format(layer=i), spec.to_hf(layer)
            else:
                yield spec.hf_name, spec.to_hf(to_host(value).astype(np_dtype))

    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush(last: bool) -> None:
        if not shards[-1]:
            return
        name = f"shard-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], os.path.join(out_dir, name), {"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        if not last:
            shards.append({})
            sizes.append(0)

    writer = is_primary()
    for name, array in tensors():
        if not writer:  # every process joins the gathers; only the first one writes
            continue
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            flush(last=False)
        shards[-1][name] = np.ascontiguousarray(array)
        sizes[-1] += array.nbytes
        total += array.nbytes
    if not writer:
        return []
    flush(last=True)
    # Name the shards the way transformers does, now that their number is known.
    final = []
    if len(files) == 1:
        os.replace(os.path.join(out_dir, files[0]), os.path.join(out_dir, "model.safetensors"))
        final = ["model.safetensors"]
    else:
        renames = {}
        for i, name in enumerate(files):
            new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
            renames[name] = new
            final.append(new)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}
        with open(os.path.join(out_dir, CheckpointReader.INDEX), "w") as f:
            json.dump(index, f, indent=2)
    log.info("wrote %s of weights in %d file(s) to %s", _format_size(total), len(final), out_dir)
    return final


def _append_eos_post_processor(tokenizer_json: dict[str, Any], eos: str, eos_id: int) -> None:
    """Makes the fast tokenizer append ``eos`` to every sequence (Qwen3-Embedding style)."""
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": eos, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": eos, "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": eos, "type_id": 1}}],
        "special_tokens": {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}},
    }


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, writer: bool = True) -> Iterator[str]:
    """Write a folder all at once: yields a temporary sibling folder to fill; when the block
    ends without error it takes ``out_dir``'s place by rename (an existing ``out_dir`` is
    replaced), on error it is removed. A kill part-way leaves ``out_dir`` as it was, never a
    half-written folder (only a hidden ``.NAME.partial-PID`` sibling, cleared by the next write).

    ``writer=False`` (the non-writing processes of a multi-host export) yields the temporary
    path and touches nothing. Reusable by anything that writes a model folder::

        with atomic_folder(out) as tmp:
            write_files(tmp)
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    if not writer:
        yield tmp
        return
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by a killed earlier write of the same folder
        if stale.startswith(f".{name}.partial-") or stale.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.filename is None:  # a failed write (disk full) names no file: name the folder
            raise OSError(err.errno, f"{err.strerror or err} while writing; {out_dir} is "
                          "unchanged", out_dir) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    if os.path.lexists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if os.path.lexists(old):
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def export_hf(
    params: Mapping[str, jax.Array],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None,
    pooling: str = "last_token",
    normalize: bool = True,
    append_eos: bool = False,
    eos_token: str | None = None,
    max_length: int = 512,
    query_instruction: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    model_card: Mapping[str, Any] | None = None,
) -> str:
    """Writes a complete HF + sentence-transformers model folder and returns its path.

    Always writes a ``README.md`` model card (``model_card.render_model_card``); ``model_card``
    adds the run's record (config, data, steps, final loss, evaluation) to it.

    Contents: safetensors weights (base model, ``*Model`` architecture), ``config.json``, the
    tokenizer files (with an EOS-appending post-processor when ``append_eos``),
    ``modules.json`` + ``sentence_bert_config.json`` + ``1_Pooling/config.json`` (+ ``2_Normalize``)
    + ``config_sentence_transformers.json`` (query prompt), and ``reasonembed_encoder.json`` with
    the pooling settings ``TextEncoder`` reads back, and ``reasonembed_content_hash.json``.
    Pass LoRA-merged ``params``. The folder appears complete or not at all (``atomic_folder``);
    an existing ``out_dir`` is replaced (``tokenizer_dir`` may be that folder).
    """
    out_dir = os.fspath(out_dir)
    with atomic_folder(out_dir, writer=is_primary()) as tmp:
        _export_hf_files(params, config, tmp, tokenizer_dir=tokenizer_dir, pooling=pooling,
                         normalize=normalize, append_eos=append_eos, eos_token=eos_token,
                         max_length=max_length, query_instruction=query_instruction, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, model_card=model_card)
    return out_dir


def _export_hf_files(
    params: Mapping[str, jax.Array], config: ModelConfig, out_dir: str, *,
    tokenizer_dir: str | os.PathLike | None, pooling: str, normalize: bool, append_eos: bool,
    eos_token: str | None, max_length: int, query_instruction: str | None, dtype: str | None,
    max_shard_bytes: int, model_card: Mapping[str, Any] | None,
) -> None:
    dtype = dtype or _source_dtype(config)
    write_hf_weights(params, config, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if not is_primary():
        return
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf(torch_dtype=dtype), f, indent=2, sort_keys=True)

    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    tok_json_path = os.path.join(out_dir, "tokenizer.json")
    tok_cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(tok_cfg_path):
        with open(tok_cfg_path) as f:
            tok_cfg = json.load(f)
        # Decoders pad left (last-token pooling); BERT must pad right, because HF derives its
        # absolute positions from the column index.
        tok_cfg["padding_side"] = config.padding_side
        tok_cfg["model_max_length"] = max_length
        with open(tok_cfg_path, "w") as f:
            json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    eos = None
    if append_eos:
        if not os.path.isfile(tok_json_path):
            raise ValueError("append_eos needs a fast tokenizer (tokenizer.json) to export")
        with open(tok_json_path, encoding="utf-8") as f:
            tok_json = json.load(f)
        tokenizer = load_tokenizer(out_dir)
        eos_id = embedding_eos_token_id(tokenizer, eos_token)
        eos = tokenizer.convert_ids_to_tokens(eos_id)
        _append_eos_post_processor(tok_json, eos, eos_id)
        with open(tok_json_path, "w", encoding="utf-8") as f:
            json.dump(tok_json, f, ensure_ascii=False)

    _write_sentence_transformers_files(
        out_dir, config.hidden_size, pooling, normalize, max_length, query_instruction
    )
    settings = {"pooling": pooling, "normalize": normalize, "append_eos": append_eos,
                "eos_token": eos, "max_length": max_length,
                "query_instruction": query_instruction}
    with open(os.path.join(out_dir, ENCODER_SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    from reasonembed_jax.model_card import write_model_card

    write_model_card(out_dir, model_type=config.model_type, hidden_size=config.hidden_size,
                     pooling=pooling, normalize=normalize, append_eos=append_eos,
                     max_length=max_length, query_instruction=query_instruction, run=model_card)
    write_content_hash(out_dir)  # last: the embedding cache's identity of this folder


_ST_POOLING = {"last_token": "lasttoken", "mean": "mean", "first_token": "cls"}
# The boolean key of each sentence-transformers pooling mode in ``1_Pooling/config.json`` (what
# every release, 3.x to 6.x, understands).
_ST_MODE_KEYS = {
    "cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken",
}


def _write_sentence_transformers_files(
    out_dir: str, dim: int, pooling: str, normalize: bool, max_length: int,
    query_instruction: str | None,
) -> None:
    if pooling not in _ST_POOLING:
        raise ValueError(f"unknown pooling '{pooling}'")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    with open(os.path.join(out_dir, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)
    with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_length, "do_lower_case": False}, f, indent=2)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    mode = _ST_POOLING[pooling]
    pooling_cfg = {"word_embedding_dimension": dim, "include_prompt": True}
    for st_mode, key in _ST_MODE_KEYS.items():
        pooling_cfg[key] = st_mode == mode
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling_cfg, f, indent=2)
    prompts = {"document": ""}
    if query_instruction:
        prompts["query"] = QUERY_TEMPLATE.format(instruction=query_instruction, query="")
    with open(os.path.join(out_dir, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": prompts, "default_prompt_name": None,
                   "similarity_fn_name": "cosine"}, f, indent=2)


def read_encoder_settings(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The pooling settings saved by ``export_hf``; for a sentence-transformers folder without
    them (e.g. all-MiniLM-L6-v2), the settings its own files declare; else empty."""
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, ENCODER_SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return _sentence_transformers_settings(model_dir)


def _sentence_transformers_settings(model_dir: str) -> dict[str, Any]:
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return {}
    with open(modules_path) as f:
        modules = json.load(f)
    settings: dict[str, Any] = {"normalize": any(m.get("type", "").endswith(".Normalize")
                                                 for m in modules)}
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling is not None:
        cfg_path = os.path.join(model_dir, pooling.get("path", ""), "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        st_mode = cfg.get("pooling_mode") or next(
            (m for m, key in _ST_MODE_KEYS.items() if cfg.get(key)), None)
        mode = next((ours for ours, st in _ST_POOLING.items() if st == st_mode), None)
        if mode is None:
            raise ValueError(f"{cfg_path}: pooling '{st_mode or cfg}' is not supported (choose a "
                             f"model with one of {sorted(_ST_POOLING.values())})")
        settings["pooling"] = mode
    bert_cfg = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(bert_cfg):
        with open(bert_cfg) as f:
            max_length = json.load(f).get("max_seq_length")
        if max_length:
            settings["max_length"] = int(max_length)
    return settings


# ---------------------------------------------------------------------------------------------
# Content hash of a model folder (embedding-cache identity)
# ---------------------------------------------------------------------------------------------

CONTENT_HASH_FILE = "reasonembed_content_hash.json"
HASH_ALGORITHM = "sha256"  # hardware-accelerated on x86 (SHA-NI) and ARMv8: the fastest here


def _hashed_file(name: str) -> bool:
    """The files whose bytes decide an embedding: weights, config and tokenizer."""
    return (name == "config.json" or name in TOKENIZER_FILES
            or name.endswith((".safetensors", ".safetensors.index.json")))


def file_digest(path: str | os.PathLike, *, chunk_bytes: int = 16 * 2**20) -> str:
    """Hex digest of every byte of a file, read in chunks (no full copy in memory)."""
    h = hashlib.new(HASH_ALGORITHM)
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _file_records(folder: str, recorded: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (_hashed_file(name) and os.path.isfile(path)):
            continue
        st = os.stat(path)
        old = recorded.get(name) or {}
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get(
                "digest"):
            digest = old["digest"]
        else:
            digest = file_digest(path)
        out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest}
    return out


def content_hash(folder: str | os.PathLike) -> str:
    """One digest of the full content of a model folder's weight, config and tokenizer files.

    Trust model: ``CONTENT_HASH_FILE`` (written by ``export_hf``) records each file's digest
    with its size and modification time; a file whose size and mtime still match is taken from
    the record, any other file (new, rewritten, copied without its times) is hashed again. So a
    folder changed in place is always re-hashed; only a deliberate rewrite that restores the
    old mtime could fool it.
    """
    folder = os.fspath(folder)
    recorded: dict[str, Any] = {}
    path = os.path.join(folder, CONTENT_HASH_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("algorithm") == HASH_ALGORITHM:
                recorded = saved.get("files", {})
        except (OSError, ValueError):
            recorded = {}
    return content_hash_of_records(_file_records(folder, recorded))


def write_content_hash(folder: str | os.PathLike) -> str:
    """Hashes ``folder`` and records the per-file digests in ``CONTENT_HASH_FILE`` so readers
    (the evaluation cache) need not re-read the weights. Returns the folder digest."""
    folder = os.fspath(folder)
    files = _file_records(folder, {})
    digest = content_hash_of_records(files)
    with open(os.path.join(folder, CONTENT_HASH_FILE), "w") as f:
        json.dump({"algorithm": HASH_ALGORITHM, "digest": digest, "files": files}, f, indent=2)
    return digest


def content_hash_of_records(files: Mapping[str, Mapping[str, Any]]) -> str:
    total = hashlib.new(HASH_ALGORITHM)
    for name in sorted(files):
        total.update(f"{name}\0{files[name]['digest']}\n".encode())
    return total.hexdigest()
