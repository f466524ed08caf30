"""Logical axis names and the rules table that maps them onto the (data, fsdp, tensor) mesh.

Model code names axes only; the rules (``config.mesh.rules``, default ``DEFAULT_RULES``) decide
the parallelism. Sharding parameters over every device (FSDP) instead of replicating them is a
change of rules (``FSDP_RULES``), not of model code. A logical name missing from the rules is an
error, never a silent replication.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
# The logical axis of example rows (training batches, texts to encode): data parallelism.
BATCH = "activation_batch"

# (logical axis, mesh axis or tuple of mesh axes or None). Every logical name the model, LoRA
# and the batches use must be listed.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    (BATCH, (DATA, FSDP)),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("positions", None),  # BERT's position table
    ("token_types", None),  # BERT's token-type table
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)
# ZeRO-3 style: parameters (and so gradients and optimizer moments) sharded over every device
# the batch is split over, gathered layer by layer in the forward and backward passes.
FSDP_RULES = tuple((name, (DATA, FSDP) if name == "embed" else target)
                   for name, target in DEFAULT_RULES)
RULE_SETS = {"default": DEFAULT_RULES, "fsdp": FSDP_RULES}

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def check_rules(rules: Rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """``rules`` as a tuple of (logical name, mesh target) pairs; raises ``ValueError`` on a
    malformed entry, a repeated logical name or a target that is not a mesh axis."""
    out, seen = [], set()
    for entry in rules:
        if not isinstance(entry, list | tuple) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"an axis rule must be (logical name, mesh axes), got {entry!r}")
        name, target = entry
        if name in seen:
            raise ValueError(f"axis rule '{name}' is given twice")
        seen.add(name)
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(f"axis rule '{name}' maps to {bad}; mesh axes are {MESH_AXES}")
        out.append((name, target if target is None or isinstance(target, str) else tuple(target)))
    return tuple(out)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh with GSPMD (Auto) axes; one size may be -1 (the remainder).
    With every size explicit and fewer devices asked for than exist, the first ones are used."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by fsdp*tensor*data={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in (data, fsdp, tensor) and int(np.prod(sizes)) < len(devices):
        devices = devices[: int(np.prod(sizes))]  # an explicit smaller mesh uses the first devices
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} "
            f"devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for ``logical_axes``; a mesh axis is used at most once per array, and axes of
    size 1 in ``mesh`` are dropped."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is not None and name not in table:
            raise ValueError(f"logical axis '{name}' has no sharding rule (known: "
                             f"{sorted(table)}); add it to config.mesh.rules")
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(
            t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1)
        )
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
    rules: Rules = DEFAULT_RULES,
) -> NamedSharding:
    """NamedSharding for an array with these logical axes. With ``shape`` given, a dimension that
    its mesh axes do not divide is replicated instead (e.g. 8 kv heads on a 16-way tensor axis)."""
    spec = logical_to_spec(logical_axes, rules, mesh)
    if shape is not None:
        parts = []
        for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
            names = () if part is None else (part,) if isinstance(part, str) else part
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            parts.append(part if dim % size == 0 else None)
        spec = PartitionSpec(*parts)
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 1) -> NamedSharding:
    """Rows of a batch (first axis) split by the ``activation_batch`` rule; other axes whole."""
    return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1), rules, mesh))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways batch rows are split (the product of the ``activation_batch`` mesh axes)."""
    part = logical_to_spec((BATCH,), rules, mesh)[0]
    names = () if part is None else (part,) if isinstance(part, str) else part
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
    rules: Rules = DEFAULT_RULES,
) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape, rules))
