"""Training-step tokens/s and MFU of our jitted step against a PyTorch reference, side by side.

Both sides train the same random mid-size Qwen3 (same initial weights) on the same batch: B queries
and B*G passages (positive + hard negatives, left padded), last-token pooling, L2 norm, InfoNCE over
in-batch + hard negatives at ``tau = 0.02``, global-norm clipping at 1.0 and AdamW. The reference
is HF transformers ``Qwen3Model`` + the same loss in torch + ``torch.optim.AdamW`` (foreach), with a
small hand-written LoRA wrapper for the LoRA row (``peft`` is not a dependency).

``--hf-dir`` trains a real converted decoder folder instead (e.g. ``.cache/models/smollm2-hf``:
``decoder_finetune.py``'s shape is ``--hf-dir ... --group 2 --passage-len 64 --lora-rank 32``);
both sides then load the same weights (torch through ``AutoModel``). A BERT-family folder (e.g.
all-MiniLM-L6-v2) trains fully (``--no-lora``) with mean pooling and the model's dropout on both
sides (torch in train mode), as ``scifact_finetune.py`` does; the step-0 losses then differ by
the dropout masks and are not compared.

Timing excludes compilation / warm-up; the implementations alternate step by step (A B A B, so
load from other processes hits both alike); the table gives the median of ``--steps`` timed
steps with their min-max, and the load average and core count are printed beside it (a warning
when the machine is busy: figures from a loaded machine have misled this project before).
Tokens/s counts every position the step processes (padding included, the same for both sides).
MFU = model FLOPs per step (``training.flops.step_flops``: 6 x params x tokens + attention) / step time /
the machine's *measured* fp32 matmul peak (the better of jax and torch on a large square matmul).

    python benchmarks/train_throughput.py [--layers 4] [--hidden 512] [--queries 8] [--group 4]
        [--query-len 64] [--passage-len 128] [--steps 3] [--lora-rank 16] [--no-lora] [--no-full]
        [--dtype float32|bfloat16] [--hf-dir CONVERTED_DECODER_DIR] [--ablation]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from bench_common import interleave, machine_line, median, median_range, warn_if_busy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measure_peak(size: int, repeats: int) -> tuple[float, float]:
    """Best fp32 GFLOP/s of a ``size^3`` matmul with jax and with torch."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    best_j = best_t = float("inf")
    ta = torch.randn(size, size)
    torch.matmul(ta, ta)
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        best_j = min(best_j, time.perf_counter() - start)
        start = time.perf_counter()
        torch.matmul(ta, ta)
        best_t = min(best_t, time.perf_counter() - start)
    flops = 2.0 * size**3
    return flops / best_j / 1e9, flops / best_t / 1e9


def make_batch(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Random token ids, left padded, each row with a random real length in [len/2, len]."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def rows(n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = rng.integers(t // 2, t + 1, size=n)
        ids = rng.integers(1, args.vocab, size=(n, t)).astype(np.int32)
        mask = (np.arange(t)[None, :] >= (t - lengths)[:, None]).astype(np.int32)
        return np.where(mask == 1, ids, 0).astype(np.int32), mask

    q_ids, q_mask = rows(args.queries, args.query_len)
    p_ids, p_mask = rows(args.queries * args.group, args.passage_len)
    return {"query_input_ids": q_ids, "query_attention_mask": q_mask,
            "passage_input_ids": p_ids, "passage_attention_mask": p_mask}


# -- PyTorch reference ------------------------------------------------------------------------


def torch_lora(model: Any, rank: int, alpha: float) -> list[Any]:
    """Freezes ``model`` and wraps every projection ``Linear`` with ``W x + (alpha/r) B A x``
    (``A`` Gaussian / fan_in^0.5, ``B`` zero); returns the adapter parameters."""
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(base.in_features, rank) / base.in_features**0.5)
            self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))
            self.scale = alpha / rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.scale * ((x @ self.a) @ self.b)

    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for module in list(model.modules()):
        for name in PROJECTIONS:
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Linear):
                wrapped = LoraLinear(child)
                setattr(module, name, wrapped)
                adapters += [wrapped.a, wrapped.b]
    return adapters


def is_bert(model_dir: pathlib.Path) -> bool:
    from reasonembed_jax.model.encoder import BERT_MODEL_TYPES

    return json.loads((pathlib.Path(model_dir) / "config.json").read_text())[
        "model_type"] in BERT_MODEL_TYPES


