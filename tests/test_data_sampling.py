"""Seeded sampling and scheduling: checked against counts and set arithmetic done here in numpy."""

import numpy as np
import pytest

from reasonembed_jax.data.sampling import (
    epoch_plan,
    host_slice,
    sample_passages,
    steps_per_epoch,
)


def test_negatives_without_replacement_when_enough():
    for key in range(50):
        pos, neg = sample_passages(3, 20, 8, seed=1, epoch=0, record_key=key)
        assert 0 <= pos < 3
        assert neg.shape == (7,)
        assert len(set(neg.tolist())) == 7
        assert neg.min() >= 0 and neg.max() < 20


def test_negatives_with_replacement_only_as_far_as_needed():
    # 3 negatives, 10 wanted: each negative must appear floor(10/3)=3 or ceil(10/3)=4 times.
    for key in range(50):
        _, neg = sample_passages(1, 3, 11, seed=0, epoch=2, record_key=key)
        counts = np.bincount(neg, minlength=3)
        assert counts.sum() == 10
        assert set(counts.tolist()) <= {3, 4}


def test_exactly_enough_negatives_uses_each_once():
    _, neg = sample_passages(1, 5, 6, seed=0, epoch=0, record_key=0)
    assert sorted(neg.tolist()) == [0, 1, 2, 3, 4]


def test_group_size_one_has_no_negatives():
    _, neg = sample_passages(2, 4, 1, seed=0, epoch=0, record_key=9)
    assert neg.shape == (0,)


def test_sampling_is_a_pure_function_of_seed_epoch_record():
    a = [sample_passages(4, 30, 16, seed=7, epoch=1, record_key=k) for k in range(20)]
    b = [sample_passages(4, 30, 16, seed=7, epoch=1, record_key=k) for k in range(20)]
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    other_epoch = [sample_passages(4, 30, 16, seed=7, epoch=2, record_key=k) for k in range(20)]
    other_seed = [sample_passages(4, 30, 16, seed=8, epoch=1, record_key=k) for k in range(20)]
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, other_epoch, strict=True))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, other_seed, strict=True))


def test_positive_and_negatives_roughly_uniform():
    pos_counts = np.zeros(4)
    neg_counts = np.zeros(10)
    for key in range(4000):
        pos, neg = sample_passages(4, 10, 3, seed=3, epoch=0, record_key=key)
        pos_counts[pos] += 1
        neg_counts[neg] += 1
    # Expected 1000 per positive and 800 per negative; 6 sigma bounds.
    assert np.all(np.abs(pos_counts - 1000) < 6 * np.sqrt(1000 * 0.75))
    assert np.all(np.abs(neg_counts - 800) < 6 * np.sqrt(800))


def test_invalid_sampling_arguments():
    with pytest.raises(ValueError):
        sample_passages(0, 3, 2, seed=0, epoch=0, record_key=0)
    with pytest.raises(ValueError):
        sample_passages(1, 3, 0, seed=0, epoch=0, record_key=0)


def test_epoch_plan_covers_full_batches_once():
    sizes, batches = [13, 40, 7], [4, 8, 2]
    plan = epoch_plan(5, 0, sizes, batches)
    expected_steps = 13 // 4 + 40 // 8 + 7 // 2
    assert steps_per_epoch(sizes, batches) == expected_steps == len(plan.step_domain)
    seen = {d: [] for d in range(3)}
    for k in range(expected_steps):
        d, positions = plan.positions(k)
        assert len(positions) == batches[d]
        seen[d].extend(positions.tolist())
    for d in range(3):
        # Every record at most once per epoch, all full batches used.
        assert len(seen[d]) == len(set(seen[d])) == (sizes[d] // batches[d]) * batches[d]
        assert set(seen[d]) <= set(range(sizes[d]))
    counts = np.bincount(plan.step_domain, minlength=3)
    assert counts.tolist() == [13 // 4, 40 // 8, 7 // 2]


def test_epoch_plan_is_seeded_and_changes_per_epoch():
    sizes, batches = [50, 60], [5, 6]
    a, b = epoch_plan(1, 3, sizes, batches), epoch_plan(1, 3, sizes, batches)
    assert np.array_equal(a.step_domain, b.step_domain)
    assert all(np.array_equal(x, y) for x, y in zip(a.record_order, b.record_order, strict=True))
    c = epoch_plan(1, 4, sizes, batches)
    assert not np.array_equal(a.record_order[0], c.record_order[0])
    # Domains are interleaved, not run one after the other.
    assert len(np.flatnonzero(np.diff(a.step_domain))) > 2


def test_host_slices_partition_the_global_batch():
    rows = np.arange(24)
    parts = [rows[host_slice(24, p, 3)] for p in range(3)]
    assert np.array_equal(np.concatenate(parts), rows)
    with pytest.raises(ValueError):
        host_slice(10, 0, 3)
    with pytest.raises(ValueError):
        host_slice(12, 3, 3)
