"""Does the learned mixture pay off? ADAPT against static mixtures under 1%, 5% and 10% budgets, in miniature.

    python bench/reproduce.py --out bench/results/reproduce          # the whole study (see --help for the knobs)
    python bench/reproduce.py --quick --out /tmp/rq                  # smoke test: every code path, a few minutes
    python bench/reproduce.py --out bench/results/reproduce --report # tables and plots from the runs so far

The protocol (the ADAPT paper's comparison, scaled down so that it runs on 2 CPU cores):

- Suite. 12 synthetic training tasks (adapt_fast.data.synthetic) of clearly different size (0.3x to 4x a base
  size, so `uniform` and `proportional` differ) and difficulty (letter maps, copying, counting, arithmetic),
  one of them `random_output` (outputs unrelated to inputs: nothing to learn), written as NI task files with
  a fixed validation split per task. A separate test folder holds fresh instances of every training task
  (deduplicated against the training inputs) and 4 held-out tasks related to the training tasks but never
  trained on (a paraphrased definition of copy, reverse composed with uppercase, the keyword task with unseen
  praise words, counting words instead of letters): our stand-in for the paper's out-of-domain benchmarks.
  The validation split drives ADAPT's meta-gradient and the trainer's curves; every number in the tables comes
  from the test folder, which no method ever sees.
- Model. A small Llama (byte tokenizer) from random init, one initialisation per seed, written once as a
  local HF folder under <out>/work/models (model.name accepts a folder).
- Methods. uniform, proportional (tokens), proportional with a T5/FLAN examples cap, temperature (T = 3),
  adapt (the trainer's defaults), adapt_rms (mixture.normalize rms, lambda 1: the lookahead term in units of
  its running RMS, so the mixture's sharpness does not follow the learning-rate schedule); ablations of adapt
  at 5%: tau near-max / near-mean (the default tau = 1 is the moderate one), lambda = 0, val_every = 1, and the
  objective without random_output (meta.val_tasks = the 11 learnable tasks).
- Budgets. 1%, 5%, 10% of the suite's training tokens (budget.fraction), seeds 0, 1, 2. Every method at a
  budget has the same steps and the same learning-rate schedule: the trainer's cosine schedule is a function
  of budget / tokens_per_micro_batch, and both are fixed per budget (same lr, warm-up, micro-batch).
- Metrics (per budget and method, mean +- std over seeds): test loss over the training tasks (mean, worst,
  worst without random_output), exact match by greedy generation (mean, worst task without random_output),
  the same on the held-out tasks, tokens given to each task, tokens needed to reach uniform's final worst-case
  loss (on the validation curve), the final mixture's entropy and its largest share (collapse check).
- Then the same methods on the Super-NaturalInstructions sample (../shared/data/natural-instructions, grouped by
  category, 15% of each task's instances held out as test), validation loss only. The sample is small (1% of
  its tokens is a single micro-batch), so its budgets are 50% and 200% (two epochs) of its training tokens.

Runs are independent processes' work items: `--workers` processes (one torch thread each on CPU) take them in
order of budget, then seed. Each finished run writes <out>/runs/<suite>/<budget>/<variant>/s<seed>.json; a
rerun skips runs whose JSON exists with the same settings, so the study resumes, and the tables
(<out>/results.md, <out>/summary.json) and plots (<out>/plots/) are rebuilt from whatever runs exist.
Scratch (trainer outputs, tokenised cache, models) lives in <out>/work, removed run by run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NI_DATA = REPO.parent / "shared" / "data" / "natural-instructions"

# ----------------------------------------------------------------------------- the suite

TRAIN_TASKS = (
    "has_digit", "length_class", "keyword", "count", "parity", "last_letter",
    "uppercase", "copy", "sort", "addition", "multiply", "random_output",
)  # fmt: skip
RANDOM_TASK = "random_output"
# Relative sizes (x the base examples per task). Large: an easy classification task and the random task (as
# large noisy sources often are); small: the hard arithmetic tasks. Proportional mixing follows these.
SIZES = {
    "keyword": 4.0, "random_output": 3.0, "copy": 2.0, "uppercase": 1.5, "has_digit": 1.0, "length_class": 1.0,
    "last_letter": 0.8, "parity": 0.8, "count": 0.6, "sort": 0.5, "addition": 0.4, "multiply": 0.3,
}  # fmt: skip
HELDOUT_TASKS = ("final_letter", "has_capital", "praise_unseen", "count_words")
NI_CAP = 40
QUICK_NI_VARIANTS = ("uniform", "adapt", "adapt_rms")  # --quick keeps the NI part to a smoke test
DATA_SEED = 0  # the data are the same for every run; seeds vary the initialisation and the sampling order


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of the study."""

    name: str
    examples_per_task: int  # base size E: task k has round(E * SIZES[k]) training examples
    val_per_task: int  # fixed validation split (ADAPT's meta-gradient, curves)
    test_per_task: int  # test instances per training task and per held-out task
    hidden: int
    layers: int
    lr: float
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]
    ablation_budgets: tuple[float, ...]
    ni_budgets: tuple[float, ...]
    ni_seeds: tuple[int, ...]
    tokens_per_micro_batch: int = 4096
    ni_tokens_per_micro_batch: int = 8192
    max_len: int = 512
    meta: tuple[tuple[str, str], ...] = ()  # trainer overrides shared by every adapt run (quick mode only)
    temperature: float = 3.0
    max_new_tokens: int = 20


FULL = Scale(
    name="full", examples_per_task=7500, val_per_task=48, test_per_task=60, hidden=64, layers=2, lr=1e-2,
    seeds=(0, 1, 2), budgets=(0.01, 0.05, 0.10), ablation_budgets=(0.05,),
    ni_budgets=(0.5, 2.0), ni_seeds=(0, 1, 2), ni_tokens_per_micro_batch=4096,
)  # fmt: skip
QUICK = Scale(
    name="quick", examples_per_task=200, val_per_task=8, test_per_task=6, hidden=32, layers=1, lr=1e-2,
    seeds=(0,), budgets=(0.05, 0.10), ablation_budgets=(0.10,), ni_budgets=(0.10,), ni_seeds=(0,),
    tokens_per_micro_batch=2048, ni_tokens_per_micro_batch=2048,
    meta=(("--meta.warmup", "1"), ("--meta.val_every", "2")),
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]
    ablation: bool = False
    label: str = ""


