"""The Grain pipeline on a small mixed-format, mixed-domain data set, with the real Qwen3 tokenizer.

Batches are checked by decoding their tokens back to text and comparing with the records written
here (not with anything the pipeline computed), so a wrong row order, a wrong positive or a
cross-domain batch shows up as a text mismatch.
"""

import gzip
import json
import os
import re

import numpy as np
import pytest

from reasonembed_jax.data import build_pipeline, iterator_state_to_bytes, restore_iterator_state
from reasonembed_jax.data.pipeline import DEMO_DATA_DIR
from reasonembed_jax.data.sources import write_array_record
from reasonembed_jax.instructions import task_instruction
from reasonembed_jax.text import format_query, load_tokenizer
from train_configs import load_config_file

NUM_DEVICES = 2
# alpha: shapes from config; beta: from its records; gamma: config defaults.
ALPHA_SHAPE, BETA_SHAPE, DEFAULT_SHAPE = (3, 2), (2, 4), (5, 1)


def _record(domain, i, num_neg, with_domain):
    rec = {
        "id": f"{domain}-{i}",
        "prompt": f"Given a {domain} question, find the passage that answers it",
        "query": f"{domain} question number {i} [rid={domain}-{i}] about topic {i * 7 % 13}",
        "reasoning_query": f"to answer {domain} question {i} one needs fact {i % 5}",
        "pos": [f"{domain} answer {i} positive {j}" for j in range(1 + i % 3)],
        "neg": [f"{domain} answer {i} negative {j}" for j in range(num_neg)],
    }
    if with_domain:
        rec["domain"] = domain
    if domain == "beta":
        rec["train_group_size"], rec["batch_size"] = BETA_SHAPE
    return rec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """alpha.jsonl (domain from file name), mixed.jsonl.gz (beta + gamma), gamma.array_record."""
    root = tmp_path_factory.mktemp("mixed")
    records = {}
    alpha = [_record("alpha", i, 6, False) for i in range(12)]
    with open(root / "alpha.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in alpha)
    beta = [_record("beta", i, 1 + i % 2, True) for i in range(16)]
    gamma_a = [_record("gamma", i, 2 + i % 6, True) for i in range(6)]
    mixed = [r for pair in zip(beta[:6], gamma_a, strict=True) for r in pair] + beta[6:]
    with gzip.open(root / "mixed.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in mixed)
    gamma_b = [_record("gamma", i, 8, True) for i in range(6, 10)]
    write_array_record(root / "gamma.array_record", [json.dumps(r).encode() for r in gamma_b])
    for r in alpha + beta + gamma_a + gamma_b:
        rec = dict(r)
        rec.setdefault("domain", "alpha")
        records[r["id"]] = rec
    return root, records


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


def make_config(root, tokenizer_dir, **overrides):
    cfg = {
        "sources": (str(root / "*.jsonl*"), str(root / "gamma.array_record")),
        "tokenizer": str(tokenizer_dir),
        "domains": {"alpha": {"group_size": ALPHA_SHAPE[0], "batch_size": ALPHA_SHAPE[1],
                              "instruction": "Find the alpha passage"}},
        "group_size": DEFAULT_SHAPE[0],
        "batch_size": DEFAULT_SHAPE[1],
        "num_devices": NUM_DEVICES,
        "query_max_length": 64,
        "passage_max_length": 32,
        "reasoning_max_length": 48,
        "buckets": (16, 32, 64),
        "use_reasoning_query": True,
        "return_record_index": True,
        "num_epochs": 1.5,
        "seed": 11,
    }
    cfg.update(overrides)
    return cfg


def _decode_rows(tokenizer, ids, mask):
    return [tokenizer.decode(row[m == 1], skip_special_tokens=True)
            for row, m in zip(ids, mask, strict=True)]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_every_batch_is_one_domain_with_its_shapes_and_texts(dataset, qwen3_tokenizer_dir,
                                                             tokenizer):
    root, records = dataset
    pipe = build_pipeline(make_config(root, qwen3_tokenizer_dir), process_index=0,
                          process_count=1)
    assert pipe.domain_names == ("alpha", "beta", "gamma")
    shapes = {d.name: (d.group_size, d.batch_size) for d in pipe.domains}
    assert shapes == {"alpha": ALPHA_SHAPE, "beta": BETA_SHAPE, "gamma": DEFAULT_SHAPE}
    # steps/epoch = sum floor(N_d / (batch * devices)).
    assert pipe.steps_per_epoch == 12 // 4 + 16 // 8 + 10 // 2
    assert pipe.num_steps == int(np.ceil(1.5 * pipe.steps_per_epoch))
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # what Qwen3-Embedding appends and pools
    seen_this_epoch = set()
    for step in range(pipe.num_steps):
        if step % pipe.steps_per_epoch == 0:
            seen_this_epoch = set()
        batch = pipe.batch_at(step)
        domain = pipe.domain_names[int(batch["domain_index"])]
        group, per_device = shapes[domain]
        b = per_device * NUM_DEVICES
        assert int(batch["step"]) == step and batch["step"].dtype == np.int64
        assert batch["domain_index"].dtype == np.int32 and batch["domain_index"].shape == ()
        assert batch["query_input_ids"].shape[0] == b
        assert batch["reasoning_input_ids"].shape[0] == b
        assert batch["passage_input_ids"].shape[0] == b * group
        for name, max_len in (("query", 64), ("passage", 32), ("reasoning", 48)):
            ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]
            assert ids.dtype == mask.dtype == np.int32
            assert ids.shape[1] in (16, 32, 64) and ids.shape[1] <= max_len
            # Left padding, EOS last.
            assert np.all(mask[:, -1] == 1) and np.all(ids[:, -1] == eos)
            assert np.all(np.diff(mask, axis=1) >= 0)
        queries = _decode_rows(tokenizer, batch["query_input_ids"], batch["query_attention_mask"])
        passages = _decode_rows(tokenizer, batch["passage_input_ids"],
                                batch["passage_attention_mask"])
        reasoning = _decode_rows(tokenizer, batch["reasoning_input_ids"],
                                 batch["reasoning_attention_mask"])
        for row, text in enumerate(queries):
            rid = re.search(r"\[rid=([a-z]+-\d+)\]", text).group(1)
            rec = records[rid]
            assert rec["domain"] == domain
            assert rid not in seen_this_epoch
            seen_this_epoch.add(rid)
            instruction = "Find the alpha passage" if domain == "alpha" else rec["prompt"]
            assert text == format_query(rec["query"], instruction)
            assert reasoning[row] == format_query(rec["reasoning_query"], instruction)
            group_texts = passages[row * group:(row + 1) * group]
            assert group_texts[0] in rec["pos"]
            negs = group_texts[1:]
            assert all(n in rec["neg"] for n in negs)
            if len(rec["neg"]) >= group - 1:
                assert len(set(negs)) == len(negs)


def test_same_seed_same_batches_other_seed_differs(dataset, qwen3_tokenizer_dir):
    root, _ = dataset
    cfg = make_config(root, qwen3_tokenizer_dir)
    a = _take(build_pipeline(cfg, process_index=0, process_count=1).iterator(), 8)
    b = _take(build_pipeline(cfg, process_index=0, process_count=1).iterator(), 8)
    _assert_batches_equal(a, b)
    c = _take(build_pipeline({**cfg, "seed": 12}, process_index=0, process_count=1).iterator(), 8)
    assert any(not np.array_equal(x["record_index"], y["record_index"])
               for x, y in zip(a, c, strict=True))


def test_restore_from_saved_state_continues_exactly(dataset, qwen3_tokenizer_dir):
    root, _ = dataset
    cfg = make_config(root, qwen3_tokenizer_dir)
    pipe = build_pipeline(cfg, process_index=0, process_count=1)
    full = _take(pipe.iterator(), pipe.num_steps)
    it = pipe.iterator()
    _take(it, 7)
    state = iterator_state_to_bytes(it)
    resumed = build_pipeline(cfg, process_index=0, process_count=1).iterator()
    restore_iterator_state(resumed, state)
    _assert_batches_equal(_take(resumed, pipe.num_steps - 7), full[7:])
    with pytest.raises(StopIteration):
        next(resumed)


def test_restore_with_worker_processes(dataset, qwen3_tokenizer_dir):
    root, _ = dataset
    cfg = make_config(root, qwen3_tokenizer_dir, max_steps=8)
    reference = _take(build_pipeline(cfg, process_index=0, process_count=1).iterator(), 8)
    pipe = build_pipeline({**cfg, "worker_count": 1}, process_index=0, process_count=1)
    it = pipe.iterator()
    first = _take(it, 3)
    state = iterator_state_to_bytes(it)
    it.close()
    resumed = pipe.iterator()
    restore_iterator_state(resumed, state)
    rest = _take(resumed, 5)
    resumed.close()
    _assert_batches_equal(first + rest, reference)


def test_two_hosts_slices_union_is_the_global_batch(dataset, qwen3_tokenizer_dir):
    root, _ = dataset
    cfg = make_config(root, qwen3_tokenizer_dir, pad_to_max_length=True)
    single = build_pipeline(cfg, process_index=0, process_count=1)
    hosts = [build_pipeline(cfg, process_index=p, process_count=2) for p in range(2)]
    for step in range(single.steps_per_epoch + 2):
        whole = single.batch_at(step)
        parts = [h.batch_at(step) for h in hosts]
        ids = np.concatenate([p["record_index"] for p in parts])
        assert len(set(ids.tolist())) == len(ids)
        for key in whole:
            if key in ("domain_index", "step"):
                assert all(np.array_equal(p[key], whole[key]) for p in parts)
            else:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                              whole[key], err_msg=key)


