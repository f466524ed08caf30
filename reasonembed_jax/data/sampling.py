"""Pure, seeded functions that decide which records and passages make up each training step.

Nothing here keeps state: the batch of step ``n`` is a function of (seed, n) and the record counts,
so every host computes the same schedule and resuming needs only the step number.

Randomness comes from ``numpy.random.default_rng(SeedSequence(key))`` with integer keys; PCG64
streams are identical on every platform and numpy version that keeps ``default_rng``'s contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Distinct stream tags so the record order, the domain order and the passage draws never share
# a random stream even when their other key parts coincide.
_TAG_RECORD_ORDER = 1
_TAG_STEP_ORDER = 2
_TAG_PASSAGES = 3


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def sample_passages(
    num_pos: int,
    num_neg: int,
    group_size: int,
    *,
    seed: int,
    epoch: int,
    record_key: int,
) -> tuple[int, np.ndarray]:
    """Draws one positive and ``group_size - 1`` negatives for one record at one epoch.

    Returns ``(pos_index, neg_indices)``. The positive is uniform over ``range(num_pos)``. The
    negatives are drawn without replacement when ``num_neg >= group_size - 1``; otherwise every
    negative is taken ``floor((G-1)/num_neg)`` times plus ``(G-1) mod num_neg`` distinct ones once
    more, in a random order: each appears ``floor`` or ``ceil((G-1)/num_neg)`` times (replacement
    only as far as needed).
    """
    if num_pos < 1 or num_neg < 1:
        raise ValueError(f"need >= 1 positive and negative, got {num_pos} and {num_neg}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rng = _rng(seed, _TAG_PASSAGES, epoch, record_key)
    pos_index = int(rng.integers(num_pos))
    wanted = group_size - 1
    if wanted == 0:
        return pos_index, np.zeros((0,), dtype=np.int64)
    if num_neg >= wanted:
        return pos_index, rng.choice(num_neg, size=wanted, replace=False).astype(np.int64)
    full, rest = divmod(wanted, num_neg)
    neg = np.concatenate([
        np.tile(np.arange(num_neg, dtype=np.int64), full),
        rng.choice(num_neg, size=rest, replace=False).astype(np.int64),
    ])
    rng.shuffle(neg)
    return pos_index, neg


def steps_per_epoch(domain_sizes: Sequence[int], global_batch_sizes: Sequence[int]) -> int:
    """``sum_d floor(N_d / B_d)``: full batches per epoch (a domain's remainder waits a turn)."""
    return int(sum(n // b for n, b in zip(domain_sizes, global_batch_sizes, strict=True)))


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Where each step of one epoch draws its records from.

    ``step_domain[k]`` is the domain of step ``k`` of the epoch and ``step_batch[k]`` which of that
    domain's batches it is; batch ``j`` of domain ``d`` holds the records at positions
    ``record_order[d][j*B_d:(j+1)*B_d]`` of that domain.
    """

    step_domain: np.ndarray
    step_batch: np.ndarray
    record_order: tuple[np.ndarray, ...]
    global_batch_sizes: tuple[int, ...]

    def positions(self, step_in_epoch: int) -> tuple[int, np.ndarray]:
        """``(domain, record positions within that domain)`` of one step's global batch."""
        d = int(self.step_domain[step_in_epoch])
        j = int(self.step_batch[step_in_epoch])
        size = self.global_batch_sizes[d]
        return d, self.record_order[d][j * size:(j + 1) * size]


def epoch_plan(
    seed: int, epoch: int, domain_sizes: Sequence[int], global_batch_sizes: Sequence[int]
) -> EpochPlan:
    """The seeded schedule of one epoch.

    Each domain's records are permuted (stream ``(seed, epoch, d)``) and cut into
    ``floor(N_d / B_d)`` full batches; the batches of all domains are then put in one seeded random
    order (stream ``(seed, epoch)``), so domains interleave in proportion to their batch counts.
    """
    if len(domain_sizes) != len(global_batch_sizes):
        raise ValueError("domain_sizes and global_batch_sizes differ in length")
    orders, step_domain, step_batch = [], [], []
    for d, (n, b) in enumerate(zip(domain_sizes, global_batch_sizes, strict=True)):
        orders.append(_rng(seed, _TAG_RECORD_ORDER, epoch, d).permutation(int(n)))
        count = int(n) // int(b)
        step_domain.append(np.full((count,), d, dtype=np.int32))
        step_batch.append(np.arange(count, dtype=np.int32))
    domains = np.concatenate(step_domain) if step_domain else np.zeros((0,), np.int32)
    batches = np.concatenate(step_batch) if step_batch else np.zeros((0,), np.int32)
    order = _rng(seed, _TAG_STEP_ORDER, epoch).permutation(len(domains))
    return EpochPlan(
        step_domain=domains[order],
        step_batch=batches[order],
        record_order=tuple(orders),
        global_batch_sizes=tuple(int(b) for b in global_batch_sizes),
    )


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows ``[p*B/P, (p+1)*B/P)`` of a global batch that host ``p`` of ``P`` owns."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the process count {process_count}"
        )
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)
