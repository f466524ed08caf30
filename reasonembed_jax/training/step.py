"""The jitted training step: embeddings, loss, gradients (plain or GradCache), update.

Everything here works on global arrays; the mesh and the logical-axis rules decide how it is
split over devices. The train state is a plain pytree::

    {"step": int32, "params": trainable params, "opt_state": optax state, "rng": key data}

Frozen parameters (the base model under LoRA) are passed separately and never updated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from reasonembed_jax import losses
from reasonembed_jax.lora import LoraConfig, lora_project, with_dropout_keys
from reasonembed_jax.model.decoder import default_project
from reasonembed_jax.model.encoder import ModelConfig, embed
from reasonembed_jax.model.sharding import BATCH, DEFAULT_RULES, Rules, constrain, data_parallel_size

Array = jax.Array
PyTree = Any
LOSS_KINDS = ("infonce", "ri_infonce", "qwen3_masked")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step."""

    model: ModelConfig
    loss: str = "ri_infonce"
    temperature: float = 0.02
    kappa: float = 5.0
    ri_warmup_steps: int = 100
    qwen3_margin: float = 0.1
    # Leave in-batch copies of a query's own positive out of its softmax (needs passage_key).
    mask_duplicate_positives: bool = True
    # Encode the reasoning queries in training mode (LoRA / model dropout on, still no gradient),
    # as the authors' no-grad pass under ``model.train()`` does; off: deterministic, no dropout.
    reasoning_dropout: bool = False
    pooling: str = "last_token"
    # The model's own dropout in training passes (BERT family; see ``encoder.forward``).
    dropout: bool = False
    lora: LoraConfig | None = None
    grad_cache: bool = False
    # GradCache: rows per device in one chunk (queries, passages and reasoning queries alike).
    chunk_rows_per_device: int = 8
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got '{self.loss}'")
        if self.dropout and self.model.model_type != "bert":
            raise ValueError("model.dropout is implemented for the BERT family only")

    @property
    def uses_reasoning(self) -> bool:
        return self.loss == "ri_infonce"

    @property
    def last_token_only(self) -> bool:
        """Whether the decoder runs its last layer for the pooled token only (the unrolled path;
        under scan the last layer runs in full, see ``decoder._scan_layers``)."""
        return (self.pooling == "last_token" and self.model.model_type != "bert"
                and not self.model.scan_layers)

    @property
    def data_parallel(self) -> int:
        if self.mesh is None:
            return 1
        return data_parallel_size(self.mesh, self.rules)


def make_embed_fn(cfg: StepConfig, *, train: bool) -> Callable[..., Array]:
    """``embed(trainable, frozen, ids, mask, key) -> [N, D]`` unit-norm float32 embeddings."""
    project = lora_project(cfg.lora, train=train) if cfg.lora is not None else default_project

    def embed_fn(trainable: PyTree, frozen: PyTree, ids: Array, mask: Array, key: Array) -> Array:
        params = {**frozen, **trainable}
        if cfg.lora is not None and train and cfg.lora.dropout > 0:
            params = with_dropout_keys(params, key, cfg.model.num_layers)
        ids = constrain(ids, (BATCH, "activation_length"), cfg.mesh, cfg.rules)
        mask = constrain(mask, (BATCH, "activation_length"), cfg.mesh, cfg.rules)
        dropout_key = key if train and cfg.dropout else None
        return embed(cfg.model, params, ids, mask, pooling=cfg.pooling, normalize=True,
                     mesh=cfg.mesh, rules=cfg.rules, project=project, dropout_key=dropout_key)

    return embed_fn


