"""FLOPs of one training step: what the model needs ("model FLOPs") and what runs ("hardware").

Per token through a model of ``N`` matmul parameters (embedding gathers are free):

- forward ``2N``; backward ``4N`` when the weights are trained (activation and weight
  gradients), ``2N`` when they are frozen (LoRA: activation gradients only), plus the adapters'
  own ``6 N_lora``;
- attention adds ``4 T d heads`` per token per layer forward (``QK^T`` and ``PV`` over all ``T``
  keys, as every implementation here computes them; a causal kernel skips about half) and twice
  that backward;
- hardware FLOPs add what the step recomputes: one more forward under GradCache (its first,
  gradient-free pass over every chunk) and, under full rematerialisation, each layer's forward
  again in the backward pass less the ``o_proj``/``down_proj`` matmuls, whose outputs no gradient
  reads (autodiff drops them); ``dots``/``save_projections`` keep the matmuls, so nothing.
- reasoning queries (RI-InfoNCE weights) run forward only, once.

Model FLOPs utilisation (MFU) divides model FLOPs per second by the hardware's peak; hardware
FLOPs utilisation (HFU) divides what ran. ``tests/test_flops.py`` checks the hardware count
against XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES_TRAINED = ("query", "passage")


def matmul_params(cfg: Any) -> int:
    """Parameters of the per-layer matmuls (q, k, v, o and the MLP matrices)."""
    c = cfg
    attn = c.hidden_size * c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
    attn += c.num_heads * c.head_dim * c.hidden_size
    return c.num_layers * (attn + c.mlp_matrices * c.hidden_size * c.intermediate_size)


def lora_params(cfg: Any, lora: Any) -> int:
    """Adapter parameters (``r * (fan_in + fan_out)`` per adapted matrix and layer)."""
    if lora is None:
        return 0
    c = cfg
    fan = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim),
           "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
           "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
           "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
           "gate_proj": (c.hidden_size, c.intermediate_size),
           "up_proj": (c.hidden_size, c.intermediate_size),
           "down_proj": (c.intermediate_size, c.hidden_size)}
    return c.num_layers * sum(lora.rank * sum(fan[t]) for t in lora.targets if t in fan)


def step_flops_split(cfg: Any, batch: Mapping[str, Any], *, grad_cache: bool,
                     uses_reasoning: bool, lora: Any = None, remat_policy: str | None = None,
                     last_token_only: bool = False) -> dict[str, float]:
    """``{"model": ..., "hardware": ...}`` FLOPs of one step on ``batch`` (any mapping with the
    ``<role>_attention_mask`` arrays; their padded shapes count, as the kernels run on them).

    ``last_token_only``: the decoder's last layer runs its query side (q and o projections,
    attention, MLP) for the pooled token only (``decoder_forward(last_token_only=True)``)."""
    c = cfg
    remat = remat_policy if remat_policy is not None else c.remat_policy
    n, n_lora = matmul_params(c), lora_params(c, lora)
    n_kv = 2 * c.hidden_size * c.num_kv_heads * c.head_dim  # one layer's k and v projections
    attn_layer = 4 * c.num_heads * c.head_dim  # per query token and key, one layer, forward
    # LoRA share of one layer's k/v vs the rest (the adapters follow their matrices).
    kv_lora = n_lora * n_kv / max(n, 1)

    def shape(role: str) -> tuple[int, int]:
        rows, t = batch[f"{role}_attention_mask"].shape
        return int(rows), int(t)

    def passes(role: str) -> tuple[float, float, float]:
        """Forward FLOPs (base matmuls, adapters, attention) of one pass over ``role``."""
        rows, t = shape(role)
        tokens = float(rows * t)
        if not last_token_only:
            return (tokens * 2 * n, tokens * 2 * n_lora,
                    tokens * c.num_layers * attn_layer * t)
        layer, layer_lora = n / c.num_layers, n_lora / c.num_layers
        base = tokens * 2 * (n - layer + n_kv) + rows * 2 * (layer - n_kv)
        adapters = tokens * 2 * (n_lora - layer_lora + kv_lora) + rows * 2 * (
            layer_lora - kv_lora)
        attn = tokens * (c.num_layers - 1) * attn_layer * t + rows * attn_layer * t
        return base, adapters, attn

    def forward(role: str) -> float:
        return sum(passes(role))

    def backward(role: str) -> float:
        base, adapters, attn = passes(role)
        weights = base if lora is not None else 2 * base  # frozen base: activation grads only
        return weights + 2 * adapters + 2 * attn

    # Full remat re-runs each layer's forward in the backward pass, except what no gradient
    # reads: the outputs of o_proj and down_proj (and their adapters) feed only residual sums.
    c_in = c.num_heads * c.head_dim * c.hidden_size + c.intermediate_size * c.hidden_size
    kept = 1.0 - c.num_layers * c_in / max(n, 1)

    def recompute(role: str) -> float:
        base, adapters, attn = passes(role)
        return (base + adapters) * kept + attn

    fwd = sum(forward(r) for r in ROLES_TRAINED)
    model = fwd + sum(backward(r) for r in ROLES_TRAINED)
    extra = (fwd if grad_cache else 0.0) + (
        sum(recompute(r) for r in ROLES_TRAINED) if remat == "full" else 0.0)
    if uses_reasoning:
        model += forward("reasoning")
    return {"model": model, "hardware": model + extra}


def step_flops(cfg: Any, batch: Mapping[str, Any], *, grad_cache: bool,
               uses_reasoning: bool, lora: Any = None) -> float:
    """Model FLOPs of one step (see ``step_flops_split``)."""
    return step_flops_split(cfg, batch, grad_cache=grad_cache, uses_reasoning=uses_reasoning,
                            lora=lora)["model"]
