"""Text handling shared by encoding, training data and evaluation: query formatting, tokenization
with left padding, optional EOS append and length buckets.

Every place that turns text into model inputs goes through ``tokenize_texts`` so training and
inference see identical token sequences.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"
DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def format_query(query: str, instruction: str | None) -> str:
    """``Instruct: {instruction}\\nQuery: {query}``; the bare query when no instruction is given.

    Documents are never formatted: only queries (and reasoning queries) carry the instruction.
    """
    if instruction is None or instruction == "":
        return query
    return QUERY_TEMPLATE.format(instruction=instruction, query=query)


def load_tokenizer(path: str | os.PathLike):  # noqa: ANN201 (transformers type)
    """Loads a fast tokenizer from a local folder (never remote code), padding on the left."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Qwen-family embedders (Qwen3-Embedding) append and pool <|endoftext|>, not the chat EOS.
EMBEDDING_EOS_TOKENS = ("<|endoftext|>",)


def embedding_eos_token_id(tokenizer, eos_token: str | None = None) -> int:  # noqa: ANN001
    """The id appended before last-token pooling: ``eos_token`` if given, else the first of
    ``EMBEDDING_EOS_TOKENS`` the vocabulary has, else the tokenizer's own EOS."""
    vocab = tokenizer.get_vocab()
    for name in ((eos_token,) if eos_token else EMBEDDING_EOS_TOKENS):
        if name in vocab:
            return int(vocab[name])
    if eos_token:
        raise ValueError(f"EOS token '{eos_token}' is not in the tokenizer's vocabulary")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set the EOS token explicitly")
    return int(tokenizer.eos_token_id)


def bucket_length(length: int, buckets: Sequence[int] | None, max_length: int) -> int:
    """The smallest bucket >= ``length`` (capped at ``max_length``); ``length`` with no buckets."""
    if not buckets:
        return min(length, max_length)
    for b in sorted(buckets):
        if b >= length:
            return min(b, max_length)
    return max_length


def tokenize_to_ids(
    tokenizer,  # noqa: ANN001 (transformers tokenizer)
    texts: Sequence[str],
    max_length: int,
    *,
    append_eos: bool = False,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` tokens *including* the appended EOS when
    ``append_eos`` (Qwen3-Embedding style: the EOS is the pooled token, so it must survive
    truncation). A tokenizer whose post-processor already appends the EOS is not doubled."""
    if isinstance(texts, str):
        raise TypeError("expected a sequence of strings, not a single string")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    eos = None
    if append_eos:
        eos = eos_token_id if eos_token_id is not None else embedding_eos_token_id(tokenizer)
    budget = max_length - 1 if append_eos else max_length
    encoded = tokenizer(
        list(texts),
        add_special_tokens=True,
        truncation=True,
        max_length=max(budget, 1),
        padding=False,
        return_attention_mask=False,
    )["input_ids"]
    rows = []
    for ids in encoded:
        ids = list(ids)
        if append_eos:
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            ids = ids[:budget] + [eos]
        else:
            ids = ids[:budget]
        rows.append(ids)
    return rows


def pad_left(
    rows: Sequence[Sequence[int]], width: int, pad_id: int, num_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads id lists into int32 ``(input_ids, attention_mask)`` of shape
    ``[num_rows or len(rows), width]``; extra rows are all padding (mask 0)."""
    n = len(rows) if num_rows is None else num_rows
    if n < len(rows):
        raise ValueError(f"num_rows={n} is fewer than the {len(rows)} rows given")
    input_ids = np.full((n, width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((n, width), dtype=np.int32)
    for i, ids in enumerate(rows):
        if len(ids) > width:
            raise ValueError(f"row {i} has {len(ids)} tokens, more than the width {width}")
        if len(ids):
            input_ids[i, width - len(ids):] = ids
            attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask


def pad_token_id(tokenizer) -> int:  # noqa: ANN001
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def tokenize_texts(
    tokenizer,  # noqa: ANN001 (transformers tokenizer)
    texts: Sequence[str],
    max_length: int,
    *,
    append_eos: bool = False,
    eos_token_id: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes ``texts`` into left-padded ``(input_ids, attention_mask)`` int32 arrays
    (``tokenize_to_ids`` then ``pad_left``). The padded width is ``pad_to`` if given, else the
    bucket of the longest row."""
    rows = tokenize_to_ids(
        tokenizer, texts, max_length, append_eos=append_eos, eos_token_id=eos_token_id
    )
    longest = max((len(r) for r in rows), default=1)
    width = pad_to if pad_to is not None else bucket_length(max(longest, 1), buckets, max_length)
    if width < longest:
        raise ValueError(f"pad_to={width} is shorter than the longest sequence ({longest})")
    return pad_left(rows, width, pad_token_id(tokenizer))
