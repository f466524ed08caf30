"""On-disk cache of corpus embeddings, keyed by the encoder and the exact corpus.

Layout: ``<cache_dir>/<key>/embeddings.npy`` (float32 ``[N, D]``, opened as a memory map) and
``meta.json``. ``key = sha256(encoder.cache_key, max_length, corpus fingerprint)``, where the
fingerprint hashes every document id and text in order, so any change of model, length setting
or corpus gives a new entry. Entries are written to a temporary folder and renamed into place,
so an interrupted run never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

CACHE_FORMAT = 1


class Encoder(Protocol):
    """What evaluation needs from an embedder (``reasonembed_jax.encode.TextEncoder`` fits)."""

    cache_key: str

    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = True,
    ) -> np.ndarray: ...


def default_cache_dir() -> pathlib.Path:
    """``$REASONEMBED_CACHE/corpus_embeddings``, else
    ``~/.cache/reasonembed_jax/corpus_embeddings``."""
    root = os.environ.get("REASONEMBED_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "reasonembed_jax"
    return base / "corpus_embeddings"


def corpus_fingerprint(doc_ids: Sequence[str], doc_texts: Sequence[str]) -> str:
    """sha256 over the length-prefixed UTF-8 bytes of each (id, text) pair, in order."""
    if len(doc_ids) != len(doc_texts):
        raise ValueError(f"{len(doc_ids)} ids for {len(doc_texts)} texts")
    digest = hashlib.sha256()
    for doc_id, text in zip(doc_ids, doc_texts, strict=True):
        for part in (doc_id, text):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def embedding_cache_key(encoder_key: str, max_length: int | None, fingerprint: str) -> str:
    """Cache entry name for an encoder, a length setting and a corpus fingerprint."""
    payload = json.dumps(
        {"format": CACHE_FORMAT, "encoder": encoder_key, "max_length": max_length,
         "corpus": fingerprint},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def encode_in_length_order(
    encode: Callable[[Sequence[str]], np.ndarray],
    texts: Sequence[str],
    allocate: Callable[[int], np.ndarray],
    block_size: int,
) -> np.ndarray:
    """Encodes ``texts`` longest first, ``block_size`` at a time, into ``allocate(dim)`` (rows in
    input order). ``allocate`` may return a memory map, so memory stays bounded for big corpora."""
    order = np.argsort(-np.array([len(t) for t in texts], dtype=np.int64), kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), block_size):
        rows = order[start : start + block_size]
        embeddings = np.asarray(encode([texts[i] for i in rows]), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(rows):
            raise ValueError(f"encoder returned shape {embeddings.shape} for {len(rows)} texts")
        if out is None:
            out = allocate(embeddings.shape[1])
        if embeddings.shape[1] != out.shape[1]:
            raise ValueError(
                f"encoder changed embedding size: {embeddings.shape[1]} != {out.shape[1]}"
            )
        if not np.isfinite(embeddings).all():
            raise ValueError("encoder returned non-finite embeddings")
        out[rows] = embeddings
    assert out is not None
    return out


def encode_corpus(
    encoder: Encoder,
    doc_ids: Sequence[str],
    doc_texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None,
    batch_size: int = 32,
    max_length: int | None = None,
    block_size: int = 16384,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict]:
    """Corpus embeddings ``[N, D]`` float32 (a read-only memory map when cached) plus info
    ``{"cache_hit", "seconds", "cache_path"}``. ``cache_dir=None`` disables the cache."""
    if len(doc_texts) == 0:
        raise ValueError("the corpus is empty")
    started = time.perf_counter()

    def encode(texts: Sequence[str]) -> np.ndarray:
        return encoder.encode(
            list(texts), instruction=None, batch_size=batch_size, max_length=max_length,
            progress=progress,
        )

    if cache_dir is None:
        out = encode_in_length_order(
            encode, doc_texts, lambda dim: np.empty((len(doc_texts), dim), np.float32), block_size
        )
        seconds = time.perf_counter() - started
        log(f"encoded {len(doc_texts)} documents in {seconds:.2f} s (no cache)")
        return out, {"cache_hit": False, "seconds": seconds, "cache_path": None}

    key = embedding_cache_key(encoder.cache_key, max_length, corpus_fingerprint(doc_ids, doc_texts))
    entry = pathlib.Path(cache_dir) / key
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        embeddings = np.load(entry / "embeddings.npy", mmap_mode="r")
        if embeddings.shape[0] != len(doc_texts) or meta.get("num_docs") != len(doc_texts):
            raise RuntimeError(f"corrupt embedding cache entry {entry}: row count mismatch")
        seconds = time.perf_counter() - started
        log(f"loaded {len(doc_texts)} document embeddings from cache {entry} in {seconds:.2f} s "
            f"(encoding took {meta.get('encode_seconds', float('nan')):.2f} s when cached)")
        return embeddings, {"cache_hit": True, "seconds": seconds, "cache_path": str(entry)}

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        out = encode_in_length_order(
            encode,
            doc_texts,
            lambda dim: np.lib.format.open_memmap(
                tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(len(doc_texts), dim)
            ),
            block_size,
        )
        out.flush()
        del out
        seconds = time.perf_counter() - started
        meta = {"format": CACHE_FORMAT, "encoder_cache_key": encoder.cache_key,
                "max_length": max_length, "num_docs": len(doc_texts),
                "encode_seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process filled the entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"encoded {len(doc_texts)} documents in {seconds:.2f} s; cached at {entry}")
    return np.load(entry / "embeddings.npy", mmap_mode="r"), {
        "cache_hit": False, "seconds": seconds, "cache_path": str(entry)}
