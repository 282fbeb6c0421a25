"""Packing primitives: the Python and native backends agree, and both do exactly what the contract says."""

from __future__ import annotations

import numpy as np
import pytest

from adapt_fast.data import pack
from adapt_fast.data.pack import NATIVE_AVAILABLE, best_fit_pack, cut_to_budget, fullest_subset, place_pool

needs_native = pytest.mark.skipif(
    not NATIVE_AVAILABLE, reason="adapt_fast._native_packer not built (no cmake/C++ compiler at install time)"
)
BACKENDS = ["python", pytest.param("native", marks=needs_native)]


def reference_best_fit(lengths, caps, priority) -> np.ndarray:
    """The contract, written as plainly as possible (O(n W))."""
    n = len(lengths)
    prio = [False] * n if priority is None else [bool(p) for p in priority]
    remaining = [int(c) for c in caps]
    out = np.full(n, -1, dtype=np.int64)
    for i in sorted(range(n), key=lambda i: (not prio[i], -int(lengths[i]), i)):
        fits = [(r, b) for b, r in enumerate(remaining) if r >= lengths[i]]
        if fits:
            _, b = min(fits)
            remaining[b] -= int(lengths[i])
            out[i] = b
    return out


def random_case(rng: np.random.Generator, n: int, W: int):
    """Lengths with many ties, capacities from empty to roomy (with equal ones for tie-breaking)."""
    max_len = int(rng.choice([3, 20, 2048]))
    lengths = rng.integers(1, max_len + 1, size=n)
    fill = rng.choice([0.3, 0.9, 1.1, 3.0])
    mean_cap = max(1, int(fill * lengths.sum() / max(W, 1)))
    kind = rng.integers(3)
    if kind == 0:
        caps = np.full(W, mean_cap)
    elif kind == 1:
        caps = rng.integers(0, 2 * mean_cap + 1, size=W)
    else:
        caps = rng.choice([0, mean_cap // 2, mean_cap], size=W)
    p = rng.integers(3)
    priority = None if p == 0 else (rng.random(n) < 0.2) if p == 1 else np.ones(n, dtype=bool)
    return lengths.astype(np.int64), caps.astype(np.int64), priority


def cases(num: int):
    rng = np.random.default_rng(1234)
    for seed in range(num):
        n = int(rng.choice([0, 1, 2, 7, 50, 300, 2000]))
        W = int(rng.choice([0, 1, 2, 5, 16, 64]))
        yield seed, random_case(np.random.default_rng(seed), n, W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_fit_matches_reference(backend):
    for seed, (lengths, caps, priority) in cases(150):
        if len(lengths) > 300:
            continue  # the reference is O(n W) in Python
        got = best_fit_pack(lengths, caps, priority, backend=backend)
        np.testing.assert_array_equal(got, reference_best_fit(lengths, caps, priority), err_msg=f"seed {seed}")


@needs_native
def test_best_fit_native_equals_python():
    for seed, (lengths, caps, priority) in cases(400):
        a = best_fit_pack(lengths, caps, priority, backend="native")
        b = best_fit_pack(lengths, caps, priority, backend="python")
        assert a.dtype == b.dtype == np.int64
        np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")
    # the contract's size: ~100k items into 64 bins, with priority and huge lengths (comparison sort path)
    rng = np.random.default_rng(0)
    for max_len in (2048, 10**9):
        lengths = rng.integers(1, max_len, size=100_000)
        caps = rng.integers(0, 2 * int(lengths.sum()) // 64, size=64)
        priority = rng.random(100_000) < 0.1
        np.testing.assert_array_equal(
            best_fit_pack(lengths, caps, priority, backend="native"),
            best_fit_pack(lengths, caps, priority, backend="python"),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_fit_properties(backend):
    for seed, (lengths, caps, priority) in cases(300):
        n, W = len(lengths), len(caps)
        out = best_fit_pack(lengths, caps, priority, backend=backend)
        assert out.shape == (n,) and out.dtype == np.int64
        assert ((out >= -1) & (out < W)).all()
        placed = out >= 0
        load = np.bincount(out[placed], weights=lengths[placed], minlength=W) if W else np.zeros(0)
        assert (load <= caps).all(), f"seed {seed}: bin over capacity"
        # Remaining capacities only shrink, so an item that fit nowhere when its turn came fits nowhere at the end.
        left = caps - load
        if W and (~placed).any():
            assert lengths[~placed].min() > left.max(), f"seed {seed}: an unplaced item fits a bin"
        if W == 0:
            assert not placed.any()
        if priority is not None and priority.any():
            # Priority items are placed first: their placement ignores every other item.
            alone = best_fit_pack(lengths[priority], caps, None, backend=backend)
            np.testing.assert_array_equal(out[priority], alone, err_msg=f"seed {seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_fit_small_examples(backend):
    # order 2(len 5), 0(len 4), 1(len 3); bins remaining [6, 5, 5]: 5 -> bin 1 (tie, lowest), 4 -> bin 2, 3 -> bin 0
    assert best_fit_pack([4, 3, 5], [6, 5, 5], backend=backend).tolist() == [2, 0, 1]
    # priority wins over length: the short priority item takes the only bin first
    assert best_fit_pack([4, 3], [4], np.array([False, True]), backend=backend).tolist() == [-1, 0]
    assert best_fit_pack([1, 1], [0, 0], backend=backend).tolist() == [-1, -1]
    assert best_fit_pack(np.zeros(0, np.int64), [3], backend=backend).shape == (0,)
    assert best_fit_pack([2, 2], np.zeros(0, np.int64), backend=backend).tolist() == [-1, -1]
    assert best_fit_pack(np.array([2, 1], np.int32), [3], backend=backend).tolist() == [0, 0]  # any int dtype


def check_cut(counts: np.ndarray, remaining: int, n_keep: int, last_take: int) -> None:
    n, total = len(counts), int(counts.sum())
    if n == 0 or remaining == 0:
        assert (n_keep, last_take) == (0, 0)
        return
    if total <= remaining:
        assert (n_keep, last_take) == (n, counts[-1])
        return
    assert 1 <= n_keep <= n
    assert 0 < last_take <= counts[n_keep - 1]
    assert counts[: n_keep - 1].sum() + last_take == remaining  # exact
    assert counts[: n_keep - 1].sum() < remaining  # stops at the item that reaches the budget


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_to_budget_exact(backend):
    rng = np.random.default_rng(7)
    for _ in range(500):
        n = int(rng.choice([0, 1, 3, 20, 500]))
        counts = rng.integers(0, 50, size=n) * (rng.random(n) < 0.7)  # ~30% zeros
        total = int(counts.sum())
        for remaining in {0, 1, total, total + 1, total + 1000, int(rng.integers(0, total + 2)), max(total - 1, 0)}:
            n_keep, last_take = cut_to_budget(counts, remaining, backend=backend)
            assert isinstance(n_keep, int) and isinstance(last_take, int)
            check_cut(counts, remaining, n_keep, last_take)
            assert counts[: max(n_keep - 1, 0)].sum() + last_take == min(remaining, total) or n_keep == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_to_budget_examples(backend):
    assert cut_to_budget([3, 0, 2, 0], 5, backend=backend) == (4, 0)  # all fit: trailing zero kept
    assert cut_to_budget([3, 0, 2, 0, 1], 5, backend=backend) == (3, 2)  # zero after the cut dropped
    assert cut_to_budget([3, 0, 2], 4, backend=backend) == (3, 1)
    assert cut_to_budget([3, 0, 2], 3, backend=backend) == (1, 3)
    assert cut_to_budget([0, 0, 5], 2, backend=backend) == (3, 2)
    assert cut_to_budget([3, 2], 0, backend=backend) == (0, 0)
    assert cut_to_budget([0, 0], 0, backend=backend) == (0, 0)
    assert cut_to_budget([], 10, backend=backend) == (0, 0)
    assert cut_to_budget(np.array([4, 4]), np.int64(5), backend=backend) == (2, 1)


@needs_native
def test_cut_to_budget_native_equals_python():
    rng = np.random.default_rng(3)
    for _ in range(300):
        counts = rng.integers(0, 100, size=int(rng.integers(0, 1000))) * (rng.random() < 0.5)
        remaining = int(rng.integers(0, int(counts.sum()) + 10))
        assert cut_to_budget(counts, remaining, "native") == cut_to_budget(counts, remaining, "python")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    bad_pack = [
        ([3, -1], [5], None),  # negative length
        ([3, 0], [5], None),  # zero length
        ([3], [-1], None),  # negative capacity
        ([3, 2], [5], np.array([True])),  # priority shape
        ([3, 2], [5], np.array([1, 0])),  # priority not bool
        ([[3, 2]], [5], None),  # 2-D
        ([3.5], [5], None),  # not integers
    ]
    for lengths, caps, priority in bad_pack:
        with pytest.raises(ValueError):
            best_fit_pack(lengths, caps, priority, backend=backend)
    for counts, remaining in [([1, -2], 3), ([1, 2], -1), ([[1]], 1)]:
        with pytest.raises(ValueError):
            cut_to_budget(counts, remaining, backend=backend)


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="unknown packing backend"):
        best_fit_pack([1], [1], backend="gpu")
    monkeypatch.setattr(pack, "NATIVE_AVAILABLE", False)
    with pytest.raises(ValueError, match="not built"):
        best_fit_pack([1], [1], backend="native")
    with pytest.raises(ValueError, match="not built"):
        cut_to_budget([1], 1, backend="native")
    assert best_fit_pack([1], [1], backend="auto").tolist() == [0]  # falls back to Python


@needs_native
def test_native_module_validates_directly():
    from adapt_fast import _native_packer

    with pytest.raises(ValueError):
        _native_packer.best_fit_pack(np.array([1, -1]), np.array([3]), None)
    with pytest.raises(ValueError):
        _native_packer.cut_to_budget(np.array([1]), -1)
    assert _native_packer.best_fit_pack(np.array([2, 1]), np.array([1, 2]), None).tolist() == [1, 0]


def brute_force_fullest(sizes: list[int], room: int) -> tuple[int, int]:
    """(the largest subset sum <= room, the smallest last index among subsets reaching it; -1 for none)."""
    best, best_last = 0, -1
    for mask in range(1, 1 << len(sizes)):
        chosen = [i for i in range(len(sizes)) if mask >> i & 1]
        total = sum(sizes[i] for i in chosen)
        if total > room:
            continue
        if total > best or (total == best and chosen[-1] < best_last):
            best, best_last = total, chosen[-1]
    return best, best_last


def reference_fullest(sizes: list[int], room: int, max_search: int = 256) -> tuple[list[int], int, int, int]:
    """fullest_subset's contract, plainly: (the prefix taken, then the brute-force fullest sum and its smallest last
    index over the candidates after it, those candidates' positions in `sizes`)."""
    fits = [i for i, size in enumerate(sizes) if 0 < size <= room]
    if not fits:
        return [], 0, -1, []
    window, total, prefix = 2 * max(sizes[i] for i in fits), 0, []
    for i in fits:
        if total + sizes[i] > room - window:
            break
        total += sizes[i]
        prefix.append(i)
    rest = [i for i in fits[len(prefix) :] if sizes[i] <= room - total][:max_search]
    best, best_last = brute_force_fullest([sizes[i] for i in rest], room - total)
    return prefix, best, (rest[best_last] if best_last >= 0 else -1), rest


def test_fullest_subset_takes_a_prefix_then_the_fullest_rest_preferring_earlier_items():
    rng = np.random.default_rng()  # fresh cases every run
    for _ in range(400):
        n = int(rng.integers(0, 14))
        sizes = rng.integers(0, int(rng.choice([5, 40, 300])) + 1, size=n).tolist()  # zero sizes are never taken
        room = int(rng.integers(0, max(2, sum(sizes) + 2)))
        max_search = int(rng.choice([3, 256]))
        take = fullest_subset(np.array(sizes, dtype=np.int64), room, max_search)
        assert take.dtype == np.bool_ and take.shape == (n,)
        prefix, best, last, rest = reference_fullest(sizes, room, max_search)
        chosen = np.flatnonzero(take).tolist()
        assert chosen[: len(prefix)] == prefix, (sizes, room)
        tail = chosen[len(prefix) :]
        assert set(tail) <= set(rest), (sizes, room)
        assert sum(sizes[i] for i in tail) == best, (sizes, room)
        assert (tail[-1] if tail else -1) == last, (sizes, room)
        if sizes and room <= 2 * max([x for x in sizes if x <= room], default=0) and max_search >= n:
            assert sum(sizes[i] for i in chosen) == brute_force_fullest(sizes, room)[0]  # the fullest of all


def test_fullest_subset_fills_a_large_room_exactly():
    """A 65536-slot micro-batch from lognormal lengths (an exact fill exists; the prefix leaves the search a window),
    and all-even lengths against an odd room (none exists: the fullest is room - 1, where the gcd ends the search)."""
    rng = np.random.default_rng()
    sizes = np.clip(rng.lognormal(np.log(300), 1.0, 2000), 16, 4096).astype(np.int64)
    assert sizes[fullest_subset(sizes, 65536)].sum() == 65536
    even = 2 * rng.integers(500, 1500, size=5000)
    assert even[fullest_subset(even, 65535)].sum() == 65534


def test_place_pool_fills_each_bin_in_turn_with_the_fullest_subset_of_what_is_left():
    rng = np.random.default_rng()
    for _ in range(100):
        n, W = int(rng.integers(0, 11)), int(rng.integers(1, 4))
        lengths = rng.integers(1, 60, size=n).astype(np.int64)
        caps = rng.integers(-5, 120, size=W).astype(np.int64)
        placement = place_pool(lengths, caps)
        assert placement.shape == (n,) and placement.min(initial=0) >= -1 and placement.max(initial=-1) < W
        left = np.arange(n)
        for b in range(W):
            expected = left[fullest_subset(lengths[left], int(caps[b]))] if caps[b] > 0 else left[:0]
            assert np.array_equal(np.flatnonzero(placement == b), np.sort(expected))
            left = left[placement[left] != b]
        assert (placement[left] == -1).all()