def variants(scale: Scale, suite: str = "synthetic") -> list[Variant]:
    # T5/FLAN examples-proportional with a cap: the synthetic base task size; NI: 40 examples (the median category)
    cap = str(scale.examples_per_task if suite == "synthetic" else NI_CAP)
    return [
        Variant("uniform", ("--mixture.method", "uniform")),
        Variant("proportional", ("--mixture.method", "proportional")),
        Variant("proportional_cap", ("--mixture.method", "proportional", "--mixture.cap", cap), label=f"cap {cap}"),
        Variant("temperature", ("--mixture.method", "temperature", "--mixture.temperature", str(scale.temperature))),
        Variant("adapt", ("--mixture.method", "adapt"), label="tau 1, lambda 1e-3, val_every 10"),
        Variant("adapt_rms", ADAPT_RMS, label="normalize rms, lambda 1"),
        Variant("adapt_tau0.05", ("--mixture.method", "adapt", "--mixture.tau", "0.05"), True, "tau 0.05: near-max"),
        Variant("adapt_tau20", ("--mixture.method", "adapt", "--mixture.tau", "20"), True, "tau 20: near-mean"),
        Variant("adapt_lambda0", ("--mixture.method", "adapt", "--mixture.entropy_weight", "0"), True, "lambda 0"),
        Variant("adapt_val1", ("--mixture.method", "adapt", "--meta.val_every", "1"), True, "val_every 1"),
        # Φ over the learnable tasks only: random_output's loss has an entropy floor, so in the default Φ over
        # every training task it is always among the worst and draws objective weight (see the README section).
        Variant(
            "adapt_obj_norandom",
            ("--mixture.method", "adapt", "--meta.val_tasks", ",".join(t for t in TRAIN_TASKS if t != RANDOM_TASK)),
            True,
            f"Φ without {RANDOM_TASK}",
        ),
    ]


ADAPT_RMS = ("--mixture.method", "adapt", "--mixture.normalize", "rms", "--mixture.entropy_weight", "1")
STATIC = ("uniform", "proportional", "proportional_cap", "temperature")


@dataclass(frozen=True)
class RunSpec:
    suite: str  # synthetic | ni
    budget: float
    variant: Variant
    seed: int

    @property
    def id(self) -> str:
        return f"{self.suite}/b{self.budget * 100:g}/{self.variant.name}/s{self.seed}"


@dataclass
class Paths:
    out: Path
    work: Path = field(init=False)

    def __post_init__(self):
        self.work = self.out / "work"

    def result(self, spec: RunSpec) -> Path:
        return self.out / "runs" / f"{spec.id}.json"

    def suite(self, suite: str) -> Path:
        return self.work / "data" / suite

    def model(self, scale: Scale, seed: int) -> Path:
        return self.work / "models" / f"llama-h{scale.hidden}-l{scale.layers}-seed{seed}"


def _set_splits(task_file: Path, n_val: int) -> set[str]:
    """Mark the first n_val instances of an NI file as validation, the rest train; returns the inputs."""
    doc = json.loads(task_file.read_text())
    for i, inst in enumerate(doc["Instances"]):
        inst["split"] = "validation" if i < n_val else "train"
    task_file.write_text(json.dumps(doc, indent=0))
    return {inst["input"] for inst in doc["Instances"]}


def _stamp_matches(stamp: Path, signature: dict) -> bool:
    """The data folder was written with these settings (compared as JSON: tuples come back as lists)."""
    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(signature))


def build_synthetic(paths: Paths, scale: Scale) -> tuple[Path, Path]:
    """<work>/data/synthetic/{train,test}/tasks/*.json (deterministic; rebuilt only when missing)."""
    from adapt_fast.data.synthetic import write_synthetic_suite

    root = paths.suite("synthetic")
    train, test = root / "train", root / "test"
    stamp = root / "done.json"
    signature = {"scale": scale.name, "E": scale.examples_per_task, "val": scale.val_per_task,
                 "test": scale.test_per_task, "sizes": SIZES, "heldout": HELDOUT_TASKS}  # fmt: skip
    if _stamp_matches(stamp, signature):
        return train, test
    shutil.rmtree(root, ignore_errors=True)
    sizes = {k: v + scale.val_per_task / scale.examples_per_task for k, v in SIZES.items()}
    write_synthetic_suite(train, DATA_SEED, scale.examples_per_task, TRAIN_TASKS, num_positive_examples=0, sizes=sizes)
    seen = {name: _set_splits(train / "tasks" / f"{name}.json", scale.val_per_task) for name in TRAIN_TASKS}
    # Test instances: a different data seed, deduplicated against the training inputs (small input spaces repeat).
    n = 4 * scale.test_per_task
    write_synthetic_suite(test, DATA_SEED + 1, n, TRAIN_TASKS, 0, sizes=dict.fromkeys(TRAIN_TASKS, 1.0))
    write_synthetic_suite(test, DATA_SEED + 2, n, HELDOUT_TASKS, 0, sizes=dict.fromkeys(HELDOUT_TASKS, 1.0))
    for name in TRAIN_TASKS + HELDOUT_TASKS:
        f = test / "tasks" / f"{name}.json"
        doc = json.loads(f.read_text())
        skip = seen.get(name, set())
        kept, inputs = [], set()
        for inst in doc["Instances"]:
            if inst["input"] not in skip and inst["input"] not in inputs:
                kept.append(inst)
                inputs.add(inst["input"])
        doc["Instances"] = kept[: scale.test_per_task]
        f.write_text(json.dumps(doc, indent=0))
    stamp.write_text(json.dumps(signature))
    return train, test


def build_ni(paths: Paths, test_fraction: float = 0.15, val_fraction: float = 0.1) -> tuple[Path, Path]:
    """The NI sample split per task file: test (held out from everything), validation, train."""
    root = paths.suite("ni")
    train, test = root / "train", root / "test"
    stamp = root / "done.json"
    signature = {"test": test_fraction, "val": val_fraction, "files": sorted(p.name for p in NI_DATA.glob("tasks/*"))}
    if _stamp_matches(stamp, signature):
        return train, test
    shutil.rmtree(root, ignore_errors=True)
    for folder in (train, test):
        (folder / "tasks").mkdir(parents=True)
    for index, f in enumerate(sorted((NI_DATA / "tasks").glob("*.json"))):
        doc = json.loads(f.read_text(encoding="utf-8"))
        instances = doc["Instances"]
        order = np.random.default_rng([DATA_SEED, index, 4242]).permutation(len(instances))
        n_test = max(1, round(test_fraction * len(instances)))
        n_val = max(1, round(val_fraction * len(instances)))
        test_doc = {**doc, "Instances": [instances[i] for i in order[:n_test]]}
        train_doc = {
            **doc,
            "Instances": [
                {**instances[i], "split": "validation" if j < n_val else "train"} for j, i in enumerate(order[n_test:])
            ],
        }
        (test / "tasks" / f.name).write_text(json.dumps(test_doc, ensure_ascii=False))
        (train / "tasks" / f.name).write_text(json.dumps(train_doc, ensure_ascii=False))
    stamp.write_text(json.dumps(signature))
    return train, test


