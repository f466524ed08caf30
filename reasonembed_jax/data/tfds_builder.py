"""A TFDS builder for training records, written as ``array_record`` files (no TensorFlow needed).

``tensorflow-datasets`` (checked with 4.9.10) imports, builds and reads ``array_record`` datasets
without TensorFlow installed; this module uses it only when called (``example_to_record`` needs
nothing). Build::

    python -m reasonembed_jax.data.tfds_builder data/*.jsonl.gz --data-dir ~/tfds

then train from the version folder it prints (``data.sources = ("DATA_DIR/reason_embed_records/
1.0.0",)``, or ``...:split``). Each example holds one record; unset optional fields are stored
as empty values (``""``, ``[]``, ``0``) and come back as absent. Integer ``id`` values are stored
as text and scores as float32 (TFDS keeps floats in ``tf.train.Example`` float lists).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from reasonembed_jax.cli import run_cli
from reasonembed_jax.data.index import InputStats, check_record, note_source
from reasonembed_jax.data.sources import JsonlSource, domain_from_path
from reasonembed_jax.records import RecordError

log = logging.getLogger(__name__)

BUILDER_NAME = "reason_embed_records"
VERSION = "1.0.0"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded TFDS example -> a record dict in the JSONL schema (empty optionals dropped)."""
    out: dict[str, Any] = {
        "prompt": _text(example["prompt"]),
        "query": _text(example["query"]),
        "pos": [_text(t) for t in example["pos"]],
        "neg": [_text(t) for t in example["neg"]],
    }
    for name in ("reasoning_query", "domain", "id"):
        value = _text(example[name])
        if value:
            out[name] = value
    for name in ("pos_scores", "neg_scores"):
        values = [float(v) for v in example[name]]
        if values:
            out[name] = values
    for name in ("train_group_size", "batch_size"):
        value = int(example[name])
        if value:
            out[name] = value
    return out


def record_to_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A validated record dict -> the TFDS example (optional fields filled with empty values)."""
    rid = record.get("id")
    return {
        "prompt": record["prompt"],
        "query": record["query"],
        "reasoning_query": record.get("reasoning_query") or "",
        "pos": list(record["pos"]),
        "neg": list(record["neg"]),
        "pos_scores": list(record.get("pos_scores") or []),
        "neg_scores": list(record.get("neg_scores") or []),
        "domain": record.get("domain") or "",
        "train_group_size": int(record.get("train_group_size") or 0),
        "batch_size": int(record.get("batch_size") or 0),
        "id": "" if rid is None else str(rid),
    }


@functools.cache
def builder_class() -> type:
    """The ``GeneratorBasedBuilder`` subclass (created on first use: it imports TFDS)."""
    import numpy as np
    import tensorflow_datasets as tfds

    class ReasonEmbedRecords(tfds.core.GeneratorBasedBuilder):
        """ReasonEmbed training records; every source file's valid records go to one split."""

        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, sources: Mapping[str, Sequence[str]] | None = None,
                     strict: bool = False, **kwargs: Any):
            self._sources = {k: list(v) for k, v in (sources or {}).items()}
            self._strict = strict
            self.stats = InputStats()
            super().__init__(**kwargs)

        def _info(self) -> Any:
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description="Training records in the reasonembed_jax.records schema.",
                features=tfds.features.FeaturesDict({
                    "prompt": text,
                    "query": text,
                    "reasoning_query": text,
                    "pos": tfds.features.Sequence(text),
                    "neg": tfds.features.Sequence(text),
                    "pos_scores": tfds.features.Sequence(np.float64),
                    "neg_scores": tfds.features.Sequence(np.float64),
                    "domain": text,
                    "train_group_size": np.int32,
                    "batch_size": np.int32,
                    "id": text,
                }),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager
            if not self._sources:
                raise ValueError("no source files given to the builder")
            return {split: self._generate_examples(paths) for split, paths in self._sources.items()}

        def _generate_examples(self, paths: Sequence[str]) -> Any:
            for path in paths:
                source = JsonlSource(path)
                note_source(source, self.stats, strict=self._strict)
                for position, raw in enumerate(source.iter_raw()):
                    try:
                        record, domain = check_record(
                            raw, location=source.location(position), assigned_domain=None,
                            fallback_domain=domain_from_path(path), max_chars=None,
                            require_reasoning_query=False)
                    except RecordError as err:
                        if self._strict:
                            raise
                        self.stats.add_bad(err)
                        continue
                    self.stats.num_valid += 1
                    data = record.to_json()
                    data["domain"] = domain
                    yield f"{os.path.basename(path)}:{position}", record_to_example(data)

    return ReasonEmbedRecords


def build_tfds_dataset(
    sources: Mapping[str, Sequence[str]] | Sequence[str],
    data_dir: str,
    *,
    strict: bool = False,
) -> tuple[str, InputStats]:
    """Builds the dataset (array_record files) and returns (its version folder, record counts).

    ``sources``: ``{split: [jsonl files]}`` or a list of files for the ``train`` split. Records
    without a ``domain`` get their file's stem, so one TFDS dataset can hold every domain.
    """
    if not isinstance(sources, Mapping):
        sources = {"train": list(sources)}
    builder = builder_class()(sources=sources, strict=strict, data_dir=data_dir,
                              file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_dir), builder.stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reasonembed_jax.data.tfds_builder",
        description="Build a TFDS dataset (array_record format, no TensorFlow) from training-"
                    "record JSONL files; all files go to the 'train' split.")
    parser.add_argument("inputs", nargs="+", help="JSONL or JSONL.gz files")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first invalid record instead of skipping it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    path, stats = build_tfds_dataset(args.inputs, args.data_dir, strict=args.strict)
    log.info("%s\n%s", path, stats.summary())
    print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
