"""Synthesis test set-up: offline hub, shared data paths, a deterministic fake embedder."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTHESIS_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = SYNTHESIS_DIR.parent
SHARED_DATA = pathlib.Path(
    os.environ.get("REASONEMBED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def bag_of_words_embed(texts, dim: int = 256) -> np.ndarray:
    """Hashed bag-of-words counts: identical texts get identical vectors, overlapping texts get
    high cosine. A stand-in embedder with known behaviour."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
            out[i, h % dim] += 1.0
    return out


def pytest_configure(config) -> None:  # noqa: ANN001
    config.addinivalue_line("markers", "vllm: needs the real vLLM engine (slow)")