def build_model(paths: Paths, scale: Scale, seed: int) -> Path:
    """A small Llama (byte tokenizer) from random init with this seed, saved as a local HF folder."""
    folder = paths.model(scale, seed)
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapt_fast.data.tokenizer import build_byte_tokenizer
    from adapt_fast.model.loading import BYTE_IDS, TINY_VOCAB

    heads = max(2, scale.hidden // 16)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=scale.hidden, intermediate_size=3 * scale.hidden,
        num_hidden_layers=scale.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=scale.hidden // heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_byte_tokenizer().save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------- one run


def micro_batch(scale: Scale, suite: str) -> int:
    return scale.tokens_per_micro_batch if suite == "synthetic" else scale.ni_tokens_per_micro_batch


def max_len(scale: Scale, suite: str) -> int:
    return scale.max_len if suite == "synthetic" else 1024


def trainer_args(spec: RunSpec, scale: Scale, paths: Paths, work: Path) -> list[str]:
    train = paths.suite(spec.suite) / "train"
    args = [
        "--data.path", str(train), "--data.cache_dir", str(paths.work / "cache"),
        "--data.group_by", "category" if spec.suite == "ni" else "task",
        "--data.max_len", str(max_len(scale, spec.suite)),
        "--tokens_per_micro_batch", str(micro_batch(scale, spec.suite)),
        "--model.name", str(paths.model(scale, spec.seed)),
        "--training.lr", str(scale.lr), "--seed", str(spec.seed),
        "--budget.fraction", str(spec.budget), "--output_dir", str(work),
    ]  # fmt: skip
    args += list(spec.variant.args)
    if spec.variant.name.startswith("adapt"):
        for key, value in scale.meta:
            if key not in spec.variant.args:
                args += [key, value]
    return args


def code_version() -> dict:
    """What code a run used: a hash of the trainer's and this script's sources (`code`), and the git commit they
    were checked out at, `-dirty` when they differ from it (`commit`, for the reader). A run whose code differs
    is redone, and the tables say when their runs come from more than one version."""
    sources = sorted([*REPO.glob("adapt_fast/**/*.py"), *REPO.glob("kernels/**/*.py"), *REPO.glob("csrc/*.*"),
                      Path(__file__).resolve()])  # fmt: skip
    digest = hashlib.sha256()
    for f in sources:
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        tracked = ["adapt_fast", "kernels", "csrc", "bench/reproduce.py"]
        changed = subprocess.run([*git, "status", "--porcelain", "--", *tracked], capture_output=True, text=True,
                                 check=True)  # fmt: skip
        label = commit.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        label = "unknown (no git)"
    return {"code": digest.hexdigest()[:12], "commit": label}


def settings_hash(spec: RunSpec, scale: Scale, paths: Paths, code: str) -> str:
    args = trainer_args(spec, scale, paths, Path("-"))
    parts = [args, dataclasses.asdict(scale), SIZES, HELDOUT_TASKS, code]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.replace(str(paths.out), "<out>").encode()).hexdigest()[:16]


def _records(folder: Path, group_by: str) -> list[dict]:
    from adapt_fast.evaluate import load_split

    return load_split(folder, group_by=group_by, val_fraction=0.0)


def _downsample(rows: list[dict], keep: int) -> list[dict]:
    if len(rows) <= keep:
        return rows
    idx = np.unique(np.linspace(0, len(rows) - 1, keep).round().astype(int))
    return [rows[i] for i in idx]


