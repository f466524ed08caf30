"""What a run reports while it trains: per-step metrics (loss, throughput, MFU) written to
``metrics.jsonl`` and TensorBoard, and the guard that stops a run stuck on non-finite steps."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from reasonembed_jax.distributed import to_host
from reasonembed_jax.training.state import TrainingError

log = logging.getLogger("reasonembed_jax.train")
# Dense bf16 peak per device, for the MFU estimate (device_kind substring -> TFLOP/s).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float | None:
    if config.train.peak_tflops_per_device:
        return float(config.train.peak_tflops_per_device) * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


class MetricsWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if self.enabled:
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX missing: TensorBoard logging off")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _to_python(v: Any) -> Any:
    if isinstance(v, np.ndarray | jax.Array | np.generic):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class NanGuard:
    """Counts consecutive skipped (non-finite) steps and stops the run past a limit."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0

    def update(self, step: int, skipped: bool, loss: float) -> None:
        self.streak = self.streak + 1 if skipped else 0
        if skipped:
            log.warning("step %d: non-finite loss, gradient or update (loss=%s); update skipped "
                        "(%d in a row)", step, loss, self.streak)
        if self.streak >= self.max_consecutive:
            raise TrainingError(
                f"{self.streak} consecutive steps had a non-finite loss, gradient or update (last at step "
                f"{step}); stopping. Lower the learning rate, check the data, or compute in "
                "float32.")


class StepLog:
    """Per-step metrics with one step in flight: a step's device metrics are read only after the
    next step is dispatched (``record`` finishes the previous one), so reading them never stalls
    the device. Keeps the history, writes every ``log_every`` steps (and skipped and last steps),
    feeds the NaN guard."""

    def __init__(self, config: ml_collections.ConfigDict, writer: MetricsWriter, num_steps: int,
                 extra_metrics: Any = dict):
        self.log_every = config.train.log_every
        self.num_steps = num_steps
        self.writer = writer
        self.extra_metrics = extra_metrics  # () -> data-pipeline counters written with each row
        self.peak = peak_flops_per_device(config)
        self.nan_guard = NanGuard(config.train.max_consecutive_nan)
        self.history: list[dict[str, Any]] = []
        self.ri_uniform_steps = 0  # this process's run so far
        self._pending: tuple[int, dict, float, dict] | None = None
        self.on_metrics = None  # (metrics) -> None, e.g. a progress bar

    def record(self, step: int, metrics: dict, seconds: float, info: dict) -> None:
        """Holds step ``step``'s (device) metrics and finishes the step held before."""
        self.flush()
        self._pending = (step, metrics, seconds, info)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics, seconds, info = self._pending
        self._pending = None
        m = {k: float(to_host(v)) for k, v in metrics.items()}
        m["tokens_per_sec"] = info["tokens"] / max(seconds, 1e-9)
        m["step_seconds"] = seconds
        if self.peak:  # model FLOPs (useful work) and hardware FLOPs (what ran) per peak
            m["mfu"] = info["flops"] / max(seconds, 1e-9) / (self.peak * jax.device_count())
            m["hfu"] = info["hw_flops"] / max(seconds, 1e-9) / (self.peak * jax.device_count())
        m["domain"] = info["domain"]
        if "ri_uniform" in m:  # solved batches whose RI weights fell back to uniform
            self.ri_uniform_steps += int(m["ri_uniform"])
            m["ri_uniform_steps"] = self.ri_uniform_steps
        self.history.append({"step": step, **m})
        if step % self.log_every == 0 or m["skipped"] or step == self.num_steps - 1:
            self.writer.write(step, {**m, **self.extra_metrics()})
        if self.on_metrics is not None:
            self.on_metrics(m)
        self.nan_guard.update(step, bool(m["skipped"]), m["loss"])
