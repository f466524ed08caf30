"""Evaluation pipeline shared by the CLI (``reasonembed_jax.evaluate``) and the trainer hook.

``evaluate_tasks`` is the single path: for every task a retriever produces a ``SearchResult``
(dense: cached corpus encoding + ``exact_search``; BM25: ``retrieval.top_k_of_scores``), which
becomes a run and is scored by ``per_query_metrics``. The macro average is the unweighted mean
over tasks.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from reasonembed_jax.evaluation.cache import Encoder, encode_corpus
from reasonembed_jax.evaluation.datasets import RetrievalTask, load_data
from reasonembed_jax.evaluation.metrics import DEFAULT_METRICS, mean_metrics, per_query_metrics
from reasonembed_jax.evaluation.search import exact_search
from reasonembed_jax.retrieval import SearchResult

EXPORT_CONTRACT = "DIR/export/latest/ holding config.json and model.safetensors[.index.json]"


class DenseRetriever:
    """Embeds corpus (cached on disk) and queries with ``encoder`` and runs ``exact_search``."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        query_batch_size: int = 256,
        corpus_chunk_size: int = 65536,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_dir = cache_dir
        self.query_batch_size = query_batch_size
        self.corpus_chunk_size = corpus_chunk_size
        self.progress = progress
        self.log = log

    def describe(self) -> dict:
        return {"encoder_cache_key": getattr(self.encoder, "cache_key", None),
                "batch_size": self.batch_size, "max_length": self.max_length}

    def search(self, task: RetrievalTask, top_k: int) -> tuple[SearchResult, dict]:
        corpus, info = encode_corpus(
            self.encoder, task.corpus_ids, task.corpus_texts, cache_dir=self.cache_dir,
            batch_size=self.batch_size, max_length=self.max_length, progress=self.progress,
            log=lambda m: self.log(f"[{task.name}] {m}"),
        )
        started = time.perf_counter()
        queries = np.asarray(self.encoder.encode(
            list(task.query_texts), instruction=task.instruction, batch_size=self.batch_size,
            max_length=self.max_length, progress=self.progress,
        ), dtype=np.float32)
        query_seconds = time.perf_counter() - started
        if queries.shape != (len(task.query_texts), corpus.shape[1]):
            raise ValueError(f"query embeddings have shape {queries.shape}, expected "
                             f"({len(task.query_texts)}, {corpus.shape[1]})")
        started = time.perf_counter()
        result = exact_search(
            queries, corpus, top_k, excluded=task.excluded_indices(),
            query_batch_size=self.query_batch_size, corpus_chunk_size=self.corpus_chunk_size,
        )
        search_seconds = time.perf_counter() - started
        self.log(f"[{task.name}] encoded {len(task.query_texts)} queries in {query_seconds:.2f} s, "
                 f"searched {corpus.shape[0]} documents in {search_seconds:.2f} s")
        return result, {
            "corpus_seconds": info["seconds"], "corpus_cache_hit": info["cache_hit"],
            "query_seconds": query_seconds, "search_seconds": search_seconds,
        }


def evaluate_tasks(
    tasks: Sequence[RetrievalTask],
    retriever: DenseRetriever | object,
    *,
    top_k: int = 1000,
    metrics: Sequence[str] = DEFAULT_METRICS,
    run_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Scores every task; returns ``{"tasks": {name: {metric: value, "num_queries", "timings"}},
    "average": {metric: macro mean}}``. ``run_dir`` also writes TREC runs ``<task>.run``."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names {names}")
    out: dict = {"tasks": {}}
    for task in tasks:
        result, timings = retriever.search(task, top_k)
        run = result.to_run(task.query_ids, task.corpus_ids)
        if run_dir is not None:
            write_trec_run(pathlib.Path(run_dir) / f"{task.name}.run", run, tag=task.name)
        per_query = per_query_metrics(task.qrels, run, metrics)
        values = mean_metrics(per_query)
        out["tasks"][task.name] = {**values, "num_queries": len(per_query),
                                   "num_documents": len(task.corpus_ids), "timings": timings}
        log(f"[{task.name}] " + ", ".join(f"{m}={values[m]:.4f}" for m in metrics))
    out["average"] = {m: float(np.mean([out["tasks"][n][m] for n in names])) for m in metrics}
    return out


def write_trec_run(path: pathlib.Path, run: Mapping[str, Mapping[str, float]], tag: str) -> None:
    """TREC run file ``qid Q0 docid rank score tag`` in trec_eval order."""
    from reasonembed_jax.evaluation.metrics import trec_order

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, doc_id in enumerate(trec_order(docs), 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {docs[doc_id]!r} {tag}\n")


def format_table(results: Mapping, metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """Plain-text table of per-task metrics (x100) and the macro average."""
    rows = [(name, values) for name, values in results["tasks"].items()]
    rows.append(("average", results["average"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'task':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics)]
    for name, values in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * values[m]:>10.2f}" for m in metrics))
    return "\n".join(lines)


def resolve_model_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """The exported HF model of a training workdir.

    Contract: the trainer's export step writes (or points a symlink) ``<workdir>/export/latest``
    to a Hugging Face folder with ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``). Anything else raises ``FileNotFoundError`` saying what is
    missing.
    """
    latest = pathlib.Path(workdir) / "export" / "latest"
    if not pathlib.Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not latest.is_dir():
        raise FileNotFoundError(f"no exported model at {latest}: expected {EXPORT_CONTRACT} "
                                "(run the trainer's export first, or pass --model HF_DIR)")
    if not (latest / "config.json").is_file():
        raise FileNotFoundError(f"{latest} has no config.json (expected {EXPORT_CONTRACT})")
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any((latest / n).is_file() for n in weights):
        raise FileNotFoundError(f"{latest} has no model.safetensors[.index.json] weights")
    return latest.resolve()


_LOADED: dict[tuple, list[RetrievalTask]] = {}


def evaluate_during_training(
    encoder: Encoder,
    datasets_spec: str | Sequence[str] | Sequence[RetrievalTask],
    *,
    top_k: int = 100,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 32,
    max_length: int | None = None,
    prefix: str = "eval",
    log: Callable[[str], None] = print,
    **load_kwargs: object,
) -> dict[str, float]:
    """Evaluates the current model for the trainer's periodic hook; returns flat scalars
    ``{f"{prefix}/{task}/{metric}": v, f"{prefix}/average/{metric}": v}``.

    ``datasets_spec``: ``--data``-style strings (loaded once per process and reused) or loaded
    ``RetrievalTask``s; ``load_kwargs`` go to ``load_data``. The corpus cache is off: weights change
    between calls. Same code path as the CLI (``DenseRetriever`` + ``evaluate_tasks``).
    """
    specs = [datasets_spec] if isinstance(datasets_spec, str) else list(datasets_spec)
    tasks: list[RetrievalTask] = []
    for spec in specs:
        if isinstance(spec, RetrievalTask):
            tasks.append(spec)
            continue
        key = (spec, tuple(sorted(load_kwargs.items())))
        if key not in _LOADED:
            _LOADED[key] = load_data(spec, **load_kwargs)
        tasks.extend(_LOADED[key])
    retriever = DenseRetriever(encoder, batch_size=batch_size, max_length=max_length,
                               cache_dir=None, progress=False, log=log)
    results = evaluate_tasks(tasks, retriever, top_k=top_k, metrics=metrics, log=log)
    flat = {f"{prefix}/{name}/{m}": float(values[m])
            for name, values in results["tasks"].items() for m in metrics}
    flat.update({f"{prefix}/average/{m}": v for m, v in results["average"].items()})
    return flat