def run_one(spec: RunSpec, scale: Scale, paths: Paths) -> dict:
    """Train, evaluate on the test folder, return the run's compact result (the trainer's folder is removed)."""
    import torch

    from adapt_fast.evaluate import evaluate
    from adapt_fast.model.loading import load_model_and_tokenizer
    from adapt_fast.report import read_metrics
    from adapt_fast.train import main

    work = paths.work / "runs" / spec.id.replace("/", "_")
    shutil.rmtree(work, ignore_errors=True)
    version = _WORKER_CODE or code_version()  # the code this process imported (a worker's, at its start)
    t0, cpu0 = time.time(), time.process_time()
    report = main(trainer_args(spec, scale, paths, work))
    train_wall = time.time() - t0
    if not isinstance(report, dict):
        raise RuntimeError(f"the trainer stopped ({report!r})")
    rows = read_metrics(work / "metrics.jsonl")

    t1 = time.time()
    model, tokenizer = load_model_and_tokenizer(str(work / "final"))
    group_by = "category" if spec.suite == "ni" else "task"
    records = _records(paths.suite(spec.suite) / "test", group_by)
    generate = spec.suite == "synthetic"
    kw = dict(generate=generate, max_new_tokens=scale.max_new_tokens, batch_size=64,
              tokens_per_micro_batch=micro_batch(scale, spec.suite), max_len=max_len(scale, spec.suite))  # fmt: skip
    with torch.no_grad():
        test = evaluate(model, tokenizer, [r for r in records if r["task"] in report["tokens_per_task"]], **kw)
        heldout_records = [r for r in records if r["task"] not in report["tokens_per_task"]]
        heldout = evaluate(model, tokenizer, heldout_records, **kw) if heldout_records else None
    eval_wall = time.time() - t1

    curve = [
        {"step": r["step"], "tokens": r["tokens_consumed"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r
    ]
    # the mixture each step was drawn with, at the tokens consumed before that step
    starts = [0] + [r["tokens_consumed"] for r in rows[:-1]]
    mixture = _downsample([{"tokens": t, "p": r["mixture"]} for t, r in zip(starts, rows, strict=True)], 120)
    result = {
        "id": spec.id, "suite": spec.suite, "budget_fraction": spec.budget, "variant": spec.variant.name,
        "seed": spec.seed, "settings": settings_hash(spec, scale, paths, version["code"]),
        "code": version["code"], "commit": version["commit"], "scale": scale.name,
        "args": trainer_args(spec, scale, paths, Path("<work>")),
        "budget_tokens": report["budget_tokens"], "tokens_consumed": report["tokens_consumed"],
        "steps": report["steps"], "tokens_per_task": report["tokens_per_task"],
        "mixture_final": report["mixture_final"], "mixture_entropy_final": report["mixture_entropy_final"],
        "val_loss_final": report["val_loss_per_task"], "examples_reused": report.get("examples_reused"),
        "test": {k: {m: v.get(m) for m in ("val_loss", "exact_match", "rouge_l")} for k, v in test["tasks"].items()},
        "heldout": None if heldout is None else {
            k: {m: v.get(m) for m in ("val_loss", "exact_match", "rouge_l")} for k, v in heldout["tasks"].items()
        },
        "curve": curve, "mixture": mixture,
        "train_wall_seconds": train_wall, "train_seconds": report.get("train_seconds"),
        "eval_wall_seconds": eval_wall, "threads": torch.get_num_threads(),
        "cpu_seconds": time.process_time() - cpu0,  # this process's CPU time: the run's cost on a free core
    }  # fmt: skip
    dots = [r["meta_dots"] for r in rows if "meta_dots" in r]
    if dots:
        names = list(dots[0])
        d = np.array([[row.get(n, np.nan) for n in names] for row in dots], dtype=float)
        result["meta_dots"] = {
            "updates": len(dots),
            "mean": dict(zip(names, np.nanmean(d, 0).tolist(), strict=True)),
            "std": dict(zip(names, np.nanstd(d, 0).tolist(), strict=True)),
            "positive_fraction": dict(zip(names, np.nanmean(d > 0, 0).tolist(), strict=True)),
        }
        if spec.seed == 0:  # the whole trajectory of one seed, for the analysis of ADAPT's updates
            (paths.out / "traces").mkdir(parents=True, exist_ok=True)
            keep = [{k: r[k] for k in ("step", "tokens_consumed", "lr", "mixture", "meta_dots", "val_loss") if k in r}
                    for r in rows]  # fmt: skip
            name = spec.id.replace("/", "_") + ".jsonl.gz"
            with gzip.open(paths.out / "traces" / name, "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
    shutil.rmtree(work, ignore_errors=True)
    return result


_WORKER_CODE: dict | None = None  # the code a worker process runs: what it imported at its start


def _worker_init(threads: int) -> None:
    """Set threads, then import every trainer module and hash the sources as they are now: a worker keeps the code
    it imported for all its runs, so this (not the files at a run's start) is the code its runs used."""
    global _WORKER_CODE
    import importlib

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    files = [(f.relative_to(REPO), "") for f in REPO.glob("adapt_fast/**/*.py")]
    files += [(f.relative_to(REPO), "adapt_fast.") for f in REPO.glob("kernels/*.py")]  # as installed
    for rel, prefix in sorted(files):
        if rel.stem != "__main__":  # a package's command line would run
            importlib.import_module(prefix + ".".join(rel.with_suffix("").parts).removesuffix(".__init__"))
    _WORKER_CODE = code_version()


def _work(item: tuple[RunSpec, Scale, Paths]) -> tuple[str, dict | None, str]:
    spec, scale, paths = item
    log = paths.work / "logs" / (spec.id.replace("/", "_") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as f:
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = f
            try:
                result = run_one(spec, scale, paths)
            finally:
                sys.stdout, sys.stderr = saved
        target = paths.result(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=0))
        tmp.replace(target)
        log.unlink(missing_ok=True)
        return spec.id, result, ""
    except BaseException:  # noqa: BLE001 (a failed run is reported and the study goes on)
        return spec.id, None, traceback.format_exc()


# ----------------------------------------------------------------------------- planning and running


def plan(scale: Scale, suites: list[str], only: set[str] | None) -> list[RunSpec]:
    """Runs in the order they are done: by budget, then seed, then variant (a partial study is complete per seed)."""
    specs = []
    for suite in suites:
        budgets = scale.budgets if suite == "synthetic" else scale.ni_budgets
        seeds = scale.seeds if suite == "synthetic" else scale.ni_seeds
        for budget in sorted(set(budgets) | (set(scale.ablation_budgets) if suite == "synthetic" else set())):
            for seed in seeds:
                for v in variants(scale, suite):
                    if only and v.name not in only:
                        continue
                    if v.ablation and (suite != "synthetic" or budget not in scale.ablation_budgets):
                        continue
                    if suite == "ni" and scale.name == "quick" and v.name not in QUICK_NI_VARIANTS:
                        continue
                    if suite == "synthetic" and not v.ablation and budget not in budgets:
                        continue
                    specs.append(RunSpec(suite, budget, v, seed))
    return specs


def load_results(paths: Paths) -> list[dict]:
    out = []
    for f in sorted((paths.out / "runs").rglob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def cost(spec: RunSpec) -> float:
    """Relative cost of a run (for the time estimate): budget, x2 for ADAPT (G and the ghost dots)."""
    factor = 1.0 if spec.variant.name in STATIC else (4.0 if spec.variant.name == "adapt_val1" else 2.0)
    return spec.budget * factor * (0.01 if spec.suite == "ni" else 1.0) + 0.015  # + start-up and evaluation


def run_study(scale: Scale, paths: Paths, specs: list[RunSpec], workers: int, threads: int) -> None:
    version = code_version()
    print(f"code: commit {version['commit']}, sources {version['code']}", flush=True)
    todo = []
    for spec in specs:
        f = paths.result(spec)
        if f.is_file():
            try:
                if json.loads(f.read_text()).get("settings") == settings_hash(spec, scale, paths, version["code"]):
                    continue
            except (OSError, json.JSONDecodeError):
                pass
        todo.append(spec)
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} done already, {len(todo)} to do "
          f"with {workers} worker(s) x {threads} thread(s)", flush=True)  # fmt: skip
    if not todo:
        return
    suites = {s.suite for s in todo}
    if "synthetic" in suites:
        build_synthetic(paths, scale)
    if "ni" in suites:
        build_ni(paths)
    for seed in sorted({s.seed for s in todo}):
        build_model(paths, scale, seed)
    # Tokenise in a child process: the parent stays small while the workers run (2 workers + a fat parent
    # holding the Arrow tables of a 24M-token suite is how a shared machine runs out of memory).
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=prepare_cache, args=(scale, paths, todo))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"tokenising the data failed (exit code {child.exitcode})")

    total_cost, done_cost, t_start = sum(cost(s) for s in todo), 0.0, time.time()
    failures = 0
    with ctx.Pool(workers, initializer=_worker_init, initargs=(threads,), maxtasksperchild=None) as pool:
        items = [(s, scale, paths) for s in todo]
        by_id = {s.id: s for s in todo}
        for n, (run_id, result, error) in enumerate(pool.imap_unordered(_work, items), start=1):
            done_cost += cost(by_id[run_id])
            elapsed = time.time() - t_start
            eta = elapsed / max(done_cost, 1e-9) * (total_cost - done_cost)
            if result is None:
                failures += 1
                (paths.out / "errors.log").open("a").write(f"== {run_id}\n{error}\n")
                print(f"[{n}/{len(todo)}] {run_id} FAILED (see {paths.out / 'errors.log'})", flush=True)
                continue
            print(f"[{n}/{len(todo)}] {run_id}: train {result['train_wall_seconds']:.0f} s, eval "
                  f"{result['eval_wall_seconds']:.0f} s; elapsed {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", flush=True)  # fmt: skip
            try:
                write_report(scale, paths, plots=False)
            except Exception:  # noqa: BLE001 (the tables are rebuilt at the end anyway)
                traceback.print_exc()
    if failures:
        print(f"{failures} run(s) failed: {paths.out / 'errors.log'}", flush=True)


