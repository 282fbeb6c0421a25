"""Packing placement primitives: best-fit placement of examples into micro-batches, fullest-subset
filling of the bins, and the budget cut.

best_fit_pack and cut_to_budget have two backends that give identical output: pure Python/NumPy, and
the optional C++17 extension `adapt_fast._native_packer` (csrc/packer.cpp, built by setup.py through
CMake when a compiler is present). backend="auto" takes the native one when it imported. The subset
search (fullest_subset, place_pool) is Python only: its work is bitset shifts on Python ints.

best_fit_pack: items are taken in the order (priority first, then length descending, then index
ascending); each goes into the bin with the smallest remaining capacity that still holds it,
ties to the lowest bin index; an item that fits nowhere gets -1. Remaining capacities only
shrink, so an unplaced item fits no bin at the end either.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, insort
from functools import reduce
from math import gcd

import numpy as np

try:
    from adapt_fast import _native_packer as _native

    NATIVE_AVAILABLE: bool = True
except ImportError:  # not built (no cmake / compiler at install time): the Python backend is used
    _native = None
    NATIVE_AVAILABLE = False

BACKENDS = ("auto", "native", "python")


def _use_native(backend: str) -> bool:
    if backend == "python":
        return False
    if backend == "auto":
        return NATIVE_AVAILABLE
    if backend == "native":
        if not NATIVE_AVAILABLE:
            raise ValueError("backend='native': adapt_fast._native_packer is not built (needs cmake + a C++ compiler)")
        return True
    raise ValueError(f"unknown packing backend {backend!r}; expected one of {BACKENDS}")


def _as_int64_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def best_fit_pack(
    lengths: np.ndarray,
    bin_capacities: np.ndarray,
    priority: np.ndarray | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Place items into bins by best fit. Returns (n,) int64: each item's bin index, or -1 if unplaced.

    lengths (n,) ints > 0; bin_capacities (W,) ints >= 0; priority (n,) bool or None (all False).
    """
    lengths = _as_int64_1d(lengths, "lengths")
    caps = _as_int64_1d(bin_capacities, "bin_capacities")
    if lengths.size and lengths.min() <= 0:
        raise ValueError("lengths must all be > 0")
    if caps.size and caps.min() < 0:
        raise ValueError("bin_capacities must all be >= 0")
    if priority is None:
        prio = np.zeros(lengths.shape[0], dtype=np.bool_)
    else:
        prio = np.asarray(priority)
        if prio.shape != lengths.shape:
            raise ValueError(f"priority must have shape {lengths.shape}, got {prio.shape}")
        if prio.size and prio.dtype != np.bool_:
            raise ValueError(f"priority must be bool, got dtype {prio.dtype}")
        prio = np.ascontiguousarray(prio, dtype=np.bool_)
    if _use_native(backend):
        return _native.best_fit_pack(lengths, caps, prio)
    return _best_fit_pack_py(lengths, caps, prio)


def _best_fit_pack_py(lengths: np.ndarray, caps: np.ndarray, prio: np.ndarray) -> np.ndarray:
    n, W = lengths.shape[0], caps.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or W == 0:
        return out
    # Stable order: priority first, then length descending (lexsort is stable: ties keep index order).
    order = np.lexsort((-lengths, ~prio))
    sorted_len = lengths[order]
    # suffix_min[i]: the shortest item from position i on; once no bin holds it, nothing more fits.
    suffix_min = np.minimum.accumulate(sorted_len[::-1])[::-1].tolist()
    # Each bin is one int key = remaining * W + bin, kept sorted: the first key >= L * W is the bin
    # with the smallest remaining >= L, lowest index among equals.
    keys = sorted(int(c) * W + b for b, c in enumerate(caps.tolist()))
    placed = [-1] * n
    for i, L in enumerate(sorted_len.tolist()):
        LW = L * W
        pos = bisect_left(keys, LW)
        if pos == W:  # fits nowhere
            if i + 1 < n and keys[-1] < suffix_min[i + 1] * W:
                break  # no later item fits either
            continue
        key = keys.pop(pos)
        placed[i] = key % W
        insort(keys, key - LW)
    out[order] = placed
    return out


