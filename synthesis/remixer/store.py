"""Files of a stage: JSONL reading/writing, atomic writes, and the resumable shard loop.

Layout of one stage's folder::

    <work_dir>/<stage>/plan.json              what the shards are (items, shard size, fingerprint)
    <work_dir>/<stage>/shard-00003.jsonl      output of shard 3
    <work_dir>/<stage>/shard-00003.stats.json its counters; its presence marks the shard done
    <work_dir>/<stage>/final.jsonl            all shards merged (written once every shard is done)
    <work_dir>/<stage>/summary.json           the stage summary

A shard's output is written to a temporary file and renamed into place, then its stats file is
written the same way, so a crash or kill at any moment leaves either a finished shard or nothing
that counts: re-running redoes only the shards without a stats file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pathlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

PathLike = str | os.PathLike


class StageError(RuntimeError):
    """A stage cannot run: missing input, or a plan that contradicts work already on disk."""


def read_jsonl(path: PathLike) -> Iterator[dict[str, Any]]:
    """Yields the JSON objects of a JSONL file (``.gz`` read transparently); blank lines skipped.

    A malformed line raises ``StageError`` naming the file and line.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise StageError(f"{path}:{number}: expected a JSON object")
            yield obj


def atomic_write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, fsync and rename (all or nothing)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes records as JSONL atomically; returns how many were written."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


ShardFn = Callable[[Sequence[dict[str, Any]]], tuple[list[dict[str, Any]], Mapping[str, Any]]]


class ShardedStage:
    """Runs ``process`` over fixed-size shards of ``items``, skipping shards already done.

    ``plan_key`` identifies the work (input and settings); if ``plan.json`` on disk names another
    plan, the stage refuses to mix the two (use a fresh folder or ``restart``). With
    ``num_workers`` > 1, worker ``worker_index`` takes shards ``i`` with
    ``i % num_workers == worker_index`` (data parallelism over several engines or servers).
    """

    def __init__(self, stage_dir: PathLike, items: Sequence[dict[str, Any]], shard_size: int,
                 plan_key: Mapping[str, Any], *, restart: bool = False) -> None:
        if shard_size < 1:
            raise StageError("shard_size must be >= 1")
        self.dir = pathlib.Path(stage_dir)
        self.items = items
        self.shard_size = shard_size
        self.num_shards = (len(items) + shard_size - 1) // shard_size
        self.plan = {
            "num_items": len(items),
            "shard_size": shard_size,
            "num_shards": self.num_shards,
            "items": fingerprint([it.get("id") for it in items]),
            "settings": fingerprint(plan_key),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.dir / "plan.json"
        if restart:
            self.clear()
        if plan_path.exists():
            on_disk = json.loads(plan_path.read_text(encoding="utf-8"))
            if on_disk != self.plan:
                raise StageError(
                    f"{self.dir} holds work for another plan ({on_disk}) than this run "
                    f"({self.plan}); use another work dir or --restart"
                )
        else:
            atomic_write_json(plan_path, self.plan)

    def clear(self) -> None:
        """Removes every shard, merged output and plan of this stage folder."""
        for path in self.dir.iterdir():
            if path.is_file() and (path.name.startswith(("shard-", ".shard-", "plan.json"))
                                   or path.name in ("final.jsonl", "summary.json")):
                path.unlink()

    def shard_path(self, index: int) -> pathlib.Path:
        return self.dir / f"shard-{index:05d}.jsonl"

    def stats_path(self, index: int) -> pathlib.Path:
        return self.dir / f"shard-{index:05d}.stats.json"

    def is_done(self, index: int) -> bool:
        return self.stats_path(index).exists() and self.shard_path(index).exists()

    def pending(self, worker_index: int = 0, num_workers: int = 1) -> list[int]:
        if not 0 <= worker_index < num_workers:
            raise StageError(f"worker_index {worker_index} not in [0, {num_workers})")
        return [i for i in range(self.num_shards)
                if i % num_workers == worker_index and not self.is_done(i)]

    def run(self, process: ShardFn, *, worker_index: int = 0, num_workers: int = 1,
            log: Callable[[str], None] = print) -> int:
        """Processes this worker's pending shards in order; returns how many were processed."""
        todo = self.pending(worker_index, num_workers)
        skipped = sum(1 for i in range(self.num_shards)
                      if i % num_workers == worker_index) - len(todo)
        if skipped:
            log(f"[{self.dir.name}] {skipped} shard(s) already done, skipped")
        for index in todo:
            lo = index * self.shard_size
            shard_items = self.items[lo: lo + self.shard_size]
            records, stats = process(shard_items)
            atomic_write_jsonl(self.shard_path(index), records)
            atomic_write_json(self.stats_path(index), dict(stats))
            log(f"[{self.dir.name}] shard {index + 1}/{self.num_shards}: "
                f"{len(shard_items)} in, {len(records)} out")
        return len(todo)

    def all_done(self) -> bool:
        return all(self.is_done(i) for i in range(self.num_shards))

    def records(self) -> list[dict[str, Any]]:
        """All shard outputs in shard order (every shard must be done)."""
        out: list[dict[str, Any]] = []
        for i in range(self.num_shards):
            out.extend(read_jsonl(self.shard_path(i)))
        return out

    def stats(self) -> Counter:
        """The sum of every finished shard's numeric counters."""
        total: Counter = Counter()
        for i in range(self.num_shards):
            if self.stats_path(i).exists():
                for key, value in json.loads(self.stats_path(i).read_text("utf-8")).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        total[key] += value
        return total


def remove_if_exists(path: PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