def torch_embed(model: Any, ids: Any, mask: Any, mean: bool) -> Any:
    """Left-padded rows -> normalised embeddings: last-token pooling, or the mean over real
    tokens (``mean``). Positions count real tokens only (ours and HF's padding-free semantics)."""
    import torch

    pos = (mask.cumsum(1) - 1).clamp(min=0)
    h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    if mean:
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
    else:
        pooled = h[:, -1]
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def torch_step_fn(model: Any, params: list[Any], batch: dict[str, Any], args: argparse.Namespace,
                  dtype: Any, mean: bool = False) -> Callable[[], float]:
    """One optimisation step of the reference: forward both roles, InfoNCE, backward, clip,
    AdamW."""
    import torch

    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    targets = torch.arange(args.queries) * args.group

    def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return torch_embed(model, ids, mask, mean)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        q = embed(t["query_input_ids"], t["query_attention_mask"])
        p = embed(t["passage_input_ids"], t["passage_attention_mask"])
        loss = torch.nn.functional.cross_entropy(q @ p.T / args.temperature, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return float(loss.detach())

    return step


# -- ours -------------------------------------------------------------------------------------


def jax_state(model_dir: pathlib.Path, args: argparse.Namespace, lora_rank: int | None,
              scan_layers: bool = True) -> tuple[Any, Any, dict, dict]:
    """Our step settings, optimizer, initial train state and frozen weights for ``model_dir``
    (float32 master weights, no remat; LoRA r=``lora_rank`` or full fine-tuning)."""
    import jax
    import jax.numpy as jnp

    from reasonembed_jax.hf_io import load_hf_params
    from reasonembed_jax.lora import LoraConfig, init_lora
    from reasonembed_jax.model.encoder import BERT_MODEL_TYPES, config_from_hf_dir
    from reasonembed_jax.training.step import StepConfig, make_optimizer

    mcfg = config_from_hf_dir(model_dir, dtype=args.dtype, param_dtype="float32",
                              remat_policy="none", scan_layers=scan_layers)
    bert = mcfg.model_type in BERT_MODEL_TYPES
    if bert and lora_rank is not None:
        raise SystemExit("BERT-family models are timed with full fine-tuning only (--no-lora)")
    base = load_hf_params(model_dir, mcfg)
    lora = None
    if lora_rank is not None:
        lora = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.0)
        trainable, frozen = init_lora(mcfg, lora, jax.random.key(1)), base
    else:
        trainable, frozen = base, {}
    cfg = StepConfig(model=mcfg, loss="infonce", temperature=args.temperature, lora=lora,
                     pooling="mean" if bert else "last_token", dropout=bert)
    optimizer = make_optimizer(args.lr, weight_decay=args.weight_decay, clip_norm=1.0)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
             "opt_state": jax.jit(optimizer.init)(trainable),
             "rng": jax.random.key_data(jax.random.key(2))}
    # Committed to the device, as the step's outputs are: an uncommitted initial state made the
    # second call compile the whole step again (12 s inside the first timed step).
    state = jax.device_put(state, jax.devices()[0])
    return cfg, optimizer, state, frozen


def model_folder(args: argparse.Namespace, tmp: str) -> tuple[pathlib.Path, Any]:
    """(folder, HF class) of the benchmark's model: ``--hf-dir``, or a random Qwen3 of
    ``--hidden``/``--layers``/``--vocab`` saved under ``tmp`` (torch seed 0)."""
    import torch
    from transformers import AutoModel, Qwen3Config, Qwen3Model

    if args.hf_dir:
        return pathlib.Path(args.hf_dir), AutoModel
    cfg = json.loads((SHARED / "hf_configs" / "Qwen3-0.6B" / "config.json").read_text())
    cfg.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden, vocab_size=args.vocab,
               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
               num_key_value_heads=max(args.hidden // 128, 1), head_dim=64,
               tie_word_embeddings=False)
    model_dir = pathlib.Path(tmp) / "model"
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(**cfg)).save_pretrained(model_dir)
    return model_dir, Qwen3Model


