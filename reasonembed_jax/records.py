"""The training-record schema: the one contract between synthesis (ReMixer) and training.

One JSON object per line (JSONL, optionally gzipped), usually one file per domain:

============== ========================= ==================================================
field          type                      meaning
============== ========================= ==================================================
``prompt``     str                       task instruction for the query side (may be "")
``query``      str, non-empty            the user query
``reasoning_query`` str, optional         query rewritten with reasoning (RI-InfoNCE needs it)
``pos``        list[str], >= 1           relevant passages
``neg``        list[str], >= 1           hard negatives
``pos_scores`` list[number], optional    one score per ``pos`` entry (annotator / teacher)
``neg_scores`` list[number], optional    one score per ``neg`` entry
``domain``     str, optional             domain name (batches never mix domains)
``train_group_size`` int >= 1, optional  passages per query (1 positive + G-1 negatives)
``batch_size`` int >= 1, optional        per-device queries for this domain
``id``         str or int, optional      stable record id
``source_id``  str or int, optional      corpus document the query was written from
                                         (synthesis provenance: no-leakage checks read it)
============== ========================= ==================================================

This module is pure standard library so the synthesis stage can import it without JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

REQUIRED_FIELDS = ("prompt", "query", "pos", "neg")
OPTIONAL_FIELDS = (
    "reasoning_query",
    "pos_scores",
    "neg_scores",
    "domain",
    "train_group_size",
    "batch_size",
    "id",
    "source_id",
)
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS


class RecordError(ValueError):
    """A record that breaks the schema; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str, *, source: str | None = None, line: int | None = None):
        self.reason = reason
        self.source = source
        self.line = line
        where = f"{source}:{line}: " if source is not None and line is not None else ""
        super().__init__(f"{where}{reason}")


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """A validated training record (see the module docstring for the field meanings)."""

    prompt: str
    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    reasoning_query: str | None = None
    pos_scores: tuple[float, ...] | None = None
    neg_scores: tuple[float, ...] | None = None
    domain: str | None = None
    train_group_size: int | None = None
    batch_size: int | None = None
    id: str | int | None = None
    source_id: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict, optional fields left out when unset."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "query": self.query,
            "pos": list(self.pos),
            "neg": list(self.neg),
        }
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _check_text(value: Any, name: str, *, allow_empty: bool, max_chars: int | None) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{name}' is empty")
    if max_chars is not None and len(value) > max_chars:
        raise RecordError(f"field '{name}' has {len(value)} characters, more than {max_chars}")
    return value


def _check_texts(value: Any, name: str, *, max_chars: int | None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RecordError(f"field '{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RecordError(f"field '{name}' is an empty list")
    return tuple(
        _check_text(v, f"{name}[{i}]", allow_empty=False, max_chars=max_chars)
        for i, v in enumerate(value)
    )


def _check_scores(value: Any, name: str, expected_len: int) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise RecordError(f"field '{name}' must be a list of numbers, got {type(value).__name__}")
    if len(value) != expected_len:
        raise RecordError(f"field '{name}' has {len(value)} entries but its texts have {expected_len}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RecordError(f"field '{name}[{i}]' must be a finite number, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecordError(f"field '{name}' must be an integer >= 1, got {value!r}")
    return value


def validate_record(
    obj: Any, *, max_chars: int | None = None, require_reasoning_query: bool = False
) -> TrainingRecord:
    """Checks one decoded JSON object against the schema and returns it as a ``TrainingRecord``.

    Raises ``RecordError`` naming the first offending field. Unknown extra fields are allowed
    (producers may carry provenance) and dropped. ``max_chars`` bounds every text field.
    """
    if not isinstance(obj, Mapping):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise RecordError(f"missing required field '{name}'")
    prompt = _check_text(obj["prompt"], "prompt", allow_empty=True, max_chars=max_chars)
    query = _check_text(obj["query"], "query", allow_empty=False, max_chars=max_chars)
    pos = _check_texts(obj["pos"], "pos", max_chars=max_chars)
    neg = _check_texts(obj["neg"], "neg", max_chars=max_chars)
    reasoning_query = obj.get("reasoning_query")
    if reasoning_query is not None:
        reasoning_query = _check_text(
            reasoning_query, "reasoning_query", allow_empty=False, max_chars=max_chars
        )
    elif require_reasoning_query:
        raise RecordError("missing field 'reasoning_query' (required for RI-InfoNCE)")
    pos_scores = obj.get("pos_scores")
    if pos_scores is not None:
        pos_scores = _check_scores(pos_scores, "pos_scores", len(pos))
    neg_scores = obj.get("neg_scores")
    if neg_scores is not None:
        neg_scores = _check_scores(neg_scores, "neg_scores", len(neg))
    domain = obj.get("domain")
    if domain is not None:
        domain = _check_text(domain, "domain", allow_empty=False, max_chars=None)
    group = obj.get("train_group_size")
    if group is not None:
        group = _check_positive_int(group, "train_group_size")
    batch = obj.get("batch_size")
    if batch is not None:
        batch = _check_positive_int(batch, "batch_size")
    rid, source_id = obj.get("id"), obj.get("source_id")
    for name, value in (("id", rid), ("source_id", source_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise RecordError(
                f"field '{name}' must be a string or integer, got {type(value).__name__}"
            )
    return TrainingRecord(
        prompt=prompt,
        query=query,
        pos=pos,
        neg=neg,
        reasoning_query=reasoning_query,
        pos_scores=pos_scores,
        neg_scores=neg_scores,
        domain=domain,
        train_group_size=group,
        batch_size=batch,
        id=rid,
        source_id=source_id,
    )


def parse_record_line(
    line: str | bytes,
    *,
    source: str | None = None,
    line_number: int | None = None,
    max_chars: int | None = None,
    require_reasoning_query: bool = False,
) -> TrainingRecord:
    """Decodes and validates one JSONL line; errors carry ``source:line``."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"malformed JSON ({err.msg if hasattr(err, 'msg') else err})",
                          source=source, line=line_number) from None
    try:
        return validate_record(
            obj, max_chars=max_chars, require_reasoning_query=require_reasoning_query
        )
    except RecordError as err:
        raise RecordError(err.reason, source=source, line=line_number) from None


def dump_record(record: TrainingRecord | Mapping[str, Any]) -> str:
    """One JSONL line (no trailing newline) for a record, validated first."""
    if not isinstance(record, TrainingRecord):
        record = validate_record(record)
    return json.dumps(record.to_json(), ensure_ascii=False)