def compute_loss(
    cfg: StepConfig, q: Array, p: Array, rq: Array | None, step: Array, group_size: int,
    passage_keys: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The configured loss on embeddings; RI weights switch on after ``ri_warmup_steps``."""
    keys = passage_keys if cfg.mask_duplicate_positives else None
    if cfg.loss == "infonce":
        return losses.infonce_loss(q, p, group_size=group_size, temperature=cfg.temperature,
                                   passage_keys=keys)
    if cfg.loss == "qwen3_masked":
        return losses.qwen3_masked_infonce_loss(q, p, group_size=group_size,
                                                temperature=cfg.temperature,
                                                margin=cfg.qwen3_margin, passage_keys=keys)
    if rq is None:
        raise ValueError("ri_infonce needs reasoning queries in the batch")
    return losses.ri_infonce_loss(q, p, rq, group_size=group_size, temperature=cfg.temperature,
                                  kappa=cfg.kappa, use_weights=step >= cfg.ri_warmup_steps,
                                  passage_keys=keys)


def _keys(rng: Array, step: Array) -> tuple[Array, Array, Array]:
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    kq, kp, kr = jax.random.split(key, 3)
    return tuple(jax.random.key_data(k) for k in (kq, kp, kr))


def _group_size(batch: Mapping[str, Array]) -> int:
    return batch["passage_input_ids"].shape[0] // batch["query_input_ids"].shape[0]


def plain_loss_and_grads(
    cfg: StepConfig, trainable: PyTree, frozen: PyTree, batch: Mapping[str, Array], step: Array,
    rng: Array,
) -> tuple[Array, dict[str, Array], PyTree]:
    """Loss and gradients with every activation of the batch kept for the backward pass."""
    embed = make_embed_fn(cfg, train=True)
    embed_reasoning = make_embed_fn(cfg, train=cfg.reasoning_dropout)
    kq, kp, kr = _keys(rng, step)
    group = _group_size(batch)
    rq = None
    if cfg.uses_reasoning:
        # The reasoning queries only weight the loss: no gradient (dropout: reasoning_dropout).
        rq = jax.lax.stop_gradient(embed_reasoning(trainable, frozen, batch["reasoning_input_ids"],
                                                   batch["reasoning_attention_mask"], kr))

    def loss_fn(tr: PyTree) -> tuple[Array, tuple[dict[str, Array], Array, Array]]:
        q = embed(tr, frozen, batch["query_input_ids"], batch["query_attention_mask"], kq)
        p = embed(tr, frozen, batch["passage_input_ids"], batch["passage_attention_mask"], kp)
        loss, aux = compute_loss(cfg, q, p, rq, step, group, keys)
        return loss, (aux, q, p)

    keys = batch.get("passage_key")
    (loss, (aux, q, p)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    aux = dict(aux, accuracy=losses.in_batch_accuracy(q, p, group_size=group, passage_keys=keys))
    return loss, aux, grads


def _to_chunks(x: Array, num_chunks: int, shards: int) -> Array:
    """``[N, ...] -> [C, N/C, ...]`` where chunk c holds the c-th slice of *every* data shard,
    so each chunk stays spread over all devices (no cross-device movement)."""
    n = x.shape[0]
    per = n // (shards * num_chunks)
    y = x.reshape(shards, num_chunks, per, *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(num_chunks, shards * per, *x.shape[1:])


def _from_chunks(y: Array, shards: int) -> Array:
    """Inverse of ``_to_chunks``."""
    c, rows = y.shape[:2]
    z = y.reshape(c, shards, rows // shards, *y.shape[2:])
    return jnp.swapaxes(z, 0, 1).reshape(c * rows, *y.shape[2:])


def _num_chunks(cfg: StepConfig, rows: int) -> int:
    shards = cfg.data_parallel
    if rows % shards:
        raise ValueError(f"{rows} rows do not split over {shards} data-parallel shards")
    per_shard = rows // shards
    chunk = min(cfg.chunk_rows_per_device, per_shard)
    if per_shard % chunk:
        raise ValueError(f"GradCache chunk of {chunk} rows does not divide the {per_shard} rows "
                         "per device; choose train.grad_cache_chunk accordingly")
    return per_shard // chunk


def grad_cache_loss_and_grads(
    cfg: StepConfig, trainable: PyTree, frozen: PyTree, batch: Mapping[str, Array], step: Array,
    rng: Array,
) -> tuple[Array, dict[str, Array], PyTree]:
    """GradCache: the loss gradient of a batch too large for one pass.

    1. embed every chunk without keeping activations; 2. take the loss gradient with respect
    to the embeddings (the full global-batch softmax); 3. re-run each chunk with its embedding
    gradient as the cotangent and sum the parameter gradients. Without dropout the result equals
    the plain step's. With dropout each chunk draws its masks from its own key, reused in both
    passes, so the gradient is exact for those masks (which differ from the plain step's: it
    draws one set per role, not per chunk).
    """
    embed = make_embed_fn(cfg, train=True)
    embed_reasoning = make_embed_fn(cfg, train=cfg.reasoning_dropout)
    shards = cfg.data_parallel
    kq, kp, kr = _keys(rng, step)
    group = _group_size(batch)

    def chunked(role: str) -> tuple[Array, Array, Array]:
        ids, mask = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
        n = _num_chunks(cfg, ids.shape[0])
        keys = jax.random.key_data(jax.random.split(
            jax.random.wrap_key_data({"query": kq, "passage": kp, "reasoning": kr}[role]), n))
        return _to_chunks(ids, n, shards), _to_chunks(mask, n, shards), keys

    def embed_all(role: str, fn: Callable) -> Array:
        ids, mask, keys = chunked(role)
        out = jax.lax.map(lambda xs: fn(trainable, frozen, *xs), (ids, mask, keys))
        return jax.lax.stop_gradient(_from_chunks(out, shards))

    q = embed_all("query", embed)
    p = embed_all("passage", embed)
    rq = embed_all("reasoning", embed_reasoning) if cfg.uses_reasoning else None

    keys = batch.get("passage_key")

    def loss_fn(q: Array, p: Array) -> tuple[Array, dict[str, Array]]:
        return compute_loss(cfg, q, p, rq, step, group, keys)

    (loss, aux), (dq, dp) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(q, p)

    def backprop(role: str, cotangent: Array, grads: PyTree) -> PyTree:
        ids, mask, keys = chunked(role)
        cots = _to_chunks(cotangent, ids.shape[0], shards)

        def body(acc: PyTree, xs: tuple[Array, ...]) -> tuple[PyTree, None]:
            c_ids, c_mask, c_key, c_cot = xs
            _, vjp = jax.vjp(lambda tr: embed(tr, frozen, c_ids, c_mask, c_key), trainable)
            (g,) = vjp(c_cot)
            return jax.tree.map(jnp.add, acc, g), None

        grads, _ = jax.lax.scan(body, grads, (ids, mask, keys, cots))
        return grads

    grads = jax.tree.map(jnp.zeros_like, trainable)
    grads = backprop("query", dq, grads)
    grads = backprop("passage", dp, grads)
    aux = dict(aux, accuracy=losses.in_batch_accuracy(q, p, group_size=group, passage_keys=keys))
    return loss, aux, grads


def make_optimizer(
    learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9,
    b2: float = 0.999, eps: float = 1e-8, clip_norm: float | None = 1.0,
    reference_world_size: int = 1,
) -> optax.GradientTransformation:
    """AdamW (decay only on matrices, not norms or biases) after global-norm clipping.

    ``reference_world_size`` W reproduces a PyTorch run whose optimizer saw ``1/W`` of our
    gradient: FlagEmbedding gathers embeddings from all W ranks into one global-batch loss but
    back-propagates only through each rank's own embeddings, and DDP then *averages* the W
    gradients, so each parameter gets ``(1/W) * d(global mean loss)``. Its ``clip_norm`` and
    Adam ``eps`` therefore act at ``W * clip_norm`` and ``W * eps`` on our global-mean gradient
    (Adam is otherwise invariant to the gradient scale; decoupled weight decay does not see it).
    """
    if reference_world_size < 1:
        raise ValueError(f"reference_world_size must be >= 1, got {reference_world_size}")
    w = float(reference_world_size)
    def decay_mask(params: PyTree) -> PyTree:
        return jax.tree.map(lambda x: x.ndim >= 3 or (x.ndim == 2 and x.shape[0] > 1), params)

    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm * w))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps * w, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def make_schedule(
    peak: float, total_steps: int, *, warmup_ratio: float = 0.1, decay: str = "linear",
    end_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up over ``warmup_ratio * total_steps`` to ``peak``, then linear or cosine
    decay to ``end_ratio * peak`` at ``total_steps``."""
    warmup = int(round(warmup_ratio * total_steps))
    rest = max(total_steps - warmup, 1)
    if decay == "linear":
        after = optax.linear_schedule(peak, peak * end_ratio, rest)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_ratio)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown decay '{decay}'; choose linear, cosine or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


