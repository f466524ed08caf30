"""One validating pass over all sources: which records are usable, per domain, and what was skipped.

Every record is decoded and checked against ``reasonembed_jax.records`` before training starts, so
a bad line is found at start-up rather than hours into a run. In the default mode a bad record is
skipped and counted (by kind, with the first few ``file:line: reason`` messages kept for logs and
metrics); with ``strict=True`` the first bad record raises ``RecordError`` naming ``file:line``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from reasonembed_jax.data.sources import RecordSource, decode_raw, domain_from_path
from reasonembed_jax.records import RecordError, TrainingRecord, validate_record

log = logging.getLogger(__name__)

# Kinds of bad input, in the order they are reported.
BAD_INPUT_KINDS = (
    "malformed_json",
    "missing_reasoning_query",
    "missing_field",
    "empty_list",
    "empty_text",
    "wrong_type",
    "too_long",
    "length_mismatch",
    "missing_domain",
    "domain_mismatch",
    "truncated_file",
    "invalid",
)


def classify_record_error(reason: str) -> str:
    """Maps a ``RecordError`` reason (``records.py`` wording) to one of ``BAD_INPUT_KINDS``."""
    rules = (
        ("malformed JSON", "malformed_json"),
        ("missing field 'reasoning_query'", "missing_reasoning_query"),
        ("missing required field", "missing_field"),
        ("missing field", "missing_field"),
        ("is an empty list", "empty_list"),
        ("is empty", "empty_text"),
        ("characters, more than", "too_long"),
        ("entries but its texts have", "length_mismatch"),
        ("no domain", "missing_domain"),
        ("domain mismatch", "domain_mismatch"),
        ("compressed data ends early", "truncated_file"),
        ("must be", "wrong_type"),
    )
    for needle, kind in rules:
        if needle in reason:
            return kind
    return "invalid"


@dataclasses.dataclass
class InputStats:
    """Counts of what the indexing pass kept and skipped."""

    num_valid: int = 0
    num_blank_lines: int = 0
    # valid records that carry no reasoning query (kept: not needed, or q' = query)
    num_without_reasoning_query: int = 0
    bad_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    max_examples: int = 10
    # Valid records kept but worth a look: an ``id`` seen before, and records whose content
    # (every field but ``id``) equals an earlier record's (they weigh twice in training).
    duplicate_ids: int = 0
    identical_records: int = 0
    duplicate_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.bad_counts.values())

    def add_bad(self, err: RecordError) -> None:
        kind = classify_record_error(err.reason)
        self.bad_counts[kind] = self.bad_counts.get(kind, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat scalars for a metrics writer: valid, skipped, and skipped per kind."""
        out = {
            f"{prefix}records_valid": float(self.num_valid),
            f"{prefix}records_skipped": float(self.num_bad),
            f"{prefix}blank_lines": float(self.num_blank_lines),
            f"{prefix}records_without_reasoning_query": float(self.num_without_reasoning_query),
            f"{prefix}duplicate_ids": float(self.duplicate_ids),
            f"{prefix}identical_records": float(self.identical_records),
        }
        for kind in BAD_INPUT_KINDS:
            out[f"{prefix}records_skipped/{kind}"] = float(self.bad_counts.get(kind, 0))
        return out

    def summary(self) -> str:
        """One log paragraph: totals, per-kind counts, and the first reasons with file:line."""
        lines = [f"{self.num_valid} valid records ({self.num_without_reasoning_query} without a "
                 f"reasoning query), {self.num_bad} skipped"]
        if self.bad_counts:
            per_kind = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_counts.items()))
            lines.append(f"skipped by kind: {per_kind}")
            lines.extend(f"  {e}" for e in self.examples)
            if self.num_bad > len(self.examples):
                lines.append(f"  ... and {self.num_bad - len(self.examples)} more")
        if self.duplicate_ids or self.identical_records:
            lines.append(f"kept but suspicious: duplicate_ids={self.duplicate_ids}, "
                         f"identical_records={self.identical_records}")
            lines.extend(f"  {e}" for e in self.duplicate_examples)
        return "\n".join(lines)

    def note_duplicates(self, record: TrainingRecord, location: tuple[str, int],
                        seen_ids: dict[Any, str], seen_content: dict[bytes, str]) -> None:
        """Counts a valid record whose id, or whose whole content but the id, came before."""
        where = f"{location[0]}:{location[1]}"
        if record.id is not None:
            key = (type(record.id).__name__, record.id)
            if key in seen_ids:
                self.duplicate_ids += 1
                self._duplicate_example(f"{where}: id {record.id!r} also at {seen_ids[key]}")
            else:
                seen_ids[key] = where
        content = {k: v for k, v in record.to_json().items() if k not in ("id", "source_id")}
        digest = hashlib.blake2b(json.dumps(content, sort_keys=True).encode(),
                                 digest_size=16).digest()
        if digest in seen_content:
            self.identical_records += 1
            self._duplicate_example(f"{where}: same record as {seen_content[digest]}")
        else:
            seen_content[digest] = where

    def _duplicate_example(self, text: str) -> None:
        if len(self.duplicate_examples) < self.max_examples:
            self.duplicate_examples.append(text)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def note_source(source: RecordSource, stats: InputStats, *, strict: bool) -> None:
    """Adds a source's blank lines to ``stats``; a truncated gzip file (its readable lines are
    used) is counted as bad input naming the file, or with ``strict`` raises ``RecordError``."""
    stats.num_blank_lines += getattr(source, "num_blank_lines", 0)
    truncation = getattr(source, "truncation", None)
    if truncation is None:
        return
    line, cause = truncation
    err = RecordError(f"compressed data ends early ({cause}): the file is truncated or damaged; "
                      f"{len(source)} records before line {line} are used",
                      source=source.path, line=line)
    if strict:
        raise err
    log.warning("%s", err)
    stats.add_bad(err)


