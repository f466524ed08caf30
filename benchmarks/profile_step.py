"""Where a training step's time goes, ours and PyTorch's, on the same model and batch.

Per-phase timers (interleaved A B A B, median of ``--repeats``): the forward pass alone (both
roles embedded, no gradient), forward + backward (loss and gradients), and the whole step (plus
clipping and AdamW). Then one profiled step of each: for ours a ``jax.profiler`` trace whose XLA
thunks are summed by HLO instruction and grouped by kind (matmuls, elementwise fusions, copies
and transposes, slicing of the stacked layers, reductions, ...), with XLA's own compile time;
for PyTorch ``torch.profiler``'s operator table. The model and batch are
``train_throughput.py``'s (random Qwen3 by default, ``--hf-dir`` a real converted decoder, or
a BERT-family folder such as all-MiniLM-L6-v2 with ``--full``: mean pooling, dropout on in the
training phases of both sides, off in the forward phase).

    python benchmarks/profile_step.py [--hf-dir .cache/models/smollm2-hf] [--lora-rank 32 |
        --full] [--queries 8 --group 2 --query-len 64 --passage-len 64] [--repeats 3]
        [--xla-dump DIR]

Run it alone on the machine: the load average is printed and a busy machine is flagged.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import train_throughput as tt  # noqa: E402  (same model, batch and reference as the benchmark)
from bench_common import interleave, machine_line, median, median_range, warn_if_busy  # noqa: E402

# HLO instruction kinds, in match order, for the grouping of thunk time.
KINDS = (
    ("matmul (ynn/dot fusions, dots)", r"\b(dot|convolution)\(|ynn_fusion|xnn_fusion|custom-call"),
    ("slicing stacked layers (scan)", r"\b(dynamic-slice|dynamic-update-slice)\("),
    ("copy / transpose", r"\b(copy|transpose)\("),
    ("reduce", r"\breduce(-window)?\("),
    ("rng", r"\brng"),
    ("elementwise fusion", r"\bfusion\(|kind=kLoop|kind=kInput"),
    ("control (while, call, conditional)", r"\b(while|call|conditional)\("),
)


def ours(model_dir: pathlib.Path, batch: dict, args: argparse.Namespace, rank: int | None
         ) -> dict[str, Any]:
    """Our three phases as jitted functions on a one-device mesh, plus the compiled step."""
    import jax
    import jax.numpy as jnp
    import optax

    from reasonembed_jax.training.step import make_embed_fn, make_train_step, plain_loss_and_grads

    cfg, optimizer, state, frozen = tt.jax_state(model_dir, args, rank,
                                                 scan_layers=not args.unrolled)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    embed = make_embed_fn(cfg, train=False)
    key = state["rng"]

    @jax.jit
    def forward(t: Any, f: Any, b: dict) -> Any:
        q = embed(t, f, b["query_input_ids"], b["query_attention_mask"], key)
        p = embed(t, f, b["passage_input_ids"], b["passage_attention_mask"], key)
        return (q @ p.T).sum()

    @jax.jit
    def forward_backward(t: Any, f: Any, b: dict) -> Any:
        loss, _, grads = plain_loss_and_grads(cfg, t, f, b, jnp.zeros((), jnp.int32), key)
        return loss, grads

    step_fn = jax.jit(make_train_step(cfg, optimizer, optax.constant_schedule(args.lr)),
                      donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen, device_batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], frozen, device_batch)
        jax.block_until_ready(metrics)

    return {
        # (the step donates the state: the phases read the current parameters)
        "forward": lambda: jax.block_until_ready(
            forward(holder["state"]["params"], frozen, device_batch)),
        "forward + backward": lambda: jax.block_until_ready(
            forward_backward(holder["state"]["params"], frozen, device_batch)),
        "whole step": step, "compiled": compiled, "compile_s": compile_s,
    }


def theirs(model_dir: pathlib.Path, model_cls: Any, batch: dict, args: argparse.Namespace,
           rank: int | None) -> dict[str, Any]:
    import torch

    ref = model_cls.from_pretrained(model_dir, dtype=torch.float32,
                                    attn_implementation="sdpa").train()
    ref.config.use_cache = False
    torch.manual_seed(1)
    params = tt.torch_lora(ref, rank, 2.0 * rank) if rank is not None else list(ref.parameters())
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    targets = torch.arange(args.queries) * args.group
    mean = tt.is_bert(model_dir)

    def embed(ids: Any, mask: Any) -> Any:
        return tt.torch_embed(ref, ids, mask, mean)

    def forward() -> None:  # no dropout, as ours (train=False)
        ref.eval()
        try:
            with torch.no_grad():
                (embed(t["query_input_ids"], t["query_attention_mask"])
                 @ embed(t["passage_input_ids"], t["passage_attention_mask"]).T).sum()
        finally:
            ref.train()

    def forward_backward() -> None:
        for p in params:
            p.grad = None
        q = embed(t["query_input_ids"], t["query_attention_mask"])
        p = embed(t["passage_input_ids"], t["passage_attention_mask"])
        torch.nn.functional.cross_entropy(q @ p.T / args.temperature, targets).backward()

    return {"forward": forward, "forward + backward": forward_backward,
            "whole step": tt.torch_step_fn(ref, params, batch, args, torch.float32, mean=mean)}


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """``{instruction name: kind}`` for the instructions of an optimised HLO module."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if not m:
            continue
        name, rest = m.groups()
        if name.startswith(("ynn", "xnn", "dot")):
            rest = "dot(" + rest  # XNNPACK/YNNPACK matmul fusions are named so
        out[name] = next((kind for kind, pattern in KINDS if re.search(pattern, rest)), "other")
    return out


