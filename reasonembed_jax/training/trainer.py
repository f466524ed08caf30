"""Training, top to bottom: set-up, data, state (or a resumed checkpoint), the compiled step, the
loop with its periodic hooks, the export.

    state, metrics = train_step(state, frozen, batch)     # one jitted, donated update

Where things live: the set-up and the train state (shapes, shardings, values) in ``state``; the
step, loss and optimizer in ``step``; metrics, throughput and the NaN guard in ``monitoring``;
checkpoints and preemption in ``checkpoint``; the ``--dry_run`` memory plan in ``memory_plan``;
the export in ``export``. Resumes automatically from the newest restorable checkpoint in
``workdir``; saves every ``train.checkpoint_every`` steps and on SIGTERM; writes metrics to
``metrics.jsonl`` and TensorBoard; exports an HF folder (LoRA merged) at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from reasonembed_jax.distributed import to_host
from reasonembed_jax.model.sharding import Rules, batch_sharding
from reasonembed_jax.training import memory_plan
from reasonembed_jax.training.checkpoint import Checkpointer, Preemption, abstract_like
from reasonembed_jax.training.export import export_run, finite_state, text_encoder
from reasonembed_jax.training.flops import step_flops_split
from reasonembed_jax.training.monitoring import MetricsWriter, StepLog, count_params
from reasonembed_jax.training.state import (
    Setup,
    TrainingError,
    build_setup,
    init_state,
    make_optimizer_from_config,
    merged_params,
)
from reasonembed_jax.training.step import make_train_step

log = logging.getLogger("reasonembed_jax.train")

__all__ = ["Trainer", "TrainingError", "train", "finite_state"]


def train(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False) -> dict:
    """Trains (or with ``dry_run`` only compiles and prints the memory plan)."""
    trainer = Trainer(config, workdir)
    if dry_run:
        return trainer.dry_run()
    with open(os.path.join(trainer.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return trainer.run()


@dataclasses.dataclass
class Hook:
    """Periodic work after a step: ``fn(steps_done, state)`` when ``steps_done % every == 0``
    (``every`` 0: never); a hook returning a dict stops the run with it as the result."""

    name: str
    every: int
    fn: Callable[[int, dict], dict | None]

    def __call__(self, steps_done: int, state: dict) -> dict | None:
        if self.every > 0 and steps_done % self.every == 0:
            return self.fn(steps_done, state)
        return None


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules,
                    fields: tuple[str, ...]) -> dict[str, jax.Array]:
    """This host's rows -> global arrays, rows split by the ``activation_batch`` rule."""
    sharding = batch_sharding(mesh, rules)
    keys = [f"{role}_{suffix}" for role in fields for suffix in ("input_ids", "attention_mask")]
    if "passage_key" in host_batch:
        keys.append("passage_key")
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(host_batch[key]))
            for key in keys}


def step_info(setup: Setup, host_batch: Mapping[str, np.ndarray], domain_names: tuple[str, ...]
              ) -> dict[str, Any]:
    """Host-side facts of one step for its metrics: real tokens, model and hardware FLOPs,
    domain (global counts: this host's times the process count)."""
    flops = step_flops_split(setup.model_cfg, host_batch, grad_cache=setup.step_cfg.grad_cache,
                             uses_reasoning=setup.step_cfg.uses_reasoning, lora=setup.lora,
                             last_token_only=setup.step_cfg.last_token_only)
    tokens = sum(np.asarray(host_batch[f"{r}_attention_mask"]).sum() for r in setup.fields)
    return {"tokens": float(tokens) * jax.process_count(),
            "flops": flops["model"] * jax.process_count(),
            "hw_flops": flops["hardware"] * jax.process_count(),
            "domain": domain_names[int(np.asarray(host_batch["domain_index"]))]}


