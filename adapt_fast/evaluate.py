"""Evaluate a model per task: validation loss and, with --generate, exact match and ROUGE-L.

    python -m adapt_fast.evaluate --model DIR [--tokenizer DIR|byte] --data PATH [--config RUN/config.yaml]
        [--group_by task|category] [--task_column C] [--tasks a,b] [--template auto|ni|chat]
        [--assistant_turns last|all]
        [--num_positive_examples N] [--split validation|train|all|test] [--val_fraction F] [--val_examples N]
        [--seed S] [--max_len N] [--truncation_mode keep_start|keep_end] [--generate] [--max_new_tokens N]
        [--batch_size N]
        [--max_examples_per_task N] [--tokens_per_micro_batch N] [--dtype D] [--device D]
        [--save_predictions] [--out FILE.json]

The held-out split is the trainer's: records are loaded, filtered to --tasks and split with
formats.assign_splits(records, val_fraction, val_examples, seed), exactly as data.cache.build_or_load
does (--config takes these settings from a run's saved config; flags override). `all` is train and
validation; `test` is the data's own test split (rows or instances marked test*, a datasets folder's
test* splits), which training never reads. Prompts are the
prompt part of render.tokenize_record, so evaluation sees what training saw.

- Loss: examples packed into micro-batches (document-masked attention), per_task_loss, token mean per task.
- Generation: greedy, batched with left padding and an attention mask, up to EOS or max_new_tokens;
  only the new tokens are decoded. Exact match is after normalisation (strip, lower-case, collapse
  whitespace) against any reference; ROUGE-L is the LCS F1 over whitespace tokens of the normalised
  texts, best over the references (as in Super-NaturalInstructions).

The table goes to stderr; the JSON result to --out (or stdout without it). The Python API
`evaluate(model, tokenizer, records, ...)` works in-process on a model object (trainer, benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from adapt_fast.config import TRUNCATION_MODES
from adapt_fast.data import formats
from adapt_fast.data.cache import TokenizedSplit
from adapt_fast.data.loader import pack_examples
from adapt_fast.data.render import fit_to_max_len, resolve_template, tokenize_record
from adapt_fast.errors import ConfigError, DataError, UserError, exit_on_user_error, first_line
from adapt_fast.model.attention import ATTN_NAME, use_packed_attention
from adapt_fast.model.loading import unwrap
from adapt_fast.model.loss import per_task_loss

SPLITS = ("validation", "train", "all", "test")
METRICS = ("val_loss", "exact_match", "rouge_l")

# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Strip, lower-case and collapse whitespace."""
    return " ".join(text.lower().split())


def exact_match(pred: str, refs: str | list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    refs = [refs] if isinstance(refs, str) else refs
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 of whitespace tokens of the normalised texts. Two empty texts score 1, one empty 0."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(not p and not r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(pred: str, refs: str | list[str]) -> float:
    """Best ROUGE-L F1 over the references."""
    refs = [refs] if isinstance(refs, str) else refs
    return max((rouge_l(pred, r) for r in refs), default=0.0)


def references(record: dict) -> list[str]:
    """All reference outputs of a record (its `references` JSON list, else its output)."""
    refs = json.loads(record.get("references") or "[]")
    return [str(r) for r in refs] or [record["output"]]


# ----------------------------------------------------------------------------- tokenising


def prompt_ids(record: dict, tokenizer, template: str, num_positive_examples: int = 0) -> list[int]:
    """The prompt tokens of a record as training renders them (tokenize_record up to the first loss token)."""
    ids, mask = tokenize_record(record, tokenizer, template, num_positive_examples)
    return ids[: mask.index(1)] if 1 in mask else ids


def tokenize_split(
    records: list[dict], tokenizer, task_names: list[str], template: str, num_positive_examples: int = 0,
    max_len: int | None = None, assistant_turns: str = "last", truncation_mode: str = "keep_start",
) -> TokenizedSplit:  # fmt: skip
    """Records -> an in-memory TokenizedSplit (the cache's layout) for packing. Examples longer than
    max_len are truncated as in training; ones left without a loss token are left out."""
    index = {name: k for k, name in enumerate(task_names)}
    ids, masks, tasks = [], [], []
    for record in records:
        example, mask = tokenize_record(record, tokenizer, template, num_positive_examples, assistant_turns)
        if max_len is not None:
            example, mask, status = fit_to_max_len(example, mask, max_len, True, truncation_mode)
            if status == "dropped":
                continue
        ids.append(np.asarray(example, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=np.uint8))
        tasks.append(index[record["task"]])
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSplit(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.uint32),
        loss_mask=np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        offsets=offsets,
        task_ids=np.array(tasks, dtype=np.int32),
        lengths=lengths,
        loss_tokens=np.array([int(m[1:].sum()) for m in masks], dtype=np.int32),
        num_tasks=len(task_names),
    )