def jax_profile(step: Any, compiled: Any, steps: int) -> tuple[list, dict[str, float]]:
    """Thunk time (ms per step) by HLO instruction and by kind, from a ``jax.profiler`` trace."""
    import jax

    kinds = hlo_kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        path = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_op: collections.Counter = collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            by_op[op] += e.get("dur", 0) / 1e3 / steps
    by_kind: collections.Counter = collections.Counter()
    for op, ms in by_op.items():
        by_kind[kinds.get(op, "other")] += ms
    return by_op.most_common(15), dict(by_kind.most_common())


def torch_profile(step: Any) -> str:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", default=None)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--group", type=int, default=2)
    p.add_argument("--query-len", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--unrolled", action="store_true", help="ours with the layer loop unrolled")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-trace", action="store_true", help="timers only")
    p.add_argument("--dtype", default="float32", choices=["float32"], help=argparse.SUPPRESS)
    p.add_argument("--weight-decay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_dir:
        args.vocab = json.loads((pathlib.Path(args.hf_dir) / "config.json").read_text())[
            "vocab_size"]

    import torch

    print("before:", machine_line(), f"| torch threads {torch.get_num_threads()}", flush=True)
    warn_if_busy()
    batch = tt.make_batch(args)
    rank = None if args.full else args.lora_rank
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_cls = tt.model_folder(args, tmp)
        a = ours(model_dir, batch, args, rank)
        b = theirs(model_dir, model_cls, batch, args, rank)
        phases = ("forward", "forward + backward", "whole step")
        for impl in (a, b):  # warm-up (compiles ours)
            for ph in phases:
                impl[ph]()
        times = interleave({(who, ph): impl[ph] for ph in phases
                            for who, impl in (("ours", a), ("torch", b))}, args.repeats)
        what = "full fine-tuning" if rank is None else f"LoRA r={rank}"
        print(f"\nphases, {model_dir.name if args.hf_dir else 'random Qwen3'}, {what}, "
              f"{args.queries} x {args.query_len} + {args.queries * args.group} x "
              f"{args.passage_len} tokens; seconds, median (min-max) of {args.repeats}")
        print(f"{'phase':<22}{'ours':>24}{'torch':>24}{'torch/ours':>12}")
        for ph in phases:
            o, t = times["ours", ph], times["torch", ph]
            print(f"{ph:<22}{median_range(o):>24}{median_range(t):>24}"
                  f"{median(t) / median(o):>11.2f}x")
        print(f"ours: step compile {a['compile_s']:.1f} s; after: {machine_line()}")
        if args.no_trace:
            return
        top, kinds = jax_profile(a["whole step"], a["compiled"], 2)
        total = sum(kinds.values())
        print(f"\nours, XLA thunk time per step by kind ({total:.0f} ms in thunks):")
        for kind, ms in kinds.items():
            print(f"  {kind:<38}{ms:9.1f} ms {100 * ms / total:5.1f}%")
        print("ours, top instructions (ms per step):")
        for op, ms in top:
            print(f"  {op:<38}{ms:9.1f}")
        print("\ntorch, one step:")
        print(torch_profile(b["whole step"]))


if __name__ == "__main__":
    main()
