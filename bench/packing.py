"""Packing benchmark: best-fit look-ahead packing vs naive padding, native vs Python backend.

Examples get instruction-tuning-like lengths (lognormal, clipped to [min_len, max_len]). The packer
fills W micro-batches of T tokens per step from a look-ahead buffer: draw new examples until the
buffer holds ~lookahead x W x T tokens, place them with best_fit_pack (examples left over from the
previous step go first, as priority), and roll the unplaced ones over. Only full look-ahead steps are
counted (the drain at the end of a finite stream is not steady state). That isolates best_fit_pack, the
primitive; the real PackedLoader (floors, leftovers that wait, subset-sum placement) is then measured on
the demo suite and on lognormal lengths.

    .venv/bin/python bench/packing.py                      # writes bench/results/packing.json
    .venv/bin/python bench/packing.py --bins 8 --num-examples 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from adapt_fast.data.pack import NATIVE_AVAILABLE, best_fit_pack, cut_to_budget


def sample_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """Lognormal example lengths in tokens, clipped to [lo, hi] (clipping at hi = truncation)."""
    return np.clip(rng.lognormal(np.log(median), sigma, size=n).round(), lo, hi).astype(np.int64)


def pack_stream(lengths: np.ndarray, T: int, W: int, lookahead: float, backend: str) -> dict:
    """Look-ahead best-fit packing of the stream into steps of W micro-batches of T tokens."""
    caps = np.full(W, T, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(lengths)])  # cum[i] = tokens in lengths[:i]
    target = int(lookahead * W * T)
    carried = np.zeros(0, dtype=np.int64)  # stream indices rolled over from the previous step
    age = np.zeros(0, dtype=np.int64)  # steps each carried example has waited
    pos, steps, examples, tokens, max_age, pack_s = 0, 0, 0, 0, 0, 0.0
    assignments = []
    t0 = time.perf_counter()
    while True:
        need = target - int(lengths[carried].sum())
        end = int(np.searchsorted(cum, cum[pos] + need, side="left"))  # first `end` with enough tokens
        if end > len(lengths):
            break  # stream exhausted: stop at steady state
        idx = np.concatenate([carried, np.arange(pos, end)])
        prio = np.zeros(len(idx), dtype=bool)
        prio[: len(carried)] = True
        t = time.perf_counter()
        out = best_fit_pack(lengths[idx], caps, prio, backend=backend)
        pack_s += time.perf_counter() - t
        ok = out >= 0
        examples += int(ok.sum())
        tokens += int(lengths[idx[ok]].sum())
        max_age = max(max_age, int(age[ok[: len(carried)]].max(initial=0)))
        age = np.concatenate([age[~ok[: len(carried)]] + 1, np.ones(int((~ok[len(carried) :]).sum()), np.int64)])
        carried, pos, steps = idx[~ok], end, steps + 1
        assignments.append(out)
    wall = time.perf_counter() - t0
    slots = steps * W * T
    return {
        "steps": steps,
        "micro_batches": steps * W,
        "examples": examples,
        "tokens": tokens,
        "padding_fraction": 1.0 - tokens / slots,
        "max_rollover_age_steps": max_age,
        "wall_s": wall,
        "pack_call_s": pack_s,
        "examples_per_s": examples / wall,
        "tokens_per_s": tokens / wall,
        "pack_call_examples_per_s": examples / pack_s,
        "pack_call_tokens_per_s": tokens / pack_s,
        "_assignments": assignments,
    }


def naive_padding(lengths: np.ndarray, batch_size: int, max_len: int, T: int) -> dict:
    """Padding of the usual alternatives (no packing), on the same stream."""
    n = len(lengths) // batch_size * batch_size
    batches = lengths[:n].reshape(-1, batch_size)
    pad_longest = 1.0 - batches.sum() / (batches.max(axis=1).sum() * batch_size)
    pad_max_len = 1.0 - lengths.mean() / max_len
    # Sequential concatenation without look-ahead: close a micro-batch when the next example doesn't fit.
    used, fill = 0, []
    for L in lengths.tolist():
        if used + L > T:
            fill.append(used)
            used = 0
        used += L
    pad_sequential = 1.0 - sum(fill) / (len(fill) * T)
    return {
        f"pad_to_longest_of_{batch_size}": float(pad_longest),
        "pad_to_max_len": float(pad_max_len),
        "sequential_concat_no_lookahead": float(pad_sequential),
    }


def time_cut(n: int, backend: str, reps: int = 20) -> float:
    counts = np.random.default_rng(0).integers(0, 500, size=n)
    remaining = int(counts.sum()) // 2
    t = time.perf_counter()
    for _ in range(reps):
        cut_to_budget(counts, remaining, backend=backend)
    return (time.perf_counter() - t) / reps


def loader_on_demo_suite(tokens_per_micro_batch: int, naive_batch_size: int) -> dict:
    """The real PackedLoader (subset-sum placement + MicroBatch tensors) on the embedded demo suite,
    uniform mixture, a budget of 4 epochs, both packing backends; naive padding on the same lengths."""
    import tempfile
    import warnings

    from adapt_fast.config import Config
    from adapt_fast.data.cache import build_or_load
    from adapt_fast.data.loader import PackedLoader
    from adapt_fast.data.pack import NATIVE_AVAILABLE
    from adapt_fast.data.synthetic import write_synthetic_suite
    from adapt_fast.data.tokenizer import build_byte_tokenizer

    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_suite(Path(tmp) / "suite", seed=0, examples_per_task=cfg.data.synthetic_examples)
        data = build_or_load(Path(tmp) / "suite", build_byte_tokenizer(), cache_dir=Path(tmp) / "c", progress=False)
        lengths = np.asarray(data.train.lengths, dtype=np.int64)
        budget = 4 * int(lengths.sum())
        out: dict = {"examples": int(lengths.size), "budget_tokens": budget, "loader": {}}
        for backend in ["native", "python"] if NATIVE_AVAILABLE else ["python"]:
            p = np.ones(data.num_tasks) / data.num_tasks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loader = PackedLoader(data.train, tokens_per_micro_batch, budget, p, pack_backend=backend)
            start = time.perf_counter()
            while loader.next_micro_batch() is not None:
                pass
            seconds = time.perf_counter() - start
            out["loader"][backend] = {
                "padding_fraction": loader.stats.padding_fraction,
                "micro_batches": loader.stats.micro_steps,
                "examples_per_s": loader.stats.examples / seconds,
                "tokens_per_s": loader.stats.tokens / seconds,
            }
        shuffled = np.random.default_rng(0).permutation(lengths)
        naive = naive_padding(shuffled, naive_batch_size, int(lengths.max()), tokens_per_micro_batch)
        out["naive_pad_to_longest"] = naive[f"pad_to_longest_of_{naive_batch_size}"]
    return out


def loader_on_lognormal(args: argparse.Namespace) -> dict:
    """The real PackedLoader (floors, leftovers, subset-sum placement, MicroBatch tensors) on lognormal lengths:
    20 tasks with shares 1:2:...:10 (linearly spaced), a budget of 1200 micro-batches per rank. Cases: medians 256
    and 1024 with a mixture update every 4 steps, at 1 and 8 ranks; and the hard one, a mixture update every step
    (the floors) with a fifth of the examples cut at 3/4 of a micro-batch or at a whole one, on one rank. Reports
    padding, the largest relative error of a task's realised share, the longest any drawn example waited, and the
    loader's time per global micro-step."""
    import warnings

    from adapt_fast.data.cache import TokenizedSplit
    from adapt_fast.data.loader import PackedLoader

    T, num_tasks, out = args.tokens_per_micro_batch, 20, {}
    p = np.linspace(1, 10, num_tasks)
    p /= p.sum()
    cases = [(256, None, 4, 1), (256, None, 4, 8), (1024, None, 4, 1), (1024, None, 4, 8)]
    cases += [(600, 3 * T // 4, 1, 1), (600, T, 1, 1)]
    for median, cut_at, meta_every, W in cases:
        rng = np.random.default_rng(args.seed)
        lengths = sample_lengths(rng, 50_000, median, args.sigma, args.min_len, args.max_len)
        if cut_at is not None:
            lengths = np.minimum(sample_lengths(rng, 50_000, median, args.sigma, args.min_len, cut_at), cut_at)
            lengths[rng.random(lengths.size) < 0.2] = cut_at
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.ones(int(offsets[-1]), dtype=np.int32)
        tasks = rng.integers(0, num_tasks, lengths.size)
        split = TokenizedSplit(ids, np.ones_like(ids, np.uint8), offsets, tasks, lengths, lengths - 1, num_tasks)
        with warnings.catch_warnings():  # examples are reused at 8 ranks: known, not news
            warnings.simplefilter("ignore")
            loader = PackedLoader(split, T, 1200 * W * T, p, world_size=W, seed=args.seed)
            steps, longest_wait, start = 0, 0, time.perf_counter()
            while loader.next_micro_batch(meta_step=steps % meta_every == 0) is not None:
                longest_wait = max(longest_wait, *loader.leftover_waits, 0)
                steps += 1
            seconds = time.perf_counter() - start
        shares = np.array(loader.stats.tokens_per_task) / loader.stats.tokens
        name = f"median={median},W={W},meta_every={meta_every}" + (f",fifth_at={cut_at}" if cut_at else "")
        out[name] = {
            "padding_fraction": loader.stats.padding_fraction,
            "max_relative_share_error": float(np.abs(shares / p - 1).max()),
            "longest_wait_steps": longest_wait,
            "ms_per_global_micro_step": 1e3 * seconds / steps,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens-per-micro-batch", type=int, default=4096)
    ap.add_argument("--bins", type=int, nargs="+", default=[1, 8, 64], help="micro-batches per best_fit_pack call")
    ap.add_argument("--num-examples", type=int, default=200_000)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--median-len", type=float, default=256.0)
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the lengths")
    ap.add_argument("--lookahead", type=float, default=1.1, help="buffer tokens / step capacity")
    ap.add_argument("--naive-batch-size", type=int, default=8, help="examples per padded batch (naive baseline)")
    ap.add_argument("--repeats", type=int, default=2, help="timing: best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    args = ap.parse_args()
    T = args.tokens_per_micro_batch
    assert args.max_len <= T, "an example must fit one micro-batch"

    lengths = sample_lengths(
        np.random.default_rng(args.seed), args.num_examples, args.median_len, args.sigma, args.min_len, args.max_len
    )
    backends = ["native", "python"] if NATIVE_AVAILABLE else ["python"]
    if not NATIVE_AVAILABLE:
        print("note: adapt_fast._native_packer is not built; timing the Python backend only")
    results = {
        "config": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__},
        "native_available": NATIVE_AVAILABLE,
        "lengths": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)),
            "fraction_at_max_len": float((lengths == args.max_len).mean()),
            "total_tokens": int(lengths.sum()),
        },
        "naive": naive_padding(lengths, args.naive_batch_size, args.max_len, T),
        "best_fit": {},
        "cut_to_budget_100k_s": {b: time_cut(100_000, b) for b in backends},
    }
    L = results["lengths"]
    print(f"{args.num_examples} examples, lengths mean {L['mean']:.0f} median {L['median']:.0f} p99 {L['p99']:.0f}")
    print(f"micro-batch {T} tokens, look-ahead {args.lookahead}x; naive padding:")
    for k, v in results["naive"].items():
        print(f"  {k:34s} {100 * v:6.2f}%")

    for W in args.bins:
        per = {}
        for b in backends:
            runs = [pack_stream(lengths, T, W, args.lookahead, b) for _ in range(args.repeats)]
            per[b] = min(runs, key=lambda r: r["wall_s"])
        flat = {b: np.concatenate(per[b]["_assignments"]) for b in backends}
        identical = None if len(backends) == 1 else bool(np.array_equal(flat["native"], flat["python"]))
        for r in per.values():
            del r["_assignments"]
        results["best_fit"][f"W={W}"] = {**per, "backends_identical": identical}
        r0 = per[backends[0]]
        print(
            f"best-fit W={W:<3d} padding {100 * r0['padding_fraction']:.3f}%  ({r0['micro_batches']} micro-batches, "
            f"max roll-over {r0['max_rollover_age_steps']} steps, backends identical: {identical})"
        )
        for b, r in per.items():
            loop = f"loop {r['examples_per_s']:>11,.0f} ex/s {r['tokens_per_s'] / 1e6:8.1f} M tok/s"
            ex_s, tok_s = r["pack_call_examples_per_s"], r["pack_call_tokens_per_s"] / 1e6
            calls = f"pack calls {ex_s:>11,.0f} ex/s {tok_s:8.1f} M tok/s"
            print(f"  {b:7s} {loop} | {calls}")
    for b, s in results["cut_to_budget_100k_s"].items():
        print(f"cut_to_budget n=100k {b:7s} {1e3 * s:.3f} ms")

    results["loader_demo_suite"] = loader_on_demo_suite(args.tokens_per_micro_batch, args.naive_batch_size)
    for b, r in results["loader_demo_suite"]["loader"].items():
        print(
            f"PackedLoader on the demo suite ({b}): padding {100 * r['padding_fraction']:.3f}%, "
            f"{r['examples_per_s']:,.0f} ex/s, {r['tokens_per_s'] / 1e6:.2f} M tok/s (MicroBatch tensors built)"
        )
    naive = results["loader_demo_suite"]["naive_pad_to_longest"]
    print(f"  naive padding on the same examples: {100 * naive:.1f}%")

    results["loader_lognormal"] = loader_on_lognormal(args)
    for case, r in results["loader_lognormal"].items():
        print(
            f"PackedLoader, lognormal {case}: padding {100 * r['padding_fraction']:.3f}%, task shares within "
            f"{100 * r['max_relative_share_error']:.1f}%, longest wait {r['longest_wait_steps']} steps, "
            f"{r['ms_per_global_micro_step']:.2f} ms/step"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
