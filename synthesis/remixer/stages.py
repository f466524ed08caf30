"""The ReMixer stages (method.md section 6) and NV-Retriever negative mining (section 7).

Every stage reads the previous stage's ``final.jsonl`` in the work dir and writes its own folder
(see ``store``). LLM stages run in shards: each shard's prompts go to the backend as one batch;
answers that fail (request error or unparsable) are re-sent, together, up to ``max_attempts``
times, then counted as failures. Nothing is dropped without a counter in the summary.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from reasonembed_jax import retrieval
from remixer import prompts as P
from remixer.backends import Backend, make_backend
from remixer.store import (
    ShardedStage,
    StageError,
    atomic_write_json,
    atomic_write_jsonl,
    fingerprint,
    read_jsonl,
)

STAGES = ("filter", "sources", "queries", "candidates", "annotations", "split", "nv_negatives",
          "reasoning")


# ------------------------------------------------------------------------------ context


class BackendPool:
    """Backends by model name, created on first use; the same settings under two names share one
    backend. With ``keep_alive`` False only one backend lives at a time (two offline engines
    would compete for the same accelerator memory); True keeps every engine until ``close``."""

    def __init__(self, models: Mapping[str, Mapping[str, Any]],
                 factory: Callable[[Mapping[str, Any]], Backend] = make_backend,
                 keep_alive: bool = False) -> None:
        self.models = models
        self.factory = factory
        self.keep_alive = keep_alive
        self._live: dict[str, Backend] = {}

    def get(self, name: str) -> Backend:
        if name not in self.models:
            raise StageError(f"no model named '{name}' in the config")
        key = fingerprint(self.models[name])
        if key not in self._live:
            if not self.keep_alive:
                self.close()
            self._live[key] = self.factory(self.models[name])
        return self._live[key]

    def close(self) -> None:
        for backend in self._live.values():
            backend.close()
        if self._live:
            self._live.clear()
            gc.collect()


@dataclasses.dataclass
class Context:
    config: dict[str, Any]
    work_dir: pathlib.Path
    domain: P.Domain
    backends: BackendPool
    worker_index: int = 0
    num_workers: int = 1
    restart: bool = False
    log: Callable[[str], None] = print

    def stage_dir(self, stage: str) -> pathlib.Path:
        return self.work_dir / stage

    def final_path(self, stage: str) -> pathlib.Path:
        return self.stage_dir(stage) / "final.jsonl"

    def read_final(self, stage: str) -> list[dict[str, Any]]:
        path = self.final_path(stage)
        if not path.exists():
            raise StageError(f"{path} does not exist: run the '{stage}' stage first "
                             "(all of its shards)")
        return list(read_jsonl(path))


# ------------------------------------------------------------------------------ LLM calls


def is_item_error(error: str) -> bool:
    """True for a failure caused by the request itself (over-long prompt, a 4xx answer other
    than 408/429), which retrying elsewhere cannot fix; False for backend trouble."""
    if error.startswith("prompt_too_long"):
        return True
    status = re.search(r"HTTP (\d{3})", error)
    return bool(status) and status.group(1).startswith("4") and status.group(1) not in (
        "408", "429")


def generate_with_retries(backend: Backend, prompts: Sequence[str], sampling: Mapping[str, Any],
                          parse: Callable[[str], Any], max_attempts: int
                          ) -> tuple[list[Any], list[str | None], Counter]:
    """Sends all ``prompts`` as one batch; re-sends the failed ones (request error, or ``parse``
    returned None) as one batch per round, at most ``max_attempts`` rounds in all.

    Returns (parsed value or None per prompt, last raw text per prompt, counters). Raises
    ``StageError`` when every request failed for a reason other than the request itself.
    """
    parsed: list[Any] = [None] * len(prompts)
    raw: list[str | None] = [None] * len(prompts)
    last_errors: list[str | None] = [None] * len(prompts)
    stats: Counter = Counter()
    todo = list(range(len(prompts)))
    for attempt in range(max_attempts):
        if not todo:
            break
        if attempt:
            stats["llm_retried"] += len(todo)
        answers = backend.generate([prompts[i] for i in todo], sampling)
        if len(answers) != len(todo):
            raise StageError(f"backend returned {len(answers)} answers for {len(todo)} prompts")
        failed = []
        for i, answer in zip(todo, answers, strict=True):
            stats["llm_requests"] += 1
            stats["tokens_generated"] += answer.num_tokens
            if answer.finish_reason == "length":
                # cut off at sampling.max_tokens: a thinking answer cut there has no answer
                stats["answers_hit_max_tokens"] += 1
            if answer.error is not None or answer.text is None:
                stats["llm_request_errors"] += 1
                last_errors[i] = answer.error or "no text"
                failed.append(i)
                continue
            raw[i] = answer.text
            value = parse(answer.text)
            if value is None:
                stats["llm_parse_failures"] += 1
                failed.append(i)
            else:
                parsed[i] = value
        todo = failed
    stats["llm_final_failures"] += len(todo)
    if prompts and stats["llm_request_errors"] == stats["llm_requests"]:
        errors = [e for e in last_errors if e is not None]
        if errors and not all(is_item_error(e) for e in errors):
            # nothing came back at all: the engine or server is down, not the prompts bad.
            # Raising keeps the shard unrecorded, so a re-run redoes it instead of losing it.
            raise StageError(f"backend unavailable: all {len(prompts)} requests failed "
                             f"{max_attempts} time(s); last error: {errors[-1]}")
    return parsed, raw, stats


def _timed(process: Callable[[Sequence[dict[str, Any]]], tuple[list[dict[str, Any]], Counter]]
           ) -> Callable[[Sequence[dict[str, Any]]], tuple[list[dict[str, Any]], Counter]]:
    def wrapped(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        start = time.perf_counter()
        records, stats = process(items)
        stats["items_in"] += len(items)
        stats["items_out"] += len(records)
        stats["elapsed_s"] += time.perf_counter() - start
        return records, stats
    return wrapped


def summarize(stage: str, ctx: Context, counters: Mapping[str, float],
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Builds, prints and saves ``summary.json``: counters plus rates and throughput."""
    c = Counter({k: 0 for k in ("items_in", "items_out", "llm_requests", "llm_request_errors",
                                "llm_parse_failures", "llm_final_failures", "tokens_generated",
                                "answers_hit_max_tokens")})
    c.update(counters)
    answered = c["llm_requests"] - c["llm_request_errors"]
    elapsed = c["elapsed_s"]
    summary: dict[str, Any] = {
        "stage": stage,
        "domain": ctx.domain.key,
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in sorted(c.items())},
    }
    if c["llm_requests"]:
        summary["parse_failure_rate"] = round(c["llm_parse_failures"] / max(answered, 1), 4)
        summary["request_error_rate"] = round(c["llm_request_errors"] / c["llm_requests"], 4)
        summary["max_tokens_hit_rate"] = round(c["answers_hit_max_tokens"] / max(answered, 1), 4)
        summary["final_failure_rate"] = round(
            c["llm_final_failures"] / max(c["llm_requests"] - c.get("llm_retried", 0), 1), 4)
    if elapsed > 0:
        summary["items_per_s"] = round(c["items_in"] / elapsed, 3)
        summary["tokens_per_s"] = round(c["tokens_generated"] / elapsed, 3)
    if extra:
        summary.update(extra)
    atomic_write_json(ctx.stage_dir(stage) / "summary.json", summary)
    ctx.log(f"[{stage}] summary: {json.dumps(summary, sort_keys=True)}")
    return summary


