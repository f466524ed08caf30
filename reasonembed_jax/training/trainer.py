"""The training loop, top to bottom: mesh, model, shardings, data, compiled step, loop.

    state, metrics = train_step(state, frozen, batch)     # one jitted, donated update

Resumes automatically from the newest restorable checkpoint in ``workdir``; saves every
``train.checkpoint_every`` steps and on SIGTERM; writes metrics to ``metrics.jsonl`` and
TensorBoard; exports an HF folder (LoRA merged) at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonembed_jax import hf_io
from reasonembed_jax.cli import UserError
from reasonembed_jax.distributed import to_host
from reasonembed_jax.lora import PROJECTIONS, LoraConfig, init_lora, lora_param_shapes, merge_lora
from reasonembed_jax.model.encoder import ModelConfig, config_from_hf, config_from_hf_dir
from reasonembed_jax.model.params import LAYER_PREFIX, init_param_value, param_specs
from reasonembed_jax.model.sharding import DEFAULT_RULES, make_mesh, named_sharding
from reasonembed_jax.tiny_model import shrink_hf_config
from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like
from reasonembed_jax.training.config import validate_config
from reasonembed_jax.training.flops import step_flops_split
from reasonembed_jax.training.step import (
    SCHEDULES,
    StepConfig,
    all_finite,
    deepspeed_warmup_decay_schedule,
    make_optimizer,
    make_schedule,
    make_train_step,
)

log = logging.getLogger("reasonembed_jax.train")
BATCH_FIELDS = ("query", "passage", "reasoning")
# Dense bf16 peak per device, for the MFU estimate (device_kind substring -> TFLOP/s).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


class TrainingError(UserError, RuntimeError):
    """A setting, input or run condition the user must change (one line on the CLI)."""


# ---------------------------------------------------------------------------------------------
# Set-up pieces
# ---------------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    m = config.model
    if not m.hf_dir:
        raise TrainingError("config.model.hf_dir is empty: name a local HF folder")
    path = os.path.join(m.hf_dir, "config.json")
    if not os.path.isfile(path):
        raise TrainingError(f"no config.json in config.model.hf_dir={m.hf_dir}")
    with open(path) as f:
        hf = json.load(f)
    if m.shrink:
        s = dict(m.shrink)
        hf = shrink_hf_config(hf, layers=s["layers"], hidden=s["hidden"], heads=s["heads"],
                              kv_heads=s["kv_heads"], head_dim=s.get("head_dim"),
                              intermediate=s.get("intermediate"))
        if m.init == "hf":
            raise TrainingError("config.model.shrink only makes sense with model.init='scratch'")
    runtime = dict(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers,
                   remat_policy=m.remat_policy, attention_impl=m.get("attention_impl", "auto"))
    if m.attention != "auto":
        runtime["attention"] = m.attention
    try:
        # From the folder when its weights are loaded: the family may read them (BERT's pooler).
        return config_from_hf_dir(m.hf_dir, **runtime) if m.init == "hf" else config_from_hf(
            hf, **runtime)
    except ValueError as e:
        raise TrainingError(f"config.model: {e}") from e


def lora_config(config: ml_collections.ConfigDict, model: ModelConfig) -> LoraConfig | None:
    """The LoRA settings; the default target list (every projection name) means every projection
    ``model`` has (BERT has no gate_proj). An explicit list must name existing projections."""
    if not config.lora.enabled:
        return None
    targets = tuple(config.lora.targets)
    if targets == PROJECTIONS:
        specs = param_specs(model)
        targets = tuple(t for t in targets if LAYER_PREFIX + t in specs)
    try:
        lora = LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                          dropout=config.lora.dropout, targets=targets, init_a=config.lora.init_a)
    except ValueError as e:
        raise TrainingError(f"config.lora: {e}") from e
    try:
        lora_param_shapes(model, lora)
    except ValueError as e:
        raise TrainingError(f"config.lora.targets: {e}") from e
    return lora


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    return {path: named_sharding(mesh, spec.logical_axes, spec.shape)
            for path, spec in param_specs(cfg).items()}


def init_base_params(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh: Mesh,
                     seed: int) -> dict[str, jax.Array]:
    """Base weights: read from the HF folder into their shardings, or random (jit-initialised
    directly in their shardings, never materialised whole on one device)."""
    if config.model.init == "hf":
        return hf_io.load_hf_params(config.model.hf_dir, cfg, mesh=mesh)
    if config.model.init != "scratch":
        raise TrainingError(f"config.model.init must be 'hf' or 'scratch', got "
                            f"'{config.model.init}'")
    specs = param_specs(cfg)

    def init() -> dict[str, jax.Array]:
        keys = jax.random.split(jax.random.key(seed), len(specs))
        return {path: init_param_value(spec, k, cfg) for k, (path, spec) in zip(keys, specs.items(),
                                                                            strict=True)}

    return jax.jit(init, out_shardings=param_shardings(cfg, mesh))()


def split_trainable(cfg: ModelConfig, params: dict[str, jax.Array]) -> tuple[dict, dict]:
    """(trained, frozen) parts of full fine-tuning: table rows marked ``trainable=False`` (BERT's
    unused pooler) stay constant and are exported as loaded."""
    specs = param_specs(cfg)
    trained = {p: v for p, v in params.items() if specs[p].trainable}
    return trained, {p: v for p, v in params.items() if not specs[p].trainable}


def init_adapters(cfg: ModelConfig, lora: LoraConfig, mesh: Mesh, seed: int) -> dict:
    shardings = {path: named_sharding(mesh, axes, shape)
                 for path, (shape, axes) in lora_param_shapes(cfg, lora).items()}
    return jax.jit(lambda: init_lora(cfg, lora, jax.random.key(seed + 1)),
                   out_shardings=shardings)()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, fields: tuple[str, ...]
                    ) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over (data, fsdp) rows."""
    sharding = batch_sharding(mesh)
    out = {}
    keys = [f"{role}_{suffix}" for role in fields for suffix in ("input_ids", "attention_mask")]
    if "passage_key" in host_batch:
        keys.append("passage_key")
    for key in keys:
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(host_batch[key]))
    return out


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


