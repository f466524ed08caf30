"""The encode CLI and TextEncoder: order, normalisation, batching invariance, input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_models
from reasonembed_jax import hf_io
from reasonembed_jax.encode import TextEncoder

TEXTS = [f"document {i}: " + " ".join(["word"] * (i * 7 % 40)) + f" end {i}" for i in range(11)]


@pytest.fixture(scope="module")
def model_dir(hf_configs_dir, qwen3_tokenizer_dir, tmp_path_factory):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    torch_model = hf_models.build_hf_model(cfg)
    src = hf_models.save_hf_model(torch_model, tmp_path_factory.mktemp("src"))
    model = hf_io.load_encoder(src)
    out = tmp_path_factory.mktemp("model")
    hf_io.export_hf(model.params, model.config, out,
                    tokenizer_dir=qwen3_tokenizer_dir)
    return out, torch_model


def _hf_reference(torch_model, tokenizer, texts):
    rows = []
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        with torch.no_grad():
            h = torch_model(input_ids=ids).last_hidden_state[0, -1].numpy()
        rows.append(h / np.linalg.norm(h))
    return np.stack(rows)


def test_encode_matches_hf_in_input_order(model_dir):
    path, torch_model = model_dir
    encoder = TextEncoder.from_pretrained(path, batch_size=4)
    emb = encoder.encode(TEXTS, progress=False)
    ref = _hf_reference(torch_model, encoder.tokenizer, TEXTS)
    np.testing.assert_allclose(emb, ref, atol=2e-5)
    # Matryoshka truncation renormalises the first dims.
    small = TextEncoder.from_pretrained(path, batch_size=4, dim=16).encode(TEXTS, progress=False)
    np.testing.assert_allclose(
        small, ref[:, :16] / np.linalg.norm(ref[:, :16], axis=1, keepdims=True), atol=2e-5)


def test_cli_writes_normalised_rows_in_input_order(model_dir, tmp_path):
    path, torch_model = model_dir
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "emb.npy"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "reasonembed_jax.encode", "--model", str(path), "--input",
           str(data), "--text-field", "body", "--out", str(out), "--batch-size", "3",
           "--instruction", "Find the matching document."]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    encoder = TextEncoder.from_pretrained(path)
    queries = [f"Instruct: Find the matching document.\nQuery: {t}" for t in TEXTS]
    np.testing.assert_allclose(emb, _hf_reference(torch_model, encoder.tokenizer, queries),
                               atol=2e-5)


def test_cli_reports_bad_input_line(model_dir, tmp_path):
    path, _ = model_dir
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "reasonembed_jax.encode", "--model", str(path), "--input",
         str(data), "--out", str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{data}:2: field 'text' is int, not a string" in proc.stderr


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "reasonembed_jax.encode", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--instruction" in proc.stdout
