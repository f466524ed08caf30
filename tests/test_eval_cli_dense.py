"""The CLI's dense path with a real TextEncoder on a tiny random Qwen3: --workdir resolution,
corpus embeddings cached on the first run and reused (time printed) on the second."""

import json
import pathlib
import re
import shutil

import pytest

import hf_models
from reasonembed_jax import evaluate as cli

MINI = pathlib.Path(__file__).parent / "data" / "eval_bright_mini"


@pytest.fixture(scope="module")
def workdir(hf_configs_dir, qwen3_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("workdir")
    export = root / "export" / "step_5"
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    hf_models.save_hf_model(hf_models.build_hf_model(cfg), export)
    for f in qwen3_tokenizer_dir.iterdir():
        shutil.copy(f, export / f.name)
    (root / "export" / "latest").symlink_to("step_5")
    return root


def test_dense_cli_caches_corpus_embeddings(workdir, tmp_path, capsys):
    args = ["--workdir", str(workdir), "--data", f"bright:{MINI}:biology,leetcode",
            "--max-length", "64", "--batch-size", "8", "--top-k", "50", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    cli.main([*args, "--out", str(tmp_path / "first.json")])
    first_log = capsys.readouterr().out
    assert first_log.count("cached at") == 2 and "from cache" not in first_log
    cli.main([*args, "--out", str(tmp_path / "second.json")])
    second_log = capsys.readouterr().out
    times = re.findall(r"loaded \d+ document embeddings from cache \S+ in (\d+\.\d+) s", second_log)
    assert len(times) == 2
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    assert first["model"] == str((workdir / "export" / "step_5").resolve())
    for name in ("biology", "leetcode"):
        assert not first["tasks"][name]["timings"]["corpus_cache_hit"]
        assert second["tasks"][name]["timings"]["corpus_cache_hit"]
        assert first["tasks"][name]["ndcg@10"] == second["tasks"][name]["ndcg@10"]
    assert first["settings"]["instructions"]["biology"].startswith("Given a Biology post")
