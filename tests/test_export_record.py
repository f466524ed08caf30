"""Exports carry their own record: evaluate's default max length comes from the model folder, and
every HF export writes a model card whose numbers match the run."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

import hf_models
from reasonembed_jax import evaluate as cli
from reasonembed_jax.hf_io import ENCODER_SETTINGS_FILE

MINI = pathlib.Path(__file__).parent / "data" / "eval_bright_mini"


@pytest.fixture(scope="module")
def model_with_record(hf_configs_dir, qwen3_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    hf_models.save_hf_model(hf_models.build_hf_model(cfg), root)
    for f in qwen3_tokenizer_dir.iterdir():
        shutil.copy(f, root / f.name)
    (root / ENCODER_SETTINGS_FILE).write_text(json.dumps(
        {"pooling": "last_token", "normalize": True, "append_eos": False, "max_length": 48}))
    return root


@pytest.mark.parametrize("given,expected,source", [(None, 48, "the model folder"),
                                                   (32, 32, "--max-length")])
def test_evaluate_max_length_defaults_to_the_models_record(model_with_record, tmp_path, capsys,
                                                           given, expected, source):
    args = ["--model", str(model_with_record), "--data", f"bright:{MINI}:biology", "--top-k", "5",
            "--batch-size", "8", "--no-progress", "--no-cache", "--out", str(tmp_path / "r.json")]
    if given:
        args += ["--max-length", str(given)]
    cli.main(args)
    log = capsys.readouterr().out
    assert f"max length {expected} tokens (from {source}" in log
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["max_length"] == expected


def test_training_export_carries_a_model_card_matching_the_run(tmp_path):
    import gzip

    import numpy as np
    import yaml
    from sentence_transformers import SentenceTransformer

    from reasonembed_jax.training.trainer import Trainer
    from train_configs import tiny_train_config

    c = tiny_train_config(steps=3, devices=8)
    c.train.export_at_end = True
    c.train.log_every = 1
    c.export.dtype = "float32"
    c.eval.every = 3
    c.eval.data = f"bright:{MINI}:biology"
    c.eval.top_k = 5
    c.eval.max_length = 32
    c.eval.batch_size = 8
    workdir = tmp_path / "run"
    result = Trainer(c, str(workdir)).run()
    export = pathlib.Path(result["export"])
    card = (export / "README.md").read_text()
    _, front, body = card.split("---", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "sentence-transformers"
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert "sentence-transformers" in meta["tags"]

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r for r in rows if "loss" in r][-1]
    assert f"- steps: {result['final_step']}" in body
    shown = float(body.split("- final loss: ")[1].split()[0])
    np.testing.assert_allclose(shown, last_loss["loss"], rtol=1e-5)
    evals = [r for r in rows if any(k.startswith("eval") or "ndcg" in k for k in r)][-1]
    for key, value in evals.items():
        if key != "step" and isinstance(value, float):
            assert f"| {key} | {value:.4f} |" in body
    source = c.data.sources[0]
    with gzip.open(source, "rt") as f:
        records = sum(1 for line in f if line.strip())
    assert f"| biology | {records} | 4 | 1 |" in body
    config_json = json.loads(body.split("```json\n")[1].split("```")[0])
    assert config_json["optim"]["learning_rate"] == c.optim.learning_rate
    assert "Instruct: {instruction}\nQuery: {query}" in body

    st = SentenceTransformer(str(export), device="cpu")
    emb = st.encode(["a query about cells", "a document"])
    assert emb.shape == (2, result["state"]["params"]["embed_tokens"].shape[-1])
