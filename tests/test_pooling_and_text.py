"""Pooling against plain numpy formulas; tokenization against the tokenizer called directly."""

import numpy as np
import pytest

from reasonembed_jax.model.pooling import pool
from reasonembed_jax.text import format_query, load_tokenizer, tokenize_texts


def _masks(padding_side):
    lengths = [5, 2, 7, 1]
    mask = np.zeros((4, 7), np.int32)
    for i, n in enumerate(lengths):
        if padding_side == "left":
            mask[i, 7 - n:] = 1
        else:
            mask[i, :n] = 1
    return mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", ["last_token", "first_token", "mean"])
@pytest.mark.parametrize("dim", [None, 3])
def test_pooling_matches_numpy(padding_side, mode, dim):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(4, 7, 6)).astype(np.float32)
    mask = _masks(padding_side)
    expected = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m.astype(bool)]
        expected.append({"last_token": real[-1], "first_token": real[0],
                         "mean": real.mean(0)}[mode])
    expected = np.stack(expected)
    if dim is not None:
        expected = expected[:, :dim]
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    got = np.asarray(pool(hidden, mask, mode, dim=dim))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_pooling_rejects_bad_arguments():
    hidden, mask = np.zeros((1, 2, 4), np.float32), np.ones((1, 2), np.int32)
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        pool(hidden, mask, "max")
    with pytest.raises(ValueError, match="Matryoshka dim must be in"):
        pool(hidden, mask, dim=5)


def test_query_format():
    assert format_query("why?", "Given a post, find answers.") == (
        "Instruct: Given a post, find answers.\nQuery: why?")
    assert format_query("why?", None) == "why?"


def test_left_padded_tokenization_with_eos(qwen3_tokenizer_dir):
    tokenizer = load_tokenizer(qwen3_tokenizer_dir)
    texts = ["one two three four five six seven eight", "hi"]
    direct = [tokenizer(t)["input_ids"] for t in texts]
    assert len(direct[0]) == 8
    ids, mask = tokenize_texts(tokenizer, texts, max_length=64, buckets=(4, 8, 16))
    assert ids.shape == (2, 8)  # the smallest bucket the longest row fits
    wide, _ = tokenize_texts(tokenizer, texts + ["nine " * 9], max_length=64, buckets=(4, 8, 16))
    assert wide.shape == (3, 16)
    for row, m, ref in zip(ids, mask, direct, strict=True):
        assert list(row[m.astype(bool)]) == ref
        assert m[-1] == 1 and (m[: len(m) - len(ref)] == 0).all()
    eos = 151643
    ids, mask = tokenize_texts(tokenizer, texts, max_length=4, append_eos=True,
                               eos_token_id=eos, buckets=None)
    assert list(ids[0]) == direct[0][:3] + [eos]  # truncation keeps room for the EOS
    assert list(ids[1][mask[1].astype(bool)]) == direct[1] + [eos]
