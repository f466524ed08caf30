"""Logical axis names and the rules table that maps them onto the (data, fsdp, tensor) mesh.

Model code names axes only; this table decides the parallelism. Switching FSDP against tensor
parallelism is a change of ``rules``, not of model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or tuple of mesh axes or None). First match wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


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


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
    rules: Rules = DEFAULT_RULES,
) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape, rules))
