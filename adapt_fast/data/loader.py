"""The packed loader: micro-batches that follow the mixture p and spend the token budget exactly.

Every call plans one *global* micro-step of W micro-batches (one per data-parallel rank) and returns
this rank's. All ranks run the same deterministic plan, so they draw disjoint examples and know the
global counts without communicating. A global micro-step:

1. Capacity W·L token slots (L = tokens_per_micro_batch). The pool aims at (1 + lookahead)·W·L tokens
   plus SEARCH_SLACK average examples (at most 4·W·L), split among tasks by p with largest-remainder
   rounding plus each task's running deficit; examples left over from earlier steps count toward their
   task's part. A task draws while its part covers half of its next example, so many small shares do
   not each pull in a whole example every step.
2. Each task draws from its own stream: its examples shuffled without replacement, reshuffled every
   epoch (an example fed a second time is counted as reused). On meta steps (mixture updates) every task contributes
   at least `meta_floor_examples` examples, so every d_k can be measured - as long as the floors take
   at most `meta_floor_fraction` of the step's capacity (long examples, many tasks): then the tasks
   whose floor went unplaced longest go first (ties in a seeded order), the others wait for a later
   meta step (ADAPT leaves a task it did not measure alone; nothing is drawn for a floor that does not
   fit), and the rest of the step still follows p.
3. Placement: leftovers that waited MAX_WAIT steps (longest-waiting first), then the floors, both by
   best fit. When the examples that could still go in hold less than (1 + lookahead) times the room
   left (long leftovers beside the floors, or an empty pool), up to 4 rounds draw more by p. Then each
   of the W bins takes the subset of the rest that fills it fullest, longest-waiting examples preferred
   (pack.place_pool: a greedy prefix, then an exact subset sum over the last window). What is not
   placed rolls over.
4. The budget: when the step would spend more than what remains, the plan is cut in weighted fair
   order (each example when its task's share reaches it, so the cut follows p) and the last example
   truncated so that exactly the budget is spent (`unit: tokens` counts non-padding tokens, `unit: loss`
   counts tokens that carry the loss). The last step is not padded.

Within a micro-batch, examples are grouped by task in task order (task_offsets), as the ghost
kernels expect. See MicroBatch for the fields.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from adapt_fast.data.batch import IGNORE_INDEX, PAD_TASK, MicroBatch
from adapt_fast.data.cache import TokenizedSplit, group_by_task
from adapt_fast.data.pack import best_fit_pack, cut_to_budget, place_pool
from adapt_fast.errors import DataError, DataWarning, some_of


def largest_remainder(total: int, p: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, proportional to p (ties to the lower index)."""
    p = np.asarray(p, dtype=np.float64)
    if total <= 0 or p.sum() <= 0:
        return np.zeros(len(p), dtype=np.int64)
    exact = total * p / p.sum()
    counts = np.floor(exact).astype(np.int64)
    short = int(total - counts.sum())
    order = np.lexsort((np.arange(len(p)), -(exact - counts)))
    counts[order[:short]] += 1
    return counts


