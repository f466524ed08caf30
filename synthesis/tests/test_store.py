"""The shard loop: resumption after a crash, plan checks, worker partitioning."""

from __future__ import annotations

import json
import pathlib
from collections import Counter

import pytest

from remixer.store import ShardedStage, StageError, read_jsonl


class Crash(Exception):
    pass


def _items(n: int) -> list[dict]:
    return [{"id": f"x{i}", "v": i} for i in range(n)]


def _square(seen: list):
    def process(items):
        seen.append([it["id"] for it in items])
        return [{"id": it["id"], "sq": it["v"] ** 2} for it in items], Counter(n=len(items))
    return process


def test_resume_after_crash_redoes_only_the_unfinished_shards(tmp_path: pathlib.Path):
    items = _items(10)
    calls: list = []

    def crashing(items_):
        if items_[0]["id"] == "x6":  # third shard
            raise Crash("killed mid-shard")
        return _square(calls)(items_)

    stage = ShardedStage(tmp_path / "s", items, 3, {"k": 1})
    with pytest.raises(Crash):
        stage.run(crashing, log=lambda _: None)
    assert [stage.is_done(i) for i in range(4)] == [True, True, False, False]
    # a half-written temporary file from the killed shard must not count
    (tmp_path / "s" / ".shard-00002.jsonl.tmp-999").write_text('{"id": "partial"')

    calls.clear()
    stage2 = ShardedStage(tmp_path / "s", items, 3, {"k": 1})
    assert stage2.run(_square(calls), log=lambda _: None) == 2
    assert calls == [["x6", "x7", "x8"], ["x9"]]
    assert stage2.all_done()
    assert stage2.records() == [{"id": f"x{i}", "sq": i * i} for i in range(10)]
    assert stage2.stats()["n"] == 10
    # a third run does nothing
    calls.clear()
    assert ShardedStage(tmp_path / "s", items, 3, {"k": 1}).run(_square(calls),
                                                               log=lambda _: None) == 0
    assert calls == []


def test_stats_file_marks_done_not_the_data_file(tmp_path: pathlib.Path):
    items = _items(4)
    stage = ShardedStage(tmp_path / "s", items, 2, {})
    stage.run(_square([]), log=lambda _: None)
    stage.stats_path(1).unlink()  # crash between the data rename and the stats write
    calls: list = []
    assert ShardedStage(tmp_path / "s", items, 2, {}).run(_square(calls), log=lambda _: None) == 1
    assert calls == [["x2", "x3"]]


def test_plan_mismatch_is_refused_unless_restart(tmp_path: pathlib.Path):
    ShardedStage(tmp_path / "s", _items(4), 2, {"temperature": 1.0}).run(_square([]),
                                                                          log=lambda _: None)
    with pytest.raises(StageError, match="another plan"):
        ShardedStage(tmp_path / "s", _items(4), 2, {"temperature": 0.5})
    with pytest.raises(StageError, match="another plan"):
        ShardedStage(tmp_path / "s", _items(5), 2, {"temperature": 1.0})
    stage = ShardedStage(tmp_path / "s", _items(4), 2, {"temperature": 0.5}, restart=True)
    assert stage.pending() == [0, 1]


def test_workers_partition_the_shards(tmp_path: pathlib.Path):
    items = _items(11)
    seen: list = []
    for worker in range(3):
        stage = ShardedStage(tmp_path / "s", items, 2, {})
        stage.run(_square(seen), worker_index=worker, num_workers=3, log=lambda _: None)
        if worker < 2:
            assert not stage.all_done()
    assert stage.all_done()
    flat = sorted(i for shard in seen for i in shard)
    assert flat == sorted(it["id"] for it in items)  # every item exactly once
    with pytest.raises(StageError):
        stage.pending(3, 3)


def test_shard_files_are_plain_jsonl(tmp_path: pathlib.Path):
    stage = ShardedStage(tmp_path / "s", _items(3), 5, {})
    stage.run(_square([]), log=lambda _: None)
    rows = list(read_jsonl(stage.shard_path(0)))
    assert [r["sq"] for r in rows] == [0, 1, 4]
    assert json.loads(stage.stats_path(0).read_text()) == {"n": 3}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(StageError, match="bad.jsonl:2"):
        list(read_jsonl(bad))
