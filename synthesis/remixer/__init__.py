"""ReMixer: LLM synthesis of reasoning-intensive retrieval training data, run on vLLM.

Stages (method.md section 6): 0 domain filter, 1 source selection, 2 conditioned query
generation, 3 candidate mining, 4 relevance annotation, 5 pos/neg split, 6 reasoning queries;
plus NV-Retriever positive-aware negatives (section 7). No JAX: the only project imports are pure
standard-library modules of the main package: the training-record schema
(``reasonembed_jax.records``), the task-instruction table (``reasonembed_jax.instructions``) and
the query format (``reasonembed_jax.text.format_query``).
"""

__version__ = "0.1.0"