def test_multi_host_pads_to_max_length_by_default(dataset, qwen3_tokenizer_dir):
    root, _ = dataset
    host = build_pipeline(make_config(root, qwen3_tokenizer_dir), process_index=1,
                          process_count=2)
    batch = host.batch_at(0)
    assert batch["query_input_ids"].shape[1] == 64
    assert batch["passage_input_ids"].shape[1] == 32


def test_iterator_state_in_an_orbax_checkpoint(dataset, qwen3_tokenizer_dir, tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    root, _ = dataset
    cfg = make_config(root, qwen3_tokenizer_dir, max_steps=6)
    pipe = build_pipeline(cfg, process_index=0, process_count=1)
    full = _take(pipe.iterator(), 6)
    it = pipe.iterator()
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    resumed = pipe.iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(_take(resumed, 4), full[2:])


def test_conflicting_record_shapes_and_small_domains_are_config_errors(tmp_path,
                                                                       qwen3_tokenizer_dir):
    recs = [_record("beta", i, 3, True) for i in range(8)]
    recs[3]["train_group_size"] = 7
    with open(tmp_path / "beta.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    cfg = {"sources": (str(tmp_path / "beta.jsonl"),), "tokenizer": str(qwen3_tokenizer_dir),
           "num_devices": 1}
    with pytest.raises(ValueError, match="disagree on train_group_size"):
        build_pipeline(cfg, process_index=0, process_count=1)
    # A config override settles it; a batch bigger than the domain is refused.
    ok = build_pipeline({**cfg, "domains": {"beta": {"group_size": 2, "batch_size": 4}}},
                        process_index=0, process_count=1)
    assert ok.steps_per_epoch == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pipeline({**cfg, "domains": {"beta": {"group_size": 2, "batch_size": 9}}},
                       process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible by the process count"):
        build_pipeline({**cfg, "domains": {"beta": {"group_size": 2, "batch_size": 3}}},
                       process_index=0, process_count=2)
    with pytest.raises(ValueError, match="unknown fields"):
        build_pipeline({**cfg, "domains": {"beta": {"group": 2}}}, process_index=0,
                       process_count=1)
    with pytest.raises(ValueError, match="unknown data config fields"):
        build_pipeline({**cfg, "batch": 3}, process_index=0, process_count=1)


def test_shipped_demo_data(qwen3_tokenizer_dir, tokenizer):
    files = sorted(os.listdir(DEMO_DATA_DIR))
    total = sum(os.path.getsize(os.path.join(DEMO_DATA_DIR, f)) for f in files)
    assert total < 2 * 1024 * 1024
    assert "LICENSE.CC-BY-4.0.txt" in files and "README.md" in files
    data = load_config_file("demo").data  # the demo's data, as the demo and benchmark read it
    data.tokenizer = str(qwen3_tokenizer_dir)
    pipe = build_pipeline(data, process_index=0, process_count=1)
    assert len(pipe.domains) == 7 and pipe.stats.num_valid == 336 and pipe.stats.num_bad == 0
    shapes = {d.name: (d.group_size, d.batch_size) for d in pipe.domains}
    assert shapes == {name: (data.domains[name].group_size, data.domains[name].batch_size)
                      if name in data.domains else (data.group_size, data.batch_size)
                      for name in shapes}
    assert len(set(shapes.values())) == 3  # the demo exercises per-domain shapes
    for step in range(3):
        batch = pipe.batch_at(step)
        d = pipe.domains[int(batch["domain_index"])]
        assert batch["passage_input_ids"].shape[0] == d.group_size * d.batch_size * data.num_devices
        text = tokenizer.decode(batch["query_input_ids"][0], skip_special_tokens=True)
        assert text.startswith(f"Instruct: {task_instruction(d.name)}\nQuery: ")
