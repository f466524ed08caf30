"""One prepared accelerator suite: parity, train step, the 8B recipe step, encode throughput.

    python benchmarks/gpu_suite.py            # on one GPU (planned for an H200, <= 8 minutes)
    python benchmarks/gpu_suite.py --smoke    # the same code paths, tiny, on CPU (CI runs this)

Prints one table (part | measurement | value | note) and, when ``$OUT`` is set, writes
``$OUT/gpu_suite.json``. Every part runs in its own try/except: a broken part prints its error
into the table and the others still run. Architectures are written out here (the device image
has no shared data); weights are random.

1. parity: our encoder vs HF transformers (torch) on a random Qwen3-0.6B-shaped model at full
   depth, fp32 and bf16 (cosine of last-token embeddings); also our bf16 vs our fp32.
2. train step, Qwen3-0.6B shape, bf16, LoRA and full: tokens/s, MFU, HFU (training.flops) and
   the same step (InfoNCE on last-token embeddings, gradient checkpointing, SDPA) in HF + torch.
3. the ReasonEmbed recipe shape on one device: Qwen3-8B-shaped bf16 base, LoRA r=32, GradCache,
   RI-InfoNCE; seconds per step, MFU/HFU, compiled plan vs measured peak memory, projected hours
   for one epoch of 81,659 queries. A smaller batch than the recipe's is timed and extrapolated
   linearly when ``--recipe-queries`` is below 64 (the table says so).
4. encode throughput (BRIGHT-length inputs): ours vs HF torch vs sentence-transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN3_06B = dict(model_type="qwen3", architectures=["Qwen3Model"], vocab_size=151936,
                 hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                 tie_word_embeddings=True, hidden_act="silu", attention_bias=False)
QWEN3_8B = dict(QWEN3_06B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, tie_word_embeddings=False)
TINY = dict(QWEN3_06B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
EPOCH_QUERIES = 81_659  # the released ReasonEmbed training data
RESULTS: list[dict] = []
REPEATS = 2  # timed steps after the warm-up (1 with --smoke)


def row(part: str, what: str, value, note: str = "") -> None:
    RESULTS.append({"part": part, "measurement": what, "value": value, "note": note})
    v = f"{value:.6g}" if isinstance(value, float) else str(value)
    print(f"| {part} | {what} | {v} | {note} |", flush=True)


def part(name: str):
    def wrap(fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as e:  # noqa: BLE001 (the table must survive one broken part)
                row(name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                    traceback.format_exc().splitlines()[-3].strip()[:120])
            row(name, "part seconds", time.perf_counter() - start)
        return run
    return wrap


def torch_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_model(hf: dict, folder: str, seed: int = 0):
    """A random HF Qwen3 (float32, every weight random) saved as safetensors in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    model = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def left_padded(rows: int, width: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 2, width + 1, rows)
    lengths[0] = width
    ids = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(1, vocab, n)
        mask[i, width - n:] = 1
    return ids, mask


def hf_last_token(model, ids, mask, dtype):
    import torch

    dev = torch_device()
    m = model.to(dev, dtype)
    with torch.no_grad():
        h = m(input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
              attention_mask=torch.tensor(mask, dtype=torch.long, device=dev)).last_hidden_state
    out = h[:, -1].float().cpu().numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def ours_last_token(folder, ids, mask, dtype):
    import jax

    from reasonembed_jax import hf_io
    from reasonembed_jax.model.encoder import embed

    model = hf_io.load_encoder(folder, dtype=dtype)
    fn = jax.jit(lambda p, i, m: embed(model.config, p, i, m))
    return np.asarray(fn(model.params, ids, mask), np.float32)


def cosine(a, b):
    return float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                             * np.linalg.norm(b, axis=-1))))


@part("1 parity")
def parity(args, tmp):
    import torch

    hf = TINY if args.smoke else QWEN3_06B
    folder = os.path.join(tmp, "parity")
    model = hf_model(hf, folder)
    ids, mask = left_padded(4 if args.smoke else 8, 32 if args.smoke else 512, hf["vocab_size"])
    ref32 = hf_last_token(model, ids, mask, torch.float32)
    ref16 = hf_last_token(model, ids, mask, torch.bfloat16)
    ours32 = ours_last_token(folder, ids, mask, "float32")
    ours16 = ours_last_token(folder, ids, mask, "bfloat16")
    row("1 parity", "min cosine ours fp32 vs HF fp32", cosine(ours32, ref32), "aim >= 0.9999")
    row("1 parity", "min cosine ours bf16 vs HF bf16", cosine(ours16, ref16), "aim >= 0.999")
    row("1 parity", "min cosine ours bf16 vs ours fp32", cosine(ours16, ours32), "")
    row("1 parity", "min cosine HF bf16 vs HF fp32", cosine(ref16, ref32), "reference spread")


