"""Training data: record sources, validation, seeded per-domain sampling, the Grain pipeline.

The trainer's entry points::

    from reasonembed_jax.data import build_pipeline, iterator_state_to_bytes, restore_iterator_state
    pipeline = build_pipeline(config.data)          # indexes and validates every record once
    it = pipeline.iterator()                        # grain.DatasetIterator of host-slice batches
    state = iterator_state_to_bytes(it)             # or grain.checkpoint.CheckpointSave(it)

Importing this package does not import JAX (Grain worker processes import it too).
"""

from reasonembed_jax.data.index import BAD_INPUT_KINDS, InputStats, classify_record_error
from reasonembed_jax.data.pipeline import (
    DomainSpec,
    TrainingDataPipeline,
    build_pipeline,
    default_data_config,
    iterator_state_to_bytes,
    make_train_iterator,
    restore_iterator_state,
)
from reasonembed_jax.data.sampling import epoch_plan, host_slice, sample_passages, steps_per_epoch

__all__ = [
    "BAD_INPUT_KINDS",
    "DomainSpec",
    "InputStats",
    "TrainingDataPipeline",
    "build_pipeline",
    "classify_record_error",
    "default_data_config",
    "epoch_plan",
    "host_slice",
    "iterator_state_to_bytes",
    "make_train_iterator",
    "restore_iterator_state",
    "sample_passages",
    "steps_per_epoch",
]