@dataclasses.dataclass(frozen=True)
class DomainIndex:
    """The usable records of one domain: global record keys plus shapes the records asked for."""

    name: str
    record_keys: np.ndarray  # int64 [N]; key = source offset + position in that source
    record_group_sizes: tuple[int, ...]  # distinct train_group_size values found (may be empty)
    record_batch_sizes: tuple[int, ...]  # distinct batch_size values found (may be empty)


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """All domains' usable records, and how record keys map back to sources."""

    domains: tuple[DomainIndex, ...]
    source_offsets: np.ndarray  # int64 [num_sources + 1]
    stats: InputStats

    def locate(self, key: int) -> tuple[int, int]:
        """``(source_id, position)`` of a global record key."""
        source_id = int(np.searchsorted(self.source_offsets, key, side="right")) - 1
        return source_id, int(key - self.source_offsets[source_id])


def check_record(
    raw: Any,
    *,
    location: tuple[str, int],
    assigned_domain: str | None,
    fallback_domain: str | None,
    max_chars: int | None,
    require_reasoning_query: bool,
) -> tuple[TrainingRecord, str]:
    """Decodes and validates one raw record; returns it with the domain it belongs to.

    The domain is ``assigned_domain`` (from a ``domain=path`` spec; a record naming another domain
    is an error), else the record's own ``domain``, else ``fallback_domain`` (the file name), else
    an error. Raises ``RecordError`` carrying ``file:line``.
    """
    source, line = location
    try:
        obj = decode_raw(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise RecordError(f"malformed JSON ({msg})", source=source, line=line) from None
    try:
        record = validate_record(
            obj, max_chars=max_chars, require_reasoning_query=require_reasoning_query
        )
    except RecordError as err:
        raise RecordError(err.reason, source=source, line=line) from None
    if assigned_domain is not None:
        if record.domain is not None and record.domain != assigned_domain:
            raise RecordError(
                f"domain mismatch: record says '{record.domain}' but its source is assigned to "
                f"'{assigned_domain}'",
                source=source,
                line=line,
            )
        return record, assigned_domain
    if record.domain is not None:
        return record, record.domain
    if fallback_domain is not None:
        return record, fallback_domain
    raise RecordError(
        "record has no domain (set 'domain', or name the source 'domain=path')",
        source=source,
        line=line,
    )


def index_records(
    sources: Sequence[RecordSource],
    assigned_domains: Sequence[str | None],
    *,
    domain_from_filename: bool = True,
    strict: bool = False,
    max_chars: int | None = None,
    require_reasoning_query: bool = False,
    max_examples: int = 10,
) -> RecordIndex:
    """Validates every record of every source and groups the valid ones by domain.

    Domains come out sorted by name, so every host numbers them identically.
    """
    if len(sources) != len(assigned_domains):
        raise ValueError("one assigned domain (or None) per source is required")
    stats = InputStats(max_examples=max_examples)
    offsets = np.zeros((len(sources) + 1,), dtype=np.int64)
    keys: dict[str, list[int]] = collections.defaultdict(list)
    groups: dict[str, set[int]] = collections.defaultdict(set)
    batches: dict[str, set[int]] = collections.defaultdict(set)
    seen_ids: dict[Any, str] = {}
    seen_content: dict[bytes, str] = {}
    for source_id, (source, assigned) in enumerate(zip(sources, assigned_domains, strict=True)):
        offsets[source_id + 1] = offsets[source_id] + len(source)
        note_source(source, stats, strict=strict)
        fallback = domain_from_path(source.path) if domain_from_filename else None
        for position, raw in enumerate(source.iter_raw()):
            try:
                record, domain = check_record(
                    raw,
                    location=source.location(position),
                    assigned_domain=assigned,
                    fallback_domain=fallback,
                    max_chars=max_chars,
                    require_reasoning_query=require_reasoning_query,
                )
            except RecordError as err:
                if strict:
                    raise
                stats.add_bad(err)
                continue
            stats.num_valid += 1
            stats.num_without_reasoning_query += record.reasoning_query is None
            stats.note_duplicates(record, source.location(position), seen_ids, seen_content)
            keys[domain].append(int(offsets[source_id]) + position)
            if record.train_group_size is not None:
                groups[domain].add(record.train_group_size)
            if record.batch_size is not None:
                batches[domain].add(record.batch_size)
    domains = tuple(
        DomainIndex(
            name=name,
            record_keys=np.asarray(keys[name], dtype=np.int64),
            record_group_sizes=tuple(sorted(groups[name])),
            record_batch_sizes=tuple(sorted(batches[name])),
        )
        for name in sorted(keys)
    )
    if stats.num_bad or stats.duplicate_ids or stats.identical_records:
        log.warning("training data: %s", stats.summary())
    return RecordIndex(domains=domains, source_offsets=offsets, stats=stats)