def our_step(hf, *, lora_rank, rows, group, t, grad_cache, chunk, reasoning, folder=None):
    """(seconds per step, flops split, memory report, tokens) of our jitted step on random
    weights and ids (bf16 compute, full remat)."""
    import jax
    import jax.numpy as jnp

    from reasonembed_jax.lora import LoraConfig, init_lora
    from reasonembed_jax.model.encoder import config_from_hf
    from reasonembed_jax.model.params import init_param_value, param_specs
    from reasonembed_jax.training.flops import step_flops_split
    from reasonembed_jax.training.memory_plan import memory_report
    from reasonembed_jax.training.step import StepConfig, make_optimizer, make_train_step

    cfg = config_from_hf(hf, param_dtype="float32", dtype="bfloat16", remat_policy="full")
    lora = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.1) if lora_rank else None
    step_cfg = StepConfig(model=cfg, loss="ri_infonce" if reasoning else "infonce", lora=lora,
                          grad_cache=grad_cache, chunk_rows_per_device=chunk)
    specs = param_specs(cfg)
    base_dtype = jnp.bfloat16 if lora else jnp.float32

    @jax.jit
    def init():
        keys = jax.random.split(jax.random.key(0), len(specs))
        return {p: init_param_value(s, k, cfg).astype(base_dtype)
                for k, (p, s) in zip(keys, specs.items(), strict=True)}

    base = init()
    if lora:
        trainable, frozen = jax.jit(lambda: init_lora(cfg, lora, jax.random.key(1)))(), base
    else:
        trainable, frozen = base, {}
    opt = make_optimizer(1e-5)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
             "opt_state": jax.jit(opt.init)(trainable),
             "rng": jax.random.key_data(jax.random.key(2))}
    batch = {}
    roles = [("query", rows), ("passage", rows * group)] + ([("reasoning", rows)] if reasoning
                                                           else [])
    for i, (role, n) in enumerate(roles):
        ids, mask = left_padded(n, t, hf["vocab_size"], seed=i)
        batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"] = jnp.asarray(ids), \
            jnp.asarray(mask)
    fn = jax.jit(make_train_step(step_cfg, opt, lambda s: 1e-5), donate_argnums=(0,))
    compiled = fn.lower(state, frozen, batch).compile()
    mem = memory_report(compiled)
    state, metrics = compiled(state, frozen, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    flops = step_flops_split(cfg, batch, grad_cache=grad_cache, uses_reasoning=reasoning,
                             lora=lora, last_token_only=step_cfg.last_token_only)
    tokens = sum(int(np.asarray(batch[f"{r}_attention_mask"]).sum()) for r, _ in roles)
    return min(times), flops, mem, tokens, float(metrics["loss"])


def peak_flops():
    import jax

    from reasonembed_jax.training.monitoring import PEAK_TFLOPS

    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12, kind
    return None, kind


def torch_step_seconds(hf, *, lora_rank, rows, group, t):
    """The same step in HF + torch: bf16, SDPA, gradient checkpointing, InfoNCE (tau 0.02) on
    last-token embeddings, AdamW; LoRA through peft."""
    import torch

    dev = torch_device()
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model(hf, tmp)
    model = model.to(dev, torch.bfloat16).train()
    model.gradient_checkpointing_enable()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    q_ids, q_mask = left_padded(rows, t, hf["vocab_size"], 0)
    p_ids, p_mask = left_padded(rows * group, t, hf["vocab_size"], 1)
    tt = lambda a: torch.tensor(a, dtype=torch.long, device=dev)  # noqa: E731

    def step():
        def emb(ids, mask):
            h = model(input_ids=tt(ids), attention_mask=tt(mask)).last_hidden_state[:, -1]
            return torch.nn.functional.normalize(h.float(), dim=-1)

        q, p = emb(q_ids, q_mask), emb(p_ids, p_mask)
        logits = q @ p.T / 0.02
        loss = torch.nn.functional.cross_entropy(
            logits, torch.arange(rows, device=dev) * group)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


@part("2 train step")
def train_step(args, tmp):
    hf = TINY if args.smoke else QWEN3_06B
    rows, group, t = (2, 2, 32) if args.smoke else (16, 8, 512)
    peak, kind = peak_flops()
    variants = [("LoRA r=4 (smoke)", 4)] if args.smoke else [("LoRA r=32", 32), ("full", 0)]
    for name, rank in variants:  # smoke: LoRA only (full takes the same code path)
        sec, flops, mem, tokens, loss = our_step(hf, lora_rank=rank, rows=rows, group=group,
                                                 t=t, grad_cache=False, chunk=8,
                                                 reasoning=False)
        row("2 train step", f"{name}: ours s/step ({rows}q x {group}, {t} tok)", sec,
            f"{tokens / sec:,.0f} tokens/s; loss {loss:.4f}")
        if peak:
            row("2 train step", f"{name}: ours MFU / HFU", flops["model"] / sec / peak,
                f"HFU {flops['hardware'] / sec / peak:.3f} on {kind}")
        try:
            ref = torch_step_seconds(hf, lora_rank=rank, rows=rows, group=group, t=t)
            row("2 train step", f"{name}: HF+torch s/step", ref,
                f"ours is {ref / sec:.2f}x (aim >= 1.3x)")
        except Exception as e:  # noqa: BLE001
            row("2 train step", f"{name}: HF+torch", f"ERROR {type(e).__name__}: {e}"[:200])


@part("3 recipe 8B")
def recipe(args, tmp):
    import jax

    hf = TINY if args.smoke else QWEN3_8B
    queries = 2 if args.smoke else args.recipe_queries
    group, t = (2, 32) if args.smoke else (16, 512)  # 64 queries x 16 = 1,024 passages
    sec, flops, mem, tokens, loss = our_step(hf, lora_rank=4 if args.smoke else 32,
                                             rows=queries, group=group, t=t, grad_cache=True,
                                             chunk=2 if args.smoke else 8, reasoning=True)
    scale = 64 / queries
    note = "" if scale == 1 else f"timed {queries} queries, scaled x{scale:g} linearly"
    row("3 recipe 8B", f"s/step ({queries}q x {group}, {t} tok, GradCache, LoRA)", sec,
        f"loss {loss:.4f}")
    step_sec = sec * scale
    hours = math.ceil(EPOCH_QUERIES / 64) * step_sec / 3600
    row("3 recipe 8B", "projected hours, one epoch of 81,659 queries", hours, note)
    peak, kind = peak_flops()
    if peak:
        row("3 recipe 8B", "MFU / HFU", flops["model"] / sec / peak,
            f"HFU {flops['hardware'] / sec / peak:.3f} on {kind} (aim MFU >= 0.40)")
    widened = mem.get("cpu_widened_gib", 0.0)  # XLA:CPU's float32 weight copies; 0 on a GPU
    row("3 recipe 8B", "compiled plan GiB (args + temp)", mem.get("peak_gib", float("nan")),
        f"args {mem.get('arguments_gib', 0):.2f} + temp {mem.get('temp_gib', 0):.2f}"
        + (f", of which CPU-only f32 weight copies {widened:.2f}" if widened else ""))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row("3 recipe 8B", "measured peak GiB", stats["peak_bytes_in_use"] / 2**30, kind)


@part("4 encode")
def encode(args, tmp):
    import jax
    import torch

    hf = TINY if args.smoke else QWEN3_06B
    folder = os.path.join(tmp, "encode")
    model = hf_model(hf, folder)
    rows, t = (4, 64) if args.smoke else (64, 1024)
    ids, mask = left_padded(rows, t, hf["vocab_size"])
    tokens = int(mask.sum())

    from reasonembed_jax import hf_io
    from reasonembed_jax.model.encoder import forward

    ours = hf_io.load_encoder(folder, dtype="bfloat16")
    fn = jax.jit(lambda p, i, m: forward(ours.config, p, i, m, last_token_only=True))
    params = ours.params
    jax.block_until_ready(fn(params, ids, mask))
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(fn(params, ids, mask))
    ours_tps = 3 * tokens / (time.perf_counter() - start)
    row("4 encode", f"ours tokens/s ({rows} x {t}, bf16)", ours_tps)
    dev = torch_device()
    m = model.to(dev, torch.bfloat16)
    tt = lambda a: torch.tensor(a, dtype=torch.long, device=dev)  # noqa: E731
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        m(input_ids=tt(ids), attention_mask=tt(mask))
        sync()
        start = time.perf_counter()
        for _ in range(3):
            m(input_ids=tt(ids), attention_mask=tt(mask))
        sync()
    hf_tps = 3 * tokens / (time.perf_counter() - start)
    row("4 encode", "HF torch tokens/s (bf16, SDPA)", hf_tps,
        f"ours is {ours_tps / hf_tps:.2f}x (aim >= 1.5x)")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device=dev, model_kwargs={"torch_dtype": torch.bfloat16})
    # The same token ids through sentence-transformers' modules (Transformer + Pooling); the
    # random model has no tokenizer, and tokenisation is not what this part measures.
    features = {"input_ids": tt(ids), "attention_mask": tt(mask)}
    with torch.no_grad():
        st(dict(features))
        sync()
        start = time.perf_counter()
        for _ in range(3):
            st(dict(features))["sentence_embedding"]
        sync()
    st_tps = 3 * tokens / (time.perf_counter() - start)
    row("4 encode", "sentence-transformers tokens/s (same ids)", st_tps,
        f"ours is {ours_tps / st_tps:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI)")
    parser.add_argument("--recipe-queries", type=int, default=64,
                        help="queries per timed recipe step (x16 passages); < 64 extrapolates")
    parser.add_argument("--parts", default="1,2,3,4")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        global REPEATS
        REPEATS = 1
    import jax

    print(f"gpu_suite: jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), smoke={args.smoke}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    print("| part | measurement | value | note |\n|---|---|---|---|", flush=True)
    parts = {"1": parity, "2": train_step, "3": recipe, "4": encode}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.parts.split(","):
            parts[key](args, tmp)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_suite.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "smoke": args.smoke,
                       "rows": RESULTS}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
