"""Configuration: plain YAML mapping onto typed dataclasses, overridable as `--section.field value`.

One `Config` serves every entry point (trainer, data inspector, evaluation). Field names are a
contract with scripts outside the repo (`data.path`, `budget.tokens`, `mixture.method`, ...).
Every field is validated before any work starts; a bad one is a one-line ConfigError (exit 2).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import decimal
import difflib
import inspect
import json
import math
import os
import re
import sys
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapt_fast.errors import ConfigError, DataWarning, some_of

MIXTURE_METHODS = ("adapt", "uniform", "proportional", "temperature", "fixed")
TRUNCATION_MODES = ("keep_start", "keep_end")  # TRL's SFTConfig.truncation_mode
INT_LIMIT = 2**63  # int fields end up in int64 (numpy, torch): larger ones are refused
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # a bool's spellings
REMOVED_KEYS = {"training.log_every": "every step is logged"}  # still in old runs' config.yaml: ignored


@dataclass
class DataConfig:
    path: str = ""  # NI task folder, JSONL/Parquet file or folder, HF save_to_disk folder; "" = synthetic suite
    group_by: str = "task"  # task | category (NI files: first category)
    task_column: str = "task"  # JSONL/Parquet/HF: the column naming the task
    template: str = "auto"  # auto (chat template if the tokenizer has one, else ni) | ni | chat
    assistant_turns: str = "last"  # which assistant turns of a conversation carry the loss: last | all
    num_positive_examples: int = 0  # NI prompt: how many of the task's positive examples to show
    val_fraction: float = 0.1  # per-task validation split when the data has none
    val_examples: int = 0  # if > 0: this many validation examples per task instead of val_fraction
    max_len: int = 1024  # longest example in tokens
    truncate: bool = True  # longer examples are truncated (True) or dropped (False); counted either way
    truncation_mode: str = "keep_start"  # what a cut keeps (TRL's names): keep_start | keep_end (the response)
    tasks: list[str] = field(default_factory=list)  # keep only these tasks (default all)
    cache_dir: str = ""  # tokenised cache; default: $ADAPT_FAST_CACHE or ~/.cache/adapt_fast
    num_proc: int = 1  # tokenisation workers
    synthetic_examples: int = 400  # synthetic suite: examples per task (sizes vary around this)
    lookahead: float = 0.1  # packing pool beyond the step's capacity, as a fraction of it
    meta_floor_examples: int = 1  # examples of every task on steps that update the mixture
    meta_floor_fraction: float = 0.25  # at most this share of such a step goes to the floors (longest-waiting first)


@dataclass
class ModelConfig:
    name: str = "tiny-llama"  # a preset (tiny-llama, tiny-qwen3, tiny-gemma3, llama-3.2-1b, ...) or a local folder
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float64
    trust_remote_code: bool = False  # a local model folder's own modelling code may run (off: never)
    tokenizer: str = ""  # "": model.name's own (a folder's tokenizer files; presets: byte) | a folder | byte


@dataclass
class BudgetConfig:
    tokens: int = 150_000  # budget in `unit`s (setting `fraction` instead clears this)
    fraction: float = 0.0  # of the training tokens available (in `unit`s)
    unit: str = "tokens"  # tokens (non-padding tokens fed) | loss (response tokens only)
    allow_repeat: bool = True  # a budget above what the data holds reuses examples (with a warning)


@dataclass
class MixtureConfig:
    method: str = "adapt"  # adapt | uniform | proportional | temperature | fixed
    temperature: float = 2.0  # temperature method: p_k ∝ n_k^(1/T)
    cap: int = 0  # proportional: examples-proportional with this cap (T5/FLAN) when > 0
    weights: dict[str, float] = field(default_factory=dict)  # fixed method: task -> weight
    tau: float = 1.0  # ADAPT: temperature of the smooth worst case
    entropy_weight: float = 1e-3  # ADAPT: λ
    floor: float = 0.05  # ADAPT: ε, p = (1-ε) softmax(α) + ε/K
    lr: float = 0.05  # ADAPT: β, learning rate of the mixture optimizer
    optimizer: str = "adam"  # adam | sgd
    prior: str = "uniform"  # uniform | proportional | fixed (mixture.weights): ADAPT's starting mixture
    relative_loss: bool = False  # use ℓ_k / ℓ_k(θ_0)
    normalize: str = "none"  # ADAPT: none (λ absolute) | rms (η·d_k over its running RMS: λ dimensionless)


@dataclass
class MetaConfig:
    val_tasks: list[str] = field(default_factory=list)  # tasks whose validation loss forms Φ (default all)
    val_every: int = 10  # recompute G = ∇Φ every this many steps
    update_every: int = 1  # update the mixture every this many steps
    warmup: int = 10  # no mixture updates before this step
    dots: str = "one_pass"  # one_pass | exact (K backward passes; tests and tiny models)
    precondition: str = "none"  # none | adam
    val_examples_per_task: int = 8  # validation batch for G: examples per objective task


@dataclass
class TrainingConfig:
    lr: float = 1e-3  # AdamW's peak learning rate
    lr_schedule: str = "cosine"  # after the warm-up: cosine | linear (decay to lr * min_lr_ratio) | constant
    min_lr_ratio: float = 0.1  # cosine / linear decay to lr * min_lr_ratio
    warmup_steps: int = 10  # linear learning-rate warm-up, in optimizer steps
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's beta1, beta2
    grad_clip: float = 1.0  # clip the gradient's global norm to this (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    max_steps: int = 0  # 0 = until the budget is spent
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    deepspeed_config: str = ""  # a DeepSpeed JSON (HF Trainer's --deepspeed) merged in: ZeRO options, offload, ...
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in the backward (less memory)
    eval_every: int = 0  # validation losses also every this many steps (0: only with G, and at the end)
    max_bad_steps: int = 5  # this many non-finite (skipped) steps in a row stop the run (checkpoint, exit 3)


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | triton | torch
    fused_layers: bool = True  # with the triton backend: RMSNorm, gated MLPs (SwiGLU, GEGLU), RoPE fused too
    fold_ghost_dots: bool = False  # mixture updates: linear layers' dots inside their weight-gradient GEMM


@dataclass
class CheckpointConfig:
    every_tokens: int = 0  # write one every this many budget units consumed (0 = only at the end)
    keep_last: int = 2  # complete checkpoints kept (>= 2 leaves one to fall back on)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tokens_per_micro_batch: int = 4096  # slots of one packed micro-batch, per rank
    seed: int = 0  # data splits and order, model init, every random draw
    output_dir: str = "runs/default"  # checkpoints, metrics, plots, report.json, final/ model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing values


def _parse_value(text: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML value or command-line string to the field's type; ConfigError if it can't be."""
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(text, bool):
                return text
            lowered = str(text).strip().lower()
            if lowered in TRUE_WORDS:
                return True
            if lowered in FALSE_WORDS:
                return False
            raise ValueError
        if annotation is int:
            return _parse_int(text)
        if annotation is float:
            if isinstance(text, bool):
                raise ValueError
            return float(text)
        if annotation is str:
            if text is None or isinstance(text, (dict, list)):  # YAML null is not the text "None"
                raise ValueError
            return str(text)
        if origin is list:
            if text is None:
                raise ValueError
            (item_type,) = typing.get_args(annotation)
            items = text if isinstance(text, list) else [s for s in str(text).split(",") if s.strip()]
            if item_type is str:
                items = names_from_files(items, name)
            return [_parse_value(item.strip() if isinstance(item, str) else item, item_type, name) for item in items]
        if origin is dict:
            key_type, value_type = typing.get_args(annotation)
            if isinstance(text, dict):
                pairs = text.items()
            else:  # "a=0.5,b=0.5" or "a:0.5,b:0.5"
                pairs = [item.replace(":", "=", 1).split("=", 1) for item in str(text).split(",") if item.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
            return {_parse_value(k, key_type, name).strip(): _parse_value(v, value_type, name) for k, v in pairs}
    except (TypeError, ValueError, ArithmeticError):  # ArithmeticError: OverflowError, decimal's errors
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {annotation}")
    raise ConfigError(f"{name}: bad value {text!r} (expected {_type_name(annotation)})")


def names_from_files(items: list, name: str) -> list:
    """Items as given, an "@path" item replaced by the names in that file, one per line (blank lines and "#" comments
    skipped), as SNI's splits/default/train_tasks.txt lists its tasks. ConfigError if the file cannot be read."""
    out = []
    for item in items:
        if not (isinstance(item, str) and item.strip().startswith("@")):
            out.append(item)
            continue
        path = Path(os.path.expanduser(item.strip()[1:]))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            reason = "no such file" if isinstance(err, FileNotFoundError) else type(err).__name__
            raise ConfigError(f"{name}: cannot read the list {path} ({reason})") from None
        names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not names:  # an empty list would mean "every task"
            raise ConfigError(f"{name}: the list {path} names nothing")
        out += names
    return out


def _parse_int(text: Any) -> int:
    """An int from an int, a whole float or text ("12", "1e5"); ValueError for "2.5e0", "inf", "1e999", ..."""
    if isinstance(text, bool):
        raise ValueError
    if isinstance(text, str) and "e" in text.lower():
        text = decimal.Decimal(text)  # exact, unlike float: 9007199254740993e0 stays odd
    if isinstance(text, (float, decimal.Decimal)) and not (abs(text) < INT_LIMIT and text == int(text)):
        raise ValueError  # a fraction, out of range, inf or nan
    value = int(text)
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise ValueError
    return value


_TYPE_NAMES = {int: "an integer below 2^63", float: "a number", str: "text", bool: "true or false"}


def _type_name(annotation: Any) -> str:
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation]
    if typing.get_origin(annotation) is list:
        return "a comma-separated list"
    if typing.get_origin(annotation) is dict:
        return "name=value pairs, comma-separated"
    return getattr(annotation, "__name__", str(annotation))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` (or a top-level field) on cfg from a raw value."""
    if dotted in REMOVED_KEYS:
        print(f"warning: {dotted} is no longer used ({REMOVED_KEYS[dotted]}); ignored", file=sys.stderr, flush=True)
        return
    parts = dotted.split(".")
    target: Any = cfg
    for depth, part in enumerate(parts):
        types_here = _field_types(type(target))
        if part not in types_here:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"unknown config key {dotted!r} (no {part!r} in {where}){_suggest(dotted)}")
        annotation = types_here[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(annotation):
                if value is None:  # a YAML section whose fields are all commented out
                    return
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: expected a mapping of fields")
                for key, sub in value.items():
                    _set(cfg, f"{dotted}.{key}", sub)
            else:
                if value == NO_VALUE:  # `--field` alone: a switch for a bool, a forgotten value for anything else
                    if annotation is not bool:
                        raise ConfigError(f"--{dotted}: missing value (expected {_type_name(annotation)})")
                    value = True
                setattr(target, part, _parse_value(value, annotation, dotted))
                _clear_other_budget(cfg, dotted)
            return
        if not dataclasses.is_dataclass(annotation):
            raise ConfigError(f"unknown config key {dotted!r} ({'.'.join(parts[: depth + 1])} has no fields)")
        target = getattr(target, part)


HF_NAMES = {  # HF Trainer / TRL argument -> ours, for the "did you mean" of an unknown key
    "learning_rate": "training.lr",
    "deepspeed": "training.deepspeed_config",
    "gradient_accumulation_steps": "training.grad_accum",
    "max_grad_norm": "training.grad_clip",
    "lr_scheduler_type": "training.lr_schedule",
    "per_device_train_batch_size": "tokens_per_micro_batch (in tokens)",
    "num_train_epochs": "budget.fraction",
    "eval_steps": "training.eval_every",
    "save_total_limit": "checkpoint.keep_last",
    "fp16": "model.dtype",
    "adam_beta1": "training.betas",
    "adam_beta2": "training.betas",
    "resume_from_checkpoint": "--resume",
    "max_seq_length": "data.max_len",
    "max_length": "data.max_len",
    "model_name_or_path": "model.name",
    "tokenizer_name": "model.tokenizer",
    "bf16": "model.dtype",
    "torch_dtype": "model.dtype",
    "dataset_name": "data.path",
}


def _suggest(dotted: str) -> str:
    """'; did you mean X?' for an unknown key: HF's name for it, a field of that name in a section, or a close
    spelling; '' when nothing is close."""
    names = [name for name, *_ in _describe(Config())]
    last = dotted.rsplit(".", 1)[-1]
    guesses = difflib.get_close_matches(dotted.lower(), names, n=1, cutoff=0.8)  # a typo: trainng.lr
    if not guesses:
        guesses = [HF_NAMES[last]] if last in HF_NAMES else [n for n in names if n.rsplit(".", 1)[-1] == last]
    guesses = guesses or difflib.get_close_matches(dotted, names, n=1, cutoff=0.7)
    return f"; did you mean {' or '.join(guesses)}?" if guesses else ""


def _clear_other_budget(cfg: Config, dotted: str) -> None:
    """budget.tokens and budget.fraction are alternatives: setting one (> 0) clears the other."""
    if dotted == "budget.tokens" and cfg.budget.tokens > 0:
        cfg.budget.fraction = 0.0
    elif dotted == "budget.fraction" and cfg.budget.fraction > 0:
        cfg.budget.tokens = 0


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from an optional YAML file and `--section.field value` overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            raise ConfigError(f"{path}: not valid YAML" + (f" (line {line + 1})" if line is not None else "")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        budget = raw.get("budget")
        if isinstance(budget, dict) and all(budget.get(key) not in (None, 0) for key in ("tokens", "fraction")):
            raise ConfigError(f"{path}: budget.tokens and budget.fraction are alternatives: give one")
        for key, value in raw.items():
            _set(cfg, str(key), value)
    for dotted, value in _pairs(overrides or []):
        _set(cfg, dotted, value)
        if dotted == "budget.fraction" and cfg.budget.fraction == 0:  # 0 in a file is "not this one"; here a mistake
            raise ConfigError("budget.fraction must be > 0, got 0 (leave it out to budget in budget.tokens)")
    validate(cfg)
    return cfg


NO_VALUE = "\x00no value"  # what _pairs gives a flag written without a value (`--flag`): true for a bool field only


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    """Turn ['--a.b', '1', '--c=2', '--flag'] into [('a.b', '1'), ('c', '2'), ('flag', NO_VALUE)]."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r} (use --section.field value)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = NO_VALUE
            i += 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def cli_values(argv: list[str]) -> dict[str, str]:
    """The command line's `--key value` pairs as given (the last of a repeated key wins), not applied to a
    Config and not validated (NO_VALUE for a flag written alone)."""
    return dict(_pairs(argv))


def parse_cli(
    argv: list[str], extra_flags: tuple[str, ...] = (), default_config: Path | None = None
) -> tuple[Config, dict[str, str]]:
    """Parse `--config FILE` (else `default_config`, if given) plus overrides. Flags named in `extra_flags`
    (e.g. 'resume') and the launcher's `--local_rank` are returned separately instead of being config keys
    (NO_VALUE when written without one). `-h`/`--help` prints `config_help` and exits 0."""
    if "-h" in argv or "--help" in argv:
        with contextlib.suppress(BrokenPipeError):  # `--help | head` closes the pipe early
            print(config_help(extra_flags), flush=True)
        raise SystemExit(0)
    config_path = default_config
    extras: dict[str, str] = {}
    overrides: list[str] = []
    for key, value in _pairs(argv):
        if key == "config":
            if value == NO_VALUE:
                raise ConfigError("--config: missing value (expected a YAML file)")
            config_path = value
        elif key in ("local_rank",):
            continue
        elif key in extra_flags:
            extras[key] = value
        else:
            overrides += [f"--{key}"] if value == NO_VALUE else [f"--{key}", value]
    return load_config(config_path, overrides), extras


def config_help(extra_flags: tuple[str, ...] = ()) -> str:
    """The --help text: a usage line, then every `section.field` with its type, default and comment."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m NAME
    prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else Path(sys.argv[0]).name
    flags = "".join(f" [--{flag}{' [PATH]' if flag == 'resume' else ''}]" for flag in extra_flags)
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--section.field VALUE ...]{flags}",
        "",
        "Fields (in the YAML file as `section: {field: value}`; lists comma-separated, dicts as name=value,...):",
    ]
    rows = []
    for name, annotation, default, note in _describe(Config()):
        kind = str(annotation) if typing.get_origin(annotation) else annotation.__name__  # list[str], int
        rows.append((name, kind, json.dumps(default, ensure_ascii=False), note))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += [f"  {n:<{widths[0]}}  {k:<{widths[1]}}  {d:<{widths[2]}}  {note}".rstrip() for n, k, d, note in rows]
    if extra_flags:
        lines += ["", "Flags:"] + [f"  --{flag}  {FLAG_HELP.get(flag, '')}".rstrip() for flag in extra_flags]
    return "\n".join(lines)


FLAG_HELP = {
    "resume": "continue the run in output_dir from its newest complete checkpoint, with the settings of its "
    "config.yaml (the command line's on top); --resume PATH: from that checkpoint or run folder",
    "overwrite_output_dir": "start over in an output_dir that holds an earlier run (its checkpoints are deleted)",
}


def _describe(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, source comment) of every field of a config dataclass instance."""
    try:  # the comments after the fields are their documentation
        source = inspect.getsource(type(obj))
    except (OSError, TypeError):
        source = ""
    notes = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", source, flags=re.MULTILINE))
    for name, annotation in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(annotation):
            yield from _describe(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation, value, notes.get(name, "")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write cfg as YAML, atomically: other ranks of a resumed run read the run's config.yaml while rank 0
    rewrites it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(value: str, name: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name}: unknown value {value!r} (choose from {', '.join(allowed)})")


def _floats(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted name, value) of every float in a config: float fields and the floats in list and dict fields."""
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{name}.")
        elif isinstance(value, float):
            yield name, value
        elif isinstance(value, list):
            yield from ((name, x) for x in value if isinstance(x, float))
        elif isinstance(value, dict):
            yield from ((f"{name}.{k}", x) for k, x in value.items() if isinstance(x, float))


def check_no_repeats(names: list[str], key: str) -> None:
    """ConfigError naming the names `key` lists more than once."""
    counts = collections.Counter(names)
    repeated = sorted(n for n, c in counts.items() if c > 1)
    _check(not repeated, f"{key}: task(s) listed more than once: {some_of(repeated)}")


def validate(cfg: Config) -> None:
    """Check every field that can be checked without reading data; raise ConfigError on the first bad one."""
    d, b, m, meta, t = cfg.data, cfg.budget, cfg.mixture, cfg.meta, cfg.training
    for name, value in _floats(cfg):
        _check(math.isfinite(value), f"{name} must be a finite number, got {value}")
    _check(bool(cfg.output_dir.strip()), "output_dir must not be empty (it would write into the current folder)")
    _one_of(d.group_by, "data.group_by", ("task", "category"))
    _one_of(d.template, "data.template", ("auto", "ni", "chat"))
    _one_of(d.assistant_turns, "data.assistant_turns", ("last", "all"))
    _one_of(d.truncation_mode, "data.truncation_mode", TRUNCATION_MODES)
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _check(d.val_examples >= 0, f"data.val_examples must be >= 0, got {d.val_examples}")
    for name, names in (("data.tasks", d.tasks), ("meta.val_tasks", meta.val_tasks)):
        check_no_repeats(names, name)
    _check(d.max_len >= 2, f"data.max_len must be >= 2, got {d.max_len}")
    _check(d.num_proc >= 1, f"data.num_proc must be >= 1, got {d.num_proc}")
    _check(d.synthetic_examples >= 4, f"data.synthetic_examples must be >= 4, got {d.synthetic_examples}")
    _check(d.lookahead >= 0.0, f"data.lookahead must be >= 0, got {d.lookahead}")
    _check(d.meta_floor_examples >= 0, f"data.meta_floor_examples must be >= 0, got {d.meta_floor_examples}")
    _check(
        0.0 < d.meta_floor_fraction <= 1.0, f"data.meta_floor_fraction must be in (0, 1], got {d.meta_floor_fraction}"
    )
    if d.path:
        _check(Path(d.path).exists(), f"data.path does not exist: {d.path}")
    _check(cfg.tokens_per_micro_batch >= 2, f"tokens_per_micro_batch must be >= 2, got {cfg.tokens_per_micro_batch}")
    _check(cfg.seed >= 0, f"seed must be >= 0 (numpy seeds are non-negative), got {cfg.seed}")
    _check(
        d.max_len <= cfg.tokens_per_micro_batch,
        f"data.max_len ({d.max_len}) must not exceed tokens_per_micro_batch ({cfg.tokens_per_micro_batch})",
    )
    _one_of(cfg.model.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16", "float64"))
    _check(
        cfg.model.dtype != "float16",
        "model.dtype float16 is not supported for training (fp16 needs loss scaling): use bfloat16 or float32",
    )
    _check(bool(cfg.model.name), "model.name must name a preset or a local folder")
    _check(
        not (cfg.model.dtype == "float64" and cfg.training.zero_stage == 0),
        "model.dtype float64 needs training.zero_stage 1 or more (DeepSpeed's ZeRO-0 cannot all-reduce fp64 gradients)",
    )

    _one_of(b.unit, "budget.unit", ("tokens", "loss"))
    _check(b.tokens >= 0, f"budget.tokens must be > 0, got {b.tokens}")
    _check(b.fraction >= 0.0, f"budget.fraction must be > 0, got {b.fraction}")
    _check(b.tokens > 0 or b.fraction > 0, "the budget must be > 0: set budget.tokens or budget.fraction")

    _one_of(m.method, "mixture.method", MIXTURE_METHODS)
    _check(m.tau > 0, f"mixture.tau must be > 0, got {m.tau}")
    _check(0.0 <= m.floor < 1.0, f"mixture.floor (epsilon) must be in [0, 1), got {m.floor}")
    _check(m.entropy_weight >= 0, f"mixture.entropy_weight must be >= 0, got {m.entropy_weight}")
    _check(m.lr > 0, f"mixture.lr must be > 0, got {m.lr}")
    _check(m.temperature > 0, f"mixture.temperature must be > 0, got {m.temperature}")
    _check(m.cap >= 0, f"mixture.cap must be >= 0, got {m.cap}")
    _one_of(m.optimizer, "mixture.optimizer", ("adam", "sgd"))
    _one_of(m.prior, "mixture.prior", ("uniform", "proportional", "fixed"))
    if m.method == "fixed" or (m.method == "adapt" and m.prior == "fixed"):
        option = "mixture.method fixed" if m.method == "fixed" else "mixture.prior fixed"
        _check(bool(m.weights), f"{option} needs mixture.weights (task=weight,...)")
        _check(all(w >= 0 for w in m.weights.values()), "mixture.weights must be >= 0")
        _check(sum(m.weights.values()) > 0, "mixture.weights must not all be zero")
    elif m.weights:
        warnings.warn(
            f"mixture.weights is used only by mixture.method fixed or mixture.prior fixed; ignored with "
            f"mixture.method {m.method}" + (f" and mixture.prior {m.prior}" if m.method == "adapt" else ""),
            DataWarning,
            stacklevel=2,
        )

    _check(meta.val_every >= 1, f"meta.val_every must be >= 1, got {meta.val_every}")
    _check(meta.update_every >= 1, f"meta.update_every must be >= 1, got {meta.update_every}")
    _check(meta.warmup >= 0, f"meta.warmup must be >= 0, got {meta.warmup}")
    _one_of(meta.dots, "meta.dots", ("one_pass", "exact"))
    _one_of(meta.precondition, "meta.precondition", ("none", "adam"))
    _check(meta.val_examples_per_task >= 1, "meta.val_examples_per_task must be >= 1")

    _check(t.lr > 0, f"training.lr must be > 0, got {t.lr}")
    _one_of(t.lr_schedule, "training.lr_schedule", ("cosine", "linear", "constant"))
    _check(0.0 <= t.min_lr_ratio <= 1.0, f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.weight_decay >= 0, f"training.weight_decay must be >= 0, got {t.weight_decay}")
    _check(t.grad_clip >= 0, f"training.grad_clip must be >= 0, got {t.grad_clip}")
    _check(t.grad_accum >= 1, f"training.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.max_steps >= 0, f"training.max_steps must be >= 0, got {t.max_steps}")
    _check(len(t.betas) == 2 and all(0 <= x < 1 for x in t.betas), "training.betas must be two numbers in [0, 1)")
    _check(t.zero_stage in (0, 1, 2, 3), f"training.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    _check(
        not (t.zero_stage == 3 and m.method == "adapt" and meta.dots == "exact"),
        "meta.dots exact is not supported with training.zero_stage 3 (K backward passes over partitioned weights); "
        "use one_pass",
    )
    _check(t.max_bad_steps >= 1, f"training.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _one_of(cfg.kernels.backend, "kernels.backend", ("auto", "triton", "torch"))
    _check(cfg.checkpoint.every_tokens >= 0, f"checkpoint.every_tokens must be >= 0, got {cfg.checkpoint.every_tokens}")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")


def check_output_dir(path: str) -> Path:
    """Create output_dir (or fail with one line if it cannot be written)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks check at the same time
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir is not writable: {path} ({err.strerror or type(err).__name__})") from None
    return out
