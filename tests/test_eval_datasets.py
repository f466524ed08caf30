"""BEIR and BRIGHT loading: layouts, task spellings, parquet, qrels, exclusions, instructions."""

import gzip
import json
import pathlib

import pytest

from reasonembed_jax.evaluation.datasets import (
    BRIGHT_TASKS,
    bright_instruction,
    find_bright_files,
    load_beir,
    load_bright_instructions,
    load_bright_task,
    load_data,
    parse_data_spec,
    read_qrels_tsv,
)

MINI = pathlib.Path(__file__).parent / "data" / "eval_bright_mini"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def beir_dir(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "d1", "title": "Title one", "text": "first text"},
        {"_id": "d2", "title": "", "text": "second text"},
        {"_id": "d3", "text": "third"},
    ])
    write_jsonl(tmp_path / "queries.jsonl", [
        {"_id": "q1", "text": "query one"}, {"_id": "q2", "text": "query two"},
        {"_id": "q3", "text": "query three (no qrels)"},
    ])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n"
                                                  "q2\td2\t2\nq2\td3\t0\n")
    (tmp_path / "dev.tsv").write_text("q2\td1\t1\n")
    return tmp_path


def test_beir_layout(beir_dir):
    task = load_beir(beir_dir, "test")
    assert task.corpus_texts == ["Title one first text", "second text", "third"]
    assert task.query_ids == ["q1", "q2"]  # q3 has no qrels for this split
    assert task.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}
    override = load_beir(beir_dir, qrels_file=beir_dir / "dev.tsv")
    assert override.query_ids == ["q2"] and override.qrels == {"q2": {"d1": 1}}
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load_beir(beir_dir, "train")


