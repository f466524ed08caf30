"""Text -> embeddings with a local HF model (decoder or BERT): the ``TextEncoder`` API and the
``encode`` CLI.

    python -m reasonembed_jax.encode --model HF_DIR --input FILE.jsonl [--text-field text] \\
        [--instruction "..."] --out EMB.npy [--batch-size N] [--max-length L]

Texts are sorted by token length and batched so padding stays small; each batch is padded to a
length bucket and a fixed row count (so only a few shapes compile) and split over all devices
along the data axis. Output rows follow the input order, float32, L2-normalised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reasonembed_jax.cli import positive_int, run_cli
from reasonembed_jax.hf_io import content_hash, load_encoder, read_encoder_settings
from reasonembed_jax.model.config import POOLING_MODES
from reasonembed_jax.model.encoder import Encoder, embed
from reasonembed_jax.model.sharding import batch_sharding, data_parallel_size, make_mesh
from reasonembed_jax.text import (
    bucket_length,
    embedding_eos_token_id,
    format_query,
    load_tokenizer,
    pad_left,
    pad_token_id,
    tokenize_to_ids,
)

log = logging.getLogger(__name__)
# Length buckets ~1.5x apart (powers of two and their midpoints): at most ~1.5x padding instead of
# 2x for powers of two alone, for twice as many (still few) compiled shapes.
ENCODE_BUCKETS = tuple(sorted({b for k in range(5, 14) for b in (2**k, 3 * 2**(k - 1))}))


class TextEncoder:
    """An ``Encoder`` (config + parameters) plus its tokenizer and pooling settings.

    ``encode(texts, instruction=...)`` returns ``[N, dim]`` float32 rows in input order;
    ``cache_key`` identifies weights + settings for embedding caches.
    """

    def __init__(
        self,
        model: Encoder,
        tokenizer: Any,
        *,
        pooling: str = "last_token",
        normalize: bool = True,
        append_eos: bool = False,
        eos_token_id: int | None = None,
        max_length: int = 512,
        dim: int | None = None,
        batch_size: int = 32,
        mesh: Mesh | None = None,
        buckets: Sequence[int] = ENCODE_BUCKETS,
        identity: str = "",
    ):
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got '{pooling}'")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.append_eos = append_eos
        self.eos_token_id = eos_token_id
        self.max_length = max_length
        self.dim = dim
        self.batch_size = batch_size
        self.mesh = mesh if mesh is not None else (model.mesh or make_mesh(data=-1))
        self.buckets = tuple(buckets)
        self._identity = identity
        self._embed = jax.jit(self._embed_impl)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        max_length: int | None = None,
        dtype: str = "float32",
        pooling: str | None = None,
        normalize: bool | None = None,
        append_eos: bool | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        mesh: Mesh | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        attention: str | None = None,
    ) -> TextEncoder:
        """Loads a local HF folder. Unset options come from ``reasonembed_encoder.json`` (written
        by our export) or default to last-token pooling, normalisation, no EOS append, 512."""
        model_dir = os.fspath(model_dir)
        for name, value in (("max_length", max_length), ("dim", dim), ("batch_size", batch_size)):
            if value is not None and value < 1:  # None is unset; 0 is an error, not "unset"
                raise ValueError(f"{name} must be >= 1, got {value}")
        saved = read_encoder_settings(model_dir)
        mesh = mesh if mesh is not None else make_mesh(data=-1)
        runtime = {} if attention is None else {"attention": attention}
        model = load_encoder(model_dir, mesh=mesh, param_dtype=dtype, dtype=dtype, **runtime)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        settings = {
            "pooling": pooling or saved.get("pooling", "last_token"),
            "normalize": saved.get("normalize", True) if normalize is None else normalize,
            "append_eos": saved.get("append_eos", False) if append_eos is None else append_eos,
            # BERT-family models cannot go past their position table.
            "max_length": max_length if max_length is not None else saved.get(
                "max_length", min(512, model.config.max_position_embeddings)),
            "dim": dim,
        }
        eos_id = None
        if settings["append_eos"]:
            eos_id = embedding_eos_token_id(tokenizer, saved.get("eos_token"))
        identity = json.dumps(
            {"weights": content_hash(model_dir), "dtype": dtype, "attention": attention,
             "tokenizer": content_hash(tokenizer_dir) if tokenizer_dir else None, **settings},
            sort_keys=True)
        return cls(model, tokenizer, eos_token_id=eos_id, batch_size=batch_size, mesh=mesh,
                   identity=identity, **settings)

    @property
    def cache_key(self) -> str:
        """A hex digest of the full weight, config and tokenizer content (``hf_io.content_hash``)
        and every setting that changes embeddings."""
        payload = self._identity or json.dumps(
            {"model": id(self.model), "pooling": self.pooling, "dim": self.dim})
        payload += json.dumps([self.pooling, self.normalize, self.append_eos, self.max_length,
                               self.dim, self.eos_token_id])
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    @property
    def embedding_dim(self) -> int:
        return self.dim or self.model.config.hidden_size

    def _embed_impl(self, params: Any, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        return embed(self.model.config, params, input_ids, mask, pooling=self.pooling,
                     normalize=self.normalize, dim=self.dim, mesh=self.model.mesh,
                     rules=self.model.rules)

    def embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings of already tokenized, left-padded rows (row count divisible by the data
        parallel size)."""
        sharding = batch_sharding(self.mesh, self.model.rules, ndim=2)
        ids = jax.device_put(jnp.asarray(input_ids, jnp.int32), sharding)
        mask = jax.device_put(jnp.asarray(attention_mask, jnp.int32), sharding)
        return np.asarray(jax.device_get(self._embed(self.model.params, ids, mask)),
                          dtype=np.float32)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        return tokenize_to_ids(self.tokenizer, texts, max_length or self.max_length,
                               append_eos=self.append_eos, eos_token_id=self.eos_token_id)

    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Embeds ``texts`` (queries when ``instruction`` is given) -> ``[N, dim]`` float32."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings, not a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, not str")
        n = len(texts)
        out = np.zeros((n, self.embedding_dim), dtype=np.float32)
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        self.num_empty_texts = len(empty)  # of the last call
        if empty:
            log.warning("%d of %d texts are empty or blank (first at index %s): they all get the "
                        "embedding of an empty input, which means nothing; check the input",
                        len(empty), n, ", ".join(map(str, empty[:5])))
        if n == 0:
            return out
        max_length = self.max_length if max_length is None else max_length
        batch_size = self.batch_size if batch_size is None else batch_size
        data_parallel = data_parallel_size(self.mesh, self.model.rules)
        rows_per_batch = -(-batch_size // data_parallel) * data_parallel
        inputs = [format_query(t, instruction) for t in texts] if instruction else list(texts)
        ids = self.tokenize(inputs, max_length)
        order = np.argsort([-len(r) for r in ids], kind="stable")
        pad = pad_token_id(self.tokenizer)
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="text", disable=not progress, desc="encode", file=sys.stderr)
        for start in range(0, n, rows_per_batch):
            chunk = order[start:start + rows_per_batch]
            rows = [ids[i] for i in chunk]
            width = bucket_length(max(len(r) for r in rows), self.buckets, max_length)
            input_ids, mask = pad_left(rows, width, pad, num_rows=rows_per_batch)
            out[chunk] = self.embed_tokens(input_ids, mask)[: len(chunk)]
            bar.update(len(chunk))
        bar.close()
        return out