class TaskStream:
    """Task k's examples, shuffled without replacement and reshuffled every epoch (seed, task, epoch)."""

    def __init__(self, examples: np.ndarray, seed: int, task: int):
        examples = np.asarray(examples)
        small = examples.size == 0 or int(examples.max()) < np.iinfo(np.int32).max
        self.examples = examples.astype(np.int32 if small else np.int64)  # int32: same shuffles, half the memory
        self.seed, self.task = seed, task
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.task, epoch]).permutation(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def next(self) -> int:
        """The next example index (a new shuffle at each epoch)."""
        if self.position == len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._shuffle(self.epoch)
        self.position += 1
        return int(self._order[self.position - 1])

    def peek(self, n: int) -> list[int]:
        """The next n examples next() would return (into later epochs if need be), none taken."""
        out, epoch, position, order = [], self.epoch, self.position, self._order
        while len(out) < n:
            if position == len(order):
                epoch, position = epoch + 1, 0
                order = self._shuffle(epoch)
            take = order[position : position + n - len(out)]
            out += [int(e) for e in take]
            position += len(take)
        return out

    @property
    def exhausted_once(self) -> bool:
        return self.epoch > 0 or self.position == len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle(self.epoch)


@dataclass
class LoaderStats:
    """Global counts (all ranks) of what the loader has handed out."""

    tokens: int = 0  # non-padding tokens fed
    loss_tokens: int = 0  # tokens carrying the loss
    padding: int = 0  # padding slots
    micro_steps: int = 0  # global micro-steps (each W micro-batches)
    examples: int = 0
    truncated: int = 0  # examples cut by the budget
    reused: int = 0  # examples fed that were fed before in this run
    tokens_per_task: list[int] = field(default_factory=list)
    loss_tokens_per_task: list[int] = field(default_factory=list)
    examples_per_task: list[int] = field(default_factory=list)

    @property
    def padding_fraction(self) -> float:
        slots = self.tokens + self.padding
        return self.padding / slots if slots else 0.0


MAX_WAIT = 16  # a leftover that waited this many steps goes in first (longest-waiting first, best fit)
SEARCH_SLACK = 16  # average examples the pool holds beyond a step's room (at most 4 steps), to choose exact fills


@dataclass
class _Item:
    example: int
    task: int
    length: int  # tokens fed (after a budget truncation)


class PackedLoader:
    """Yields this rank's packed MicroBatch until the budget is spent (then None).

    split            the training split (memory-mapped)
    budget           budget in `unit`s: "tokens" (non-padding tokens) or "loss" (loss tokens)
    mixture          initial p (K,); change it any time with set_mixture
    """

    def __init__(
        self,
        split: TokenizedSplit,
        tokens_per_micro_batch: int,
        budget: int,
        mixture: np.ndarray,
        *,
        unit: str = "tokens",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lookahead: float = 0.1,
        meta_floor_examples: int = 1,
        meta_floor_fraction: float = 0.25,
        allow_repeat: bool = True,
        pack_backend: str = "auto",
        task_names: list[str] | None = None,
    ):
        if unit not in ("tokens", "loss"):
            raise ValueError(f"unknown budget unit {unit!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.split = split
        self.num_tasks = split.num_tasks
        self.capacity = int(tokens_per_micro_batch)
        self.budget = int(budget)
        self.unit = unit
        self.rank, self.world_size = rank, world_size
        self.lookahead = lookahead
        self.meta_floor_examples = meta_floor_examples
        self.meta_floor_fraction = meta_floor_fraction
        self.floor_age = np.zeros(split.num_tasks, dtype=np.int64)  # meta steps since each task last had its floor
        self.allow_repeat = allow_repeat
        self.pack_backend = pack_backend
        # Per-example arrays stay memory-mapped (no copy): the loader's own memory grows with the number
        # of examples only by each task's example list and current shuffle (int32: 8 bytes an example).
        self._lengths = np.asarray(split.lengths)
        self._mean_length = float(self._lengths.mean()) if self._lengths.size else 0.0
        self._loss_tokens = np.asarray(split.loss_tokens)
        if self._lengths.size and self._lengths.max() > self.capacity:
            raise DataError(
                f"an example of {int(self._lengths.max())} tokens exceeds tokens_per_micro_batch ({self.capacity})"
            )
        self.seed = seed
        self.task_names = list(task_names) if task_names is not None else [str(k) for k in range(split.num_tasks)]
        self._ran_out = np.zeros(split.num_tasks, dtype=bool)  # tasks already reported as out of examples
        self.streams = [TaskStream(examples, seed, k) for k, examples in enumerate(split.examples_by_task())]
        # What each task would give next, kept per task and refreshed when it draws, so that a step's plan
        # does not ask K streams: (K,) bool, can still draw (_has_data), and (K,) its next example's length (-1: none)
        self._live_mask = np.zeros(self.num_tasks, dtype=bool)
        self._next_length = np.full(self.num_tasks, -1, dtype=np.int64)
        self._refresh(range(self.num_tasks))
        self.leftovers: list[int] = []
        self.leftover_waits: list[int] = []  # steps each leftover has waited (parallel to leftovers)
        self.stats = LoaderStats(
            tokens_per_task=[0] * self.num_tasks,
            loss_tokens_per_task=[0] * self.num_tasks,
            examples_per_task=[0] * self.num_tasks,
        )
        self.last_global_loss_tokens = 0
        self.deficit = np.zeros(self.num_tasks)  # tokens each task is owed against its share so far
        available = int(self._unit_counts().sum())
        self._reuse_reported = self.budget > available  # warned here: no second warning when reuse begins
        self._fed = np.zeros(split.num_examples, dtype=bool)  # examples fed so far (a second feed is a reuse)
        if self.budget > available:
            if not allow_repeat:
                raise DataError(
                    f"the budget ({self.budget} {unit}) exceeds the training data ({available} {unit}) "
                    "and budget.allow_repeat is false"
                )
            warnings.warn(
                f"the budget ({self.budget} {unit}) exceeds the training data ({available} {unit}): "
                "examples will be reused",
                DataWarning,
                stacklevel=2,
            )
        self.set_mixture(mixture)

    # ------------------------------------------------------------------ public

    def set_mixture(self, p: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.num_tasks,) or not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"bad mixture {p} for {self.num_tasks} tasks")
        self.mixture = p / p.sum()

    @property
    def consumed(self) -> int:
        """Budget units spent so far, all ranks together."""
        return self.stats.tokens if self.unit == "tokens" else self.stats.loss_tokens

    @property
    def remaining(self) -> int:
        return self.budget - self.consumed

    def next_micro_batch(self, meta_step: bool = False) -> MicroBatch | None:
        """Plan the next global micro-step and return this rank's micro-batch (None when spent)."""
        if self.remaining <= 0:
            return None
        bins = self._plan(meta_step)
        pad_to = None if self._last_step else self.capacity
        for items in bins:  # every bin's padding counts; only this rank's tensors are built
            used = sum(i.length for i in items)
            self.stats.padding += max(pad_to or 0, used, 1) - used
        items = bins[self.rank]
        batch = pack_items(self.split, [(i.example, i.length) for i in items], self.num_tasks, pad_to)
        batch.global_loss_tokens = self.last_global_loss_tokens
        return batch

    def state_dict(self) -> dict:
        return {
            "streams": [s.state_dict() for s in self.streams],
            "leftovers": list(self.leftovers),
            "leftover_waits": list(self.leftover_waits),
            "stats": {k: list(v) if isinstance(v, list) else v for k, v in self.stats.__dict__.items()},
            "mixture": self.mixture.tolist(),
            "deficit": self.deficit.tolist(),
            "floor_age": self.floor_age.tolist(),
            "reported": {"reuse": self._reuse_reported, "ran_out": self._ran_out.tolist()},
            "fed": np.packbits(self._fed).tolist(),  # a bit per example, as bytes
        }

    def load_state_dict(self, state: dict) -> None:
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        self._refresh(range(self.num_tasks))
        self.leftovers = [int(i) for i in state["leftovers"]]
        # absent in checkpoints from before subset-sum placement: count those leftovers as waiting one step
        self.leftover_waits = [int(w) for w in state.get("leftover_waits", [1] * len(self.leftovers))]
        self.stats = LoaderStats(**{k: list(v) if isinstance(v, list) else v for k, v in state["stats"].items()})
        self.set_mixture(np.asarray(state["mixture"]))
        self.mixture = np.asarray(state["mixture"], dtype=np.float64)  # as saved: renormalising moves it by an ulp
        self.deficit = np.asarray(state["deficit"], dtype=np.float64)
        self.floor_age = np.asarray(state.get("floor_age", np.zeros(self.num_tasks)), dtype=np.int64)
        # what was already said, not to be said again after a resume (older checkpoints: what must have been)
        live = self._live()
        reported = state.get("reported", {"reuse": self.stats.reused > 0, "ran_out": (~live).tolist()})
        self._reuse_reported = self._reuse_reported or bool(reported["reuse"])
        self._ran_out = np.asarray(reported["ran_out"], dtype=bool)
        if "fed" in state:  # older checkpoints: reuse counted from here on against what this run feeds
            self._fed = np.unpackbits(np.asarray(state["fed"], dtype=np.uint8), count=len(self._fed)).astype(bool)

    # ------------------------------------------------------------------ planning

    def _unit_counts(self) -> np.ndarray:
        return self._lengths if self.unit == "tokens" else self._loss_tokens

    def _has_data(self, task: int) -> bool:
        """Task k can still be drawn from: it has examples, and reuse is allowed or its first epoch is not over."""
        stream = self.streams[task]
        return len(stream) > 0 and (self.allow_repeat or not stream.exhausted_once)

    def _refresh(self, tasks) -> None:
        """Recompute _live_mask and _next_length of these tasks from their streams."""
        for k in tasks:
            self._live_mask[k] = self._has_data(k)
            ahead = self._peek(k, 1)
            self._next_length[k] = self._lengths[ahead[0]] if ahead else -1

    def _live(self) -> np.ndarray:
        """(K,) bool: _has_data of every task."""
        return self._live_mask.copy()

    def _draw(self, task: int) -> int | None:
        stream = self.streams[task]
        if not self._has_data(task):
            return None
        example = stream.next()
        self._refresh((task,))
        return example

    def _peek(self, task: int, n: int) -> list[int]:
        """The next (at most) n examples _draw(task) would return, not drawn."""
        stream = self.streams[task]
        if n <= 0 or not self._has_data(task):
            return []
        ahead = stream.peek(n)
        if not self.allow_repeat:
            ahead = ahead[: max(0, len(stream) - stream.position) if stream.epoch == 0 else 0]
        return ahead

    def _plan(self, meta_step: bool) -> list[list[_Item]]:
        """One global micro-step: W lists of items (examples in task order)."""
        pool = list(self.leftovers)
        waits = list(self.leftover_waits)
        floor: list[int] = []  # pool positions of this step's floor examples
        pool_tasks = np.asarray(self.split.task_ids[pool] if pool else [], dtype=np.int64)
        per_task_pool = np.bincount(pool_tasks, weights=self._lengths[pool] if pool else None, minlength=self.num_tasks)
        live = self._live()
        out = ~live & (self.mixture > 0) & ~self._ran_out
        if out.any() and self.rank == 0 and (live & (self.mixture > 0)).any():  # else: the data is simply all used
            empty = np.array([len(self.streams[k]) == 0 for k in range(self.num_tasks)])
            for which, why in ((out & empty, "have no training examples"), (out & ~empty, "have no training "
                               f"examples left after {self.consumed} of the budget's {self.budget} {self.unit} "
                               "(budget.allow_repeat false)")):  # fmt: skip
                if which.any():
                    names = some_of([self.task_names[k] for k in np.flatnonzero(which)])
                    warnings.warn(
                        f"task(s) {names} {why}: the other tasks take their share of the mixture",
                        DataWarning,
                        stacklevel=3,
                    )
        self._ran_out |= out
        p = np.where(live, self.mixture, 0.0)
        if p.sum() <= 0:  # every task with data left has a zero share: spread over the live ones
            p = live.astype(np.float64)
        # Shares are kept by integral control: each task's pool quota is its share of the step (and of
        # SEARCH_SLACK average examples, for the subset search to choose from) plus its running deficit
        # (target - consumed), so packing leftovers never bias the shares.
        p = p / max(p.sum(), 1e-300)
        slack = min(SEARCH_SLACK * self._mean_length, 4.0 * self.world_size * self.capacity)  # at most 4 steps deep
        desired = np.maximum((self.world_size * self.capacity * (1 + self.lookahead) + slack) * p + self.deficit, 0.0)
        desired = np.where(live, desired, 0.0)
        quota = largest_remainder(int(round(desired.sum())), desired) - per_task_pool.astype(np.int64)
        floors: dict[int, list[int]] = {}  # task -> pool positions of its floor examples this step
        if meta_step and self.meta_floor_examples > 0:  # floors, longest-waiting task first, within the room
            room, used = self.meta_floor_fraction * self.world_size * self.capacity, 0
            ties = np.random.default_rng([self.seed, self.stats.micro_steps, 1]).permutation(self.num_tasks)
            by_task, bounds = group_by_task(pool_tasks, self.num_tasks)  # pool positions grouped by task
            # a lower bound on each task's floor size (its pool part, plus its next example if it must draw),
            # so that the K tasks are not each asked what they would draw once the room is nearly full
            in_pool = np.diff(bounds)
            rank = np.arange(len(pool)) - np.repeat(bounds[:-1], in_pool)
            first = by_task[rank < self.meta_floor_examples]
            least = np.bincount(pool_tasks[first], weights=self._lengths[pool][first], minlength=self.num_tasks)
            draws = (in_pool < self.meta_floor_examples) & (self._next_length >= 0)
            least += np.where(draws, self._next_length, 0)
            order = np.lexsort((ties, -self.floor_age))  # longest-waiting first, ties in a seeded order
            order = order[(in_pool > 0)[order] | draws[order]]  # the tasks with a floor to give
            least_after = np.minimum.accumulate(least[order][::-1])[::-1].tolist()  # smallest from here on
            least = least.tolist()
            for n, k in enumerate(order.tolist()):
                if used and used + least_after[n] > room:
                    break  # no floor left fits
                if used and used + least[k] > room:
                    continue
                mine = by_task[bounds[k] : bounds[k + 1]][: self.meta_floor_examples].tolist()
                # what the floor would draw, looked at first: nothing is drawn for a floor that cannot fit
                more = self._peek(k, self.meta_floor_examples - len(mine))
                size = int(self._lengths[[pool[i] for i in mine] + more].sum())
                if (mine or more) and (used == 0 or used + size <= room):
                    for example in more:
                        self._take(k, example, pool, quota)
                        mine.append(len(pool) - 1)
                    floors[int(k)] = mine
                    used += size
        self._draw_quotas(quota, pool, half=True)

        placement = np.full(len(pool), -1, dtype=np.int64)
        capacities = np.full(self.world_size, self.capacity, dtype=np.int64)
        lengths = self._lengths[np.asarray(pool, dtype=np.int64)].astype(np.int64)
        waited = np.zeros(len(pool), dtype=np.int64)
        waited[: len(waits)] = waits
        # 1. Leftovers that waited MAX_WAIT steps, longest-waiting first (best fit within a wait), so that no
        # example waits for ever; 2. the floors, by best fit. A task none of whose floor went in waits for a
        # later meta step.
        for wait in np.unique(waited[waited >= MAX_WAIT])[::-1]:  # the longest-waiting first, best fit within
            self._best_fit_into(np.flatnonzero(waited == wait), lengths, placement, capacities)
        floor = np.asarray([i for mine in floors.values() for i in mine], dtype=np.int64)
        self._best_fit_into(floor[placement[floor] < 0], lengths, placement, capacities)  # not the forced ones
        if meta_step:
            measured = np.zeros(self.num_tasks, dtype=bool)
            measured[[k for k, mine in floors.items() if (placement[mine] >= 0).any()]] = True
            self.floor_age = np.where(measured, 0, self.floor_age + 1)
        # 3. Top up: long leftovers that no longer fit beside the floors leave the subset search no
        # choice, so keep drawing by p (at most 4 rounds, never past a pool of (2 + lookahead) steps plus
        # the slack) until the examples that could still go in hold (1 + lookahead) x the room left. Also
        # what fills an empty pool when every task's part is a sliver of its next example (many tasks).
        for _ in range(4):
            free = placement < 0
            fitting = int(lengths[free & (lengths <= capacities.max())].sum())
            short = int(np.ceil((1 + self.lookahead) * capacities.sum())) - fitting
            if short <= 0 or lengths[free].sum() >= (2 + self.lookahead) * self.world_size * self.capacity + slack:
                break
            before = len(pool)
            quota += largest_remainder(short, p)  # on top of what each task overshot
            self._draw_quotas(quota, pool, half=True)
            if len(pool) == before:  # every part a sliver of an example (many tasks): the most owed tasks draw
                for k in np.argsort(-(quota / np.maximum(p, 1e-300)), kind="stable").tolist():
                    if short <= 0:
                        break
                    if p[k] > 0 and self._next_length[k] >= 0:
                        short -= self._take(k, self._peek(k, 1)[0], pool, quota)
            if len(pool) == before:
                break
            lengths = self._lengths[np.asarray(pool, dtype=np.int64)].astype(np.int64)
            placement = np.concatenate([placement, np.full(len(pool) - before, -1, dtype=np.int64)])
            waited = np.concatenate([waited, np.zeros(len(pool) - before, dtype=np.int64)])
        if not pool:
            raise DataError("the training data ran out before the budget was spent (budget.allow_repeat is false)")
        # 4. Every bin takes its fullest subset of the rest, longest-waiting first; examples that waited
        # equally in a seeded order, the same on every rank, so that no task index waits longer than another.
        rest = np.flatnonzero(placement < 0)
        rest = rest[np.random.default_rng([self.seed, self.stats.micro_steps]).permutation(rest.size)]
        rest = rest[np.argsort(-waited[rest], kind="stable")]
        placement[rest] = place_pool(lengths[rest], capacities)

        pool_arr = np.asarray(pool, dtype=np.int64)
        self.leftovers = pool_arr[placement < 0].tolist()
        self.leftover_waits = (waited[placement < 0] + 1).tolist()
        tasks_of = np.asarray(self.split.task_ids[pool_arr], dtype=np.int64)
        bins: list[list[_Item]] = []
        for b in range(self.world_size):
            members = np.flatnonzero(placement == b)
            members = members[np.lexsort((members, tasks_of[members]))]  # by task, then pool order
            bins.append([_Item(int(pool_arr[i]), int(tasks_of[i]), int(lengths[i])) for i in members])
        return self._apply_budget(bins)

    def _best_fit_into(self, items: np.ndarray, lengths: np.ndarray, placement: np.ndarray, capacities: np.ndarray):
        """Best-fit the pool positions `items` into the bins' remaining capacities (both updated in place)."""
        if items.size == 0:
            return
        placement[items] = best_fit_pack(lengths[items], capacities, backend=self.pack_backend)
        placed = items[placement[items] >= 0]
        capacities -= np.bincount(placement[placed], weights=lengths[placed], minlength=capacities.size).astype(
            np.int64
        )

    def _draw_quotas(self, quota: np.ndarray, pool: list[int], half: bool = False) -> None:
        """Draw from each task k while its quota[k] (tokens) is positive (the last example may overshoot) or, with
        `half`, covers at least half of its next example; appends to pool and lowers quota in place. The top-up
        draws with `half`: a task whose part of it is a sliver of one example does not get a whole one each round."""
        can = (quota > 0) & (self._next_length >= 0)
        if half:
            can &= 2 * quota >= self._next_length
        for k in np.flatnonzero(can).tolist():  # a draw from k changes only k's quota and next example
            while quota[k] > 0 and self._next_length[k] >= 0 and not (half and 2 * quota[k] < self._next_length[k]):
                self._take(k, self._peek(k, 1)[0], pool, quota)

    def _take(self, task: int, example: int, pool: list[int], quota: np.ndarray) -> int:
        """Draw `example` (what _peek(task) gave) into the pool and charge it to quota[task]; returns its length."""
        self._draw(task)
        pool.append(example)
        length = int(self._lengths[example])
        quota[task] -= length
        return length

    def _apply_budget(self, bins: list[list[_Item]]) -> list[list[_Item]]:
        """Cut the plan (in _fair_order) to the remaining budget; count what is placed."""
        flat = [item for items in bins for item in items]
        counts = np.array([self._units(item) for item in flat], dtype=np.int64)
        self._last_step = int(counts.sum()) >= self.remaining
        if self._last_step:
            order = self._fair_order(flat)
            n_keep, last_take = cut_to_budget(counts[order], self.remaining, backend=self.pack_backend)
            cut = flat[order[n_keep - 1]]
            if last_take < counts[order[n_keep - 1]]:
                cut.length = self._length_for(cut.example, last_take)
                self.stats.truncated += 1
            kept = {id(flat[i]) for i in order[:n_keep]}
            bins = [[item for item in items if id(item) in kept] for items in bins]
        placed = np.zeros(self.num_tasks)
        self.last_global_loss_tokens = 0
        for items in bins:
            for item in items:
                self.last_global_loss_tokens += self._account(item)
                placed[item.task] += item.length
        live = self._live()
        share = np.where(live, self.mixture, 0.0)
        if share.sum() > 0:
            bound = self.world_size * self.capacity  # anti-windup: owe at most one step's capacity
            self.deficit = np.clip(self.deficit + placed.sum() * share / share.sum() - placed, -bound, bound)
        self.stats.micro_steps += 1
        return bins

    def _fair_order(self, items: list[_Item]) -> np.ndarray:
        """The order in which the last step's budget goes to `items`: each when its task's share of the tokens (after
        what the task is owed) reaches the item's start within the task (weighted fair queuing). A prefix of it
        follows the mixture; a prefix of the plan order (task order) gave the last tasks in name order nothing."""
        share = self.mixture  # not only the tasks live now: one that ran out into this very pool still has its share
        start = np.zeros(len(items))
        filled = np.zeros(self.num_tasks)
        for i, item in enumerate(items):
            start[i] = filled[item.task]
            filled[item.task] += item.length
        tasks = np.array([item.task for item in items], dtype=np.int64)
        with np.errstate(divide="ignore"):
            when = np.where(share[tasks] > 0, (start - self.deficit[tasks]) / share[tasks], np.inf)
        return np.lexsort((np.arange(len(items)), when))  # by `when`, ties in plan order

    def _units(self, item: _Item) -> int:
        if self.unit == "tokens":
            return item.length
        return int(self._loss_tokens[item.example])

    def _length_for(self, example: int, take: int) -> int:
        """Tokens of `example` to keep so that it spends exactly `take` budget units (take >= 1)."""
        if self.unit == "tokens":
            return take
        _, mask = self.split.example(example)
        positions = np.flatnonzero(np.asarray(mask[1:])) + 1  # loss tokens (never the first token)
        return int(positions[take - 1]) + 1

    def _account(self, item: _Item) -> int:
        """Count a placed item in the global statistics; returns its loss tokens. An example fed a second time is
        a reuse (drawn into the look-ahead pool again is not: what is left there at the end was never fed)."""
        if self._fed[item.example]:
            self.stats.reused += 1
            if not self._reuse_reported and self.rank == 0:
                self._reuse_reported = True
                warnings.warn(
                    f"task {self.task_names[item.task]} ran out of examples after {self.consumed} of the budget's "
                    f"{self.budget} {self.unit}: from here on examples are reused (report.json: examples_reused)",
                    DataWarning,
                    stacklevel=3,
                )
        self._fed[item.example] = True
        loss = self._loss_of([item])
        self.stats.tokens += item.length
        self.stats.loss_tokens += loss
        self.stats.examples += 1
        self.stats.tokens_per_task[item.task] += item.length
        self.stats.loss_tokens_per_task[item.task] += loss
        self.stats.examples_per_task[item.task] += 1
        return loss

    def _loss_of(self, items: list[_Item]) -> int:
        total = 0
        for item in items:
            if item.length == self._lengths[item.example]:
                total += int(self._loss_tokens[item.example])
            else:
                _, mask = self.split.example(item.example)
                total += int(np.asarray(mask[1 : item.length]).sum())
        return total

    # ------------------------------------------------------------------ building tensors


def pack_items(
    split: TokenizedSplit, items: list[tuple[int, int]], num_tasks: int, pad_to: int | None = None
) -> MicroBatch:
    """Lay (example, length) pairs end to end (already grouped by task) into a MicroBatch.
    Slots up to `pad_to` become one padding segment; an empty batch gets one padding slot."""
    lengths = np.array([length for _, length in items], dtype=np.int64)
    used = int(lengths.sum())
    total = max(pad_to or 0, used, 1)
    input_ids = np.zeros(total, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(total, dtype=np.int64)
    task_ids = np.full(total, PAD_TASK, dtype=np.int64)
    tasks = np.array([split.task_ids[e] for e, _ in items], dtype=np.int64)
    start = 0
    for (example, length), task in zip(items, tasks, strict=True):
        ids, mask = split.example(example)
        end = start + length
        input_ids[start:end] = ids[:length]
        labels[start:end] = np.where(np.asarray(mask[:length], dtype=bool), input_ids[start:end], IGNORE_INDEX)
        labels[start] = IGNORE_INDEX  # nothing predicts an example's first token
        position_ids[start:end] = np.arange(length)
        task_ids[start:end] = task
        start = end
    if total > used:
        position_ids[used:] = np.arange(total - used)
    seg = list(lengths) + ([total - used] if total > used else [])
    cu = np.zeros(len(seg) + 1, dtype=np.int32)
    np.cumsum(seg, out=cu[1:])
    task_offsets = np.zeros(num_tasks + 1, dtype=np.int64)
    task_offsets[1:] = np.cumsum(np.bincount(tasks, weights=lengths, minlength=num_tasks)[:num_tasks]).astype(np.int64)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu),
        task_ids=torch.from_numpy(task_ids),
        task_offsets=torch.from_numpy(task_offsets),
        max_seqlen=int(max(seg)),
        num_examples=len(items),
    )


def pack_examples(split: TokenizedSplit, examples: np.ndarray, tokens_per_micro_batch: int) -> list[MicroBatch]:
    """Pack a fixed set of examples (e.g. a validation batch) into as few micro-batches as best fit
    allows, no budget, no padding to full length. Every example appears exactly once."""
    examples = np.asarray(examples, dtype=np.int64)
    if examples.size == 0:
        return []
    lengths = np.asarray(split.lengths, dtype=np.int64)[examples]
    num_bins = max(1, int(np.ceil(lengths.sum() / tokens_per_micro_batch)))
    while True:
        placement = best_fit_pack(lengths, np.full(num_bins, tokens_per_micro_batch, dtype=np.int64))
        if (placement >= 0).all():
            break
        num_bins += 1
    batches = []
    for b in range(num_bins):
        members = examples[placement == b]
        if members.size == 0:
            continue
        members = members[np.argsort(np.asarray(split.task_ids)[members], kind="stable")]
        batches.append(pack_items(split, [(int(e), int(split.lengths[e])) for e in members], split.num_tasks))
    return batches
