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