Records = list[dict[str, Any]]


def _run_sharded(stage: str, ctx: Context, items: Records,
                 process: Callable[[Sequence[dict[str, Any]]], tuple[Records, Counter]],
                 settings: Mapping[str, Any],
                 finalize: Callable[[Records], tuple[Records, Counter]] | None = None,
                 model: str | None = None) -> dict[str, Any] | None:
    """Runs the shard loop, then (once every shard is done) merges, finalizes and summarizes.

    The stage's engine (``model``) is started before the first shard, so shard timings (and the
    throughput figures) exclude the start-up, which is reported as ``engine_startup_s``.
    Returns the summary, or None when other workers' shards are still missing."""
    plan = {"stage": stage, "domain": ctx.domain.key, **settings}
    if model is not None:
        plan["model"] = model_identity(ctx.config["models"][model])
    runner = ShardedStage(ctx.stage_dir(stage), items, int(ctx.config["shard_size"]), plan,
                          restart=ctx.restart)
    startup = None
    if model is not None and runner.pending(ctx.worker_index, ctx.num_workers):
        backend = ctx.backends.get(model)
        if hasattr(backend, "start"):  # offline engines; a server is already up
            start = time.perf_counter()
            backend.start()
            startup = round(time.perf_counter() - start, 3)
    runner.run(_timed(process), worker_index=ctx.worker_index, num_workers=ctx.num_workers,
               log=ctx.log)
    if not runner.all_done():
        missing = len(runner.pending(0, 1))
        ctx.log(f"[{stage}] {missing} shard(s) of other workers still missing; "
                "re-run without --worker-index once all are done to merge")
        return None
    records = runner.records()
    counters = runner.stats()
    if finalize is not None:
        records, extra = finalize(records)
        counters.update(extra)
    counters["records_final"] = len(records)
    atomic_write_jsonl(ctx.final_path(stage), records)
    return summarize(stage, ctx, counters,
                     {"engine_startup_s": startup} if startup is not None else None)


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model settings that change outputs (not where or how fast it is served): part of a
    stage's plan, so resuming with another model is refused, but moving a server is not."""
    keys = ("model", "tokenizer", "runner", "pooling_type", "max_model_len", "dtype",
            "use_chat", "chat_template_kwargs", "truncate_prompt_tokens")
    return {k: model_cfg.get(k) for k in keys}


