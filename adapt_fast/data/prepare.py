"""From a Config to tokenised data, a budget and a loader: the glue every entry point shares."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from adapt_fast.config import Config, check_no_repeats
from adapt_fast.data.cache import TokenizedData, TokenizedSplit, build_or_load, default_cache_dir
from adapt_fast.data.loader import PackedLoader
from adapt_fast.data.synthetic import write_synthetic_suite
from adapt_fast.errors import ConfigError, DataError, DataWarning, some_of


def cache_root(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()


def data_path(cfg: Config) -> Path:
    """`data.path`, or the embedded synthetic suite (written once under the cache folder)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    folder = cache_root(cfg) / f"synthetic-seed{cfg.seed}-n{cfg.data.synthetic_examples}"
    if not (folder / "tasks").is_dir():
        tmp = folder.with_name(folder.name + f".tmp{np.random.randint(1 << 30)}")
        write_synthetic_suite(tmp, seed=cfg.seed, examples_per_task=cfg.data.synthetic_examples)
        try:
            tmp.rename(folder)
        except OSError:  # written meanwhile by another rank
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def max_len_losses(data: TokenizedData) -> tuple[int, int, list[str]]:
    """(examples cut to data.max_len, examples dropped by it, tasks it left with no example at all)."""
    meta = [data.meta[split] for split in ("train", "validation")]
    truncated, dropped = (sum(m[key] for m in meta) for key in ("truncated", "dropped"))
    dropped_tasks = {t for m in meta for t in m.get("dropped_per_task", {})}
    examples = data.train.examples_per_task() + data.validation.examples_per_task()
    present = {name for k, name in enumerate(data.task_names) if examples[k] > 0}
    return truncated, dropped, sorted(dropped_tasks - present)


def warn_max_len(data: TokenizedData, max_len: int, truncate: bool, mode: str = "keep_start") -> None:
    """One warning when data.max_len cut or dropped examples (report.json counts them too)."""
    truncated, dropped, lost = max_len_losses(data)
    if not truncated and not dropped:
        return
    why = "data.truncate false" if not truncate else "no response token left once cut"
    if truncate and mode == "keep_start" and dropped:
        why = "the prompt alone too long: data.truncation_mode keep_end would keep their responses"
    warnings.warn(
        f"{truncated + dropped} example(s) longer than data.max_len ({max_len} tokens): {truncated} cut to it, "
        f"{dropped} dropped ({why})"
        + (f"; every example of {some_of(lost)} was dropped" if lost else "")
        + "; raise data.max_len to keep them whole",
        DataWarning,
        stacklevel=3,
    )


def load_data(cfg: Config, tokenizer, progress: bool = True) -> TokenizedData:
    """Tokenise (through the cache) the data named by the config."""
    d = cfg.data
    data = build_or_load(
        data_path(cfg),
        tokenizer,
        group_by=d.group_by,
        task_column=d.task_column,
        template=d.template,
        num_positive_examples=d.num_positive_examples,
        assistant_turns=d.assistant_turns,
        val_fraction=d.val_fraction,
        val_examples=d.val_examples,
        max_len=d.max_len,
        truncate=d.truncate,
        truncation_mode=d.truncation_mode,
        tasks=d.tasks,
        seed=cfg.seed,
        cache_dir=cache_root(cfg),
        num_proc=d.num_proc,
        progress=progress,
    )
    if data.train.num_examples == 0:
        dropped = data.meta["train"]["dropped"]
        if not dropped:
            raise DataError(f"{data.meta['source']}: no training examples (all are in the validation split)")
        raise DataError(
            f"no training examples left: all {dropped} were longer than data.max_len ({d.max_len})"
            + (" with data.truncate false" if not d.truncate else " or kept no response token once truncated")
        )
    warn_max_len(data, d.max_len, d.truncate, d.truncation_mode)
    if d.val_examples > 0:  # a val_examples as large as a task takes all of it but one example
        train_n, val_n = data.train.examples_per_task(), data.validation.examples_per_task()
        starved = [name for k, name in enumerate(data.task_names) if train_n[k] <= 1 and val_n[k] >= 1]
        if starved:
            warnings.warn(
                f"data.val_examples {d.val_examples} leaves {len(starved)} task(s) at most one training example: "
                + ", ".join(starved[:5])
                + (", ..." if len(starved) > 5 else ""),
                DataWarning,
                stacklevel=2,
            )
    return data


def available_units(split: TokenizedSplit, unit: str) -> int:
    """Training data size in budget units."""
    return int(np.asarray(split.lengths if unit == "tokens" else split.loss_tokens, dtype=np.int64).sum())


def resolve_budget(cfg: Config, split: TokenizedSplit) -> int:
    """budget.tokens, or budget.fraction of the training data (in budget.unit); at least 1."""
    if cfg.budget.tokens > 0:
        return int(cfg.budget.tokens)
    budget = int(cfg.budget.fraction * available_units(split, cfg.budget.unit))
    if budget < 1:
        raise ConfigError(f"budget.fraction {cfg.budget.fraction} of this data is less than one {cfg.budget.unit}")
    return budget


def check_task_names(names: list[str], data: TokenizedData, key: str) -> list[int]:
    """Indices of `names` among the data's tasks; ConfigError naming the unknown or repeated ones."""
    check_no_repeats(names, key)
    index = {name: k for k, name in enumerate(data.task_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(f"{key}: unknown task(s) {some_of(unknown)} (tasks: {some_of(data.task_names, 20)})")
    return [index[n] for n in names]


def make_loader(
    cfg: Config, data: TokenizedData, mixture: np.ndarray, budget: int, rank: int = 0, world_size: int = 1
) -> PackedLoader:
    return PackedLoader(
        data.train,
        cfg.tokens_per_micro_batch,
        budget,
        mixture,
        unit=cfg.budget.unit,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        lookahead=cfg.data.lookahead,
        meta_floor_examples=cfg.data.meta_floor_examples,
        meta_floor_fraction=cfg.data.meta_floor_fraction,
        allow_repeat=cfg.budget.allow_repeat,
        task_names=data.task_names,
    )


def load_tokenizer(cfg: Config):
    """The tokenizer of the run: model.tokenizer, else model.name's own (a local folder's tokenizer files; the byte
    tokenizer for a preset). ConfigError for a name that is neither, or a folder without tokenizer files."""
    from adapt_fast.model import loading

    return loading.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.tokenizer)