class Trainer:
    """A run of ``config`` in ``workdir``: ``run()`` trains, ``dry_run()`` only plans memory."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.setup = build_setup(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._run_record: dict[str, Any] = {}

    mesh = property(lambda self: self.setup.mesh)
    model_cfg = property(lambda self: self.setup.model_cfg)
    lora = property(lambda self: self.setup.lora)
    step_cfg = property(lambda self: self.setup.step_cfg)

    def _initial_state(self, optimizer: Any) -> tuple[dict, dict]:
        return init_state(self.setup, optimizer)

    def merged_params(self, state: dict, frozen: dict) -> dict[str, jax.Array]:
        return merged_params(self.setup, state, frozen)

    def dry_run(self) -> dict[str, dict[str, float]]:
        """Compiles the step for every domain's shape at max lengths, from shapes only (no
        weights, no data), and prints the per-device memory plan."""
        return memory_plan.plan(self.setup)

    def text_encoder(self, state: dict, frozen: dict) -> Any:
        return text_encoder(self.setup, state, frozen)

    def evaluate(self, state: dict, frozen: dict) -> dict[str, float]:
        from reasonembed_jax.evaluation import evaluate_during_training

        e = self.config.eval
        return evaluate_during_training(self.text_encoder(state, frozen), e.data, top_k=e.top_k,
                                        batch_size=e.batch_size, max_length=e.max_length,
                                        split=e.split or None)

    def export(self, state: dict, frozen: dict, step: int) -> str:
        return export_run(self.setup, self.workdir, state, frozen, step, self._run_record)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from reasonembed_jax.data import build_pipeline

        c, setup = self.config, self.setup
        # -- data -------------------------------------------------------------------------------
        pipeline = build_pipeline(c.data)
        num_steps = pipeline.num_steps if c.train.num_steps is None else int(c.train.num_steps)
        if num_steps > pipeline.num_steps:
            raise TrainingError(
                f"train.num_steps={num_steps} but the data gives only {pipeline.num_steps} steps "
                f"({pipeline.steps_per_epoch} per epoch x data.num_epochs={c.data.num_epochs}); "
                "raise data.num_epochs or lower train.num_steps")
        if num_steps < 1:
            raise TrainingError("the run has no steps: too few records for one global batch?")
        log.info("data: %s", pipeline.describe())

        # -- state: fresh, or the newest restorable checkpoint -----------------------------------
        schedule, optimizer = make_optimizer_from_config(c, num_steps)
        state, frozen = init_state(setup, optimizer)
        iterator = pipeline.iterator()
        checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                    every=c.train.checkpoint_every, keep=c.train.keep_checkpoints,
                                    async_save=c.train.async_checkpoints)
        restored = checkpointer.restore_latest(abstract_like(state), accept=finite_state)
        if restored is not None:
            _, state, data_state = restored
            iterator.set_state(data_state["grain"])
            log.info("resumed from step %d in %s", int(to_host(state["step"])),
                     checkpointer.directory)
        start = int(to_host(state["step"]))
        n_trained = count_params(state["params"])
        log.info("%s: %.1fM trained parameters of %.1fM; %d steps from step %d; mesh %s",
                 self.model_cfg.model_type, n_trained / 1e6,
                 (n_trained + count_params(frozen)) / 1e6, num_steps, start, dict(self.mesh.shape))

        # -- the compiled step and what watches it ------------------------------------------------
        step_fn = jax.jit(make_train_step(self.step_cfg, optimizer, schedule), donate_argnums=(0,))
        writer = MetricsWriter(self.workdir)
        step_log = StepLog(c, writer, num_steps, extra_metrics=lambda: pipeline.stats.as_metrics())
        bar = tqdm(total=num_steps, initial=start, unit="step", file=sys.stderr,
                   disable=not c.train.progress_bar or jax.process_index() != 0)
        step_log.on_metrics = lambda m: bar.set_postfix(loss=f"{m['loss']:.4f}",
                                                        acc=f"{m['accuracy']:.2f}")
        self._run_record = {
            "data": [{"domain": d.name, "records": d.num_records, "group_size": d.group_size,
                      "batch_size": d.batch_size} for d in pipeline.domains],
            "last_eval": None,
        }

        def save(steps_done: int, state: dict, force: bool = False) -> None:
            checkpointer.save(steps_done, state, {"grain": iterator.get_state()}, force=force)

        def evaluate(steps_done: int, state: dict) -> None:
            self._run_record["last_eval"] = self.evaluate(state, frozen)
            writer.write(steps_done, self._run_record["last_eval"])

        def stop_if_preempted(steps_done: int, state: dict) -> dict | None:
            if not preemption.any_process():
                return None
            step_log.flush()
            save(steps_done, state, force=True)
            checkpointer.wait()
            log.warning("stopped at step %d after SIGTERM; the checkpoint is saved", steps_done)
            return {"stopped_at": steps_done, "history": step_log.history}

        hooks = [
            Hook("checkpoint", c.train.checkpoint_every, save),
            Hook("evaluate", c.eval.every if c.eval.data else 0, evaluate),
            Hook("preemption", 1, stop_if_preempted),
        ]

        # -- the loop ------------------------------------------------------------------------------
        compiled_shapes: set[tuple] = set()
        last_time = time.perf_counter()
        with Preemption() as preemption:
            try:
                for step in range(start, num_steps):
                    host_batch = next(iterator)
                    batch = to_global_batch(host_batch, self.mesh, setup.rules, setup.fields)
                    shape_key = tuple((k, v.shape) for k, v in sorted(batch.items()))
                    if shape_key not in compiled_shapes:  # log each new shape's memory plan
                        mem = memory_plan.memory_report(
                            step_fn.lower(state, frozen, batch).compile())
                        log.info("compiled step for shapes %s: %s",
                                 {k: v for k, v in shape_key if k.endswith("input_ids")},
                                 {k: round(v, 3) for k, v in mem.items()})
                        compiled_shapes.add(shape_key)
                    info = step_info(setup, host_batch, pipeline.domain_names)
                    state, metrics = step_fn(state, frozen, batch)
                    step_log.flush()  # the previous step's metrics: keeps one step in flight
                    now = time.perf_counter()
                    step_log.record(step, metrics, now - last_time, info)
                    last_time = now
                    bar.update(1)
                    for hook in hooks:
                        stopped = hook(step + 1, state)
                        if stopped is not None:
                            return stopped
                step_log.flush()
                final_step = int(to_host(state["step"]))
                if final_step not in checkpointer.steps():
                    save(final_step, state, force=True)
                checkpointer.wait()
                result: dict[str, Any] = {"final_step": final_step, "history": step_log.history,
                                          "state": state, "frozen": frozen}
                if c.train.export_at_end:
                    result["export"] = self.export(state, frozen, final_step)
                return result
            finally:
                bar.close()
                writer.close()
                checkpointer.close()