def prepare_cache(scale: Scale, paths: Paths, specs: list[RunSpec]) -> None:
    """Tokenise each suite once in this process, before the workers (they then only read the cache)."""

    from adapt_fast.config import load_config
    from adapt_fast.data.prepare import load_data, load_tokenizer

    done = set()
    for spec in specs:  # the cache key holds the seed (it seeds the split): one tokenisation per suite and seed
        if (spec.suite, spec.seed) in done:
            continue
        done.add((spec.suite, spec.seed))
        t0 = time.time()
        cfg = load_config(None, [*trainer_args(spec, scale, paths, paths.work / "unused"), "--data.num_proc", "2"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_data(cfg, load_tokenizer(cfg), progress=False)
        if not data.from_cache:
            print(f"tokenised {spec.suite} (seed {spec.seed}): {int(data.train.lengths.sum())} training tokens, "
                  f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- the report


def _ms(values: list[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(values: list[float | None], digits: int = 3, pct: bool = False) -> str:
    m, s, n = _ms(values)
    if m is None:
        return "-"
    if pct:
        return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def run_metrics(r: dict) -> dict:
    """The per-run numbers the tables aggregate."""
    test = r["test"]
    losses = {k: v["val_loss"] for k, v in test.items() if v["val_loss"] is not None}
    learnable = {k: v for k, v in losses.items() if k != RANDOM_TASK}
    out = {
        "loss_mean": float(np.mean(list(losses.values()))),
        "loss_worst": float(max(losses.values())),
        "loss_worst_task": max(losses, key=losses.get),
        "loss_worst_learnable": float(max(learnable.values())) if learnable else None,
        "loss_worst_learnable_task": max(learnable, key=learnable.get) if learnable else None,
        "entropy": r["mixture_entropy_final"],
        "max_share": float(max(r["mixture_final"].values())),
    }
    em = {k: v["exact_match"] for k, v in test.items() if v.get("exact_match") is not None}
    if em:
        out["em_mean"] = float(np.mean(list(em.values())))
        out["em_worst_learnable"] = float(min(v for k, v in em.items() if k != RANDOM_TASK))
    if r.get("heldout"):
        h = r["heldout"]
        hl = [v["val_loss"] for v in h.values() if v["val_loss"] is not None]
        out["heldout_loss_mean"], out["heldout_loss_worst"] = float(np.mean(hl)), float(max(hl))
        hem = [v["exact_match"] for v in h.values() if v.get("exact_match") is not None]
        if hem:
            out["heldout_em_mean"], out["heldout_em_worst"] = float(np.mean(hem)), float(min(hem))
    return out


def _val_reduce(losses: dict, how: str) -> float | None:
    """Worst case over the tasks without random_output ("worst"), or the mean over all tasks ("mean")."""
    if how == "worst":
        vals = [v for k, v in losses.items() if k != RANDOM_TASK and v is not None]
        return max(vals) if vals else None
    vals = [v for v in losses.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def tokens_to_reach(r: dict, target: float, how: str = "worst", smooth: int = 3) -> float | None:
    """First tokens_consumed at which the run's validation loss (`how`: worst case without random_output, or mean),
    averaged over `smooth` consecutive validation points, is at or below `target`; the final full-validation
    point counts. None when never reached. (The trainer logs validation losses every meta.val_every steps on
    meta.val_examples_per_task examples per task, for every method.)"""
    points = [(row["tokens"], _val_reduce(row["val_loss"], how)) for row in r["curve"]]
    points = [p for p in points if p[1] is not None]
    values = np.array([p[1] for p in points], dtype=float)
    for i in range(len(points)):
        if values[max(0, i - smooth + 1) : i + 1].mean() <= target:
            return float(points[i][0])
    final = _val_reduce(r["val_loss_final"], how)
    if final is not None and final <= target:
        return float(r["tokens_consumed"])
    return None


def summarize(results: list[dict], scale: Scale) -> dict:
    """{suite: {budget: {variant: aggregated metrics}}} plus findings."""
    summary: dict = {}
    groups: dict = {}
    for r in results:
        groups.setdefault(r["suite"], {}).setdefault(r["budget_fraction"], {}).setdefault(r["variant"], []).append(r)
    order = [v.name for v in variants(scale)]
    for suite, by_budget in groups.items():
        summary[suite] = {}
        for budget, by_variant in sorted(by_budget.items()):
            uniform = by_variant.get("uniform", [])
            targets = {
                how: float(np.mean([_val_reduce(r["val_loss_final"], how) for r in uniform])) if uniform else None
                for how in ("worst", "mean")
            }
            rows = {}
            for name in sorted(by_variant, key=lambda n: order.index(n) if n in order else 99):
                runs = sorted(by_variant[name], key=lambda r: r["seed"])
                metrics = [run_metrics(r) for r in runs]
                row: dict = {"seeds": [r["seed"] for r in runs]}
                for key in metrics[0]:
                    if isinstance(metrics[0][key], str):
                        row[key] = [m[key] for m in metrics]
                    else:
                        row[key] = [m.get(key) for m in metrics]
                names = list(runs[0]["tokens_per_task"])
                row["tokens_share"] = {
                    n: float(np.mean([r["tokens_per_task"][n] / r["tokens_consumed"] for r in runs])) for n in names
                }
                row["test_loss_per_task"] = {
                    n: float(np.mean([r["test"][n]["val_loss"] for r in runs])) for n in runs[0]["test"]
                }
                if runs[0]["test"][names[0]].get("exact_match") is not None:
                    row["test_em_per_task"] = {
                        n: float(np.mean([r["test"][n]["exact_match"] for r in runs])) for n in runs[0]["test"]
                    }
                for how, target in targets.items():
                    row[f"tokens_to_uniform_{how}"] = [
                        tokens_to_reach(r, target, how) if target is not None else None for r in runs
                    ]
                row["budget_tokens"] = runs[0]["budget_tokens"]
                row["steps"] = runs[0]["steps"]
                row["wall_seconds"] = [r["train_wall_seconds"] + r["eval_wall_seconds"] for r in runs]
                row["meta_dots_mean"] = (
                    {n: float(np.mean([r["meta_dots"]["mean"][n] for r in runs])) for n in names}
                    if all("meta_dots" in r for r in runs) else None
                )  # fmt: skip
                rows[name] = row
            summary[suite][budget] = {"uniform_final_val": targets, "variants": rows}
    summary["findings"] = findings(summary)
    return summary


def _paired(a: dict, b: dict, key: str) -> tuple[float, float, int] | None:
    """Mean and std over seeds of a[key] - b[key], paired by seed."""
    pa = dict(zip(a["seeds"], a[key], strict=True))
    pb = dict(zip(b["seeds"], b[key], strict=True))
    d = [pa[s] - pb[s] for s in pa if s in pb and pa[s] is not None and pb[s] is not None]
    if not d:
        return None
    return float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, len(d)


def _verdict(diff: tuple[float, float, int] | None, lower_is_better: bool = True) -> str:
    """beat / matched / worse: the paired mean difference against twice its standard error."""
    if diff is None:
        return "n/a"
    mean, std, n = diff
    if n < 2:
        return "better (1 seed)" if (mean < 0) == lower_is_better and mean != 0 else "not better (1 seed)"
    se = std / math.sqrt(n)
    signed = mean if lower_is_better else -mean
    if signed < -2 * se and signed < 0:
        return "beat"
    if signed > 2 * se and signed > 0:
        return "worse"
    return "matched"


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def findings(summary: dict) -> list[dict]:
    """Per suite, budget and adapt variant: against the best static mixture and against uniform (paired by seed),
    and where its tokens went."""
    out = []
    for suite, by_budget in summary.items():
        if suite == "findings":
            continue
        for budget, entry in by_budget.items():
            rows = entry["variants"]
            statics = {k: v for k, v in rows.items() if k in STATIC}
            if not statics:
                continue
            for name, row in rows.items():
                if not name.startswith("adapt"):
                    continue
                f: dict = {"suite": suite, "budget": budget, "variant": name}
                for key in ("loss_worst_learnable", "loss_worst", "loss_mean", "heldout_loss_mean", "em_mean"):
                    if key not in row:
                        continue
                    lower = not key.startswith("em")
                    means = {k: _ms(v[key])[0] for k, v in statics.items() if key in v}
                    means = {k: m for k, m in means.items() if m is not None}
                    if not means:
                        continue
                    best = min(means, key=means.get) if lower else max(means, key=means.get)
                    diff = _paired(row, statics[best], key)
                    f[key] = {"best_static": best, "best_static_mean": means[best], "adapt_mean": _ms(row[key])[0],
                              "diff_mean": diff[0] if diff else None, "diff_std": diff[1] if diff else None,
                              "verdict": _verdict(diff, lower)}  # fmt: skip
                if "uniform" in rows:
                    u = rows["uniform"]
                    for key in ("loss_mean", "loss_worst_learnable"):  # the baseline a user would run instead
                        diff = _paired(row, u, key) if key in row and key in u else None
                        if diff is not None:
                            f[f"vs_uniform_{key}"] = {"diff_mean": diff[0], "diff_std": diff[1],
                                                      "verdict": _verdict(diff)}  # fmt: skip
                    hard = {k: v for k, v in u["test_loss_per_task"].items() if k != RANDOM_TASK}
                    ratio = {k: math.log((row["tokens_share"][k] + 1e-4) / (u["tokens_share"][k] + 1e-4)) for k in hard}
                    f["spearman_hardness_vs_token_gain"] = _spearman(list(hard.values()), list(ratio.values()))
                    if RANDOM_TASK in row["tokens_share"]:
                        f["random_share"] = row["tokens_share"][RANDOM_TASK]
                        f["uniform_random_share"] = u["tokens_share"][RANDOM_TASK]
                    hardest = sorted(hard, key=hard.get, reverse=True)[:3]
                    f["hardest3"] = hardest
                    f["hardest3_share"] = sum(row["tokens_share"][k] for k in hardest)
                    f["hardest3_uniform_share"] = sum(u["tokens_share"][k] for k in hardest)
                f["entropy_mean"] = _ms(row["entropy"])[0]
                f["max_share_mean"] = _ms(row["max_share"])[0]
                f["log_K"] = math.log(len(row["tokens_share"]))
                out.append(f)
    return out


COLUMNS = [
    ("loss_mean", "test loss mean", 3, False),
    ("loss_worst", "worst (all)", 3, False),
    ("loss_worst_learnable", "worst (no random)", 3, False),
    ("em_mean", "EM mean %", 1, True),
    ("em_worst_learnable", "EM worst %", 1, True),
    ("heldout_loss_mean", "held-out loss mean", 3, False),
    ("heldout_loss_worst", "held-out worst", 3, False),
    ("heldout_em_mean", "held-out EM mean %", 1, True),
    ("heldout_em_worst", "held-out EM worst %", 1, True),
    ("entropy", "H(p) final", 2, False),
    ("max_share", "max p", 2, False),
]


def markdown(summary: dict, scale: Scale, results: list[dict]) -> str:
    lines = [
        "# ADAPT vs static mixtures, in miniature (bench/reproduce.py)",
        "",
        f"Scale `{scale.name}`: {len(results)} runs. Numbers are mean ± std over seeds (n in the last column). "
        "Losses and exact match (EM) are on the test instances, which no method sees; `worst (no random)` leaves "
        f"out `{RANDOM_TASK}` (nothing to learn: its loss is the entropy of random letters), `EM worst` likewise. "
        "`tokens to U-worst` / `U-mean`: tokens consumed until the validation worst case (no random) / mean loss, "
        "averaged over 3 consecutive validation points, first reaches uniform's final value at that budget (mean "
        "over the seeds that reach it; reached/total).",
        "",
    ]
    versions = collections.Counter((r.get("commit", "unknown"), r.get("code", "unknown")) for r in results)
    if len(versions) == 1:
        (commit, code), _ = versions.most_common(1)[0]
        lines += [f"Code: commit `{commit}` (sources `{code}`).", ""]
    else:
        listed = ", ".join(f"`{c}` (sources `{h}`): {n} runs" for (c, h), n in sorted(versions.items()))
        lines += [f"**These runs come from {len(versions)} versions of the code**, not comparable: {listed}.", ""]
    for suite in ("synthetic", "ni"):
        if suite not in summary:
            continue
        labels = {v.name: v.label for v in variants(scale, suite)}
        lines += [
            f"## {'Synthetic suite' if suite == 'synthetic' else 'Super-NaturalInstructions sample (by category)'}",
            "",
        ]
        if suite == "ni":
            lines += [
                "A small model from random init learns little of this data: validation (test-split) loss only.",
                "",
            ]
        for budget, entry in summary[suite].items():
            rows = entry["variants"]
            any_row = next(iter(rows.values()))
            lines += [f"### budget {budget * 100:g}% ({any_row['budget_tokens']} tokens, {any_row['steps']} steps)", ""]
            cols = [c for c in COLUMNS if any(c[0] in r and any(x is not None for x in r[c[0]]) for r in rows.values())]
            reach = ["tokens to U-worst", "tokens to U-mean"]
            head = ["method"] + [c[1] for c in cols] + reach + ["n"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for name, row in rows.items():
                cells = [name + (f" ({labels[name]})" if labels.get(name) else "")]
                cells += [_fmt(row.get(c[0], []), c[2], c[3]) for c in cols]
                for how in ("worst", "mean"):
                    reached = [t for t in row[f"tokens_to_uniform_{how}"] if t is not None]
                    cells.append(f"{np.mean(reached) / 1e3:.0f}k ({len(reached)}/{len(row['seeds'])})" if reached
                                 else f"- (0/{len(row['seeds'])})")  # fmt: skip
                cells.append(str(len(row["seeds"])))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            names = list(any_row["tokens_share"])
            lines += ["Tokens per task, % of the budget (mean over seeds); last row: uniform's test loss per task "
                      "at this budget.", ""]  # fmt: skip
            lines += ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for name, row in rows.items():
                lines.append(f"| {name} | " + " | ".join(f"{100 * row['tokens_share'][n]:.1f}" for n in names) + " |")
            if "uniform" in rows:
                u = rows["uniform"]["test_loss_per_task"]
                lines.append("| *uniform test loss* | " + " | ".join(f"*{u[n]:.2f}*" for n in names) + " |")
                if "test_em_per_task" in rows["uniform"]:
                    e = rows["uniform"]["test_em_per_task"]
                    lines.append("| *uniform test EM %* | " + " | ".join(f"*{100 * e[n]:.0f}*" for n in names) + " |")
            if "adapt" in rows and "test_em_per_task" in rows["adapt"]:
                e = rows["adapt"]["test_em_per_task"]
                lines.append("| *adapt test EM %* | " + " | ".join(f"*{100 * e[n]:.0f}*" for n in names) + " |")
            lines.append("")
            plot = Path("plots") / f"{suite}_b{budget * 100:g}.png"
            lines += [f"![mixtures, seed 0, budget {budget * 100:g}%]({plot})", ""]
    lines += ["## Findings (computed)", ""]
    for f in summary.get("findings", []):
        parts = [f"**{f['suite']} {f['budget'] * 100:g}% {f['variant']}**:"]
        for key in ("loss_worst_learnable", "loss_worst", "loss_mean", "heldout_loss_mean", "em_mean"):
            if key in f:
                v = f[key]
                d = "" if v["diff_mean"] is None else f" (Δ {v['diff_mean']:+.3f} ± {v['diff_std']:.3f})"
                parts.append(f"{key} {v['verdict']} vs best static `{v['best_static']}`{d};")
        for key in ("loss_mean", "loss_worst_learnable"):
            if f"vs_uniform_{key}" in f:
                v = f[f"vs_uniform_{key}"]
                parts.append(f"{key} {v['verdict']} vs `uniform` (Δ {v['diff_mean']:+.3f} ± {v['diff_std']:.3f});")
        if "random_share" in f:
            parts.append(
                f"random_output share {100 * f['random_share']:.1f}% (uniform {100 * f['uniform_random_share']:.1f}%);"
            )
        if "hardest3" in f:
            rho = f["spearman_hardness_vs_token_gain"]
            parts.append(f"3 hardest tasks ({', '.join(f['hardest3'])}) {100 * f['hardest3_share']:.1f}% "
                         f"(uniform {100 * f['hardest3_uniform_share']:.1f}%); "
                         f"Spearman(uniform loss, log token gain) {rho:+.2f};")  # fmt: skip
        parts.append(
            f"final entropy {f['entropy_mean']:.2f} of log K = {f['log_K']:.2f}, max share {f['max_share_mean']:.2f}."
        )
        lines.append("- " + " ".join(parts))
    lines.append("")
    return "\n".join(lines)


def plot_mixtures(results: list[dict], paths: Paths, scale: Scale) -> None:
    """Per suite and budget, seed 0: the static mixtures as bars, every adapt variant's mixture over tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    (paths.out / "plots").mkdir(parents=True, exist_ok=True)
    groups: dict = {}
    for r in results:
        if r["seed"] == min(scale.seeds + scale.ni_seeds):
            groups.setdefault((r["suite"], r["budget_fraction"]), {})[r["variant"]] = r
    order = [v.name for v in variants(scale)]
    for (suite, budget), runs in groups.items():
        names = list(next(iter(runs.values()))["tokens_per_task"])
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        colors = [cmap(i % 20) for i in range(len(names))]
        adapts = [n for n in order if n in runs and n.startswith("adapt")]
        statics = [n for n in order if n in runs and not n.startswith("adapt")]
        panels = 1 + len(adapts)
        fig = Figure(figsize=(4.2 * min(panels, 3), 3.4 * math.ceil(panels / 3)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(math.ceil(panels / 3), min(panels, 3), 1)
        left = np.zeros(len(statics))
        for i, n in enumerate(names):
            share = np.array([runs[s]["tokens_per_task"][n] / runs[s]["tokens_consumed"] for s in statics])
            ax.barh(range(len(statics)), share, left=left, color=colors[i], label=n)
            left += share
        ax.set_yticks(range(len(statics)), statics, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title("static mixtures (token shares)", fontsize=8)
        for j, name in enumerate(adapts, start=2):
            ax = fig.add_subplot(math.ceil(panels / 3), min(panels, 3), j)
            m = runs[name]["mixture"]
            x = [row["tokens"] for row in m]
            ys = np.array([[row["p"][n] for row in m] for n in names])
            ax.stackplot(x, ys, colors=colors, labels=names)
            ax.set_ylim(0, 1)
            ax.set_xlim(0, runs[name]["budget_tokens"])
            ax.set_title(f"{name}: p over tokens", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(names), 8), fontsize=6)
        fig.suptitle(f"{suite}, budget {budget * 100:g}%, seed {min(scale.seeds)}", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        fig.savefig(paths.out / "plots" / f"{suite}_b{budget * 100:g}.png", dpi=110)


def _arg(args: list[str], key: str, default: float) -> float:
    return float(args[args.index(key) + 1]) if key in args else default


def adapt_diagnostics(results: list[dict], paths: Paths) -> list[dict]:
    """From the seed-0 traces of the adapt runs: what drives the mixture updates, early / middle / late.

    Per update: the lookahead term eta * d_k and the entropy term lambda * (log p_k + 1), each centred over
    the tasks present (only differences between tasks move the mixture) and as an RMS; their ratio says which
    one sets the mixture's equilibrium p_k ∝ exp(eta d_k / lambda). Also: tasks absent from the meta batch
    (d_k = nan in metrics.jsonl; the trainer then uses d_k = 0), the objective's weights w = softmax(l / tau)
    on the validation losses, and how far p is from uniform (total variation)."""
    out = []
    for r in results:
        if not r["variant"].startswith("adapt"):
            continue
        trace = paths.out / "traces" / (r["id"].replace("/", "_") + ".jsonl.gz")
        if not trace.is_file():
            continue
        with gzip.open(trace, "rt") as f:
            rows = [json.loads(line) for line in f]
        names = list(rows[0]["mixture"])
        K = len(names)
        lam = _arg(r["args"], "--mixture.entropy_weight", 1e-3)
        tau = _arg(r["args"], "--mixture.tau", 1.0)
        updates = [row for row in rows if "meta_dots" in row]
        if not updates:
            continue
        phases = {"early": [], "middle": [], "late": []}
        for i, row in enumerate(updates):
            phase = ("early", "middle", "late")[min(2, 3 * i // len(updates))]
            d = np.array([np.nan if row["meta_dots"][n] is None else row["meta_dots"][n] for n in names], float)
            p = np.array([row["mixture"][n] for n in names])
            present = np.isfinite(d)
            phases[phase].append((row["lr"] * d, p, 1 - present.mean()))
        entry = {"id": r["id"], "variant": r["variant"], "budget": r["budget_fraction"], "updates": len(updates),
                 "lambda": lam, "tau": tau}  # fmt: skip
        for phase, vals in phases.items():
            if vals:
                look = np.array([v[0] for v in vals])  # (updates, K) eta * d_k, nan where absent
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_update = np.nanmean(np.sqrt(np.nanmean((look - np.nanmean(look, 1, keepdims=True)) ** 2, 1)))
                    mean_look = np.nanmean(look, 0)
                signal = float(np.sqrt(np.mean((mean_look - mean_look.mean()) ** 2)))
                logp = np.log(np.array([v[1] for v in vals]))
                entry[phase] = {
                    "lookahead_rms_per_update": float(per_update),  # signal + noise of one update
                    "lookahead_rms_of_mean": signal,  # the phase's mean eta * d_k: the part that persists
                    "logp_spread": float(np.mean(np.std(logp, 1))),
                    "absent_fraction": float(np.mean([v[2] for v in vals])),
                }
        tv = [0.5 * sum(abs(row["mixture"][n] - 1 / K) for n in names) for row in rows]
        entry["tv_from_uniform_max"], entry["tv_from_uniform_final"] = float(max(tv)), float(tv[-1])
        entry["tv_peak_at_fraction"] = float(np.argmax(tv) / max(1, len(tv) - 1))
        vals = [row for row in rows if "val_loss" in row]
        if vals:
            last = vals[-1]["val_loss"]
            objective = r["args"][r["args"].index("--meta.val_tasks") + 1].split(",") if "--meta.val_tasks" in r[
                "args"] else names  # fmt: skip
            loss = np.array([last[n] if n in objective else -np.inf for n in names])
            w = np.exp((loss - loss.max()) / tau)
            w /= w.sum()
            top = np.argsort(-w)[:3]
            entry["objective_weights_final"] = {names[i]: float(w[i]) for i in top}
            if RANDOM_TASK in names:
                entry["objective_weight_random_final"] = float(w[names.index(RANDOM_TASK)])
        dots = np.array([[np.nan if u["meta_dots"][n] is None else u["meta_dots"][n] for n in names] for u in updates])
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            snr = np.nanmean(dots, 0) / np.nanstd(dots, 0)
        entry["d_signal_to_noise"] = {
            n: (float(x) if np.isfinite(x) else None) for n, x in zip(names, snr, strict=True)
        }
        out.append(entry)
    return out


def diagnostics_markdown(diags: list[dict]) -> str:
    if not diags:
        return ""
    lines = [
        "## ADAPT diagnostics (seed 0 traces)",
        "",
        "Per third of the mixture updates (early / middle / late). The update's stationary point is "
        "p_k ∝ exp(eta·d_k / lambda): a persistent difference of eta·d between tasks, measured against lambda, "
        "is what can hold the mixture away from uniform. `signal/λ`: RMS over tasks of the phase's *mean* "
        "eta·d_k (centred), over lambda; `noise`: mean over updates of the RMS over tasks of one update's eta·d_k "
        "(centred), over the signal (≫ 1: single updates are mostly noise, Adam moves alpha by ~lr per update "
        "anyway). `std log p`: spread of the mixture actually reached. `absent`: share of tasks missing from the "
        "meta batch (d_k is null in metrics.jsonl; the update does not move such a task). TV: total "
        "variation distance of p from uniform (max, where in training as a fraction, final). Objective weights: "
        "softmax(l/tau) on the final "
        "validation losses (top 3, and on random_output).",
        "",
        "| run | updates | signal/λ early, mid, late | noise early, mid, late | std log p early, mid, late | absent | "
        "TV max (at) | TV final | objective weight: top | on random_output |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in diags:
        ph = [e[p] for p in ("early", "middle", "late") if p in e]
        sig = ", ".join(
            "∞"
            if e["lambda"] == 0
            else "n/a"
            if "rms" in e["variant"]
            else f"{x['lookahead_rms_of_mean'] / e['lambda']:.2g}"
            for x in ph
        )  # (normalize rms divides eta·d by its running RMS: lambda there has no unit)
        noise = ", ".join(f"{x['lookahead_rms_per_update'] / max(x['lookahead_rms_of_mean'], 1e-30):.2g}" for x in ph)
        spread = ", ".join(f"{x['logp_spread']:.2f}" for x in ph)
        absent = np.mean([e[p]["absent_fraction"] for p in ("early", "middle", "late") if p in e])
        top = ", ".join(f"{k} {v:.2f}" for k, v in e.get("objective_weights_final", {}).items())
        lines.append(
            f"| {e['id']} | {e['updates']} | {sig} | {noise} | {spread} | {100 * absent:.1f}% | "
            f"{e['tv_from_uniform_max']:.3f} ({e['tv_peak_at_fraction']:.2f}) | {e['tv_from_uniform_final']:.3f} | "
            f"{top} | {e.get('objective_weight_random_final', float('nan')):.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_report(scale: Scale, paths: Paths, plots: bool = True) -> dict:
    results = [r for r in load_results(paths) if r.get("scale") == scale.name]
    if not results:
        return {}
    summary = summarize(results, scale)
    summary["scale"] = dataclasses.asdict(scale)
    summary["runs"] = len(results)
    summary["adapt_diagnostics"] = adapt_diagnostics(results, paths)
    (paths.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = markdown(summary, scale, results) + diagnostics_markdown(summary["adapt_diagnostics"])
    (paths.out / "results.md").write_text(text)
    if plots:
        plot_mixtures(results, paths, scale)
    return summary


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/reproduce", help="results folder")
    p.add_argument("--quick", action="store_true", help="smoke-test scale: a few minutes")
    p.add_argument("--report", action="store_true", help="only rebuild tables and plots from the finished runs")
    p.add_argument("--suites", default="synthetic,ni", help="synthetic,ni")
    p.add_argument("--variants", default="", help="only these variants (comma-separated)")
    p.add_argument("--seeds", default="", help="override the scale's seeds, e.g. 0,1")
    p.add_argument("--budgets", default="", help="override the scale's budgets (fractions), e.g. 0.01,0.1")
    p.add_argument("--workers", type=int, default=0, help="parallel runs (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker on CPU")
    p.add_argument("--keep_work", action="store_true", help="keep <out>/work (models, cache) at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scale = QUICK if args.quick else FULL
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        scale = dataclasses.replace(scale, seeds=seeds, ni_seeds=seeds)
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
        ablation = tuple(b for b in scale.ablation_budgets if b in budgets) or budgets[-1:]
        scale = dataclasses.replace(scale, budgets=budgets, ablation_budgets=ablation, ni_budgets=budgets)
    paths = Paths(Path(args.out).resolve())
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / ".gitignore").write_text("work/\nerrors.log\n")
    suites = [s for s in args.suites.split(",") if s]
    if "ni" in suites and not NI_DATA.is_dir():
        print(f"no {NI_DATA}: skipping the NI suite", flush=True)
        suites.remove("ni")
    only = {v for v in args.variants.split(",") if v} or None
    if not args.report:
        import torch

        workers = args.workers or (1 if torch.cuda.is_available() else 2)
        t0 = time.time()
        run_study(scale, paths, plan(scale, suites, only), workers, args.threads)
        print(f"study: {(time.time() - t0) / 60:.1f} min", flush=True)
    summary = write_report(scale, paths, plots=True)
    if not args.keep_work and not args.report:  # what failed runs of this invocation left (others may be running)
        for spec in plan(scale, suites, only):
            shutil.rmtree(paths.work / "runs" / spec.id.replace("/", "_"), ignore_errors=True)
    print(f"tables: {paths.out / 'results.md'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
