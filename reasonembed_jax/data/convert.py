"""Convert training-record JSONL(.gz) files to ArrayRecord (random access without loading).

Each input ``NAME.jsonl[.gz]`` becomes ``OUT_DIR/NAME.array_record`` (``group_size:1``), one
record per valid line, the line's bytes unchanged. Invalid lines are skipped and counted, or stop
the conversion with ``--strict``; blank lines are dropped. Usage::

    python -m reasonembed_jax.data.convert data/*.jsonl.gz --out-dir data/array_record
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence

from reasonembed_jax.cli import run_cli
from reasonembed_jax.data.index import InputStats, check_record, note_source
from reasonembed_jax.data.sources import JsonlSource, domain_from_path, write_array_record
from reasonembed_jax.records import RecordError

log = logging.getLogger(__name__)


def convert_jsonl_to_array_record(
    path: str,
    out_path: str,
    *,
    strict: bool = False,
    max_chars: int | None = None,
    stats: InputStats | None = None,
) -> InputStats:
    """Writes the valid records of one JSONL file to ``out_path``; returns the counts."""
    source = JsonlSource(path)
    stats = stats if stats is not None else InputStats()
    note_source(source, stats, strict=strict)

    def valid_lines() -> Iterator[bytes]:
        for position, raw in enumerate(source.iter_raw()):
            try:
                check_record(raw, location=source.location(position), assigned_domain=None,
                             fallback_domain=domain_from_path(path), max_chars=max_chars,
                             require_reasoning_query=False)
            except RecordError as err:
                if strict:
                    raise
                stats.add_bad(err)
                continue
            stats.num_valid += 1
            yield raw

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    try:
        write_array_record(tmp, valid_lines())
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reasonembed_jax.data.convert",
        description="Convert training-record JSONL(.gz) files to ArrayRecord files.")
    parser.add_argument("inputs", nargs="+", help="JSONL or JSONL.gz files")
    parser.add_argument("--out-dir", required=True, help="writes NAME.array_record here")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first invalid record instead of skipping it")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="records with a longer text are invalid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    total = InputStats()
    for path in args.inputs:
        out = os.path.join(args.out_dir, domain_from_path(path) + ".array_record")
        before = total.num_valid
        try:
            convert_jsonl_to_array_record(path, out, strict=args.strict,
                                          max_chars=args.max_chars, stats=total)
        except RecordError as err:
            log.error("stopped (--strict): %s", err)
            return 2
        log.info("%s -> %s: %d records", path, out, total.num_valid - before)
    log.info("%s", total.summary())
    return 0


if __name__ == "__main__":
    run_cli(main)