SCHEDULES = ("warmup_decay", "deepspeed")


def deepspeed_warmup_decay_schedule(
    peak: float, total_steps: int, *, warmup_ratio: float = 0.1, warmup_type: str = "log",
) -> optax.Schedule:
    """DeepSpeed's ``WarmupDecayLR`` as the HF Trainer fills FlagEmbedding's ``ds_stage1.json``
    (``warmup_min_lr`` 0, ``warmup_max_lr`` = lr, ``warmup_num_steps`` = ceil(ratio * total),
    ``total_num_steps`` = total), in optax's terms (``count`` = updates already applied).

    DeepSpeed sets the lr once at construction (iteration -1: ``warmup_min_lr``) and steps the
    scheduler *after* each update, so update ``count`` uses iteration ``i = count - 1``:
    ``gamma(i) = log(i + 1) / log(W)`` (``warmup_type='log'``, DeepSpeed's default) or ``i / W``
    for ``i < W``, then ``max(0, (total - i) / max(1, total - W))``, with ``W = max(2, warmup)``.
    The first two updates of a log warm-up therefore run at lr 0.
    """
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"optim.warmup_type must be 'log' or 'linear', got '{warmup_type}'")
    warmup = max(2, max(1, math.ceil(warmup_ratio * total_steps)))
    inv_log = 1.0 / math.log(warmup)
    decay_span = float(max(1, total_steps - warmup))

    def schedule(count: Array) -> Array:
        i = jnp.asarray(count, jnp.float32) - 1.0
        if warmup_type == "log":
            rising = inv_log * jnp.log(jnp.maximum(i + 1.0, 1.0))
        else:
            rising = i / warmup
        falling = jnp.maximum(0.0, (total_steps - i) / decay_span)
        gamma = jnp.where(i < 0, 0.0, jnp.where(i < warmup, rising, falling))
        return peak * gamma

    return schedule