def test_qrels_formats(tmp_path):
    (tmp_path / "trec.txt").write_text("0 0 a.txt 1\n0 0 b.txt 1\n1 0 c.txt 2\n")
    assert read_qrels_tsv(tmp_path / "trec.txt") == {"0": {"a.txt": 1, "b.txt": 1},
                                                     "1": {"c.txt": 2}}
    (tmp_path / "bad.tsv").write_text("q\td\t1\nq\te\tx\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_qrels_tsv(tmp_path / "bad.tsv")


def test_bright_examples_from_shared_data(shared_data):
    # the shared copy has hyphenated file names and examples only (no documents)
    files = find_bright_files(shared_data / "bright", "examples", "earth_science")
    assert files[0].name == "earth-science.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="documents"):
        load_bright_task(shared_data / "bright", "biology")


def test_bright_mini_fixture_matches_source(shared_data):
    task = load_bright_task(MINI, "leetcode")
    with gzip.open(shared_data / "bright" / "examples" / "leetcode.jsonl.gz", "rt") as f:
        source = [json.loads(line) for line, _ in zip(f, range(6), strict=False)]
    assert task.query_ids == [r["id"] for r in source]
    assert task.query_texts == [r["query"] for r in source]
    for row in source:
        assert task.qrels[row["id"]] == dict.fromkeys(row["gold_ids"], 1)
        assert task.excluded[row["id"]] == [e for e in row["excluded_ids"] if e != "N/A"]
        assert len(task.excluded[row["id"]]) > 2
    assert task.instruction == bright_instruction("leetcode")
    bio = load_bright_task(MINI, "biology")
    assert all(ex == [] for ex in bio.excluded.values())  # "N/A" ignored
    assert bio.excluded_indices() is None


def test_bright_hub_parquet_layout_and_string_lists(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = load_bright_task(MINI, "earth-science", instructions="none")
    docs = {"id": src.corpus_ids, "content": src.corpus_texts}
    (tmp_path / "documents").mkdir()
    (tmp_path / "examples").mkdir()
    half = len(src.corpus_ids) // 2  # two shards, as the hub names them
    pq.write_table(pa.table({k: v[:half] for k, v in docs.items()}),
                   tmp_path / "documents" / "earth_science-00000-of-00002.parquet")
    pq.write_table(pa.table({k: v[half:] for k, v in docs.items()}),
                   tmp_path / "documents" / "earth_science-00001-of-00002.parquet")
    rows = [{"id": q, "query": t, "reasoning": "r " + t[:20],
             "gold_ids": str(sorted(src.qrels[q])),  # python-literal string form
             "gold_ids_long": ["N/A"], "excluded_ids": ["N/A"]}
            for q, t in zip(src.query_ids, src.query_texts, strict=True)]
    pq.write_table(pa.Table.from_pylist(rows),
                   tmp_path / "examples" / "earth_science-00000-of-00001.parquet")
    got = load_bright_task(tmp_path, "earth-science", instructions="none")
    assert got.corpus_ids == src.corpus_ids and got.corpus_texts == src.corpus_texts
    assert got.qrels == src.qrels and got.query_texts == src.query_texts
    reasoning = load_bright_task(tmp_path, "earth_science", query_field="reasoning")
    assert reasoning.query_texts[0].startswith("r ")
    (tmp_path / "long_documents").mkdir()
    pq.write_table(pa.table(docs), tmp_path / "long_documents" / "earth_science.parquet")
    with pytest.raises(ValueError, match="no gold_ids_long"):  # gold_ids_long is ["N/A"]
        load_bright_task(tmp_path, "earth_science", long_documents=True)


def test_reasoning_field_missing_is_an_error():
    with pytest.raises(ValueError, match="no reasoning text"):
        load_bright_task(MINI, "leetcode", query_field="reasoning")
    assert load_bright_task(MINI, "biology", query_field="reasoning").query_texts[0] != \
        load_bright_task(MINI, "biology").query_texts[0]


def test_instructions(shared_data):
    assert bright_instruction("biology") == (
        "Given a Biology post, retrieve relevant passages that help answer the post.")
    assert bright_instruction("earth-science", long_documents=True) == (
        "Given an Earth Science post, retrieve relevant documents that help answer the post.")
    assert all(bright_instruction(t) for t in BRIGHT_TASKS)
    qwen = shared_data / "bright" / "instruction_configs" / "qwen"
    assert load_bright_instructions(qwen, "biology") == (
        "Given a biology post, retrieve relevant passages that help answer the post")
    assert load_bright_instructions(qwen, "theoremqa_theorems").startswith("Given a Math problem")
    task = load_bright_task(MINI, "biology", instructions=str(qwen))
    assert task.instruction.startswith("Given a biology post")
    with pytest.raises(ValueError, match="not of the form"):
        load_bright_instructions(shared_data / "bright" / "instruction_configs" / "grit", "biology")


def test_data_specs(beir_dir):
    assert parse_data_spec("beir:/x/y") == parse_data_spec("beir:/x/y")
    spec = parse_data_spec(f"bright:{MINI}:biology,earth-science")
    assert spec.path == str(MINI) and spec.tasks == ("biology", "earth_science")
    assert parse_data_spec(f"bright:{MINI}").tasks is None
    with pytest.raises(ValueError):
        parse_data_spec("msmarco:/x")
    with pytest.raises(ValueError, match="unknown BRIGHT task"):
        parse_data_spec("bright:/nonexistent:biolgy")
    with pytest.raises(FileNotFoundError, match="missing under"):
        load_data(f"bright:{MINI}")  # all 12 requested, only 3 present: named, not skipped
    tasks = load_data(f"bright:{MINI}:biology,leetcode", instruction="custom")
    assert [t.name for t in tasks] == ["biology", "leetcode"]
    assert {t.instruction for t in tasks} == {"custom"}
    with pytest.raises(ValueError, match="BEIR data only"):
        load_data(f"bright:{MINI}:biology", qrels_file=beir_dir / "dev.tsv")
    assert load_data(f"beir:{beir_dir}")[0].query_ids == ["q1", "q2"]
