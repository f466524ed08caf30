"""Bad input: each kind is skipped and counted with file:line, or stops the run in strict mode."""

import json

import pytest

from reasonembed_jax.data import build_pipeline
from reasonembed_jax.data.index import BAD_INPUT_KINDS, classify_record_error, index_records
from reasonembed_jax.data.sources import open_source, write_array_record
from reasonembed_jax.records import RecordError


def good(i, **extra):
    rec = {"prompt": "Find it", "query": f"question {i}", "reasoning_query": f"because {i}",
           "pos": [f"answer {i}"], "neg": [f"wrong {i}a", f"wrong {i}b"]}
    rec.update(extra)
    return json.dumps(rec)


def bad_json(**changes):
    rec = json.loads(good(99))
    for key, value in changes.items():
        if value is KeyError:
            del rec[key]
        else:
            rec[key] = value
    return json.dumps(rec)


# (case, bad line, kind, message, extra index options)
CASES = [
    ("malformed line", '{"prompt": "x", "query": "unterminated', "malformed_json",
     "malformed JSON (Unterminated string", {}),
    ("missing field", bad_json(neg=KeyError), "missing_field",
     "missing required field 'neg'", {}),
    ("empty pos", bad_json(pos=[]), "empty_list", "field 'pos' is an empty list", {}),
    ("empty neg", bad_json(neg=[]), "empty_list", "field 'neg' is an empty list", {}),
    ("empty query", bad_json(query="  "), "empty_text", "field 'query' is empty", {}),
    ("non-string passage", bad_json(neg=["fine", 7]), "wrong_type",
     "field 'neg[1]' must be a string, got int", {}),
    ("non-string query", bad_json(query=["a list"]), "wrong_type",
     "field 'query' must be a string, got list", {}),
    ("over-long text", bad_json(pos=["x" * 300]), "too_long",
     "field 'pos[0]' has 300 characters, more than 200", {"max_chars": 200}),
    ("missing reasoning query", bad_json(reasoning_query=KeyError), "missing_reasoning_query",
     "missing field 'reasoning_query'", {"require_reasoning_query": True}),
    ("not an object", "[1, 2, 3]", "wrong_type", "record must be a JSON object, got list", {}),
    ("scores do not match texts", bad_json(neg_scores=[0.1]), "length_mismatch",
     "field 'neg_scores' has 1 entries but its texts have 2", {}),
    ("non-scalar source id", bad_json(source_id=["d1"]), "wrong_type",
     "field 'source_id' must be a string or integer, got list", {}),
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("case,line,kind,message,options", CASES, ids=[c[0] for c in CASES])
def test_bad_record_is_counted_with_location(tmp_path, case, line, kind, message, options):
    path = write_lines(tmp_path / "dom.jsonl", [good(0), good(1), line, "", good(2)])
    index = index_records([open_source(path)], [None], **options)
    stats = index.stats
    assert stats.num_valid == 3
    assert stats.bad_counts == {kind: 1}
    assert stats.num_blank_lines == 1
    assert stats.examples == [f"{path}:3: {message}"] or stats.examples[0].startswith(
        f"{path}:3: {message}")
    assert stats.as_metrics()[f"data/records_skipped/{kind}"] == 1.0
    assert stats.as_metrics()["data/records_skipped"] == 1.0
    assert f"{path}:3: " in stats.summary()
    # The three valid records are the ones left in the domain.
    assert index.domains[0].record_keys.tolist() == [0, 1, 3]


@pytest.mark.parametrize("case,line,kind,message,options", CASES, ids=[c[0] for c in CASES])
def test_strict_mode_stops_at_first_bad_record(tmp_path, case, line, kind, message, options):
    path = write_lines(tmp_path / "dom.jsonl", [good(0), "", line, good(2)])
    with pytest.raises(RecordError) as err:
        index_records([open_source(path)], [None], strict=True, **options)
    assert str(err.value).startswith(f"{path}:3: {message}")
    assert err.value.line == 3 and err.value.source == path
    assert classify_record_error(err.value.reason) == kind


def test_domain_problems_are_counted(tmp_path):
    mixed = write_lines(tmp_path / "mixed.jsonl", [good(0, domain="a"), good(1)])
    assigned = write_lines(tmp_path / "b.jsonl", [good(2, domain="b"), good(3, domain="c")])
    index = index_records([open_source(mixed), open_source(assigned)], [None, "b"],
                          domain_from_filename=False)
    assert index.stats.bad_counts == {"missing_domain": 1, "domain_mismatch": 1}
    assert index.stats.examples == [
        f"{mixed}:2: record has no domain (set 'domain', or name the source 'domain=path')",
        f"{assigned}:2: domain mismatch: record says 'c' but its source is assigned to 'b'",
    ]
    assert [d.name for d in index.domains] == ["a", "b"]


def test_array_record_locations_are_record_numbers(tmp_path):
    path = str(tmp_path / "dom.array_record")
    write_array_record(path, [good(0).encode(), b"{oops", good(1).encode()])
    index = index_records([open_source(path)], [None])
    assert index.stats.bad_counts == {"malformed_json": 1}
    assert index.stats.examples[0].startswith(f"{path}:2: malformed JSON")


def test_reported_examples_are_capped_but_all_counted(tmp_path):
    lines = [good(0)] + ["{bad"] * 25
    path = write_lines(tmp_path / "dom.jsonl", lines)
    stats = index_records([open_source(path)], [None], max_examples=4).stats
    assert stats.bad_counts == {"malformed_json": 25}
    assert len(stats.examples) == 4
    assert "... and 21 more" in stats.summary()


def test_pipeline_counts_or_stops(tmp_path, qwen3_tokenizer_dir):
    lines = [good(i) for i in range(4)] + [bad_json(pos=[]), bad_json(query=3)]
    path = write_lines(tmp_path / "dom.jsonl", lines)
    cfg = {"sources": (path,), "tokenizer": str(qwen3_tokenizer_dir), "num_devices": 1,
           "batch_size": 2, "group_size": 2}
    pipe = build_pipeline(cfg, process_index=0, process_count=1)
    metrics = pipe.stats.as_metrics()
    assert metrics["data/records_valid"] == 4.0
    assert metrics["data/records_skipped"] == 2.0
    assert metrics["data/records_skipped/empty_list"] == 1.0
    assert metrics["data/records_skipped/wrong_type"] == 1.0
    assert set(k.rsplit("/", 1)[-1] for k in metrics if "skipped/" in k) == set(BAD_INPUT_KINDS)
    assert pipe.steps_per_epoch == 2
    with pytest.raises(RecordError, match=f"{path}:5: field 'pos' is an empty list"):
        build_pipeline({**cfg, "strict": True}, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no valid training record"):
        build_pipeline({**cfg, "sources": (write_lines(tmp_path / "x.jsonl", ["{"]),)},
                       process_index=0, process_count=1)


def test_records_without_reasoning_query_are_counted_then_skipped_or_kept(tmp_path,
                                                                          qwen3_tokenizer_dir):
    """RI-InfoNCE data where some reasoning-query calls failed: never dropped silently."""
    from reasonembed_jax.data.pipeline import _cached_tokenizer

    lines = [good(i) if i % 3 else bad_json(query=f"question {i}", reasoning_query=KeyError)
             for i in range(12)]  # records 0, 3, 6, 9 have no reasoning query
    path = write_lines(tmp_path / "dom.jsonl", lines)
    cfg = {"sources": (path,), "tokenizer": str(qwen3_tokenizer_dir), "num_devices": 1,
           "batch_size": 4, "group_size": 2, "use_reasoning_query": True,
           "return_record_index": True, "append_eos": False}
    skip = build_pipeline(cfg, process_index=0, process_count=1)
    assert skip.stats.bad_counts == {"missing_reasoning_query": 4}
    assert skip.stats.as_metrics()["data/records_skipped/missing_reasoning_query"] == 4.0
    assert skip.stats.num_valid == 8 and skip.steps_per_epoch == 2
    keep = build_pipeline({**cfg, "missing_reasoning_query": "query"}, process_index=0,
                          process_count=1)
    assert keep.stats.num_bad == 0 and keep.stats.num_valid == 12
    assert keep.stats.as_metrics()["data/records_without_reasoning_query"] == 4.0
    assert "(4 without a reasoning query)" in keep.stats.summary()
    assert keep.steps_per_epoch == 3
    tok, _ = _cached_tokenizer(str(qwen3_tokenizer_dir))  # the one the pipeline loaded
    seen = set()
    for step in range(3):
        batch = keep.batch_at(step)
        for row, key in enumerate(batch["record_index"].tolist()):
            seen.add(key)
            rec = json.loads(lines[key])
            expected = rec.get("reasoning_query", rec["query"])  # q' = the query itself
            text = tok.decode(batch["reasoning_input_ids"][row], skip_special_tokens=True)
            assert text == f"Instruct: Find it\nQuery: {expected}", (key, text)
    assert seen == set(range(12))
    with pytest.raises(ValueError, match="missing_reasoning_query must be 'skip' or 'query'"):
        build_pipeline({**cfg, "missing_reasoning_query": "drop"}, process_index=0,
                       process_count=1)
