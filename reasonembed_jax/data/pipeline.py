"""The trainer's input pipeline: homogeneous per-domain batches, step-indexed, on Grain.

Step ``n``'s batch is a pure function of (seed, n, the indexed records): ``epoch = n // S`` and
``k = n % S`` with ``S = sum_d floor(N_d / B_d)`` steps per epoch, ``sampling.epoch_plan`` gives
step ``k``'s domain and records, ``sampling.sample_passages`` the positive and negatives of each
record. The Grain dataset is ``MapDataset.range(num_steps).map(BatchBuilder)``, so an iterator's
state is little more than its next step and restores exactly, with or without worker processes.

Each host builds only its rows ``[p*B/P, (p+1)*B/P)`` of the global batch (``sampling.host_slice``)
and returns a dict of numpy arrays (``b = B/P`` queries, group size ``G``):

===========================  ===========  ===============================================
key                          shape/dtype  contents
===========================  ===========  ===============================================
``query_input_ids``          [b, Lq] i32  ``format_query(query, instruction)``, left-padded
``query_attention_mask``     [b, Lq] i32
``passage_input_ids``        [b*G, Lp]    per query: its positive, then its G-1 negatives
``passage_attention_mask``   [b*G, Lp]
``reasoning_input_ids``      [b, Lr]      only with ``use_reasoning_query``
``reasoning_attention_mask`` [b, Lr]
``domain_index``             [] i32       index into ``pipeline.domain_names``
``step``                     [] i64       global step of this batch
``record_index``             [b] i64      only with ``return_record_index`` (global record key)
===========================  ===========  ===============================================

Widths are bucketed (``text.bucket_length`` of the longest row) on one host; with several hosts
every host pads to the field's max length (``pad_to_max_length``), since hosts cannot see each
other's rows and ``jax.make_array_from_process_local_data`` needs equal shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import zlib
from collections.abc import Collection, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from reasonembed_jax.data import sampling
from reasonembed_jax.data.index import InputStats, RecordIndex, check_record, index_records
from reasonembed_jax.data.sources import (
    JSONL_SUFFIXES,
    RecordSource,
    domain_from_path,
    open_source,
    parse_source_spec,
)
from reasonembed_jax.records import TrainingRecord
from reasonembed_jax.text import format_query, load_tokenizer, tokenize_texts

log = logging.getLogger(__name__)

# The authors' released data (hanhainebula/reason-embed-data, folder reason-embed-data-0928) ships
# one file per BRIGHT domain named "{domain}-formatted.jsonl".
RELEASED_FILE_TAG = "-formatted"


def is_released_folder(spec: str) -> bool:
    """A source spec naming a plain folder (not a TFDS dataset directory): the released layout."""
    return os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "dataset_info.json"))


def released_folder_sources(directory: str, domains: Collection[str]) -> list[tuple[str, str]]:
    """``(path, domain)`` of every JSONL file of a folder laid out as the authors' release:
    ``{domain}-formatted.jsonl`` (``.gz`` allowed; ``-formatted`` optional; hyphens in the domain
    read as underscores). Every file must name one of ``domains`` (``data.domains``, which gives
    its shape: the recipe configs list every domain of the release)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(JSONL_SUFFIXES))
    if not names:
        raise ValueError(f"data source folder {directory} holds no JSONL files "
                         f"(expected {{domain}}{RELEASED_FILE_TAG}.jsonl files)")
    out, unknown = [], []
    for name in names:
        stem = domain_from_path(name)
        if stem.endswith(RELEASED_FILE_TAG):
            stem = stem[: -len(RELEASED_FILE_TAG)]
        domain = stem.replace("-", "_")
        if domain in domains:
            out.append((os.path.join(directory, name), domain))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"data source folder {directory}: {unknown} name no domain of "
                         f"data.domains; files must be {{domain}}{RELEASED_FILE_TAG}.jsonl with "
                         f"domain one of {sorted(domains)} (the recipe configs set data.domains "
                         "to every domain of the release)")
    return out


DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``config.data`` block with every field the pipeline reads, at its default."""
    c = ml_collections.ConfigDict()
    # Files: "[domain=]path" (path: .jsonl/.jsonl.gz/.array_record file, glob, or TFDS dir[:split]),
    # or a plain folder in the authors' released layout ({domain}-formatted.jsonl per domain, each
    # domain one of data.domains).
    c.sources = ()
    c.domain_from_filename = True  # records without 'domain' take their file's stem
    # Per-domain overrides: {name: {group_size, batch_size, instruction}}; missing keys fall back
    # to the records' train_group_size / batch_size, then to the defaults below.
    c.domains = ml_collections.ConfigDict()
    c.group_size = 16
    c.batch_size = 8  # per device; global batch = batch_size * num_devices
    c.num_devices = ml_collections.config_dict.placeholder(int)  # None: jax.device_count()
    c.seed = 0
    c.num_epochs = 1.0
    c.max_steps = ml_collections.config_dict.placeholder(int)  # overrides num_epochs when set
    # Text.
    c.tokenizer = ""  # local HF tokenizer folder
    c.query_max_length = 512
    c.passage_max_length = 512
    c.reasoning_max_length = 512
    c.buckets = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    c.pad_to_max_length = ml_collections.config_dict.placeholder(bool)  # None: iff >1 process
    c.append_eos = True
    c.eos_token_id = ml_collections.config_dict.placeholder(int)  # None: text.embedding_eos_token_id
    c.use_reasoning_query = False
    # With reasoning queries on, a record without one (e.g. its synthesis call failed): "skip"
    # leaves it out (counted as records_skipped/missing_reasoning_query, with a warning);
    # "query" keeps it with q' = its own query (then L' = L, so RI = 1: a neutral weight), counted
    # as records_without_reasoning_query.
    c.missing_reasoning_query = "skip"
    # Bad input.
    c.strict = False
    c.max_text_chars = 100_000
    c.max_reported_errors = 10
    # Grain.
    c.worker_count = 0
    c.worker_buffer_size = 2
    c.read_threads = 1
    c.return_record_index = False
    return c


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """One domain as the pipeline runs it."""

    name: str
    index: int
    group_size: int
    batch_size: int  # per device
    global_batch: int  # batch_size * num_devices
    host_batch: int  # global_batch / process_count
    instruction: str | None  # None: each record's own 'prompt'
    num_records: int
    steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class TextSettings:
    tokenizer: str
    query_max_length: int
    passage_max_length: int
    reasoning_max_length: int
    buckets: tuple[int, ...]
    pad_to_max_length: bool
    append_eos: bool
    eos_token_id: int | None
    use_reasoning_query: bool
    reasoning_falls_back_to_query: bool = False

    @property
    def require_reasoning_query(self) -> bool:
        return self.use_reasoning_query and not self.reasoning_falls_back_to_query


def _as_config(config: Mapping[str, Any] | ml_collections.ConfigDict | None,
               overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    c = default_data_config()
    given = dict(config.items()) if config is not None else {}
    given.update(overrides)
    unknown = sorted(set(given) - set(c.keys()))
    if unknown:
        raise ValueError(f"unknown data config fields: {unknown}")
    for key, value in given.items():
        if key == "domains":
            value = ml_collections.ConfigDict(
                {k: dict(v) for k, v in dict(value).items()} if value else {}
            )
        if key == "sources" and isinstance(value, str):
            value = (value,)
        if isinstance(value, list):
            value = tuple(value)
        c[key] = value
    return c


class BatchBuilder(grain.transforms.Map):
    """Grain map: step -> this host's slice of that step's batch (see the module docstring).

    Runs inside Grain worker processes; the tokenizer is loaded lazily in each process.
    """

    def __init__(
        self,
        *,
        sources: tuple[RecordSource, ...],
        assigned_domains: tuple[str | None, ...],
        index: RecordIndex,
        domains: tuple[DomainSpec, ...],
        steps_per_epoch: int,
        seed: int,
        text: TextSettings,
        max_text_chars: int | None,
        process_index: int,
        process_count: int,
        domain_from_filename: bool,
        return_record_index: bool,
    ):
        self.sources = sources
        self.assigned_domains = assigned_domains
        self.index = index
        self.domains = domains
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.text = text
        self.max_text_chars = max_text_chars
        self.process_index = process_index
        self.process_count = process_count
        self.domain_from_filename = domain_from_filename
        self.return_record_index = return_record_index
        self._plans: dict[int, sampling.EpochPlan] = {}
        self._plans_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plans"] = {}
        del state["_plans_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plans_lock = threading.Lock()

    @property
    def tokenizer(self):  # noqa: ANN201 (transformers tokenizer)
        return _cached_tokenizer(self.text.tokenizer)[0]

    def plan(self, epoch: int) -> sampling.EpochPlan:
        with self._plans_lock:
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = sampling.epoch_plan(
                    self.seed,
                    epoch,
                    [len(d.record_keys) for d in self.index.domains],
                    [d.global_batch for d in self.domains],
                )
            return self._plans[epoch]

    def record_keys(self, step: int) -> tuple[int, np.ndarray]:
        """``(domain index, global record keys of this host's rows)`` for one step."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        d, positions = self.plan(epoch).positions(k)
        rows = sampling.host_slice(
            self.domains[d].global_batch, self.process_index, self.process_count
        )
        return d, self.index.domains[d].record_keys[positions[rows]]

    def read_record(self, key: int) -> TrainingRecord:
        """The validated record behind a global record key."""
        source_id, position = self.index.locate(key)
        source = self.sources[source_id]
        record, _ = check_record(
            source[position],
            location=source.location(position),
            assigned_domain=self.assigned_domains[source_id],
            fallback_domain=domain_from_path(source.path) if self.domain_from_filename else None,
            max_chars=self.max_text_chars,
            require_reasoning_query=self.text.require_reasoning_query,
        )
        return record

    def _tokenize(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.text
        tokenizer, lock = _cached_tokenizer(t.tokenizer)
        with lock:
            return tokenize_texts(
                tokenizer,
                texts,
                max_length,
                append_eos=t.append_eos,
                eos_token_id=t.eos_token_id,
                buckets=t.buckets,
                pad_to=max_length if t.pad_to_max_length else None,
            )

    def texts(self, step: int) -> dict[str, Any]:
        """The untokenized texts of this host's rows for one step (tokenization's input)."""
        epoch = int(step) // self.steps_per_epoch
        d, keys = self.record_keys(step)
        spec = self.domains[d]
        queries, reasoning, passages = [], [], []
        for key in keys.tolist():
            record = self.read_record(key)
            instruction = spec.instruction if spec.instruction is not None else record.prompt
            pos_i, neg_i = sampling.sample_passages(
                len(record.pos),
                len(record.neg),
                spec.group_size,
                seed=self.seed,
                epoch=epoch,
                record_key=key,
            )
            queries.append(format_query(record.query, instruction))
            if self.text.use_reasoning_query:
                reasoning.append(format_query(record.query if record.reasoning_query is None
                                              else record.reasoning_query, instruction))
            passages.append(record.pos[pos_i])
            passages.extend(record.neg[i] for i in neg_i.tolist())
        return {
            "domain_index": d,
            "record_keys": keys,
            "queries": queries,
            "reasoning": reasoning,
            "passages": passages,
        }

    def map(self, step: int) -> dict[str, np.ndarray]:
        t = self.texts(step)
        q_ids, q_mask = self._tokenize(t["queries"], self.text.query_max_length)
        p_ids, p_mask = self._tokenize(t["passages"], self.text.passage_max_length)
        batch = {
            "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "passage_input_ids": p_ids,
            "passage_attention_mask": p_mask,
        }
        if self.text.use_reasoning_query:
            r_ids, r_mask = self._tokenize(t["reasoning"], self.text.reasoning_max_length)
            batch["reasoning_input_ids"] = r_ids
            batch["reasoning_attention_mask"] = r_mask
        # Identity of each passage's text: the loss masks in-batch copies of a query's own
        # positive (e.g. another record's negative that is this record's positive).
        batch["passage_key"] = text_keys(t["passages"])
        batch["domain_index"] = np.asarray(t["domain_index"], dtype=np.int32)
        batch["step"] = np.asarray(step, dtype=np.int64)
        if self.return_record_index:
            batch["record_index"] = np.asarray(t["record_keys"], dtype=np.int64)
        return batch


def text_keys(texts: list[str]) -> np.ndarray:
    """A stable 31-bit key per text (CRC-32 of its UTF-8 bytes), equal on every host."""
    return np.asarray([zlib.crc32(t.encode("utf-8")) & 0x7FFFFFFF for t in texts], dtype=np.int32)


class TrainingDataPipeline:
    """Indexed training data plus the recipe for building each step's batch on this host.

    Build with ``build_pipeline``; iterate with ``iterator()``; ``batch_at(step)`` builds one batch
    in-process (no Grain), handy for debugging and as a second code path in tests.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, process_index: int,
                 process_count: int, num_devices: int):
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        self.num_devices = num_devices
        if not config.sources:
            raise ValueError("data.sources is empty: name at least one training-record file")
        if not config.tokenizer:
            raise ValueError("data.tokenizer is empty: give a local HF tokenizer folder")
        if config.missing_reasoning_query not in ("skip", "query"):
            raise ValueError(f"data.missing_reasoning_query must be 'skip' or 'query', got "
                             f"{config.missing_reasoning_query!r}")
        falls_back = config.missing_reasoning_query == "query"
        sources: list[RecordSource] = []
        assigned: list[str | None] = []
        overrides = dict(config.domains) if config.domains else {}
        for spec_text in config.sources:
            if is_released_folder(spec_text):
                for path, domain in released_folder_sources(spec_text, overrides):
                    sources.append(open_source(path))
                    assigned.append(domain)
                continue
            spec = parse_source_spec(spec_text)
            for path in spec.paths:
                sources.append(open_source(path, spec.split))
                assigned.append(spec.domain)
        self.index = index_records(
            sources,
            assigned,
            domain_from_filename=config.domain_from_filename,
            strict=config.strict,
            max_chars=config.max_text_chars,
            require_reasoning_query=config.use_reasoning_query and not falls_back,
            max_examples=config.max_reported_errors,
        )
        missing = self.index.stats.num_without_reasoning_query
        if config.use_reasoning_query and falls_back and missing:
            log.warning("training data: %d of %d records have no reasoning query; their q' is "
                        "the query itself (RI = 1)", missing, self.index.stats.num_valid)
        if not self.index.domains:
            raise ValueError(f"no valid training record in {list(config.sources)}:\n"
                             f"{self.index.stats.summary()}")
        unknown = sorted(set(overrides) - {d.name for d in self.index.domains})
        if unknown:
            raise ValueError(f"data.domains names domains with no records: {unknown}")
        domains = []
        for i, d in enumerate(self.index.domains):
            o = dict(overrides.get(d.name, {}))
            bad_keys = sorted(set(o) - {"group_size", "batch_size", "instruction"})
            if bad_keys:
                raise ValueError(f"data.domains.{d.name} has unknown fields {bad_keys} "
                                 "(expected group_size, batch_size, instruction)")
            # data.domains, then the records' own fields, then the defaults.
            group = o.get("group_size") or _single(d.record_group_sizes, d.name,
                                                  "train_group_size") or config.group_size
            batch = o.get("batch_size") or _single(d.record_batch_sizes, d.name,
                                                  "batch_size") or config.batch_size
            global_batch = int(batch) * num_devices
            host = sampling.host_slice(global_batch, process_index, process_count)
            steps = len(d.record_keys) // global_batch
            if steps == 0:
                raise ValueError(
                    f"domain '{d.name}' has {len(d.record_keys)} valid records, fewer than one "
                    f"global batch ({batch} per device x {num_devices} devices = {global_batch})"
                )
            domains.append(DomainSpec(
                name=d.name, index=i, group_size=int(group), batch_size=int(batch),
                global_batch=global_batch, host_batch=host.stop - host.start,
                instruction=o.get("instruction"), num_records=len(d.record_keys),
                steps_per_epoch=steps,
            ))
        self.domains = tuple(domains)
        self.steps_per_epoch = sum(d.steps_per_epoch for d in self.domains)
        if config.max_steps is not None:
            self.num_steps = int(config.max_steps)
        else:
            self.num_steps = int(math.ceil(config.num_epochs * self.steps_per_epoch))
        pad = config.pad_to_max_length
        text = TextSettings(
            tokenizer=str(config.tokenizer),
            query_max_length=int(config.query_max_length),
            passage_max_length=int(config.passage_max_length),
            reasoning_max_length=int(config.reasoning_max_length),
            buckets=tuple(int(b) for b in config.buckets),
            pad_to_max_length=bool(process_count > 1 if pad is None else pad),
            append_eos=bool(config.append_eos),
            eos_token_id=config.eos_token_id,
            use_reasoning_query=bool(config.use_reasoning_query),
            reasoning_falls_back_to_query=falls_back,
        )
        self.builder = BatchBuilder(
            sources=tuple(sources), assigned_domains=tuple(assigned), index=self.index,
            domains=self.domains, steps_per_epoch=self.steps_per_epoch, seed=int(config.seed),
            text=text, max_text_chars=config.max_text_chars, process_index=process_index,
            process_count=process_count, domain_from_filename=config.domain_from_filename,
            return_record_index=bool(config.return_record_index),
        )
        log.info("training data: %s", self.describe())

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.domains)

    @property
    def stats(self) -> InputStats:
        """Counts of valid and skipped records (``.as_metrics()``, ``.summary()``)."""
        return self.index.stats

    def describe(self) -> str:
        rows = [f"{self.steps_per_epoch} steps/epoch, {self.num_steps} steps, "
                f"host {self.process_index}/{self.process_count}, {self.num_devices} devices"]
        for d in self.domains:
            rows.append(f"  {d.name}: {d.num_records} records, G={d.group_size}, "
                        f"batch/device={d.batch_size}, global={d.global_batch}, "
                        f"host={d.host_batch}, {d.steps_per_epoch} steps/epoch")
        rows.append(self.stats.summary())
        return "\n".join(rows)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch of ``step``, built in this process."""
        return self.builder.map(step)

    def dataset(self) -> grain.IterDataset:
        """``MapDataset.range(num_steps).map(builder)``, read in threads and worker processes."""
        ds = grain.MapDataset.range(self.num_steps).map(self.builder)
        ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=int(self.config.read_threads),
            prefetch_buffer_size=max(int(self.config.worker_buffer_size), 1),
        ))
        if int(self.config.worker_count) > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(self.config.worker_count),
                per_worker_buffer_size=int(self.config.worker_buffer_size),
            ), worker_init_fn=_worker_init)
        return ds

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from step 0; ``set_state`` (or ``restore_iterator_state``) resumes."""
        return iter(self.dataset())


_TOKENIZERS: dict[str, tuple[Any, threading.Lock]] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _cached_tokenizer(path: str) -> tuple[Any, threading.Lock]:
    """One tokenizer per folder per process (loading Qwen3's takes seconds) and its lock: a HF
    tokenizer call sets truncation state on the shared Rust object, so calls must not overlap."""
    with _TOKENIZERS_LOCK:
        if path not in _TOKENIZERS:
            _TOKENIZERS[path] = (load_tokenizer(path), threading.Lock())
        return _TOKENIZERS[path]


def _single(values: tuple[int, ...], domain: str, field: str) -> int | None:
    if len(values) > 1:
        raise ValueError(
            f"records of domain '{domain}' disagree on {field}: {list(values)}; "
            f"set data.domains.{domain}.{'group_size' if field == 'train_group_size' else field}"
        )
    return values[0] if values else None


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Grain worker set-up: absl flags must count as parsed in spawned processes."""
    del worker_index, worker_count
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(
    config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
    /,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    **overrides: Any,
) -> TrainingDataPipeline:
    """Indexes the sources in ``config`` (a ``data`` ConfigDict/mapping, plus keyword overrides).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``;
    ``num_devices`` to ``config.num_devices`` or ``jax.device_count()``.
    """
    c = _as_config(config, overrides)
    if process_index is None or process_count is None or (
        num_devices is None and c.num_devices is None
    ):
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if num_devices is None and c.num_devices is None:
            num_devices = jax.device_count()
    if num_devices is None:
        num_devices = int(c.num_devices)
    return TrainingDataPipeline(c, process_index=int(process_index),
                                process_count=int(process_count), num_devices=int(num_devices))


def make_train_iterator(
    config: Mapping[str, Any] | ml_collections.ConfigDict | None = None, /, **kwargs: Any
) -> tuple[TrainingDataPipeline, grain.DatasetIterator]:
    """``build_pipeline(config, **kwargs)`` and a fresh iterator over it."""
    pipeline = build_pipeline(config, **kwargs)
    return pipeline, pipeline.iterator()


def iterator_state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's Grain state as UTF-8 JSON (save it in a checkpoint as bytes or a string)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes | str) -> None:
    """Puts ``iterator`` at the position saved by ``iterator_state_to_bytes``."""
    if isinstance(state, bytes):
        state = state.decode("utf-8")
    iterator.set_state(json.loads(state))
