"""Helpers of the fine-tuning benchmarks that decide what is trained on or scored."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _decoder_finetune():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "decoder_finetune", ROOT / "benchmarks" / "decoder_finetune.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_synthetic_records_written_from_scored_gold_are_dropped(tmp_path):
    bench = _decoder_finetune()
    records = [{"id": f"r{i}", "query": f"q{i}", "pos": ["p"], "neg": ["n"], "source_id": src}
               for i, src in enumerate(["d1", "d2", "d3", "d4", None])]
    del records[-1]["source_id"]  # no provenance: kept (and reported), it cannot be checked
    path = tmp_path / "final.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    scored = {"dev1": {"d2": 1}, "dev2": {"d4": 1, "d9": 1}}
    out = bench.without_scored_sources(str(path), scored, str(tmp_path))
    kept = [json.loads(line) for line in pathlib.Path(out).read_text().splitlines()]
    assert [r["id"] for r in kept] == ["r0", "r2", "r4"]  # d2 and d4: gold for scored queries
    assert kept == [records[0], records[2], records[4]]  # the kept lines are unchanged
    # nothing to drop: the original file is trained on as it is
    assert bench.without_scored_sources(str(path), {"dev": {"d7": 1}}, str(tmp_path)) == str(path)


def test_ri_warmup_is_the_methods_100_steps_capped_at_half_the_run():
    bench = _decoder_finetune()
    assert bench.ri_warmup_steps(bench.parse_args(["--steps", "80"])) == 40
    assert bench.ri_warmup_steps(bench.parse_args(["--steps", "1000"])) == 100
    assert bench.ri_warmup_steps(bench.parse_args(["--steps", "80", "--ri-warmup-steps", "0"])) == 0
