"""The configs ``benchmarks/remixer_scifact.py`` writes are valid remixer configs (checked by the
pipeline's own loader), and its options land where the stages read them."""

import importlib.util
import json
import pathlib
import re

import pytest

from remixer.config import ConfigError, load_config

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "remixer_scifact.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("remixer_scifact", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(bench, tmp_path, *argv):
    args = bench.parse_args(["--writer", "/m/writer", "--embedder", "/m/emb",
                             "--work-dir", str(tmp_path), *argv])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bench.build_config(args)))
    return load_config(path)


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_presets_are_valid_configs(bench, tmp_path, preset):
    cfg = _load(bench, tmp_path, "--preset", preset)
    assert cfg["models"]["judge"]["model"] == "/m/writer"  # the writer judges by default
    assert cfg["annotation"]["max_document_chars"] == bench.PRESETS[preset]["judge_doc_chars"]
    assert cfg["queries"]["sampling"]["max_tokens"] == bench.PRESETS[preset]["query_tokens"]


def test_options_reach_the_stages(bench, tmp_path):
    cfg = _load(bench, tmp_path, "--judge", "/m/judge", "--judge-analysis-chars", "0",
                "--query-tokens", "96", "--reason-tokens", "80", "--sources", "12",
                "--top-k", "3")
    ann = cfg["annotation"]["sampling"]
    assert re.fullmatch(ann["regex"], "<score>4</score>")
    assert not re.fullmatch(ann["regex"], "because...<score>4</score>")  # the score alone
    assert ann["max_tokens"] <= 16
    assert cfg["models"]["judge"]["model"] == "/m/judge"
    assert cfg["queries"]["sampling"]["max_tokens"] == 96
    assert cfg["reasoning"]["sampling"]["max_tokens"] == 80
    assert cfg["sources"]["sample_size"] == 12 and cfg["mining"]["top_k"] == 3
    analysis = _load(bench, tmp_path, "--judge-analysis-chars", "50")["annotation"]["sampling"]
    assert re.fullmatch(analysis["regex"], "short reason <score>2</score>")
    assert not re.fullmatch(analysis["regex"], "x" * 51 + "<score>2</score>")
    with pytest.raises(SystemExit):
        _load(bench, tmp_path, "--judge-analysis-chars", "-1")


def test_pool_option_sets_the_split_rule(bench, tmp_path):
    cpu = _load(bench, tmp_path, "--preset", "cpu", "--top-k", "3")
    assert cpu["mining"]["pool_k"] == bench.PRESETS["cpu"]["pool_k"] > 3
    assert cpu["split"]["require_judged_negative"] is False
    assert cpu["reasoning"]["input"] == "nv_negatives"
    gpu = _load(bench, tmp_path, "--preset", "gpu")
    assert gpu["mining"]["pool_k"] is None and gpu["split"]["require_judged_negative"] is True
    off = _load(bench, tmp_path, "--pool-k", "0")
    assert off["mining"]["pool_k"] is None and off["split"]["require_judged_negative"] is True
    assert _load(bench, tmp_path, "--top-k", "4", "--pool-k", "9")["mining"]["pool_k"] == 9
    with pytest.raises(SystemExit):
        _load(bench, tmp_path, "--top-k", "8", "--pool-k", "5")


def test_a_misplaced_key_is_refused(tmp_path):
    """What the loader guards against: a stage key put into the sampling block."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"annotation": {"sampling": {"max_document_chars": 700}}}))
    with pytest.raises(ConfigError, match="max_document_chars"):
        load_config(path)
