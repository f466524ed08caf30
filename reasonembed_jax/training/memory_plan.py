"""The ahead-of-time memory plan: the train step compiled from shapes only (no weights, no data)
for every configured domain shape, and what XLA says it needs per device.

    python -m reasonembed_jax.train --config ... --dry_run
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from reasonembed_jax.model.sharding import batch_sharding
from reasonembed_jax.training.monitoring import count_params
from reasonembed_jax.training.state import Setup, abstract_state, make_optimizer_from_config
from reasonembed_jax.training.step import make_train_step


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


def domain_shapes(setup: Setup) -> list[tuple[str, int, int]]:
    """(name, group size, per-device batch) of every configured domain."""
    d = setup.config.data
    out = [(name, int(v.get("group_size", d.group_size)), int(v.get("batch_size", d.batch_size)))
           for name, v in d.domains.items()]
    return out or [("default", int(d.group_size), int(d.batch_size))]


def abstract_batch(setup: Setup, group: int, per_device: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of ``per_device`` queries per device at the configured max lengths."""
    d = setup.config.data
    sharding = batch_sharding(setup.mesh, setup.rules)
    b = per_device * setup.mesh.size
    rows = {"query": (b, d.query_max_length), "passage": (b * group, d.passage_max_length),
            "reasoning": (b, d.reasoning_max_length)}
    batch = {f"{role}_{s}": jax.ShapeDtypeStruct(rows[role], jnp.int32, sharding=sharding)
             for role in setup.fields for s in ("input_ids", "attention_mask")}
    batch["passage_key"] = jax.ShapeDtypeStruct(rows["passage"][:1], jnp.int32, sharding=sharding)
    return batch


def plan(setup: Setup) -> dict[str, dict[str, float]]:
    """Compiles the step for every domain's shape at max lengths and prints the per-device
    memory plan; returns ``{domain: memory_report}``."""
    _, optimizer = make_optimizer_from_config(setup.config, 1000)
    state, frozen = abstract_state(setup, optimizer)
    step_fn = jax.jit(make_train_step(setup.step_cfg, optimizer, lambda s: 0.0),
                      donate_argnums=(0,))
    report = {}
    n_train = count_params(state["params"])
    n_all = n_train + count_params(frozen)
    print(f"model {setup.model_cfg.model_type}: {n_all / 1e6:,.1f}M parameters, "
          f"{n_train / 1e6:,.1f}M trained; mesh {dict(setup.mesh.shape)}; "
          f"grad_cache={setup.step_cfg.grad_cache}", flush=True)
    by_shape: dict[tuple[int, int], dict[str, float]] = {}
    for name, group, per_device in domain_shapes(setup):
        if (group, per_device) not in by_shape:
            batch = abstract_batch(setup, group, per_device)
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