def read_jsonl_texts(path: str, field: str) -> list[str]:
    """The ``field`` of every line of a JSONL file (``.gz`` allowed); errors name file:line."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise ValueError(f"{path}:{line_no}: no field '{field}'")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}:{line_no}: field '{field}' is "
                                 f"{type(obj[field]).__name__}, not a string")
            texts.append(obj[field])
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reasonembed_jax.encode",
        description="Embed the texts of a JSONL file with a local HF model (decoder or BERT) "
        "(float32, L2-normalised rows in input order, saved as .npy).",
    )
    parser.add_argument("--model", required=True, help="local HF folder (config.json + "
                        "safetensors + tokenizer)")
    parser.add_argument("--input", required=True, help="JSONL file (optionally .gz)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text")
    parser.add_argument("--instruction", default=None,
                        help="embed as queries: 'Instruct: {instruction}\\nQuery: {text}'")
    parser.add_argument("--out", required=True, help="output .npy path")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="max tokens per text (default: the model's saved setting or 512)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter and compute dtype")
    parser.add_argument("--pooling", default=None, choices=list(POOLING_MODES))
    parser.add_argument("--dim", type=positive_int, default=None, help="Matryoshka truncation dimension")
    parser.add_argument("--append-eos", default=None, action=argparse.BooleanOptionalAction,
                        help="append EOS and pool it (Qwen3-Embedding style)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    texts = read_jsonl_texts(args.input, args.text_field)
    encoder = TextEncoder.from_pretrained(
        args.model, max_length=args.max_length, dtype=args.dtype, pooling=args.pooling,
        dim=args.dim, append_eos=args.append_eos, batch_size=args.batch_size,
    )
    start = time.perf_counter()
    emb = encoder.encode(texts, instruction=args.instruction, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np.save(args.out, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.out} "
          f"in {elapsed:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    run_cli(main)