def jax_step_fn(model_dir: pathlib.Path, batch: dict[str, Any], args: argparse.Namespace,
                lora_rank: int | None, scan_layers: bool = True
                ) -> tuple[Callable[[], float], float]:
    """Our jitted, donated ``make_train_step`` on a one-device mesh; returns (step, flops).
    ``scan_layers`` False unrolls the layer loop (an ablation row)."""
    import jax
    import jax.numpy as jnp
    import optax

    from reasonembed_jax.training.flops import step_flops
    from reasonembed_jax.training.step import make_train_step

    cfg, optimizer, state, frozen = jax_state(model_dir, args, lora_rank, scan_layers)
    mcfg = cfg.model
    train_step = jax.jit(make_train_step(cfg, optimizer, optax.constant_schedule(args.lr)),
                         donate_argnums=(0,))
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], frozen, device_batch)
        return float(metrics["loss"])  # blocks until the step is done

    flops = step_flops(mcfg, batch, grad_cache=False, uses_reasoning=False)
    return step, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768,
                        help="vocabulary size (small by default so the embedding table's AdamW "
                        "update does not dominate a mid-size model)")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="passages per query (1 positive)")
    parser.add_argument("--query-len", type=int, default=64)
    parser.add_argument("--passage-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (best kept)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning rows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (params and optimizer stay float32; torch autocast)")
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--ablation", action="store_true",
                        help="also time our step with the layer loop unrolled (scan_layers=False)")
    parser.add_argument("--hf-dir", default=None,
                        help="a converted HF decoder folder (llama/qwen2/qwen3) to train instead of "
                             "the random Qwen3 (--hidden/--layers/--vocab then ignored)")
    args = parser.parse_args()
    if args.no_full and args.no_lora:
        parser.error("--no-full and --no-lora leave nothing to time")
    if args.hf_dir:
        args.vocab = json.loads((pathlib.Path(args.hf_dir) / "config.json").read_text())[
            "vocab_size"]

    import numpy as np
    import torch

    before = machine_line()
    warn_if_busy()

    torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    batch = make_batch(args)
    tokens = sum(batch[k].size for k in batch if k.endswith("input_ids"))
    real = sum(int(batch[k].sum()) for k in batch if k.endswith("attention_mask"))
    peak_j, peak_t = measure_peak(args.peak_size, 5)
    peak = max(peak_j, peak_t) * 1e9

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_cls = model_folder(args, tmp)
        bert = is_bert(model_dir)
        variants = ([] if args.no_full else [("full", None)]) + (
            [] if args.no_lora else [("LoRA", args.lora_rank)])
        for name, rank in variants:
            ref = model_cls.from_pretrained(model_dir, dtype=torch.float32,
                                            attn_implementation="sdpa").train()
            ref.config.use_cache = False
            torch.manual_seed(1)
            params = (torch_lora(ref, rank, 2.0 * rank) if rank is not None
                      else list(ref.parameters()))
            impls = {f"HF transformers + torch {torch.__version__}":
                     torch_step_fn(ref, params, batch, args, torch_dtype, mean=bert)}
            impls["reasonembed-jax train_step"], flops = jax_step_fn(model_dir, batch, args, rank)
            if args.ablation:
                impls["reasonembed-jax train_step, layers unrolled"], _ = jax_step_fn(
                    model_dir, batch, args, rank, scan_layers=False)
            loss0 = {k: f() for k, f in impls.items()}  # compile / warm-up, untimed
            times = interleave(impls, args.steps)
            rows.append((name, rank, flops, times, loss0))
            del ref, params, impls

    model_name = (f"{model_dir.name} ({args.hf_dir})" if args.hf_dir else
                  f"Qwen3 hidden {args.hidden}, {args.layers} layers")
    print(f"\ntrain-step throughput: {model_name}, vocab "
          f"{args.vocab}, {args.queries} queries x {args.query_len} tok + {args.queries} x "
          f"{args.group} passages x {args.passage_len} tok = {tokens} positions ({real} real), "
          f"InfoNCE tau {args.temperature}, AdamW, {args.dtype}, median (min-max) of "
          f"{args.steps} interleaved steps, torch threads {torch.get_num_threads()}")
    print(f"before: {before}\nafter:  {machine_line()}")
    print(f"measured fp32 matmul peak ({args.peak_size}^3): jax {peak_j:.1f} GFLOP/s, torch "
          f"{peak_t:.1f} GFLOP/s -> MFU denominator {peak / 1e9:.1f} GFLOP/s")
    print("| training | implementation | step (s), median (min-max) | tokens/s | model GFLOP/s | "
          "MFU | ratio | step-0 loss |")
    print("|---|---|---|---|---|---|---|---|")
    diffs = []
    for name, rank, flops, times, loss0 in rows:
        label = name if rank is None else f"{name} r={rank}"
        medians = {k: median(v) for k, v in times.items()}
        ref_s, ref_loss = next(iter(medians.values())), next(iter(loss0.values()))
        for impl, s in medians.items():
            diffs.append(abs(loss0[impl] - ref_loss))
            print(f"| {label} | {impl} | {median_range(times[impl])}"
                  f" | {tokens / s:,.0f} | {flops / s / 1e9:.1f} | "
                  f"{flops / s / peak:.1%} | {ref_s / s:.2f} | {loss0[impl]:.4f} |")
    print("model FLOPs/step (training.flops.step_flops, the full model for every row, so a row that "
          "skips work shows it as higher MFU; LoRA counts frozen-weight gradients it does not "
          "compute): " + ", ".join(f"{r[0]} {r[2] / 1e9:.1f} GFLOP" for r in rows))
    print(f"max |step-0 loss difference| vs torch: {max(diffs):.2e}"
          + (" (dropout on: different masks, not compared)" if bert else ""))
    if not bert:
        np.testing.assert_allclose(diffs, 0.0, atol=1e-3)


if __name__ == "__main__":
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    main()