def widened_parameter_bytes(hlo_text: str) -> int:
    """Bytes of float32 copies of whole 16-bit step arguments in an optimised HLO module's entry
    computation: a ``convert`` (bare, or the only instruction of a loop fusion) of a bf16/f16
    entry parameter to float32 of the same shape.

    XLA:CPU computes bf16 in float32: it widens the operands of every bf16 op, and when the
    operand is a loop-invariant stack of frozen layer weights, loop-invariant code motion hoists
    the widening out of the layer/GradCache loops, i.e. a float32 copy of the frozen base that
    lives through the whole step. GPU and TPU compilers read bf16 directly and make no such
    copy. Returns 0 for modules without them (float32 steps, other backends)."""
    entry = hlo_text[hlo_text.find("\nENTRY "):]
    header = entry[:entry.find(" -> ")]
    params = {name: dims for name, dims in re.findall(
        r"([\w.\-]+): (?:bf16|f16)\[([\d,]*)\]", header)}
    pure_converts = set(re.findall(
        r"\n%([\w.\-]+) \(\S+: (?:bf16|f16)\[[\d,]*\]\) -> f32\[[\d,]*\] \{\n\s*%\S+ = "
        r"\S+ parameter\(0\)[^\n]*\n\s*ROOT %\S+ = f32\S+ convert\(", hlo_text))
    total = 0
    for dims, op, operand, calls in re.findall(
            r"\n\s*%\S+ = f32\[([\d,]*)\]\{[\d,]*\} (convert|fusion)\(%([\w.\-]+)\)"
            r"(?:, kind=kLoop, calls=%([\w.\-]+))?", entry):
        if params.get(operand) == dims and (op == "convert" or calls in pure_converts):
            total += 4 * math.prod(int(d) for d in dims.split(",") if d)
    return total