# ----------------------------------------------------------------------------- model passes


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, packed: bool) -> Iterator[None]:
    """model.eval() (and, with packed=True, the document-masked attention) for the block; restored after."""
    inner = unwrap(model)
    was_training, previous = inner.training, inner.config._attn_implementation
    switch = packed and previous != ATTN_NAME
    inner.eval()
    if switch:
        use_packed_attention(inner)
    try:
        yield
    finally:
        if switch:
            inner.set_attn_implementation(previous)
        inner.train(was_training)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, split: TokenizedSplit, tokens_per_micro_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(loss sums (K,), loss-token counts (K,)) of every example of `split`, packed into micro-batches.
    The capacity grows to the longest example when one does not fit."""
    K = split.num_tasks
    sums, counts = np.zeros(K, dtype=np.float64), np.zeros(K, dtype=np.int64)
    if split.num_examples == 0:
        return sums, counts
    capacity = max(int(tokens_per_micro_batch), int(np.max(split.lengths)))
    device = _device(model)
    weights = torch.ones(K, dtype=torch.float32, device=device)
    with eval_mode(model, packed=True):
        for batch in pack_examples(split, np.arange(split.num_examples), capacity):
            out = per_task_loss(model, batch.to(device), weights)
            sums += out.loss_sum.double().cpu().numpy()
            counts += out.count.cpu().numpy()
    return sums, counts


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often list several)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; decoded new tokens up to EOS."""
    from transformers import GenerationConfig

    inner = unwrap(model)
    device = _device(inner)
    eos = _eos_ids(inner, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None, pad_token_id=pad
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together, longest first
    outputs = [""] * len(prompts)
    with eval_mode(inner, packed=False):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(1, max(len(prompts[i]) for i in rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                if prompts[i]:
                    input_ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
                    attention_mask[r, width - len(prompts[i]) :] = 1
            generated = inner.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for r, i in enumerate(rows):
                new = generated[r, width:].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos), len(new))
                outputs[i] = tokenizer.decode(new[:stop], skip_special_tokens=True)
    return outputs


# ----------------------------------------------------------------------------- evaluation


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summarize(tasks: dict[str, dict]) -> tuple[dict, dict]:
    """(mean, worst) over tasks of each metric present: the mean of task values; the worst is the highest
    loss and the lowest exact match / ROUGE-L. Tasks without a value (no loss tokens) are skipped."""
    mean, worst = {}, {}
    for metric in METRICS:
        values = [t[metric] for t in tasks.values() if t.get(metric) is not None]
        if values:
            mean[metric] = float(np.mean(values))
            worst[metric] = float(max(values) if metric == "val_loss" else min(values))
    return mean, worst


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict],
    *,
    generate: bool,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    tokens_per_micro_batch: int = 4096,
    template: str = "auto",
    num_positive_examples: int = 0,
    max_len: int | None = None,
    return_predictions: bool = False,
    assistant_turns: str = "last",
    truncation_mode: str = "keep_start",
) -> dict:
    """Per-task validation loss (token mean) and, with generate, exact match and ROUGE-L over `records`
    (all of them: select the split beforehand). The model's mode and attention are restored after.

    Returns {"tasks": {task: {examples, loss_tokens, val_loss[, exact_match, rouge_l]}}, "mean": {...},
    "worst": {...}, "overall": {val_loss (token mean over all tasks), loss_tokens, examples}} plus
    "predictions" [{task, prediction, references, exact_match, rouge_l}] with return_predictions.
    Metric values are floats, or None where a task has no loss token.
    """
    template = resolve_template(template, tokenizer)
    task_names = sorted({r["task"] for r in records})
    split = tokenize_split(
        records, tokenizer, task_names, template, num_positive_examples, max_len, assistant_turns, truncation_mode
    )
    sums, counts = validation_loss(model, split, tokens_per_micro_batch)
    examples = {name: 0 for name in task_names}
    for r in records:
        examples[r["task"]] += 1
    tasks = {
        name: {
            "examples": examples[name],
            "loss_tokens": int(counts[k]),
            "val_loss": _finite(sums[k] / counts[k]) if counts[k] else None,
        }
        for k, name in enumerate(task_names)
    }
    result: dict = {"tasks": tasks}
    if generate:
        prompts = [prompt_ids(r, tokenizer, template, num_positive_examples) for r in records]
        if max_len is not None:
            prompts = [p[-max_len:] for p in prompts]  # keep the input's end and the output cue
        predictions = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        scored = []
        for record, pred in zip(records, predictions, strict=True):
            refs = references(record)
            scored.append(
                {"task": record["task"], "prediction": pred, "references": refs,
                 "exact_match": exact_match(pred, refs), "rouge_l": rouge_l_max(pred, refs)}
            )  # fmt: skip
        for name in task_names:
            mine = [s for s in scored if s["task"] == name]
            tasks[name]["exact_match"] = float(np.mean([s["exact_match"] for s in mine]))
            tasks[name]["rouge_l"] = float(np.mean([s["rouge_l"] for s in mine]))
        if return_predictions:
            result["predictions"] = scored
    result["mean"], result["worst"] = summarize(tasks)
    total = int(counts.sum())
    result["overall"] = {
        "examples": len(records),
        "loss_tokens": total,
        "val_loss": _finite(float(sums.sum()) / total) if total else None,
    }
    return result


