"""Readers, converter and TFDS builder: every format gives back the records written here."""

import gzip
import json
import os
import pickle
import time

import numpy as np
import pytest

from reasonembed_jax.data import build_pipeline
from reasonembed_jax.data.convert import main as convert_main
from reasonembed_jax.data.sources import (
    ArrayRecordSource,
    JsonlSource,
    SourceChangedError,
    decode_raw,
    domain_from_path,
    open_source,
    parse_source_spec,
    write_array_record,
)


def make_records(n, domain=None):
    out = []
    for i in range(n):
        rec = {"id": i, "prompt": "Find the passage", "query": f"q {i} \u00e9\u4e2d",
               "pos": [f"p {i}"], "neg": [f"n {i} {j}" for j in range(3)],
               "pos_scores": [0.5 + i], "neg_scores": [0.1, 0.2, 0.3]}
        if domain:
            rec["domain"] = domain
        out.append(rec)
    return out


def test_jsonl_plain_and_gzip_read_the_same_records_with_line_numbers(tmp_path):
    recs = make_records(5)
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    text = lines[0] + "\n\n" + "\r\n".join(lines[1:3]) + "\n   \n" + "\n".join(lines[3:])
    (tmp_path / "a.jsonl").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    for name in ("a.jsonl", "a.jsonl.gz"):
        src = open_source(str(tmp_path / name))
        assert isinstance(src, JsonlSource) and len(src) == 5 and src.num_blank_lines == 2
        assert [decode_raw(src[i]) for i in (4, 0, 2)] == [recs[4], recs[0], recs[2]]
        assert [decode_raw(r) for r in src.iter_raw()] == recs
        assert [src.location(i)[1] for i in range(5)] == [1, 3, 4, 6, 7]
        # Pickled (as for a spawned Grain worker) it re-opens and reads the same.
        clone = pickle.loads(pickle.dumps(src))
        assert decode_raw(clone[3]) == recs[3]


def test_changed_file_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_records(3)))
    src = JsonlSource(str(path))
    time.sleep(0.01)
    path.write_text("\n".join(json.dumps(r) for r in make_records(4)))
    with pytest.raises(SourceChangedError, match="changed after it was indexed"):
        src[0]


def test_array_record_round_trip_and_group_size_check(tmp_path):
    recs = make_records(7)
    path = str(tmp_path / "a.array_record")
    assert write_array_record(path, [json.dumps(r).encode() for r in recs]) == 7
    src = open_source(path)
    assert isinstance(src, ArrayRecordSource) and len(src) == 7
    assert [decode_raw(src[i]) for i in range(7)] == recs
    assert decode_raw(pickle.loads(pickle.dumps(src))[6]) == recs[6]
    from array_record.python import array_record_module

    bad = str(tmp_path / "chunked.array_record")
    w = array_record_module.ArrayRecordWriter(bad, "group_size:64")
    w.write(b"{}")
    w.close()
    with pytest.raises(ValueError, match="random access needs 'group_size:1'"):
        ArrayRecordSource(bad)


def test_source_specs(tmp_path):
    for name in ("x.jsonl", "y.jsonl.gz"):
        (tmp_path / name).write_text("")
    spec = parse_source_spec(f"bio={tmp_path}/*.jsonl*")
    assert spec.domain == "bio"
    assert spec.paths == (str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl.gz"))
    assert parse_source_spec(str(tmp_path / "x.jsonl")).domain is None
    with pytest.raises(FileNotFoundError):
        parse_source_spec(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        parse_source_spec(str(tmp_path / "*.array_record"))
    assert domain_from_path("/d/earth_science.jsonl.gz") == "earth_science"
    assert domain_from_path("/d/pony.array_record") == "pony"
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(__file__)


def test_converter_cli_skips_and_counts_or_stops(tmp_path, capsys):
    recs = make_records(4)
    lines = [json.dumps(r) for r in recs]
    lines.insert(2, '{"prompt": "p", "query": "q", "pos": [], "neg": ["n"]}')
    src = tmp_path / "bio.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ar"
    assert convert_main([str(src), "--out-dir", str(out)]) == 0
    converted = ArrayRecordSource(str(out / "bio.array_record"))
    assert [decode_raw(r) for r in converted.iter_raw()] == recs
    assert convert_main([str(src), "--out-dir", str(tmp_path / "strict"), "--strict"]) == 2
    assert not os.path.exists(tmp_path / "strict" / "bio.array_record")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    assert exit_info.value.code == 0
    assert "ArrayRecord" in capsys.readouterr().out


def test_jsonl_and_array_record_give_identical_batches(tmp_path, qwen3_tokenizer_dir):
    recs = make_records(12, domain="d1") + make_records(8, domain="d2")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert convert_main([str(path), "--out-dir", str(tmp_path)]) == 0
    cfg = {"tokenizer": str(qwen3_tokenizer_dir), "num_devices": 1, "batch_size": 2,
           "group_size": 3, "return_record_index": True}
    a = build_pipeline({**cfg, "sources": (str(path),)}, process_index=0, process_count=1)
    b = build_pipeline({**cfg, "sources": (str(tmp_path / "mixed.array_record"),)},
                       process_index=0, process_count=1)
    assert a.steps_per_epoch == b.steps_per_epoch == 6 + 4
    for step in range(a.steps_per_epoch):
        x, y = a.batch_at(step), b.batch_at(step)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_tfds_builder_without_tensorflow(tmp_path, qwen3_tokenizer_dir):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("importlib_resources")  # tfds 4.9.10 needs it but does not declare it
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None, "the point is: no TensorFlow"
    from reasonembed_jax.data.tfds_builder import build_tfds_dataset

    bio, geo = make_records(6), make_records(4, domain="geo")
    (tmp_path / "bio.jsonl").write_text("\n".join(json.dumps(r) for r in bio) + "\n{bad\n")
    (tmp_path / "geo.jsonl").write_text("\n".join(json.dumps(r) for r in geo) + "\n")
    version_dir, stats = build_tfds_dataset(
        [str(tmp_path / "bio.jsonl"), str(tmp_path / "geo.jsonl")], str(tmp_path / "tfds"))
    assert stats.num_valid == 10 and stats.bad_counts == {"malformed_json": 1}
    assert any(f.startswith("reason_embed_records-train.array_record") for f in
               os.listdir(version_dir))
    src = open_source(version_dir)
    got = sorted((decode_raw(src[i]) for i in range(len(src))), key=lambda r: (r["domain"],
                                                                               r["id"]))
    # TFDS stores floats as float32 (tf.train.Example float_list) and ids as text.
    def as_stored(r):
        f32 = lambda xs: [float(np.float32(x)) for x in xs]
        return {**r, "id": str(r["id"]), "pos_scores": f32(r["pos_scores"]),
                "neg_scores": f32(r["neg_scores"])}

    want = [as_stored({**r, "domain": "bio"}) for r in bio] + [as_stored(r) for r in geo]
    assert got == sorted(want, key=lambda r: (r["domain"], r["id"]))
    pipe = build_pipeline({"sources": (f"{version_dir}:train",),
                           "tokenizer": str(qwen3_tokenizer_dir), "num_devices": 1,
                           "batch_size": 2, "group_size": 2}, process_index=0, process_count=1)
    assert pipe.domain_names == ("bio", "geo") and pipe.steps_per_epoch == 3 + 2
    assert pipe.batch_at(0)["passage_input_ids"].shape[0] == 4
