"""gpurec.order: the epoch's permutation, ranks, padding and (elastic) resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurec.order import Segment, batches_for, permutation, plan, rank_range, remaining


def test_permutation_is_seeded_per_epoch_and_file_order_without_shuffle() -> None:
    a, b = permutation(50, 1, 0, True), permutation(50, 1, 1, True)
    assert sorted(a.tolist()) == list(range(50)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, permutation(50, 1, 0, True))
    assert not np.array_equal(a, permutation(50, 2, 0, True))
    assert permutation(5, 1, 3, False).tolist() == [0, 1, 2, 3, 4]


def test_padding_repeats_the_last_record_and_counts_real_ones() -> None:
    kw = dict(seed=0, epoch=0, shuffle=False, batch_size=4)
    p = plan(10, num_shards=1, shard_id=0, last_batch="pad", **kw)
    assert p.indices.tolist() == [*range(10), 9, 9] and p.real == [4, 4, 2]
    d = plan(10, num_shards=1, shard_id=0, last_batch="drop", **kw)
    assert d.indices.tolist() == list(range(8)) and d.real == [4, 4]
    r1 = plan(10, num_shards=3, shard_id=1, last_batch="pad", **kw)  # rank 1 of 3: 3..5
    assert r1.indices.tolist() == [3, 4, 5, 5] and r1.real == [3]
    assert batches_for(10, 3, 4, "drop") == 0 and batches_for(10, 3, 2, "drop") == 1
    # reads: the positions that read a record (a bad one is counted there, not per copy)
    assert [p.reads(b) for b in range(3)] == [4, 4, 2] and r1.reads(0) == 3
    w = plan(10, num_shards=1, shard_id=0, last_batch="wrap", **kw)
    assert w.indices.tolist() == [*range(10), 0, 1] and w.real == [4, 4, 2]
    assert [w.reads(b) for b in range(3)] == [4, 4, 4]  # 0 and 1 are epoch 1's, read here


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 80),
    old=st.integers(1, 5),
    new=st.integers(1, 6),
    bs=st.integers(1, 7),
    done=st.integers(0, 12),
    last_batch=st.sampled_from(["pad", "partial", "drop"]),
)
def test_elastic_layouts_read_every_record_once(n, old, new, bs, done, last_batch) -> None:
    """Whatever the old and new layouts: what the old ranks read plus what the new ranks
    read is every record once (less what "drop" leaves out at the end)."""
    if n < old:
        return
    kw = dict(seed=5, epoch=2, shuffle=True)
    done = min(done, batches_for(n, old, bs, "pad"))
    seg = Segment(old, bs, done)
    first = []
    for k in range(old):
        lo, hi = rank_range(n, old, k)
        first += permutation(n, 5, 2, True)[lo:hi][: done * bs].tolist()
    rest = remaining(n, segments=(seg,), **kw)
    assert sorted(first + rest.tolist()) == list(range(n))
    new_bs = bs + 1
    plans = [plan(n, num_shards=new, shard_id=k, batch_size=new_bs, last_batch=last_batch,
                  segments=(seg,), **kw) for k in range(new)]  # fmt: skip
    assert len({p.batches for p in plans}) == 1
    got = [int(i) for p in plans for b in range(p.batches) for i in p.batch(b)[: p.real[b]]]
    assert len(got) == len(set(got)) and set(got) <= set(rest.tolist())
    if last_batch != "drop":
        assert sorted(got) == sorted(rest.tolist())
    else:
        assert len(rest) - len(got) < new * new_bs


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_ranks_are_contiguous_disjoint_slices(ranks) -> None:
    slices = [rank_range(22, ranks, k) for k in range(ranks)]
    assert slices[0][0] == 0 and slices[-1][1] == 22
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