TABLE_MAX_TASKS = 50  # more tasks than this: the table shows the highest-loss ones (the JSON has every task)


def format_table(result: dict, most: int = TABLE_MAX_TASKS) -> str:
    """A plain-text table: one row per task (past `most` tasks, the `most` // 2 with the highest loss), then the mean
    and the worst (per column)."""
    has_gen = any("exact_match" in t for t in result["tasks"].values())
    shown = result["tasks"]
    if len(shown) > most:
        order = sorted(shown, key=lambda n: -math.inf if shown[n].get("val_loss") is None else shown[n]["val_loss"])
        shown = {name: shown[name] for name in order[::-1][: most // 2]}
    width = max([len("task")] + [len(n) for n in shown])
    split = result.get("settings", {}).get("split", "validation")  # the column says which split was scored
    loss = {"validation": "val loss", "test": "test loss"}.get(split, "loss")
    head = f"{'task':<{width}}  {'examples':>8}  {loss:>9}" + (f"  {'EM':>6}  {'ROUGE-L':>7}" if has_gen else "")

    def line(name: str, row: dict, examples: str) -> str:
        def fmt(key: str, w: int) -> str:
            value = row.get(key)
            return f"{value:>{w}.4f}" if value is not None else f"{'-':>{w}}"

        text = f"{name:<{width}}  {examples:>8}  {fmt('val_loss', 9)}"
        return text + (f"  {fmt('exact_match', 6)}  {fmt('rouge_l', 7)}" if has_gen else "")

    lines = [head, "-" * len(head)]
    lines += [line(name, row, str(row["examples"])) for name, row in shown.items()]
    if len(shown) < len(result["tasks"]):
        lines.append(f"... the {len(shown)} of {len(result['tasks']):,} tasks with the highest loss; the JSON has all")
    lines.append("-" * len(head))
    lines.append(line("mean", result["mean"], str(result["overall"]["examples"])))
    lines.append(line("worst", result["worst"], ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def select_records(records: list[dict], split: str, max_examples_per_task: int = 0) -> list[dict]:
    """Records of `split` (validation | train | all: both | test), at most max_examples_per_task per task (first
    ones, > 0)."""
    chosen = [r for r in records if r["split"] == split or (split == "all" and r["split"] != "test")]
    if max_examples_per_task > 0:
        seen: dict[str, int] = {}
        kept = []
        for r in chosen:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            if seen[r["task"]] <= max_examples_per_task:
                kept.append(r)
        chosen = kept
    return chosen


def load_split(
    path: str | Path, *, group_by: str = "task", task_column: str = "task", tasks: list[str] | None = None,
    val_fraction: float = 0.1, val_examples: int = 0, seed: int = 0, keep_test: bool = False,
) -> list[dict]:  # fmt: skip
    """Load records and assign splits exactly as data.cache.build_or_load does (filter tasks, then split); with
    keep_test the data's test records too (split "test")."""
    return formats.load_split_records(
        path, group_by=group_by, task_column=task_column, tasks=tasks,
        val_fraction=val_fraction, val_examples=val_examples, seed=seed, option="--tasks", keep_test=keep_test,
    )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (through exit_on_user_error)
        raise UserError(message)


# Numeric options and their smallest valid value (the trainer's, where it has the setting; max_len None = none).
_MIN_VALUES = {
    "num_positive_examples": 0,
    "val_examples": 0,
    "seed": 0,
    "max_len": 2,
    "max_new_tokens": 1,
    "batch_size": 1,
    "max_examples_per_task": 0,
    "tokens_per_micro_batch": 1,
}

# Options whose default may come from a run's config (--config): option -> (config path, built-in default).
_FROM_CONFIG = {
    "data": ("data.path", None),
    "group_by": ("data.group_by", "task"),
    "task_column": ("data.task_column", "task"),
    "tasks": ("data.tasks", []),
    "template": ("data.template", "auto"),
    "assistant_turns": ("data.assistant_turns", "last"),
    "tokenizer": ("model.tokenizer", ""),
    "num_positive_examples": ("data.num_positive_examples", 0),
    "val_fraction": ("data.val_fraction", 0.1),
    "val_examples": ("data.val_examples", 0),
    "max_len": ("data.max_len", None),
    "truncation_mode": ("data.truncation_mode", "keep_start"),
    "seed": ("seed", 0),
    "tokens_per_micro_batch": ("tokens_per_micro_batch", 4096),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m adapt_fast.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a saved model folder (or a preset name: random init)")
    p.add_argument("--tokenizer", help="a tokenizer folder, or byte (default: the model folder's own)")
    p.add_argument("--data", help="task data (as data.path); default: the --config's")
    p.add_argument("--config", help="a run's config YAML: data settings, seed and tokens_per_micro_batch from it")
    p.add_argument("--group_by", choices=("task", "category"))
    p.add_argument("--task_column")
    p.add_argument(
        "--tasks", type=lambda s: [t.strip() for t in s.split(",") if t.strip()], help="a,b,c (or @file: one a line)"
    )
    p.add_argument("--template", choices=("auto", "ni", "chat"))
    p.add_argument("--assistant_turns", choices=("last", "all"), help="which turns of a conversation the loss is on")
    p.add_argument("--num_positive_examples", type=int)
    p.add_argument("--split", choices=SPLITS, default="validation", help="all = train + validation; test = the data's")
    p.add_argument("--val_fraction", type=float)
    p.add_argument("--val_examples", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max_len", type=int, help="truncate examples as in training (default: none, or the config's)")
    p.add_argument("--truncation_mode", choices=TRUNCATION_MODES, help="what a cut keeps (default: the config's)")
    p.add_argument("--generate", action="store_true", help="also greedy-generate: exact match and ROUGE-L")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    p.add_argument("--max_examples_per_task", type=int, default=0, help="0 = all")
    p.add_argument("--tokens_per_micro_batch", type=int)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--save_predictions", action="store_true", help="include every prediction in the JSON")
    p.add_argument("--out", help="write the JSON result here (default: stdout); the table goes to stderr")
    args = p.parse_args(argv)
    if args.tasks:
        from adapt_fast.config import names_from_files

        args.tasks = names_from_files(args.tasks, "--tasks")

    cfg = None
    if args.config:
        from adapt_fast.config import load_config

        cfg = load_config(args.config)
    from_config: set[str] = set()
    for option, (dotted, default) in _FROM_CONFIG.items():
        if getattr(args, option) is None:
            value = default
            if cfg is not None:
                value = cfg
                for part in dotted.split("."):
                    value = getattr(value, part)
                from_config.add(option)
            setattr(args, option, value)
    if not args.data:
        if cfg is None:
            raise UserError("--data is required (or --config of a run)")
        from adapt_fast.data.prepare import data_path

        args.data = str(data_path(cfg))  # "" in a config: the synthetic suite
    for option, low in _MIN_VALUES.items():
        value = getattr(args, option)
        if value is not None and value < low:
            raise ConfigError(f"{_option_name(option, from_config)} must be >= {low}, got {value}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"{_option_name('val_fraction', from_config)} must be in [0, 1), got {args.val_fraction}")
    args.device = check_device(args.device)
    check_out(args.out, args.data, args.config)
    return args


def _option_name(option: str, from_config: set[str]) -> str:
    """How an error names an option: the flag, or the config field when the value came from --config."""
    return f"{_FROM_CONFIG[option][0]} (from --config)" if option in from_config else f"--{option}"


def check_device(device: str | None) -> str | None:
    """The --device string if it names a device this machine has (None: the default), else a one-line UserError."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):  # meta, lazy, opengl, ...: no data or nothing to run on here
        raise UserError(f"--device {device!r}: not supported for evaluation (use cpu or an accelerator: cuda, ...)")
    if not is_available():
        raise UserError(f"--device {device!r}: no {parsed.type} device on this machine (use --device cpu)")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        raise UserError(f"--device {device!r}: no such device ({count()} {parsed.type} device(s) on this machine)")
    return device


def check_out(out: str | None, data: str | None = None, config: str | None = None) -> None:
    """A one-line UserError unless --out can be written: its folder exists and is writable, it is not a folder
    (nor a read-only file), and it is not the data or the config it would overwrite. Called before anything is
    loaded, so that a long evaluation is not thrown away at the end."""
    if not out:
        return
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out}: is a folder (give a file name, e.g. {path / 'result.json'})")
    for option, other in (("--data", data), ("--config", config)):
        if other and Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
            raise UserError(f"--out {out}: is the {option} file (it would be overwritten)")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"--out {out}: no such folder {parent}")
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a folder")
    try:  # really try (os.access is not enough for root or read-only mounts); nothing is changed
        if path.exists():
            with open(path, "a", encoding="utf-8"):  # an existing file: opened for appending, written nothing
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".check"):
                pass  # a new file: one created and removed in its folder
    except OSError as err:
        raise UserError(f"--out {out}: cannot write ({err.strerror or type(err).__name__})") from None


def _load_model(name: str, dtype: str, device: str | None, tokenizer_name: str = ""):
    from adapt_fast.model.loading import check_model_folder, load_model_and_tokenizer, load_tokenizer

    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    try:
        if Path(name).is_dir():  # a checkpoint or a folder that is no model: that, before its tokenizer files
            check_model_folder(name)
        tokenizer = load_tokenizer(name, tokenizer_name=tokenizer_name, option="--tokenizer")
        return load_model_and_tokenizer(name, dtype=torch_dtype, device=device, tokenizer=tokenizer)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{name}: cannot load the model ({first_line(err)})") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.data).exists():
        raise DataError(f"{args.data}: no such file or folder")
    records = load_split(
        args.data, group_by=args.group_by, task_column=args.task_column, tasks=args.tasks,
        val_fraction=args.val_fraction, val_examples=args.val_examples, seed=args.seed,
        keep_test=args.split == "test",
    )  # fmt: skip
    records = select_records(records, args.split, args.max_examples_per_task)
    if not records:
        marked = " (none of these examples is marked test in the data)" if args.split == "test" else ""
        raise DataError(f"{args.data}: no examples in split {args.split!r}{marked}")
    model, tokenizer = _load_model(args.model, args.dtype, args.device, args.tokenizer)
    result = evaluate(
        model, tokenizer, records, generate=args.generate, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, tokens_per_micro_batch=args.tokens_per_micro_batch, template=args.template,
        num_positive_examples=args.num_positive_examples, max_len=args.max_len,
        return_predictions=args.save_predictions, assistant_turns=args.assistant_turns,
        truncation_mode=args.truncation_mode,
    )  # fmt: skip
    result["settings"] = {
        "model": args.model, "data": str(args.data), "split": args.split, "group_by": args.group_by,
        "tasks": args.tasks, "template": resolve_template(args.template, tokenizer),
        "assistant_turns": args.assistant_turns, "num_positive_examples": args.num_positive_examples,
        "val_fraction": args.val_fraction, "val_examples": args.val_examples, "seed": args.seed,
        "max_len": args.max_len, "truncation_mode": args.truncation_mode, "generate": args.generate,
        "max_new_tokens": args.max_new_tokens, "max_examples_per_task": args.max_examples_per_task,
    }  # fmt: skip
    print(format_table(result), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        try:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        except OSError as err:  # checked up front, so changed since: keep the result, on stdout
            print(text, flush=True)
            reason = err.strerror or type(err).__name__
            raise UserError(f"{args.out}: cannot write ({reason}); the JSON result is on stdout") from None
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