def fullest_subset(sizes: np.ndarray, room: int, max_search: int = 256) -> np.ndarray:
    """A subset of `sizes` (n,) ints that fills `room` slots as full as it can, earlier items preferred.
    Returns a (n,) bool mask.

    The items that fit are taken in order while they leave at least twice the largest of them free;
    the rest of the room is then filled by an exact subset sum (one bitset per prefix, Python ints)
    over the next `max_search` items that fit, stopping as soon as it reaches the fullest sum the
    items' gcd allows. Among the fullest subsets the search takes the one whose last item comes
    earliest. So the result is the fullest subset when room <= 2 x the largest size that fits and at
    most `max_search` items fit; otherwise the prefix can cost an exact fill that another choice of
    items would have made (rarely, with many items to choose from).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros(sizes.shape[0], dtype=bool)
    fits = np.flatnonzero((sizes > 0) & (sizes <= room))
    if fits.size == 0:
        return take
    window = 2 * int(sizes[fits].max())
    prefix = int(np.searchsorted(np.cumsum(sizes[fits]), room - window, side="right"))
    take[fits[:prefix]] = True
    left = room - int(sizes[fits[:prefix]].sum())
    rest = fits[prefix:]
    rest = rest[sizes[rest] <= left][:max_search]
    if rest.size == 0:
        return take
    candidates = sizes[rest].tolist()
    target = left - left % reduce(gcd, candidates)  # no subset sums past the last multiple of the gcd
    goal, mask = 1 << target, (1 << (left + 1)) - 1
    reachable = [1]  # reachable[i]: bit s set iff some subset of candidates[:i] sums to s
    bits = 1
    for size in candidates:
        bits = (bits | (bits << size)) & mask
        reachable.append(bits)
        if bits & goal:
            break
    total = bits.bit_length() - 1
    for i in range(len(reachable) - 2, -1, -1):
        if not (reachable[i] >> total) & 1:  # not reachable without candidate i: take it
            take[rest[i]] = True
            total -= candidates[i]
    return take


def place_pool(lengths: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Fill bins in turn, each with the fullest subset (fullest_subset) of the items not yet placed.
    Returns (n,) int64: each item's bin, or -1.

    lengths (n,) > 0, in preference order (earlier items preferred); capacities (W,) free slots per bin.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    placement = np.full(lengths.shape[0], -1, dtype=np.int64)
    free = np.arange(lengths.shape[0])
    for b, room in enumerate(np.asarray(capacities, dtype=np.int64).tolist()):
        if room <= 0 or free.size == 0:
            continue
        take = fullest_subset(lengths[free], room)
        placement[free[take]] = b
        free = free[~take]
    return placement


def cut_to_budget(counts: np.ndarray, remaining: int, backend: str = "auto") -> tuple[int, int]:
    """Cut a plan of items to a budget. Returns (n_keep, last_take).

    counts (n,) ints >= 0: the budget units item i would spend, in plan order. Keep items [0, n_keep),
    the last kept one spending only last_take (<= its count), so the kept total is exactly
    min(remaining, counts.sum()). If everything fits: (n, counts[-1]); otherwise n_keep stops at the
    item that reaches `remaining` (zero-count items after it are dropped). remaining == 0 or n == 0
    gives (0, 0).
    """
    counts = _as_int64_1d(counts, "counts")
    remaining = operator.index(remaining)
    if counts.size and counts.min() < 0:
        raise ValueError("counts must all be >= 0")
    if remaining < 0:
        raise ValueError(f"remaining must be >= 0, got {remaining}")
    if _use_native(backend):
        n_keep, last_take = _native.cut_to_budget(counts, remaining)
        return int(n_keep), int(last_take)
    n = counts.shape[0]
    if n == 0 or remaining == 0:
        return 0, 0
    cum = np.cumsum(counts)
    if cum[-1] <= remaining:
        return n, int(counts[-1])
    k = int(np.searchsorted(cum, remaining, side="left"))  # first item whose running total reaches it
    return k + 1, int(remaining - (cum[k] - counts[k]))
