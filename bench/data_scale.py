"""Data at scale: a generated suite of many short examples over many tasks.

For each suite size (default 1,000,000 and 100,000 examples over 100 tasks) it measures
1. the tokenised-cache build (NI task files -> memory-mapped arrays, data.num_proc workers): seconds
   and the build's peak resident memory (its own process, workers included);
2. in a fresh process, the loader: resident memory after opening the cache and building a
   PackedLoader over every task, and after packing N micro-batches (VmRSS, VmHWM, and the anonymous
   part: file-backed pages of the memory map are page cache the kernel can drop), and the packing
   throughput (budget tokens placed per second by PackedLoader.next_micro_batch, batches built).
The loader must stay flat in the number of examples: everything per example is memory-mapped; what
it holds itself is each task's example list and current shuffle (int32: 8 bytes an example). Pages
of the memory map that packing touches show up in VmRSS as file-backed pages (RssFile): page cache,
shared and dropped by the kernel under pressure, at most the size of the cache's arrays; the
anonymous part (RssAnon) is the loader's own.

    .venv/bin/python bench/data_scale.py                    # writes bench/results/data_scale.json
    .venv/bin/python bench/data_scale.py --examples 100000 --micro-batches 100 --out /tmp/x.json

The examples are short NI instances (a definition of a few words, an input of 4-16 letters, an
output of the same order), tokenised with the byte tokenizer of the tiny presets; the suite and the
cache live in --workdir (default: a temporary folder, removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OPS = ("copy", "reverse", "sort", "upper", "first three", "last three", "count", "double")


# ----------------------------------------------------------------------------- the suite


def _apply(op: str, s: str) -> str:
    return {
        "copy": s,
        "reverse": s[::-1],
        "sort": "".join(sorted(s)),
        "upper": s.upper(),
        "first three": s[:3],
        "last three": s[-3:],
        "count": str(len(s)),
        "double": s + s,
    }[op]


def write_suite(folder: Path, num_examples: int, num_tasks: int, seed: int = 0) -> dict:
    """num_tasks NI task files holding num_examples instances in all (sizes vary by task, +-50%)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, size=num_tasks)
    sizes = np.floor(num_examples * weights / weights.sum()).astype(np.int64)
    sizes[: num_examples - int(sizes.sum())] += 1
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    t0 = time.perf_counter()
    for k, n in enumerate(sizes):
        op = OPS[k % len(OPS)]
        lengths = rng.integers(4, 17, size=n)
        chars = letters[rng.integers(0, 26, size=int(lengths.sum()))].tobytes().decode()
        ends = np.cumsum(lengths)
        inputs = [chars[e - m : e] for e, m in zip(ends, lengths, strict=True)]
        task = {
            "Definition": [f"Task {k}: {op} the letters."],
            "Categories": [op],
            "Positive Examples": [],
            "Instances": [{"id": f"t{k}-{i}", "input": s, "output": [_apply(op, s)]} for i, s in enumerate(inputs)],
        }
        (tasks / f"task{k:03d}_{op.replace(' ', '_')}.json").write_text(json.dumps(task))
    return {
        "examples": int(sizes.sum()),
        "tasks": num_tasks,
        "files_bytes": sum(p.stat().st_size for p in tasks.iterdir()),
        "generate_seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- memory


def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------- subprocess modes


def _data_kwargs(args) -> dict:
    return dict(
        group_by="task",
        template="ni",
        max_len=256,
        val_fraction=0.01,
        seed=0,
        cache_dir=str(args.cache),
        num_proc=args.num_proc,
        progress=False,
    )


def build_mode(args) -> dict:
    """Tokenise the suite into the cache (this process and its workers alone)."""
    from adapt_fast.data.cache import build_or_load
    from adapt_fast.data.tokenizer import build_byte_tokenizer

    t0 = time.perf_counter()
    data = build_or_load(args.suite, build_byte_tokenizer(), **_data_kwargs(args))
    seconds = time.perf_counter() - t0
    assert not data.from_cache
    folder_bytes = sum(p.stat().st_size for p in data.folder.rglob("*") if p.is_file())
    return {
        "build_seconds": seconds,
        "examples_per_second": (data.train.num_examples + data.validation.num_examples) / seconds,
        "train_examples": data.train.num_examples,
        "validation_examples": data.validation.num_examples,
        "train_tokens": int(np.asarray(data.train.lengths, dtype=np.int64).sum()),
        "cache_bytes": folder_bytes,
        "peak_rss_mib_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mib_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure_mode(args) -> dict:
    """Open the cache, build the loader, pack N micro-batches: memory and throughput."""
    import torch  # noqa: F401 (the trainer imports it: count it in the baseline)

    from adapt_fast.data.cache import build_or_load
    from adapt_fast.data.loader import PackedLoader
    from adapt_fast.data.tokenizer import build_byte_tokenizer

    baseline = proc_status()
    t0 = time.perf_counter()
    data = build_or_load(args.suite, build_byte_tokenizer(), **_data_kwargs(args))
    assert data.from_cache
    open_seconds = time.perf_counter() - t0
    K = data.num_tasks
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")  # the small suite is packed past one epoch: reuse is expected here
    loader = PackedLoader(
        data.train,
        args.tokens_per_micro_batch,
        budget=args.micro_batches * args.tokens_per_micro_batch,
        mixture=np.full(K, 1.0 / K),
        seed=0,
    )
    loader_seconds = time.perf_counter() - t0
    opened = proc_status()
    t0 = time.perf_counter()
    batches = 0
    while (batch := loader.next_micro_batch(meta_step=batches % 10 == 0)) is not None:
        batches += 1
        del batch
    pack_seconds = time.perf_counter() - t0
    packed = proc_status()
    stats = loader.stats
    return {
        "open_seconds": open_seconds,
        "loader_init_seconds": loader_seconds,
        "micro_batches": batches,
        "tokens_per_micro_batch": args.tokens_per_micro_batch,
        "tokens_packed": stats.tokens,
        "examples_packed": stats.examples,
        "padding_fraction": stats.padding_fraction,
        "pack_seconds": pack_seconds,
        "tokens_per_second": stats.tokens / pack_seconds,
        "micro_batches_per_second": batches / pack_seconds,
        "rss_mib": {"after_imports": baseline, "after_open": opened, "after_packing": packed},
        "loader_rss_mib": packed["VmHWM"] - baseline["VmRSS"],
        "loader_anon_mib": packed.get("RssAnon", float("nan")) - baseline.get("RssAnon", 0.0),
    }


def _run_mode(mode: str, args, suite: Path, cache: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--mode", mode, "--suite", str(suite), "--cache", str(cache),
        "--num-proc", str(args.num_proc), "--micro-batches", str(args.micro_batches),
        "--tokens-per-micro-batch", str(args.tokens_per_micro_batch),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2000)
    parser.add_argument("--tokens-per-micro-batch", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_scale.json")
    parser.add_argument("--mode", choices=("build", "measure"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--suite", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode is not None:
        print(json.dumps(build_mode(args) if args.mode == "build" else measure_mode(args)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="adapt_fast_data_scale-"))
    results = []
    try:
        for n in args.examples:
            suite, cache = workdir / f"suite-{n}", workdir / f"cache-{n}"
            shutil.rmtree(suite, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            print(f"{n} examples: generating ...", file=sys.stderr, flush=True)
            generated = write_suite(suite, n, args.tasks)
            print(f"{n} examples: building the cache ...", file=sys.stderr, flush=True)
            build = _run_mode("build", args, suite, cache)
            print(f"{n} examples: measuring the loader ...", file=sys.stderr, flush=True)
            loader = _run_mode("measure", args, suite, cache)
            results.append({"examples": n, "suite": generated, "build": build, "loader": loader})
            print(
                f"{n} examples: build {build['build_seconds']:.1f} s, loader peak RSS "
                f"{loader['rss_mib']['after_packing']['VmHWM']:.0f} MiB "
                f"(+{loader['loader_rss_mib']:.0f} over imports, anon +{loader['loader_anon_mib']:.0f}), "
                f"packing {loader['tokens_per_second']:.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    by_n = {r["examples"]: r for r in results}
    flat = None
    if len(by_n) >= 2:
        small, large = by_n[min(by_n)], by_n[max(by_n)]
        flat = {
            "examples_ratio": large["examples"] / small["examples"],
            "loader_peak_rss_ratio": large["loader"]["rss_mib"]["after_packing"]["VmHWM"]
            / small["loader"]["rss_mib"]["after_packing"]["VmHWM"],
            "loader_anon_mib_small": small["loader"]["loader_anon_mib"],
            "loader_anon_mib_large": large["loader"]["loader_anon_mib"],
            "loader_anon_bytes_per_example": (large["loader"]["loader_anon_mib"] - small["loader"]["loader_anon_mib"])
            * 2**20
            / (large["examples"] - small["examples"]),
        }
    report = {
        "config": {
            "tasks": args.tasks,
            "num_proc": args.num_proc,
            "micro_batches": args.micro_batches,
            "tokens_per_micro_batch": args.tokens_per_micro_batch,
            "tokenizer": "byte (tiny presets)",
            "template": "ni",
            "max_len": 256,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__},
        "results": results,
        "flatness": flat,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