def _check_ids(items: Sequence[Mapping[str, Any]], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            raise StageError(f"{what}: duplicate id {item['id']!r}")
        seen.add(item["id"])


# ------------------------------------------------------------------------------ corpus


def load_corpus(path: str | pathlib.Path, include_title: bool = True) -> list[dict[str, Any]]:
    """Corpus JSONL -> [{"id": str, "text": str}]. The id comes from ``id`` or ``_id``; a
    non-empty ``title`` is put before the text on its own line when ``include_title``."""
    docs = []
    for number, obj in enumerate(read_jsonl(path), 1):
        doc_id = obj.get("id", obj.get("_id"))
        text = obj.get("text", obj.get("contents"))
        if doc_id is None or not isinstance(text, str):
            raise StageError(f"{path}:{number}: a corpus line needs 'id' (or '_id') and 'text'")
        title = obj.get("title")
        if include_title and isinstance(title, str) and title.strip():
            text = f"{title.strip()}\n{text}"
        docs.append({"id": str(doc_id), "text": text})
    _check_ids(docs, str(path))
    return docs


def _corpus(ctx: Context) -> list[dict[str, Any]]:
    """The domain corpus: the filter stage's output when the filter is enabled, else data.corpus."""
    if ctx.config["filter"]["enabled"]:
        return ctx.read_final("filter")
    path = ctx.config["data"]["corpus"]
    if not path:
        raise StageError("no corpus: set data.corpus (or --corpus)")
    return load_corpus(path, ctx.config["data"]["include_title"])


def load_exclusion_ids(paths: Sequence[str | pathlib.Path]) -> set[str]:
    """Benchmark document ids that must never be sources. A ``.jsonl``/``.jsonl.gz`` file is read
    as BRIGHT examples (``gold_ids`` and ``gold_ids_long`` of every query); any other file holds
    one id per line."""
    ids: set[str] = set()
    for path in paths:
        path = pathlib.Path(path)
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for obj in read_jsonl(path):
                for key in ("gold_ids", "gold_ids_long"):
                    ids.update(str(x) for x in obj.get(key) or [] if x != "N/A")
        else:
            ids.update(line.strip() for line in path.read_text("utf-8").splitlines()
                       if line.strip())
    return ids


def load_exclusion_texts(paths: Sequence[str | pathlib.Path]) -> set[str]:
    """Normalised texts that must never be sources (``gold_answer`` or ``text`` of each line)."""
    texts: set[str] = set()
    for path in paths:
        for obj in read_jsonl(path):
            for key in ("gold_answer", "text"):
                value = obj.get(key)
                if isinstance(value, str) and value.strip():
                    texts.add(P.normalize_for_dedup(value))
    return texts


# ------------------------------------------------------------------------------ stage 0


def run_filter(ctx: Context) -> dict[str, Any] | None:
    """Stage 0: keep the corpus passages the LLM says belong to the domain (Yes/No)."""
    cfg = ctx.config["filter"]
    path = ctx.config["data"]["corpus"]
    if not path:
        raise StageError("no corpus: set data.corpus (or --corpus)")
    docs = load_corpus(path, ctx.config["data"]["include_title"])

    def process(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        backend = ctx.backends.get(cfg["model"])
        prompts = [P.filter_prompt(ctx.domain, d["text"]) for d in items]
        verdicts, _, stats = generate_with_retries(backend, prompts, cfg["sampling"],
                                                   P.parse_yes_no, int(cfg["max_attempts"]))
        kept = []
        for doc, verdict in zip(items, verdicts, strict=True):
            if verdict is None:
                stats["dropped_unparsable"] += 1
            elif verdict:
                stats["answered_yes"] += 1
                kept.append(doc)
            else:
                stats["answered_no"] += 1
        return kept, stats

    return _run_sharded("filter", ctx, docs, process, {"cfg": cfg, "corpus": str(path)},
                        model=cfg["model"])


# ------------------------------------------------------------------------------ stage 1


def select_sources(docs: Sequence[Mapping[str, Any]], exclude_ids: set[str],
                   exclude_texts: set[str], min_chars: int, max_chars: int, sample_size: int,
                   seed: int) -> tuple[list[dict[str, Any]], Counter]:
    """Eligible = ``min_chars <= len(text) <= max_chars``, id not a benchmark gold id, text not a
    benchmark gold text, first occurrence of its text. Returns ``sample_size`` of them drawn
    uniformly (seeded), in corpus order, and the reason counts."""
    stats: Counter = Counter(docs_in=len(docs))
    eligible = []
    seen_texts: set[str] = set()
    for doc in docs:
        norm = P.normalize_for_dedup(doc["text"])
        if doc["id"] in exclude_ids:
            stats["excluded_gold_id"] += 1
        elif norm in exclude_texts:
            stats["excluded_gold_text"] += 1
        elif len(doc["text"]) < min_chars:
            stats["too_short"] += 1
        elif len(doc["text"]) > max_chars:
            stats["too_long"] += 1
        elif norm in seen_texts:
            stats["duplicate_text"] += 1
        else:
            seen_texts.add(norm)
            eligible.append(doc)
    stats["eligible"] = len(eligible)
    rng = np.random.default_rng(seed)
    if sample_size < len(eligible):
        picked = np.sort(rng.choice(len(eligible), size=sample_size, replace=False))
        chosen = [dict(eligible[i]) for i in picked]
    else:
        chosen = [dict(d) for d in eligible]
    stats["selected"] = len(chosen)
    return chosen, stats


def run_sources(ctx: Context) -> dict[str, Any]:
    """Stage 1: source selection with length bounds and benchmark-leakage exclusion."""
    data, cfg = ctx.config["data"], ctx.config["sources"]
    start = time.perf_counter()
    docs = _corpus(ctx)
    exclude_ids = load_exclusion_ids(data["exclude_ids"])
    exclude_texts = load_exclusion_texts(data["exclude_texts"])
    chosen, stats = select_sources(docs, exclude_ids, exclude_texts, int(cfg["min_chars"]),
                                   int(cfg["max_chars"]), int(cfg["sample_size"]),
                                   int(ctx.config["seed"]))
    atomic_write_jsonl(ctx.final_path("sources"), chosen)
    stats["items_in"], stats["items_out"] = len(docs), len(chosen)
    stats["exclusion_ids_loaded"] = len(exclude_ids)
    stats["exclusion_texts_loaded"] = len(exclude_texts)
    stats["elapsed_s"] = time.perf_counter() - start
    return summarize("sources", ctx, stats)


# ------------------------------------------------------------------------------ stage 2


def query_conditions(seed: int, source_id: str, cfg: Mapping[str, Any]) -> tuple[str, str]:
    """The (length, education level) drawn for one source, from the configured weights; a pure
    function of (seed, source id)."""
    rng = P.item_rng(seed, "query", source_id)
    length = P.weighted_choice(cfg["length_weights"], rng)
    education = P.weighted_choice(cfg["education_weights"], rng)
    return length, education


def run_queries(ctx: Context) -> dict[str, Any] | None:
    """Stage 2: one conditioned query per source; cleaned; duplicates dropped at the merge."""
    cfg = ctx.config["queries"]
    sources = ctx.read_final("sources")
    _check_ids(sources, "sources")
    min_chars = int(cfg["min_chars"])

    def parse(text: str) -> str | None:
        cleaned = P.clean_generated_text(text)
        return cleaned if len(cleaned) >= min_chars else None

    def process(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        backend = ctx.backends.get(cfg["model"])
        conditions = [query_conditions(int(ctx.config["seed"]), s["id"], cfg) for s in items]
        prompts = [P.query_prompt(ctx.domain, s["text"], length, education)
                   for s, (length, education) in zip(items, conditions, strict=True)]
        queries, _, stats = generate_with_retries(backend, prompts, cfg["sampling"], parse,
                                                  int(cfg["max_attempts"]))
        out = []
        for source, (length, education), query in zip(items, conditions, queries, strict=True):
            if query is None:
                stats["dropped_no_valid_query"] += 1
                continue
            out.append({"id": f"{ctx.domain.key}-{source['id']}", "source_id": source["id"],
                        "source_text": source["text"], "query": query, "length": length,
                        "education": education})
        return out, stats

    def finalize(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        seen: set[str] = set()
        kept = []
        for rec in records:
            key = P.normalize_for_dedup(rec["query"])
            if key in seen:
                continue
            seen.add(key)
            kept.append(rec)
        return kept, Counter(dropped_duplicate_query=len(records) - len(kept))

    return _run_sharded("queries", ctx, sources, process,
                        {"cfg": cfg, "seed": ctx.config["seed"]}, finalize, model=cfg["model"])


# ------------------------------------------------------------------------------ stage 3


def top_k_candidates(scores: np.ndarray, exclude: Sequence[int], usable: np.ndarray,
                     top_k: int, min_score: float | None, pad_random: bool,
                     rng: np.random.Generator) -> list[tuple[int, float, bool]]:
    """Top-``top_k`` corpus rows by ``scores`` (one query's cosines ``q . d``), skipping the
    ``exclude`` rows, rows not ``usable`` and rows scoring below ``min_score``. If fewer than
    ``top_k`` remain and ``pad_random``, random other usable rows fill the list (marked
    padded). Returns (row, score, padded), best first (``retrieval.top_k_indices`` order), then
    the padding."""
    allowed = usable.copy()
    allowed[list(exclude)] = False
    ranked = allowed if min_score is None else allowed & (scores >= min_score)
    order = retrieval.top_k_indices(scores, top_k, allowed=ranked)
    picked = [(int(i), float(scores[i]), False) for i in order]
    if len(picked) < top_k and pad_random:
        rest = np.setdiff1d(np.flatnonzero(allowed), order)
        extra = rng.permutation(rest)[: top_k - len(picked)]
        picked += [(int(i), float(scores[i]), True) for i in extra]
    return picked


def embed_corpus(ctx: Context, backend: Backend, docs: Sequence[Mapping[str, Any]],
                 model_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Corpus embeddings ``[N, D]`` and a usable mask. The corpus is embedded in chunks of
    ``mining.corpus_chunk_size`` texts, each saved (atomically) under
    ``candidates/corpus_embeddings/`` once all its texts succeeded, so a crash loses at most the
    chunk in flight and a resumed run embeds only the missing chunks. Chunks are keyed by the
    model identity and the corpus content; a different key discards them."""
    folder = ctx.stage_dir("candidates") / "corpus_embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    chunk = int(ctx.config["mining"]["corpus_chunk_size"])
    key = fingerprint({"model": model_key, "chunk": chunk,
                       "docs": fingerprint([(d["id"], d["text"]) for d in docs])})
    meta_path = folder / "meta.json"
    old = json.loads(meta_path.read_text("utf-8")) if meta_path.exists() else None
    if ctx.restart or (old is not None and old.get("key") != key):
        for path in folder.glob("chunk-*.npy"):
            path.unlink()
    atomic_write_json(meta_path, {"key": key, "num_docs": len(docs), "chunk_size": chunk})
    parts: list[np.ndarray | None] = []
    usable_parts: list[np.ndarray] = []
    reused = 0
    for index, lo in enumerate(range(0, len(docs), chunk)):
        texts = [d["text"] for d in docs[lo: lo + chunk]]
        path = folder / f"chunk-{index:05d}.npy"
        if path.exists():
            parts.append(np.load(path, allow_pickle=False))
            usable_parts.append(np.ones(len(texts), dtype=bool))
            reused += 1
            continue
        emb, errors = backend.embed(texts)
        ok = np.array([e is None for e in errors], dtype=bool)
        if ok.all():
            tmp = folder / f".chunk-{index:05d}.tmp.npy"
            np.save(tmp, emb, allow_pickle=False)
            tmp.replace(path)
        else:
            ctx.log(f"[candidates] {int((~ok).sum())} corpus texts of chunk {index} failed to "
                    "embed; they are excluded from mining and the chunk is not cached")
        parts.append(emb if ok.any() else None)
        usable_parts.append(ok)
    if reused:
        ctx.log(f"[candidates] {reused} corpus embedding chunk(s) reused from {folder}")
    dims = {p.shape[1] for p in parts if p is not None}
    if len(dims) != 1:
        raise StageError(f"corpus embeddings have dimensions {sorted(dims)}: need exactly one")
    dim = dims.pop()
    filled = [p if p is not None else np.zeros((len(u), dim), np.float32)
              for p, u in zip(parts, usable_parts, strict=True)]
    return np.concatenate(filled), np.concatenate(usable_parts)


def run_candidates(ctx: Context) -> dict[str, Any] | None:
    """Stage 3: embed queries (``Instruct: ...\\nQuery: ...``) and corpus, keep the top-k corpus
    documents per query, never the query's own source document, any other document with the
    same (normalised) text as the source, nor a text equal to the query."""
    from reasonembed_jax.text import format_query

    cfg = ctx.config["mining"]
    model_cfg = ctx.config["models"][cfg["model"]]
    queries = ctx.read_final("queries")
    _check_ids(queries, "queries")
    docs = _corpus(ctx)
    index_of = {d["id"]: i for i, d in enumerate(docs)}
    by_text: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_text.setdefault(P.normalize_for_dedup(d["text"]), []).append(i)
    state: dict[str, Any] = {}
    top_k = int(cfg["top_k"])
    keep = max(top_k, int(cfg["pool_k"] or 0))  # the judged list, then the unjudged pool

    def process(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        stats: Counter = Counter()
        backend = ctx.backends.get(cfg["model"])
        if "corpus" not in state:
            state["corpus"] = embed_corpus(ctx, backend, docs,
                                           fingerprint(model_identity(model_cfg)))
            stats["corpus_unusable"] = int((~state["corpus"][1]).sum())  # once per embedding
        corpus_emb, usable = state["corpus"]
        texts = [format_query(q["query"], ctx.domain.instruction) for q in items]
        query_emb, errors = backend.embed(texts)
        failures = [e for e in errors if e is not None]
        if texts and len(failures) == len(texts) and not all(map(is_item_error, failures)):
            raise StageError(f"embedding backend unavailable: {failures[-1]}")
        # one matrix product per block of queries (GEMM, bounded memory: block x corpus)
        block = max(1, int(2**28 // max(len(docs), 1)))
        scores = np.concatenate([query_emb[i: i + block] @ corpus_emb.T
                                 for i in range(0, len(items), block)]) if len(items) else None
        out = []
        for row, (q, error) in enumerate(zip(items, errors, strict=True)):
            if error is not None:
                stats["dropped_query_embed_failed"] += 1
                continue
            exclude = set(by_text.get(P.normalize_for_dedup(q["query"]), []))
            stats["excluded_identical_text"] += len(exclude)
            if q["source_id"] in index_of:
                exclude.add(index_of[q["source_id"]])
                stats["excluded_source"] += 1
            else:
                stats["source_not_in_corpus"] += 1
            # every copy of the source text, whatever its id (the corpus is keyed by text)
            source_text = q.get("source_text")
            if source_text is None and q["source_id"] in index_of:
                source_text = docs[index_of[q["source_id"]]]["text"]
            copies = set(by_text.get(P.normalize_for_dedup(source_text), [])
                         if source_text else []) - exclude
            stats["excluded_source_text_copies"] += len(copies)
            exclude |= copies
            exclude = sorted(exclude)
            rng = np.random.default_rng(
                int(fingerprint([ctx.config["seed"], "pad", q["id"]]), 16) % 2**63)
            ranked = top_k_candidates(scores[row], exclude, usable, keep, cfg["min_score"],
                                      bool(cfg["pad_random"]), rng)
            listed = [{"doc_id": docs[i]["id"], "text": docs[i]["text"], "score": round(s, 6),
                       "rank": r, "padded": padded}
                      for r, (i, s, padded) in enumerate(ranked)]
            # the judged list is the best top_k (padding, if any, comes after every real hit)
            picked, pool = listed[:top_k], listed[top_k:]
            stats["candidates"] += len(picked)
            stats["candidates_padded"] += sum(c["padded"] for c in picked)
            if len(picked) < top_k:
                stats["short_candidate_lists"] += 1
            record = {**q, "candidates": picked}
            if keep > top_k:
                record["pool"] = pool
                stats["pool_documents"] += len(pool)
            out.append(record)
        return out, stats

    return _run_sharded("candidates", ctx, queries, process,
                        {"cfg": cfg, "corpus": fingerprint([d["id"] for d in docs]),
                         "instruction": ctx.domain.instruction,
                         "excluded": "source id, source text copies, query text"},
                        model=cfg["model"])


# ------------------------------------------------------------------------------ stage 4


def run_annotations(ctx: Context) -> dict[str, Any] | None:
    """Stage 4: a 1-5 relevance score per (query, candidate) from ``<score>``; -1 when the answer
    stays unparsable after the retries (counted, and ignored by the split)."""
    cfg = ctx.config["annotation"]
    items_all = ctx.read_final("candidates")

    def parse(text: str) -> int | None:
        score = P.parse_score(text)
        return None if score < 0 else score

    def process(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        backend = ctx.backends.get(cfg["model"])
        pairs = [(qi, ci) for qi, q in enumerate(items) for ci in range(len(q["candidates"]))]
        cut = cfg.get("max_document_chars")
        prompts = [P.relevance_prompt(ctx.domain, items[qi]["query"],
                                      P.clip_text(items[qi]["candidates"][ci]["text"], cut))
                   for qi, ci in pairs]
        scores, _, stats = generate_with_retries(backend, prompts, cfg["sampling"], parse,
                                                 int(cfg["max_attempts"]))
        out = [{**q, "candidates": [dict(c) for c in q["candidates"]]} for q in items]
        for (qi, ci), score in zip(pairs, scores, strict=True):
            label = -1 if score is None else int(score)
            out[qi]["candidates"][ci]["label"] = label
            stats["pairs"] += 1
            stats["label_unparsable" if label < 0 else f"label_{label}"] += 1
        return out, stats

    return _run_sharded("annotations", ctx, items_all, process, {"cfg": cfg}, model=cfg["model"])


# ------------------------------------------------------------------------------ stage 5


def split_candidates(candidates: Sequence[Mapping[str, Any]], pos_min: int, neg_min: int,
                     neg_max: int) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """``pos``: label >= pos_min; ``neg``: neg_min <= label <= neg_max; -1 (unparsable) is in
    neither. A text already taken (same normalised text) is not taken twice."""
    pos, neg, seen = [], [], set()
    for c in candidates:
        key = P.normalize_for_dedup(c["text"])
        if key in seen or c["label"] < 0:
            continue
        if c["label"] >= pos_min:
            pos.append(c)
        elif neg_min <= c["label"] <= neg_max:
            neg.append(c)
        else:
            continue
        seen.add(key)
    return pos, neg


def training_record(ctx: Context, q: Mapping[str, Any], pos: Sequence[Mapping[str, Any]],
                    neg: Sequence[Mapping[str, Any]], pos_scores: Sequence[float],
                    neg_scores: Sequence[float]) -> dict[str, Any]:
    """A record in the training schema (plus provenance fields the schema ignores)."""
    rec: dict[str, Any] = {
        "id": q["id"],
        "domain": ctx.domain.key,
        "prompt": ctx.domain.instruction,
        "query": q["query"],
        "pos": [c["text"] for c in pos],
        "neg": [c["text"] for c in neg],
        "pos_scores": list(pos_scores),
        "neg_scores": list(neg_scores),
        "source_id": q["source_id"],
        "pos_ids": [c["doc_id"] for c in pos],
        "neg_ids": [c["doc_id"] for c in neg],
    }
    if ctx.domain.train_group_size:
        rec["train_group_size"] = ctx.domain.train_group_size
    if ctx.domain.batch_size:
        rec["batch_size"] = ctx.domain.batch_size
    return rec


def run_split(ctx: Context) -> dict[str, Any]:
    """Stage 5: ``pos`` (score >= 3) and ``neg`` (1-2); queries without both are dropped (without
    a positive only, when ``require_judged_negative`` is off: NV-Retriever supplies negatives)."""
    cfg = ctx.config["split"]
    require_neg = bool(cfg["require_judged_negative"])
    start = time.perf_counter()
    annotated = ctx.read_final("annotations")
    stats: Counter = Counter(items_in=len(annotated))
    out = []
    for q in annotated:
        pos, neg = split_candidates(q["candidates"], int(cfg["pos_min_score"]),
                                    int(cfg["neg_min_score"]), int(cfg["neg_max_score"]))
        if not pos and not neg:
            stats["dropped_no_pos_no_neg"] += 1
        elif not pos:
            stats["dropped_no_pos"] += 1
        elif not neg and require_neg:
            stats["dropped_no_neg"] += 1
        else:
            if not neg:
                stats["kept_without_judged_negative"] += 1
            out.append(training_record(ctx, q, pos, neg, [c["label"] for c in pos],
                                       [c["label"] for c in neg]))
            stats["pos_total"] += len(pos)
            stats["neg_total"] += len(neg)
    stats["items_out"] = len(out)
    stats["elapsed_s"] = time.perf_counter() - start
    atomic_write_jsonl(ctx.final_path("split"), out)
    extra = {"pos_per_query": round(stats["pos_total"] / len(out), 3) if out else 0.0,
             "neg_per_query": round(stats["neg_total"] / len(out), 3) if out else 0.0}
    return summarize("split", ctx, stats, extra)


# ------------------------------------------------------------------------------ NV-Retriever


def nv_threshold(positive_scores: Sequence[float], method: str, perc: float,
                 margin: float) -> float:
    """``retrieval.nv_threshold`` of ``min(positive_scores)``: the score a negative must stay
    below (TopK-PercPos ``perc * p``; TopK-MarginPos ``p - margin``)."""
    if not positive_scores:
        raise ValueError("positive-aware mining needs at least one positive score")
    return retrieval.nv_threshold(min(positive_scores), method, perc, margin)


def positive_aware_negatives(candidates: Sequence[tuple[str, float]], positive_scores:
                             Sequence[float], method: str, perc: float, margin: float,
                             filter_top: int, num_negatives: int, rng: np.random.Generator
                             ) -> list[tuple[str, float]]:
    """NV-Retriever filtering of teacher-ranked ``(text, score)`` candidates (positives already
    removed): keep ``s < nv_threshold(...)``, then draw ``num_negatives`` without replacement
    from the ``filter_top`` best survivors (all of them if fewer), returned best first."""
    threshold = nv_threshold(positive_scores, method, perc, margin)
    scores = np.array([s for _, s in candidates], dtype=np.float64)
    kept = retrieval.top_k_indices(scores, filter_top, allowed=scores < threshold)
    chosen = retrieval.draw_negatives(kept, num_negatives, sample_from_top=filter_top, rng=rng)
    return [candidates[i] for i in chosen]


def run_nv_negatives(ctx: Context) -> dict[str, Any]:
    """Alternative negatives: teacher (mining embedder) scores over the judged candidates and
    the unjudged ``pool`` (``mining.pool_k``), positives removed, NV-Retriever filter. Positives
    stay the annotator's; ``pos_scores``/``neg_scores`` become teacher cosines (annotator labels
    kept in ``pos_labels``); ``neg_unjudged`` counts negatives no judge has read."""
    cfg = ctx.config["nv_negatives"]
    start = time.perf_counter()
    split = ctx.read_final("split")
    mined = {q["id"]: q for q in ctx.read_final("candidates")}
    stats: Counter = Counter(items_in=len(split))
    out = []
    for rec in split:
        cands = mined.get(rec["id"])
        if cands is None:
            raise StageError(f"record {rec['id']!r} has no mined candidates")
        # normalised text -> (doc_id, teacher score, text, judged): the judged candidates, then
        # the unjudged pool; a text seen twice keeps its first (best-ranked) entry
        teacher: dict[str, tuple[str, float, str, bool]] = {}
        judged_count = len(cands["candidates"])
        for i, c in enumerate([*cands["candidates"], *cands.get("pool", ())]):
            teacher.setdefault(P.normalize_for_dedup(c["text"]),
                               (c["doc_id"], c["score"], c["text"], i < judged_count))
        pos_keys = [P.normalize_for_dedup(t) for t in rec["pos"]]
        missing = {k for k in pos_keys if k not in teacher or not teacher[k][3]}
        if missing:
            raise StageError(f"record {rec['id']!r}: {len(missing)} positive(s) are not among "
                             "its mined candidates, so they have no teacher score")
        pos_scores = [teacher[k][1] for k in pos_keys]
        # judged non-positives and the teacher's unjudged deeper ranks, each text once
        positives = set(pos_keys)
        entry_of = {e[2]: e for k, e in teacher.items() if k not in positives}
        pool = [(text, e[1]) for text, e in entry_of.items()]
        rng = np.random.default_rng(int(fingerprint([ctx.config["seed"], "nv", rec["id"]]), 16)
                                    % 2**63)
        negs = positive_aware_negatives(pool, pos_scores, cfg["method"], float(cfg["perc"]),
                                        float(cfg["margin"]), int(cfg["filter_top"]),
                                        int(cfg["num_negatives"]), rng)
        threshold = nv_threshold(pos_scores, cfg["method"], float(cfg["perc"]),
                                 float(cfg["margin"]))
        stats["filtered_out_false_negative_risk"] += sum(1 for _, s in pool if s >= threshold)
        if not negs:
            stats["dropped_no_negative_after_filter"] += 1
            continue
        new = dict(rec)
        new["pos_labels"] = rec["pos_scores"]
        new["pos_scores"] = [round(s, 6) for s in pos_scores]
        new["neg"] = [t for t, _ in negs]
        new["neg_scores"] = [round(s, 6) for _, s in negs]
        new["neg_ids"] = [entry_of[t][0] for t, _ in negs]
        out.append(new)
        stats["neg_total"] += len(negs)
        stats["neg_unjudged"] += sum(not entry_of[t][3] for t, _ in negs)
    stats["items_out"] = len(out)
    stats["elapsed_s"] = time.perf_counter() - start
    atomic_write_jsonl(ctx.final_path("nv_negatives"), out)
    extra = {"neg_per_query": round(stats["neg_total"] / len(out), 3) if out else 0.0,
             "method": cfg["method"]}
    return summarize("nv_negatives", ctx, stats, extra)


# ------------------------------------------------------------------------------ stage 6


def reasoning_query_text(query: str, reasoning: str, mode: str) -> str:
    """q' = the reasoning, or the query, a blank line, then the reasoning."""
    return reasoning if mode == "reasoning" else f"{query}\n\n{reasoning}"


def run_reasoning(ctx: Context) -> dict[str, Any] | None:
    """Stage 6: a reasoning LLM writes what the query needs; q' is stored as
    ``reasoning_query``. The merged output is validated against the training schema:
    ``reasoning/final.jsonl`` is the training file."""
    from reasonembed_jax.records import RecordError, dump_record, validate_record

    cfg = ctx.config["reasoning"]
    records = ctx.read_final(cfg["input"])
    _check_ids(records, cfg["input"])

    def parse(text: str) -> str | None:
        cleaned = P.strip_thinking(text).strip()
        return cleaned or None

    def process(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        backend = ctx.backends.get(cfg["model"])
        prompts = [P.reasoning_prompt(ctx.domain, r["query"]) for r in items]
        texts, _, stats = generate_with_retries(backend, prompts, cfg["sampling"], parse,
                                                int(cfg["max_attempts"]))
        stats["missing_reasoning_query"] += 0  # always in the summary, 0 included
        out = []
        for rec, text in zip(items, texts, strict=True):
            new = dict(rec)
            if text is None:
                # kept (its query, positives and negatives are fine) without reasoning_query;
                # the trainer counts such records and skips them for RI-InfoNCE or uses q' = q
                # (data.missing_reasoning_query)
                stats["missing_reasoning_query"] += 1
            else:
                new["reasoning_query"] = reasoning_query_text(rec["query"], text, cfg["mode"])
            out.append(new)
        return out, stats

    def finalize(merged: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        valid, stats = [], Counter()
        for rec in merged:
            try:
                valid.append(json.loads(dump_record(validate_record(rec))))
            except RecordError as err:
                stats["dropped_schema_invalid"] += 1
                stats[f"schema_error: {err.reason}"] += 1
        if valid:
            stats["pos_total"] = sum(len(r["pos"]) for r in valid)
            stats["neg_total"] = sum(len(r["neg"]) for r in valid)
            stats["pos_per_query"] = round(stats["pos_total"] / len(valid), 3)
            stats["neg_per_query"] = round(stats["neg_total"] / len(valid), 3)
        stats["with_reasoning_query"] = sum("reasoning_query" in r for r in valid)
        stats["without_reasoning_query"] = len(valid) - stats["with_reasoning_query"]
        return valid, stats

    return _run_sharded("reasoning", ctx, records, process,
                        {"cfg": cfg, "input_records": fingerprint(records)}, finalize,
                        model=cfg["model"])


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any] | None]] = {
    "filter": run_filter,
    "sources": run_sources,
    "queries": run_queries,
    "candidates": run_candidates,
    "annotations": run_annotations,
    "split": run_split,
    "nv_negatives": run_nv_negatives,
    "reasoning": run_reasoning,
}


def run_pipeline(ctx: Context, *, nv_negatives: bool | None = None) -> dict[str, Any]:
    """Every stage in order (the filter only if enabled; NV negatives if reasoning reads them).
    Returns the summaries by stage."""
    use_nv = ctx.config["reasoning"]["input"] == "nv_negatives" if nv_negatives is None \
        else nv_negatives
    order = (["filter"] if ctx.config["filter"]["enabled"] else []) + \
        ["sources", "queries", "candidates", "annotations", "split"] + \
        (["nv_negatives"] if use_nv else []) + ["reasoning"]
    summaries: dict[str, Any] = {}
    try:
        for stage in order:
            summary = STAGE_FUNCTIONS[stage](ctx)
            if summary is None:
                ctx.log(f"[pipeline] stopping after '{stage}': other workers' shards missing")
                break
            summaries[stage] = summary
    finally:
        ctx.backends.close()
    atomic_write_json(ctx.work_dir / "pipeline_summary.json", summaries)
    return summaries