def memory_report(compiled: Any) -> dict[str, float]:
    """Per-device memory of a compiled step in GiB (arguments, outputs, temporaries, peak), and
    ``cpu_widened_gib``: the part of the temporaries that is XLA:CPU's float32 copies of 16-bit
    weights (``widened_parameter_bytes``, counted on the CPU backend only: elsewhere such a
    convert would be real memory), with ``peak_less_widened_gib``, the peak without them (what a
    compiler with native bf16 would need, as far as the CPU plan tells)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0**30
    args, out = m.argument_size_in_bytes / gib, m.output_size_in_bytes / gib
    temp, alias = m.temp_size_in_bytes / gib, m.alias_size_in_bytes / gib
    widened = (widened_parameter_bytes(compiled.as_text()) / gib
               if jax.default_backend() == "cpu" else 0.0)
    peak = args + out + temp - alias
    return {"arguments_gib": args, "outputs_gib": out, "temp_gib": temp, "alias_gib": alias,
            "peak_gib": peak, "cpu_widened_gib": widened, "peak_less_widened_gib": peak - widened}


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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a config; ``run()`` trains, ``dry_run()`` only plans memory."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        try:
            validate_config(config)
        except ValueError as e:
            raise TrainingError(f"config.{e}") from None
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                              tensor=config.mesh.tensor)
        self.model_cfg = model_config(config)
        self.lora = lora_config(config, self.model_cfg)
        # Under LoRA the base weights are constants: keep them in the (smaller) frozen dtype.
        self.base_cfg = (self.model_cfg.replace(param_dtype=config.model.frozen_dtype)
                         if self.lora is not None else self.model_cfg)
        self.step_cfg = StepConfig(
            model=self.model_cfg, loss=config.loss.kind, temperature=config.loss.temperature,
            kappa=config.loss.kappa, ri_warmup_steps=config.loss.ri_warmup_steps,
            qwen3_margin=config.loss.qwen3_margin,
            mask_duplicate_positives=config.loss.mask_duplicate_positives,
            reasoning_dropout=bool(config.loss.reasoning_dropout),
            pooling=config.model.pooling, lora=self.lora, dropout=bool(config.model.dropout),
            grad_cache=config.train.grad_cache,
            chunk_rows_per_device=config.train.grad_cache_chunk, mesh=self.mesh,
            rules=DEFAULT_RULES,
        )
        self.fields = BATCH_FIELDS if self.step_cfg.uses_reasoning else BATCH_FIELDS[:2]
        if self.step_cfg.uses_reasoning and not config.data.use_reasoning_query:
            raise TrainingError("loss.kind='ri_infonce' needs data.use_reasoning_query=True")

    # -- state ------------------------------------------------------------------------------

    def _optimizer(self, num_steps: int) -> tuple[Any, Any]:
        o = self.config.optim
        if o.schedule == "deepspeed":
            if o.decay != "linear" or o.end_ratio:
                raise TrainingError("optim.schedule='deepspeed' decays linearly to 0: leave "
                                    "optim.decay='linear' and optim.end_ratio=0")
            schedule = deepspeed_warmup_decay_schedule(o.learning_rate, num_steps,
                                                       warmup_ratio=o.warmup_ratio,
                                                       warmup_type=o.warmup_type)
        elif o.schedule == "warmup_decay":
            schedule = make_schedule(o.learning_rate, num_steps, warmup_ratio=o.warmup_ratio,
                                     decay=o.decay, end_ratio=o.end_ratio)
        else:
            raise TrainingError(f"optim.schedule must be one of {SCHEDULES}, got '{o.schedule}'")
        optimizer = make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                   eps=o.eps, clip_norm=o.clip_norm,
                                   reference_world_size=int(o.reference_world_size))
        return schedule, optimizer

    def _initial_state(self, optimizer: Any) -> tuple[dict, dict]:
        seed = self.config.train.seed
        base = init_base_params(self.config, self.base_cfg, self.mesh, seed)
        if self.lora is not None:
            trainable, frozen = init_adapters(self.model_cfg, self.lora, self.mesh, seed), base
        else:
            trainable, frozen = split_trainable(self.model_cfg, base)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": trainable,
            "opt_state": jax.jit(optimizer.init)(trainable),
            "rng": jax.random.key_data(jax.random.key(seed + 2)),
        }
        # Every leaf on the mesh (scalars replicated), so a restored state has the same layout.
        shardings = jax.tree.map(lambda a: a.sharding, self._with_shardings(abstract_like(state)))
        return jax.device_put(state, shardings), frozen

    def merged_params(self, state: dict, frozen: dict) -> dict[str, jax.Array]:
        if self.lora is None:
            return {**frozen, **state["params"]}
        return jax.jit(lambda b, a: merge_lora(b, a, self.lora))(frozen, state["params"])

    # -- planning ---------------------------------------------------------------------------

    def _domain_shapes(self) -> list[tuple[str, int, int]]:
        """(name, group size, per-device batch) of every configured domain (for dry runs)."""
        d = self.config.data
        out = [(name, int(v.get("group_size", d.group_size)), int(v.get("batch_size", d.batch_size)))
               for name, v in d.domains.items()]
        return out or [("default", int(d.group_size), int(d.batch_size))]

    def abstract_batch(self, group: int, per_device: int) -> dict[str, jax.ShapeDtypeStruct]:
        d = self.config.data
        devices = self.mesh.size
        sharding = batch_sharding(self.mesh)
        b = per_device * devices
        rows = {"query": (b, d.query_max_length), "passage": (b * group, d.passage_max_length),
                "reasoning": (b, d.reasoning_max_length)}
        batch = {f"{role}_{s}": jax.ShapeDtypeStruct(rows[role], jnp.int32, sharding=sharding)
                 for role in self.fields for s in ("input_ids", "attention_mask")}
        batch["passage_key"] = jax.ShapeDtypeStruct(rows["passage"][:1], jnp.int32,
                                                    sharding=sharding)
        return batch

    def dry_run(self) -> dict[str, dict[str, float]]:
        """Compiles the step for every domain's shape at max lengths, from shapes only (no
        weights, no data), and prints the per-device memory plan."""
        _, optimizer = self._optimizer(1000)
        state, frozen = jax.eval_shape(lambda: self._initial_state_abstract(optimizer))
        state = self._with_shardings(state)
        frozen = self._with_shardings(frozen)
        step_fn = jax.jit(make_train_step(self.step_cfg, optimizer, lambda s: 0.0),
                          donate_argnums=(0,))
        report = {}
        n_train = count_params(state["params"])
        n_all = n_train + count_params(frozen)
        print(f"model {self.model_cfg.model_type}: {n_all / 1e6:,.1f}M parameters, "
              f"{n_train / 1e6:,.1f}M trained; mesh {dict(self.mesh.shape)}; "
              f"grad_cache={self.step_cfg.grad_cache}", flush=True)
        by_shape: dict[tuple[int, int], dict[str, float]] = {}
        for name, group, per_device in self._domain_shapes():
            if (group, per_device) not in by_shape:
                batch = self.abstract_batch(group, per_device)
                by_shape[group, per_device] = memory_report(
                    step_fn.lower(state, frozen, batch).compile())
            report[name] = by_shape[group, per_device]
            r = report[name]
            widened = r.get("cpu_widened_gib", 0.0)
            extra = (f"; CPU-only float32 copies of 16-bit weights {widened:.2f}, peak without "
                     f"them {r['peak_less_widened_gib']:.2f}") if widened else ""
            print(f"  domain {name:<22} G={group:<3} batch/device={per_device:<3} "
                  f"peak {r.get('peak_gib', float('nan')):7.2f} GiB/device (args "
                  f"{r.get('arguments_gib', 0):.2f}, temp {r.get('temp_gib', 0):.2f}{extra})",
                  flush=True)
        if any(r.get("cpu_widened_gib") for r in report.values()):
            print("  (XLA:CPU computes bf16 in float32 and hoists float32 copies of the frozen "
                  "weights out of the layer loops; GPU/TPU compilers read bf16 directly. See "
                  "README, memory plans.)", flush=True)
        return report

    def _initial_state_abstract(self, optimizer: Any) -> tuple[dict, dict]:
        specs = param_specs(self.base_cfg)
        base = {p: jnp.zeros(s.shape, self.base_cfg.jnp_param_dtype) for p, s in specs.items()}
        if self.lora is not None:
            trainable = {p: jnp.zeros(shape, jnp.float32)
                         for p, (shape, _) in lora_param_shapes(self.model_cfg, self.lora).items()}
            frozen = base
        else:
            trainable, frozen = split_trainable(self.model_cfg, base)
        state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
                 "opt_state": optimizer.init(trainable),
                 "rng": jax.random.key_data(jax.random.key(0))}
        return state, frozen

    def _with_shardings(self, tree: Any) -> Any:
        """Attaches parameter shardings to an abstract tree (by matching parameter paths)."""
        axes = {p: s.logical_axes for p, s in param_specs(self.model_cfg).items()}
        if self.lora is not None:
            axes.update({p: a for p, (_, a) in lora_param_shapes(self.model_cfg, self.lora).items()})

        def attach(path: Any, leaf: Any) -> Any:
            names = [getattr(k, "key", None) for k in path]
            name = next((n for n in reversed(names) if isinstance(n, str) and n in axes), None)
            if name is not None and len(axes[name]) == len(leaf.shape):
                sharding = named_sharding(self.mesh, axes[name], leaf.shape)
            else:
                sharding = NamedSharding(self.mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return jax.tree_util.tree_map_with_path(attach, tree)

    # -- training ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from reasonembed_jax.data import build_pipeline

        c = self.config
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
        schedule, optimizer = self._optimizer(num_steps)
        state, frozen = self._initial_state(optimizer)
        iterator = pipeline.iterator()
        checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                    every=c.train.checkpoint_every, keep=c.train.keep_checkpoints,
                                    async_save=c.train.async_checkpoints)
        restored = checkpointer.restore_latest(abstract_like(state), accept=finite_state)
        if restored is not None:
            start, state, data_state = restored
            iterator.set_state(data_state["grain"])
            log.info("resumed from step %d in %s", start, checkpointer.directory)
        start = int(to_host(state["step"]))
        step_fn = jax.jit(make_train_step(self.step_cfg, optimizer, schedule), donate_argnums=(0,))
        writer = MetricsWriter(self.workdir)
        peak = peak_flops_per_device(c)
        n_trained = count_params(state["params"])
        log.info("%s: %.1fM trained parameters of %.1fM; %d steps from step %d; mesh %s",
                 self.model_cfg.model_type, n_trained / 1e6,
                 (n_trained + count_params(frozen)) / 1e6, num_steps, start, dict(self.mesh.shape))

        compiled_shapes: set[tuple] = set()
        last_eval: dict[str, float] | None = None
        nan_guard = NanGuard(c.train.max_consecutive_nan)
        pending: tuple[int, dict, float, dict] | None = None
        last_time = time.perf_counter()
        history = []
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, unit="step", file=sys.stderr,
                   disable=not c.train.progress_bar or jax.process_index() != 0)

        ri_uniform_steps = [0]  # this process's run so far

        def finish_pending() -> None:
            nonlocal pending
            if pending is None:
                return
            step, metrics, seconds, info = pending
            pending = None
            m = {k: float(to_host(v)) for k, v in metrics.items()}
            m["tokens_per_sec"] = info["tokens"] / max(seconds, 1e-9)
            m["step_seconds"] = seconds
            if peak:  # model FLOPs (useful work) and hardware FLOPs (what ran) per peak
                m["mfu"] = info["flops"] / max(seconds, 1e-9) / (peak * jax.device_count())
                m["hfu"] = info["hw_flops"] / max(seconds, 1e-9) / (peak * jax.device_count())
            m["domain"] = info["domain"]
            if "ri_uniform" in m:  # solved batches whose RI weights fell back to uniform
                ri_uniform_steps[0] += int(m["ri_uniform"])
                m["ri_uniform_steps"] = ri_uniform_steps[0]
            history.append({"step": step, **m})
            if step % c.train.log_every == 0 or m["skipped"] or step == num_steps - 1:
                writer.write(step, {**m, **pipeline.stats.as_metrics()})
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}")
            nan_guard.update(step, bool(m["skipped"]), m["loss"])

        with _Preemption() as preemption:
            try:
                for step in range(start, num_steps):
                    host_batch = next(iterator)
                    batch = to_global_batch(host_batch, self.mesh, self.fields)
                    shape_key = tuple((k, v.shape) for k, v in sorted(batch.items()))
                    if shape_key not in compiled_shapes:
                        compiled = step_fn.lower(state, frozen, batch).compile()
                        mem = memory_report(compiled)
                        log.info("compiled step for shapes %s: %s",
                                 {k: v for k, v in shape_key if k.endswith("input_ids")},
                                 {k: round(v, 3) for k, v in mem.items()})
                        compiled_shapes.add(shape_key)
                    flops = step_flops_split(
                        self.model_cfg, host_batch, grad_cache=self.step_cfg.grad_cache,
                        uses_reasoning=self.step_cfg.uses_reasoning, lora=self.lora,
                        last_token_only=self.step_cfg.last_token_only)
                    info = {
                        "tokens": float(sum(np.asarray(host_batch[f"{r}_attention_mask"]).sum()
                                            for r in self.fields)) * jax.process_count(),
                        "flops": flops["model"] * jax.process_count(),
                        "hw_flops": flops["hardware"] * jax.process_count(),
                        "domain": pipeline.domain_names[int(np.asarray(host_batch["domain_index"]))],
                    }
                    state, metrics = step_fn(state, frozen, batch)
                    finish_pending()  # the previous step's metrics: keeps one step in flight
                    now = time.perf_counter()
                    pending = (step, metrics, now - last_time, info)
                    last_time = now
                    bar.update(1)
                    data_state = {"grain": iterator.get_state()}
                    checkpointer.save(step + 1, state, data_state)
                    if c.eval.every and (step + 1) % c.eval.every == 0 and c.eval.data:
                        last_eval = self.evaluate(state, frozen)
                        writer.write(step + 1, last_eval)
                    if preemption.any_process():
                        finish_pending()
                        checkpointer.save(step + 1, state, data_state, force=True)
                        checkpointer.wait()
                        log.warning("stopped at step %d after SIGTERM; the checkpoint is saved",
                                    step + 1)
                        return {"stopped_at": step + 1, "history": history}
                finish_pending()
                final_step = int(to_host(state["step"]))
                if final_step not in checkpointer.steps():
                    checkpointer.save(final_step, state, {"grain": iterator.get_state()},
                                      force=True)
                checkpointer.wait()
                result: dict[str, Any] = {"final_step": final_step, "history": history,
                                          "state": state, "frozen": frozen}
                self._run_record = {
                    "data": [{"domain": d.name, "records": d.num_records,
                              "group_size": d.group_size, "batch_size": d.batch_size}
                             for d in pipeline.domains],
                    "last_eval": last_eval,
                }
                if c.train.export_at_end:
                    result["export"] = self.export(state, frozen, final_step)
                return result
            finally:
                bar.close()
                writer.close()
                checkpointer.close()

    # -- evaluation and export ----------------------------------------------------------------

    def text_encoder(self, state: dict, frozen: dict) -> Any:
        from reasonembed_jax.encode import TextEncoder
        from reasonembed_jax.text import embedding_eos_token_id, load_tokenizer

        model = hf_io.abstract_encoder(self.model_cfg, mesh=self.mesh)
        hf_io.set_params(model, self.merged_params(state, frozen))
        tokenizer = load_tokenizer(self.config.data.tokenizer)
        append_eos = bool(self.config.data.append_eos)
        eos = self.config.data.eos_token_id
        if append_eos and eos is None:
            eos = embedding_eos_token_id(tokenizer)
        return TextEncoder(model, tokenizer, pooling=self.config.model.pooling,
                           append_eos=append_eos, eos_token_id=eos,
                           max_length=self.config.eval.max_length,
                           batch_size=self.config.eval.batch_size, mesh=self.mesh)

    def evaluate(self, state: dict, frozen: dict) -> dict[str, float]:
        from reasonembed_jax.evaluation import evaluate_during_training

        e = self.config.eval
        return evaluate_during_training(self.text_encoder(state, frozen), e.data, top_k=e.top_k,
                                        batch_size=e.batch_size, max_length=e.max_length,
                                        split=e.split or None)

    def model_card_record(self, step: int) -> dict[str, Any]:
        """The run's record for the export's model card: resolved config, data, steps, and the
        final loss and last evaluation as ``metrics.jsonl`` has them."""
        from reasonembed_jax.model_card import base_model_license

        c = self.config
        record: dict[str, Any] = {
            "base_model": os.path.basename(os.path.normpath(c.model.hf_dir)) if c.model.init == "hf"
            else None,
            "license": base_model_license(c.model.hf_dir) if c.model.init == "hf" else None,
            "config": json.loads(c.to_json_best_effort()),
            "data_sources": list(c.data.sources), "steps": step,
        }
        run = getattr(self, "_run_record", None) or {}
        record["data"] = run.get("data")
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
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

    def export(self, state: dict, frozen: dict, step: int) -> str:
        """HF + sentence-transformers folder at ``workdir/export/step_N``; ``export/latest``
        points at it (the contract ``evaluate --workdir`` reads)."""
        from reasonembed_jax.text import load_tokenizer

        out = os.path.join(self.workdir, "export", f"step_{step}")
        params = self.merged_params(state, frozen)
        if not finite_state({"params": params}):
            raise TrainingError(f"the parameters at step {step} are not finite: not exported")
        eos_token = None
        if self.config.data.append_eos and self.config.data.eos_token_id is not None:
            tokenizer = load_tokenizer(self.config.data.tokenizer)
            eos_token = tokenizer.convert_ids_to_tokens(int(self.config.data.eos_token_id))
        # Every process joins the parameter gathers; process 0 writes.
        hf_io.export_hf(params, self.model_cfg, out, tokenizer_dir=self.config.data.tokenizer,
                        model_card=self.model_card_record(step),
                        pooling=self.config.model.pooling,
                        append_eos=bool(self.config.data.append_eos), eos_token=eos_token,
                        max_length=self.config.export.max_length,
                        query_instruction=self.config.export.query_instruction or None,
                        dtype=self.config.export.dtype)
        if jax.process_index() == 0:
            latest = os.path.join(self.workdir, "export", "latest")
            tmp = latest + ".tmp"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(f"step_{step}", tmp)
            os.replace(tmp, latest)
            log.info("exported step %d to %s", step, out)
        return out


def finite_state(state: Mapping[str, Any]) -> bool:
    """Whether every parameter (and optimizer moment) of a train state is finite."""
    return bool(to_host(jax.jit(all_finite)({k: v for k, v in state.items()
                                             if k in ("params", "opt_state")})))


def train(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False) -> dict:
    """Trains (or with ``dry_run`` only compiles and prints the memory plan)."""
    trainer = Trainer(config, workdir)
    if dry_run:
        return trainer.dry_run()
    with open(os.path.join(trainer.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return trainer.run()
