"""reasonembed-jax: text embedders (decoder LLMs and BERT) for reasoning-intensive retrieval in
JAX.

The package root imports nothing heavy, so light modules (``reasonembed_jax.records``) can be used
by the synthesis stage without JAX installed.
"""

__version__ = "0.1.0"
