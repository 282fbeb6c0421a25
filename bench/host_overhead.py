"""Host time per training step that is not the model's: the part of a step a GPU would spend idle.

    python bench/host_overhead.py --out bench/results/host_overhead          # K = 20, 200, 1600 tasks
    python bench/host_overhead.py --out /tmp/h --tasks 20 --steps 6           # a quick look

For each task count K it writes a JSONL suite of K tasks (20 examples each, 40-300 character inputs, 5-60 character
outputs), trains the tiny preset with ADAPT on it (defaults otherwise: 4,096-token micro-batches, G every 10 steps,
a mixture update every step after 10), and times every step and, inside it, the model's own work: the forward and
loss, DeepSpeed's backward and step, the validation forward and G. Host time = step - model. Everything else the
step does (the loader's plan and packing, the validation batch, the mixture update, logging, the ghost-dot hooks
in the backward) runs on the host between GPU kernels that wait for it, and does not shrink with a faster GPU.
Writes OUT/host_overhead.json and .md: per K and step kind (plain, update, val+update), the median step, model and
host milliseconds, and the largest host parts. On this CPU the model is tiny, so host time is what dominates; the
numbers to read are the host milliseconds, which are the same for any model size.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deepspeed.runtime.engine as ds_engine  # noqa: E402

import adapt_fast.data.loader as loader  # noqa: E402
import adapt_fast.model.ghost as ghost  # noqa: E402
import adapt_fast.model.loss as loss  # noqa: E402
import adapt_fast.train as train  # noqa: E402

MODEL = {  # the model's own work: what a faster GPU shortens
    "forward+loss": (loss, "per_task_loss"),
    "backward": (ds_engine.DeepSpeedEngine, "backward"),
    "optimizer": (ds_engine.DeepSpeedEngine, "step"),
    "validation forward": (train.Trainer, "validation_losses"),
    "G": (train.Trainer, "compute_G"),
}
HOST = {  # host parts, timed on their own (inside the host time; the backward's hooks inside "backward")
    "loader plan": (loader.PackedLoader, "_plan"),
    "loader pack": (loader, "pack_items"),
    "validation batch": (train.Trainer, "_validation_batches"),
    "log": (train.Trainer, "_log"),
    "ghost-dot hooks (in backward)": (ghost.GhostDots, "_module_dots"),
}


def write_suite(path: Path, num_tasks: int, per_task: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    with open(path, "w") as f:
        for k in range(num_tasks):
            for _ in range(per_task):
                x = "".join(rng.choice(letters, int(rng.integers(40, 300))))
                y = "".join(rng.choice(letters, int(rng.integers(5, 60))))
                f.write(json.dumps({"task": f"t{k:04d}", "input": x, "output": y}) + "\n")


class StepTimer:
    """Wraps the MODEL and HOST functions and Trainer.one_step; one dict of seconds per step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = collections.defaultdict(float)
        self.depth = 0  # model calls nest (validation forward inside G): count the outermost only

    def wrap(self, owner, name: str, label: str, model: bool) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            nested = model and self.depth > 0
            self.depth += model
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= model
                if not nested:
                    self.current[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def install(self) -> None:
        for label, (owner, name) in MODEL.items():
            self.wrap(owner, name, label, model=True)
        for label, (owner, name) in HOST.items():
            self.wrap(owner, name, label, model=False)
        one_step = train.Trainer.one_step

        def timed_step(trainer):
            meta, step = trainer.cfg.meta, trainer.step
            kind = "val+update" if step % meta.val_every == 0 and step >= meta.warmup else None
            kind = kind or ("update" if step >= meta.warmup else "plain")
            start = time.perf_counter()
            row = one_step(trainer)
            self.current["step"] = time.perf_counter() - start
            self.steps.append({"kind": kind, **self.current})
            self.current = collections.defaultdict(float)
            return row

        train.Trainer.one_step = timed_step


def summarize(steps: list[dict]) -> dict:
    """Per step kind: median step, model and host ms, and each host part's median ms."""
    out = {}
    for kind in ("plain", "update", "val+update"):
        rows = [s for s in steps[1:] if s["kind"] == kind]  # the first step pays one-off costs
        if not rows:
            continue
        model = [sum(s.get(label, 0.0) for label in MODEL) for s in rows]
        med = {
            "steps": len(rows),
            "step_ms": 1e3 * statistics.median(s["step"] for s in rows),
            "model_ms": 1e3 * statistics.median(model),
            "host_ms": 1e3 * statistics.median(s["step"] - m for s, m in zip(rows, model, strict=True)),
        }
        med["parts_ms"] = {label: 1e3 * statistics.median(s.get(label, 0.0) for s in rows) for label in HOST}
        out[kind] = med
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for host_overhead.json and .md")
    parser.add_argument("--tasks", default="20,200,1600", help="task counts, comma-separated")
    parser.add_argument("--steps", type=int, default=22, help="training steps per task count")
    parser.add_argument("--work", default="", help="folder for the suites, caches and runs (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.work or tempfile.mkdtemp(prefix="host_overhead-"))
    timer = StepTimer()
    timer.install()
    results = {}
    for num_tasks in (int(k) for k in args.tasks.split(",")):
        work = scratch / f"k{num_tasks}"
        work.mkdir(parents=True, exist_ok=True)
        write_suite(work / "suite.jsonl", num_tasks)
        timer.steps = []
        argv = [
            "--data.path", str(work / "suite.jsonl"), "--data.cache_dir", str(work / "cache"),
            "--output_dir", str(work / "run"), "--overwrite_output_dir",
            "--budget.tokens", str(4096 * args.steps), "--training.max_steps", str(args.steps),
        ]  # fmt: skip
        train.main(argv)
        results[num_tasks] = summarize(timer.steps)
        print(json.dumps({num_tasks: results[num_tasks]}), file=sys.stderr)
    (out / "host_overhead.json").write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    lines = [
        "| tasks | step kind | steps | step ms | model ms | host ms | " + " | ".join(HOST) + " |",
        "|---" * (6 + len(HOST)) + "|",
    ]
    for num_tasks, kinds in results.items():
        for kind, r in kinds.items():
            parts = " | ".join(f"{r['parts_ms'][label]:.1f}" for label in HOST)
            lines.append(f"| {num_tasks} | {kind} | {r['steps']} | {r['step_ms']:.1f} | {r['model_ms']:.1f} | "
                         f"{r['host_ms']:.1f} | {parts} |")  # fmt: skip
    (out / "host_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