def all_finite(tree: PyTree) -> Array:
    """True when every floating-point leaf of ``tree`` is finite (a traced boolean)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    cfg: StepConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[PyTree, PyTree, Mapping[str, Array]], tuple[PyTree, dict[str, Array]]]:
    """``train_step(state, frozen, batch) -> (state, metrics)``; a non-finite loss, gradient,
    new parameter or optimizer state leaves parameters and optimizer state untouched and reports
    ``skipped = 1``."""
    grads_fn = grad_cache_loss_and_grads if cfg.grad_cache else plain_loss_and_grads

    def train_step(state: PyTree, frozen: PyTree, batch: Mapping[str, Array]) -> tuple[PyTree, dict]:
        step = state["step"]
        loss, aux, grads = grads_fn(cfg, state["params"], frozen, batch, step, state["rng"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # A finite loss and gradient can still give a non-finite update (a NaN learning rate,
        # an overflow in the optimizer): never apply, save or export such a state.
        finite = finite & all_finite(new_params) & all_finite(new_opt)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {
            "step": step + 1,
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "rng": state["rng"],
        }
        w = aux["weights"]
        metrics = {
            "loss": loss,
            "accuracy": aux["accuracy"],
            "grad_norm": grad_norm,
            "learning_rate": schedule(step),
            "skipped": 1 - finite.astype(jnp.int32),
            "weight_max": jnp.max(w) * w.shape[0],
            "weight_min": jnp.min(w) * w.shape[0],
        }
        if "reasoning_intensity" in aux:
            metrics["ri_mean"] = jnp.mean(aux["reasoning_intensity"])
            metrics["reasoning_loss"] = jnp.mean(aux["reasoning_loss"])
        if "ri_uniform" in aux:  # 1: every query solved, RI weights fell back to uniform
            metrics["ri_uniform"] = aux["ri_uniform"]
        return new_state, metrics

    return train_step
