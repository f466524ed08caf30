"""Retrieval evaluation: data loading (BEIR, BRIGHT), exact search, trec_eval metrics, BM25,
corpus-embedding cache, and the shared pipeline used by the CLI and the trainer hook."""

from reasonembed_jax.evaluation.datasets import (
    BRIGHT_TASKS,
    RetrievalTask,
    load_beir,
    load_bright,
    load_data,
)
from reasonembed_jax.evaluation.metrics import DEFAULT_METRICS, mean_metrics, per_query_metrics
from reasonembed_jax.evaluation.pipeline import (
    DenseRetriever,
    evaluate_during_training,
    evaluate_tasks,
    resolve_model_dir,
)
from reasonembed_jax.evaluation.search import exact_search
from reasonembed_jax.retrieval import SearchResult, top_k_of_scores

__all__ = [
    "BRIGHT_TASKS", "DEFAULT_METRICS", "DenseRetriever", "RetrievalTask", "SearchResult",
    "evaluate_during_training", "evaluate_tasks", "exact_search", "load_beir", "load_bright",
    "load_data", "mean_metrics", "per_query_metrics", "resolve_model_dir", "top_k_of_scores",
]
