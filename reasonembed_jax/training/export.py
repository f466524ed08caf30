"""A training run's products as an embedder: the in-memory ``TextEncoder`` used for evaluation
during training, and the export at the end (``workdir/export/step_N``, LoRA merged; written by
``hf_io.export_hf`` with a model card recording the run)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from reasonembed_jax import hf_io
from reasonembed_jax.distributed import to_host
from reasonembed_jax.model.encoder import Encoder
from reasonembed_jax.training.state import Setup, TrainingError, merged_params
from reasonembed_jax.training.step import all_finite

log = logging.getLogger("reasonembed_jax.train")


def finite_state(state: dict[str, Any]) -> bool:
    """Whether every parameter (and optimizer moment) of a train state is finite."""
    return bool(to_host(jax.jit(all_finite)({k: v for k, v in state.items()
                                             if k in ("params", "opt_state")})))


def text_encoder(setup: Setup, state: dict, frozen: dict) -> Any:
    """The current weights as a ``TextEncoder`` with the run's tokenizer and eval settings."""
    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.text import embedding_eos_token_id, load_tokenizer

    config = setup.config
    model = Encoder(setup.model_cfg, merged_params(setup, state, frozen), mesh=setup.mesh,
                    rules=setup.rules)
    tokenizer = load_tokenizer(config.data.tokenizer)
    append_eos = bool(config.data.append_eos)
    eos = config.data.eos_token_id
    if append_eos and eos is None:
        eos = embedding_eos_token_id(tokenizer)
    return TextEncoder(model, tokenizer, pooling=config.model.pooling, append_eos=append_eos,
                       eos_token_id=eos, max_length=config.eval.max_length,
                       batch_size=config.eval.batch_size, mesh=setup.mesh)


def model_card_record(config: Any, workdir: str, step: int, run: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """The run's record for the export's model card: resolved config, data, steps, and the
    final loss and last evaluation as ``metrics.jsonl`` has them."""
    from reasonembed_jax.model_card import base_model_license

    c = config
    record: dict[str, Any] = {
        "base_model": os.path.basename(os.path.normpath(c.model.hf_dir)) if c.model.init == "hf"
        else None,
        "license": base_model_license(c.model.hf_dir) if c.model.init == "hf" else None,
        "config": json.loads(c.to_json_best_effort()),
        "data_sources": list(c.data.sources), "steps": step,
    }
    run = run or {}
    record["data"] = run.get("data")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        losses = [r for r in rows if "loss" in r and r["step"] < step]
        if losses:
            record["final_loss"] = float(losses[-1]["loss"])
            record["final_loss_step"] = losses[-1]["step"]
    if run.get("last_eval"):
        record["eval"] = {k: v for k, v in run["last_eval"].items()
                          if isinstance(v, int | float)}
    return record


def export_run(setup: Setup, workdir: str, state: dict, frozen: dict, step: int,
               run: dict[str, Any] | None = None) -> str:
    """HF + sentence-transformers folder at ``workdir/export/step_N``; ``export/latest``
    points at it (the contract ``evaluate --workdir`` reads)."""
    from reasonembed_jax.text import load_tokenizer

    config = setup.config
    out = os.path.join(workdir, "export", f"step_{step}")
    params = merged_params(setup, state, frozen)
    if not finite_state({"params": params}):
        raise TrainingError(f"the parameters at step {step} are not finite: not exported")
    eos_token = None
    if config.data.append_eos and config.data.eos_token_id is not None:
        tokenizer = load_tokenizer(config.data.tokenizer)
        eos_token = tokenizer.convert_ids_to_tokens(int(config.data.eos_token_id))
    # Every process joins the parameter gathers; process 0 writes.
    hf_io.export_hf(params, setup.model_cfg, out, tokenizer_dir=config.data.tokenizer,
                    model_card=model_card_record(config, workdir, step, run),
                    pooling=config.model.pooling,
                    append_eos=bool(config.data.append_eos), eos_token=eos_token,
                    max_length=config.export.max_length,
                    query_instruction=config.export.query_instruction or None,
                    dtype=config.export.dtype)
    if jax.process_index() == 0:
        latest = os.path.join(workdir, "export", "latest")
        tmp = latest + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(f"step_{step}", tmp)
        os.replace(tmp, latest)
        log.info("exported step %d to %s", step, out)
    return out
