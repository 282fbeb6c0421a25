"""Train a causal LM on many tasks under a token budget, learning the task mixture (ADAPT).

    deepspeed adapt_fast/train.py --config CONFIG.yaml [--section.field value ...]
    python -m adapt_fast.train [--config CONFIG.yaml] [--section.field value ...]   (world size 1)

With no --config it runs the embedded default: the synthetic NI-format suite and a tiny Llama from
random init (CPU when there is no GPU). One optimizer step:

1. (every meta.val_every steps) a fresh validation batch holding every task: per-task losses ℓ_k;
   for ADAPT also G = ∇Φ, Φ = τ·logΣexp(ℓ_k/τ) over the objective tasks (meta.val_tasks); under ZeRO-3
   each rank keeps only its partition of G, like the weights (adapt_fast.model.zero3).
2. A micro-batches from the packed loader, which follows the current mixture p and stops at the
   budget. Forward + backward through the DeepSpeed engine; on steps that update the mixture the
   same backward also yields the per-task dot products D_k = <G, ∇ task k's share of the loss>
   (ghost hooks + the fused loss kernel), all-reduced, so d_k = D_k·N/N_k.
3. The optimizer step; ADAPT updates α from d (DESIGN.md section 1) identically on every rank.

Reliability (adapt_fast.checkpoint):
- Checkpoints every checkpoint.every_tokens budget units and at the end: DeepSpeed's (weights,
  optimizer, scheduler) plus the trainer's state (step, mixture logits and their Adam state, the
  latest G and its step, the loader's streams/leftovers/deficit/counts, counters, every rank's RNG).
  `--resume` (latest in output_dir) or `--resume PATH` continues bit-exactly (CPU, fp32): the
  metrics rows after the checkpoint, the final mixture and the token counts equal the uninterrupted
  run's; metrics.jsonl keeps the rows up to the checkpoint and the redone steps are appended.
- SIGTERM / SIGINT: the current step finishes, every rank agrees (all-reduce), a checkpoint is
  written, "stopped at step N ...; resume with: ..." is printed and the exit code is 143 / 130.
- A non-finite loss or gradient (checked on every rank before the optimizer step and agreed by
  all-reduce) skips the update of the model and of the mixture; the step still counts (its tokens
  were fed and are spent, the LR schedule advances), is logged ("bad_step") and counted in
  report.json. training.max_bad_steps of them in a row write a checkpoint and exit 3. A non-finite
  meta-gradient d skips only the mixture update.

Fault injection (tests only; documented so nobody is surprised by it):
    ADAPT_FAST_INJECT_NAN_STEPS="3,4"   steps 3 and 4 (1-based, as logged) get a NaN loss
    ADAPT_FAST_INJECT_NAN_GRAD_STEPS="3" step 3 backpropagates NaN (its loss stays finite)
    ADAPT_FAST_INJECT_SIGNAL="5:TERM"    after step 5, rank 0 sends itself SIGTERM (or INT)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Nothing is fetched at run time: models, tokenizers and data come from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A file run by the deepspeed launcher has its own folder, not the repository, on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from adapt_fast import checkpoint as ckpt
from adapt_fast.config import (
    FALSE_WORDS,
    NO_VALUE,
    TRUE_WORDS,
    Config,
    TrainingConfig,
    check_output_dir,
    cli_values,
    parse_cli,
    save_config,
)
from adapt_fast.data.batch import MicroBatch
from adapt_fast.data.loader import PackedLoader, pack_examples, pack_items
from adapt_fast.data.prepare import (
    check_task_names,
    load_data,
    load_tokenizer,
    make_loader,
    max_len_losses,
    resolve_budget,
)
from adapt_fast.errors import (
    EXIT_DIVERGED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ConfigError,
    DataWarning,
    RunStopped,
    UserError,
    exit_on_user_error,
    some_of,
)
from adapt_fast.mixture import AdaptMixture, AdaptSettings, mixture_entropy, static_mixture

TB_QUEUE = 4096  # TensorBoard events queued for its writer thread before add_scalar blocks (its default: 10)
TB_PER_TASK_SCALARS = 64  # more tasks than this: per-task values go to TensorBoard as histograms, not scalars
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ----------------------------------------------------------------------------- distributed set-up


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); a run without the
    launcher is world size 1. Returns (rank, world_size, device)."""
    import deepspeed

    own = "WORLD_SIZE" not in os.environ  # no launcher: a world of one, on a free port
    if own:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if own:  # a subprocess started from here must not inherit (and collide on) this rendezvous
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); a no-op at world size 1."""
    t = t.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# Keys of the DeepSpeed config that the trainer derives from its own config; a user's JSON may leave them out, say
# "auto" (as HF Trainer's configs do) or repeat the same value.
DEEPSPEED_OWNED = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16.enabled", "fp16.enabled", "optimizer", "scheduler", "zero_optimization.stage",
)  # fmt: skip


def merge_deepspeed_config(ours: dict, path: str) -> dict:
    """`ours` with a user's DeepSpeed JSON merged in (nested sections merged key by key): ZeRO options
    (bucket sizes, overlap, persistence threshold, offload), communication, logging. A key in DEEPSPEED_OWNED
    that disagrees with the trainer's own value is a ConfigError naming the setting to change instead."""
    import copy

    try:
        user = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"training.deepspeed_config: cannot read {path} ({err.strerror})") from None
    except ValueError as err:
        raise ConfigError(f"training.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"training.deepspeed_config: {path} must hold a JSON object")
    merged = copy.deepcopy(ours)

    def merge(into: dict, extra: dict, prefix: str) -> None:
        for key, value in extra.items():
            name = prefix + key
            if value == "auto":
                continue
            if name in ("optimizer", "scheduler") and isinstance(value, dict):
                check_auto_block(name, value, path)  # HF's configs: every value "auto" means the trainer's
                continue
            if isinstance(value, dict) and isinstance(into.get(key, {}), dict) and name not in DEEPSPEED_OWNED:
                merge(into.setdefault(key, {}), value, name + ".")
            elif isinstance(into.get(key), dict) and not isinstance(value, dict):
                raise ConfigError(f"training.deepspeed_config: {name} must be a JSON object in {path}, not {value!r}")
            elif name in DEEPSPEED_OWNED and into.get(key) != value:
                ours_value = "itself" if into.get(key) is None else f"from its own config ({json.dumps(into.get(key))})"
                raise ConfigError(
                    f"training.deepspeed_config: {name} is {json.dumps(value)} in {path}, but the trainer sets it "
                    f'{ours_value}: remove it or write "auto"'
                )
            else:
                into[key] = value

    merge(merged, user, "")
    return merged


ADAMW_TYPES = ("adamw", "adam")  # DeepSpeed's names of the optimizer the trainer builds (Adam: in AdamW mode)
OPTIMIZER_FIELDS = "training.lr, training.betas, training.weight_decay"
SCHEDULER_FIELDS = "training.warmup_steps, training.lr_schedule, training.min_lr_ratio"


def check_auto_block(name: str, block: dict, path: str) -> None:
    """An `optimizer` / `scheduler` block of a user's DeepSpeed JSON, as HF's example configs write them: accepted
    (and left out: the trainer builds its own AdamW and schedule) when every parameter is "auto" and the optimizer is
    AdamW; any set value is a ConfigError naming the trainer's fields that set it."""
    fields = OPTIMIZER_FIELDS if name == "optimizer" else SCHEDULER_FIELDS
    kind = block.get("type", "auto")
    if name == "optimizer" and kind != "auto" and str(kind).lower() not in ADAMW_TYPES:
        raise ConfigError(f"training.deepspeed_config: optimizer type {kind} in {path}: the trainer trains with AdamW")
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"training.deepspeed_config: {name}.params must be a JSON object in {path}")
    for key, value in {**{k: v for k, v in block.items() if k not in ("type", "params")}, **params}.items():
        if value != "auto":
            raise ConfigError(
                f"training.deepspeed_config: {name}.params.{key} is {json.dumps(value)} in {path}, but the trainer "
                f"builds its own {'AdamW' if name == 'optimizer' else 'LR schedule'} from {fields}: set those, and "
                f'write "auto" here or remove the {name} block'
            )


@contextlib.contextmanager
def deepspeed_config_errors():
    """DeepSpeed refusing a value or key of its config (pydantic validation; from training.deepspeed_config) as a
    one-line ConfigError instead of a traceback."""
    import pydantic  # DeepSpeed validates its config with it

    try:
        yield
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"training.deepspeed_config: DeepSpeed refuses it ({err.title}: {problems})") from None


def adamw(model: torch.nn.Module, t: TrainingConfig, ds_config: dict) -> torch.optim.Optimizer:
    """The model's AdamW: torch's fused kernel (one pass over the fp32 master weights; HF Trainer's default too), or
    DeepSpeed's CPU Adam (AdamW mode, its C++ op built on first use) when the DeepSpeed config offloads the
    optimizer (ZeRO-Offload steps on CPU tensors; DeepSpeed refuses torch's there)."""
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)


def _undo_startup_step(optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's bf16/fp16 wrapper at ZeRO-0 creates AdamW's state by stepping once on zero gradients, and AdamW's
    bias correction then counts that step: the first real update came out (1-b1)/(1-b1^2)·sqrt((1-b2^2)/(1-b2)) =
    0.73x as large as plain AdamW's (b = 0.9, 0.95), the early ones less so. Where the moments are still zero, set
    the count back to 0."""
    for state in optimizer.state.values():
        moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        if "step" in state and moments and not any(bool(m.any()) for m in moments):
            step = state["step"]
            state["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float, schedule: str = "cosine"):
    """The multiplier of the peak lr at each step: linear warm-up, then `schedule` down to min_ratio at total_steps
    (cosine or linear), or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "constant":
            return 1.0
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


# ----------------------------------------------------------------------------- stopping and faults


class StopSignals:
    """While active, SIGTERM and SIGINT set a flag instead of ending the process: the loop finishes
    its step, checkpoints and exits. A second Ctrl-C aborts at once (KeyboardInterrupt); further
    SIGTERMs (launchers often send two) are absorbed. Handlers are restored on exit; outside the
    main thread (where Python cannot install handlers) this is a no-op."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _steps_from_env(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def _fault_injection() -> tuple[set[int], set[int], tuple[int, int] | None]:
    """Testing hooks, read from the environment (see the module docstring): the 1-based steps whose
    loss is made NaN, those whose gradient only is, and (step, signal) that rank 0 sends itself."""
    nan_steps = _steps_from_env("ADAPT_FAST_INJECT_NAN_STEPS")
    nan_grad_steps = _steps_from_env("ADAPT_FAST_INJECT_NAN_GRAD_STEPS")
    sig = None
    spec = os.environ.get("ADAPT_FAST_INJECT_SIGNAL", "").strip()
    if spec:
        step, _, name = spec.partition(":")
        sig = (int(step), signal.SIGINT if name.strip().upper() in ("INT", "SIGINT") else signal.SIGTERM)
    return nan_steps, nan_grad_steps, sig


def resume_command(argv: list[str], world_size: int) -> str:
    """The command line that continues this run: its own arguments (less --resume, --overwrite_output_dir and
    the launcher's --local_rank) plus --resume."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--resume", "--local_rank", "--local-rank", "--overwrite_output_dir", "--overwrite-output-dir"):
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        if arg.startswith(
            ("--resume=", "--local_rank=", "--local-rank=", "--overwrite_output_dir=", "--overwrite-output-dir=")
        ):
            i += 1
            continue
        kept.append(arg)
        i += 1
    args = shlex.join([*kept, "--resume"])
    if world_size > 1:
        return f"deepspeed [the same launcher options] adapt_fast/train.py {args}"
    return f"python -m adapt_fast.train {args}"


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "weights":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------- the trainer


class CheckpointMismatch(Exception):
    """A checkpoint whose files are whole but that DeepSpeed cannot load into this run (another model, dtype or
    ZeRO stage): the run stops in one line and the checkpoint is left as it is (it is not broken)."""


@dataclass
class StepResult:
    loss: float
    loss_sum: np.ndarray  # (K,) global
    count: np.ndarray  # (K,) global loss tokens
    dots: np.ndarray | None  # (K,) d_k on mixture updates
    bad: str | None = None  # why the update was skipped: "non-finite loss" / "non-finite gradient"


class Trainer:
    """Everything one run needs: data, model engine, mixture, loader, writers."""

    def __init__(self, cfg: Config, resume: str | None = None, argv: list[str] | None = None):
        import deepspeed

        from adapt_fast.model.fused_layers import use_fused_layers
        from adapt_fast.model.loading import (
            check_model_folder,
            default_dtype,
            enable_gradient_checkpointing,
            load_model_and_tokenizer,
        )
        from adapt_fast.model.loss import attach_zero3_head_loss

        self.cfg = cfg
        self.argv = list(argv or [])
        if cfg.training.deepspeed_config and not Path(cfg.training.deepspeed_config).is_file():
            # checked here, not in validate(): evaluate reads a run's config.yaml from anywhere
            raise ConfigError(f"training.deepspeed_config: no such file {cfg.training.deepspeed_config}")
        self.rank, self.world_size, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.out = check_output_dir(cfg.output_dir)
        self.start_time = self.invocation_start = time.time()

        # Data: rank 0 tokenises first (fills the cache), the others then read it.
        if os.path.isdir(cfg.model.name):  # a folder that is no model: one line now, not after tokenising
            check_model_folder(cfg.model.name, cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(cfg)
        if not self.is_main:
            dist.barrier()
        self.data = load_data(cfg, self.tokenizer, progress=self.is_main)
        if self.is_main and self.world_size > 1:
            dist.barrier()
        self.task_names = self.data.task_names
        self.K = len(self.task_names)
        if self.data.validation.num_examples == 0 and cfg.mixture.method == "adapt":
            raise ConfigError("mixture.method adapt needs validation examples (data.val_fraction or data.val_examples)")
        named = check_task_names(cfg.meta.val_tasks, self.data, "meta.val_tasks")
        self.objective = named or list(range(self.K))
        val_examples = self.data.validation.examples_per_task()
        # G's batch is the validation batch cut to the objective's tasks when that leaves out any example
        self._G_subset = bool(np.delete(val_examples, self.objective).sum() > 0)
        unmeasured = [self.task_names[k] for k in self.objective if val_examples[k] == 0]
        if unmeasured and cfg.mixture.method == "adapt":
            lost = set(max_len_losses(self.data)[2])
            why = "every example longer than data.max_len, or fewer" if set(unmeasured) & lost else "fewer"
            why += " than the two examples a split needs"
            if named or len(unmeasured) == len(self.objective):  # tasks the user named, or nothing left to measure
                raise ConfigError(
                    f"mixture.method adapt: no validation examples for {some_of(unmeasured)} ({why}; leave them out "
                    "with data.tasks, or out of the objective with meta.val_tasks)"
                )
            # All tasks by default: the ones with nothing to validate on stay out of the objective Φ (and train).
            self.objective = [k for k in self.objective if val_examples[k] > 0]
            if self.is_main:
                warnings.warn(
                    f"{len(unmeasured):,} task(s) have no validation examples ({some_of(unmeasured)}: {why}): "
                    "ADAPT's objective leaves them out; those with training examples still train, their share steered "
                    "by the other tasks' validation losses (meta.val_tasks names the objective's tasks)",
                    DataWarning,
                    stacklevel=2,
                )
        self.budget = resolve_budget(cfg, self.data.train)

        # Mixture.
        train = self.data.train
        proportional = static_mixture(
            "proportional", train.tokens_per_task(), train.examples_per_task(), self.task_names
        )
        if cfg.mixture.method == "adapt":
            m = cfg.mixture
            settings = AdaptSettings(
                tau=m.tau,
                entropy_weight=m.entropy_weight,
                floor=m.floor,
                lr=m.lr,
                optimizer=m.optimizer,
                prior=m.prior,
                relative_loss=m.relative_loss,
                normalize=m.normalize,
            )
            prior = proportional
            if m.prior == "fixed":
                prior = static_mixture(
                    "fixed", train.tokens_per_task(), train.examples_per_task(), self.task_names, weights=m.weights
                )
            self.adapt: AdaptMixture | None = AdaptMixture(self.task_names, settings, prior, self.objective)
            p0 = self.adapt.probs
        else:
            self.adapt = None
            m = cfg.mixture
            p0 = static_mixture(
                m.method,
                train.tokens_per_task(),
                train.examples_per_task(),
                self.task_names,
                temperature=m.temperature,
                cap=m.cap,
                weights=m.weights,
            )
        self.static_p = p0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if not self.is_main else "default")
            self.loader: PackedLoader = make_loader(cfg, self.data, p0, self.budget, self.rank, self.world_size)

        # The DeepSpeed config first: under ZeRO-3 a model folder loads straight into its partitions.
        t = cfg.training
        dtype = DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto" else default_dtype(self.device)
        self.total_steps = self._estimate_steps()
        if self.is_main and self.adapt is not None:
            self._warn_validation_cost()
        if self.is_main and self.adapt is not None and cfg.meta.warmup >= self.total_steps:
            warnings.warn(
                f"meta.warmup ({cfg.meta.warmup} steps) is not shorter than the run (about {self.total_steps} "
                f"steps): the mixture never updates, so this run trains on its starting mixture "
                f"(mixture.prior {cfg.mixture.prior})",
                DataWarning,
                stacklevel=2,
            )
        if self.is_main and t.warmup_steps >= self.total_steps:
            warnings.warn(
                f"training.warmup_steps ({t.warmup_steps}) covers the whole run (about {self.total_steps} steps): "
                "the learning rate never reaches training.lr",
                DataWarning,
                stacklevel=2,
            )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": t.grad_accum,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if t.grad_clip > 0:
            ds_config["gradient_clipping"] = t.grad_clip
        if t.deepspeed_config:
            ds_config = merge_deepspeed_config(ds_config, t.deepspeed_config)
        if self.is_main:  # what DeepSpeed was given, after merging: for reproducing and debugging a run
            (self.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))

        # The model and the DeepSpeed engine.
        with deepspeed_config_errors():  # zero.Init reads the config too
            model, _ = load_model_and_tokenizer(
                cfg.model.name,
                dtype=dtype,
                device=self.device,
                trust_remote_code=cfg.model.trust_remote_code,
                seed=cfg.seed,
                zero3_config=ds_config if t.zero_stage == 3 else None,
                tokenizer=self.tokenizer,  # loaded for the data above: checked against the model, not loaded again
            )
        self.backend = self._kernel_backend()
        self.fused_layers = {}  # module kind -> how many run fused kernels
        if cfg.kernels.fused_layers and self.backend == "triton" and dtype != torch.float64:  # kernels: up to fp32
            self.fused_layers = use_fused_layers(model, self.backend)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.mixture.method == "adapt" and cfg.meta.dots == "one_pass":  # now, not at the first mixture update
            from adapt_fast.model.ghost import hooked_modules, uncovered_message

            _, uncovered = hooked_modules(model)
            if uncovered:
                raise ConfigError(
                    f"{cfg.model.name}: mixture.method adapt with meta.dots one_pass: {uncovered_message(uncovered)} "
                    "(meta.dots exact takes K backward passes instead, not under ZeRO-3; or use a static "
                    "mixture.method)"
                )
        # Training mode, as HF Trainer sets it (from_pretrained returns the model in eval mode): dropout and
        # activation checkpointing act on the training steps and on G; validation losses switch to eval mode.
        model.train()
        if t.zero_stage == 3:
            attach_zero3_head_loss(model)  # the fused loss reads the head weight outside the head's forward
        self.model_dtype = next(model.parameters()).dtype
        optimizer = adamw(model, t, ds_config)
        schedule = lr_lambda(t.warmup_steps, self.total_steps, t.min_lr_ratio, t.lr_schedule)
        with deepspeed_config_errors():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                config=ds_config,
            )
        self.torch_optimizer = optimizer  # the AdamW inside DeepSpeed's wrappers (skipped on bad steps)
        _undo_startup_step(optimizer)
        ckpt.install_safe_loader(self.engine)
        self.model = self.engine.module
        self.step = 0
        self.G: dict[str, torch.Tensor] | None = None
        self.G_step: int | None = None  # the step G was computed at
        self.validation_tokens = 0
        self._val_examples_of_task: list[np.ndarray] | None = None  # built on first use (_validation_batches)
        self.train_seconds = 0.0
        self.bad_steps = 0  # non-finite steps (update skipped), in all
        self.bad_in_a_row = 0
        self.mixture_updates_skipped = 0  # non-finite meta-gradients (mixture update skipped)
        self.inject_nan_steps, self.inject_nan_grad_steps, self.inject_signal = _fault_injection()

        # Checkpoints: resume, then tidy the folder (unfinished writes, checkpoints superseded).
        self.ckpt_root = self.out / ckpt.CHECKPOINTS
        self.resumed_from: Path | None = self._resume(resume) if resume else None
        self.last_checkpoint_step = self.step if self.resumed_from is not None else None
        self.first_step = self.step  # this invocation's
        every = cfg.checkpoint.every_tokens
        self.next_checkpoint = (self.loader.consumed // every + 1) * every if every > 0 else None
        if self.is_main:
            self._tidy_output()
            save_config(cfg, self.out / "config.yaml")
            self._open_writers()
        self._barrier()

    def _warn_validation_cost(self) -> None:
        """One warning when ADAPT's validation batch (its losses, then G: about 4/3 of a training pass over it, every
        meta.val_every steps) costs more than the training steps between two of them, as with many tasks."""
        meta, val = self.cfg.meta, self.data.validation
        n = val.examples_per_task()
        mean_length = val.tokens_per_task() / np.maximum(n, 1)
        per_task = np.minimum(n, meta.val_examples_per_task) * mean_length
        val_tokens = float(per_task.sum())
        train_tokens = meta.val_every * self.cfg.tokens_per_micro_batch * self.world_size * self.cfg.training.grad_accum
        ratio = (val_tokens / 3 + float(per_task[self.objective].sum())) / train_tokens  # losses' forward, then G
        if ratio > 1:
            fewer = (
                ""
                if meta.val_tasks
                else "aim the objective at fewer tasks (meta.val_tasks: G's backward covers only those), "
            )
            warnings.warn(
                f"ADAPT's validation batch ({val_tokens:,.0f} tokens: meta.val_examples_per_task "
                f"{meta.val_examples_per_task} of {self.K} tasks) costs about {ratio:.2g}x the training between two "
                f"of them (meta.val_every {meta.val_every} steps): lower meta.val_examples_per_task, raise "
                f"meta.val_every, {fewer}or group tasks (data.group_by category) to spend the time on training",
                DataWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ checkpoints

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def state_dict(self) -> dict:
        """The trainer's own state (DeepSpeed holds the weights, the optimizer and the scheduler):
        tensors, lists, dicts, numbers and strings only (torch.load(weights_only=True) reads it)."""
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "consumed": self.loader.consumed,
            "budget": self.budget,
            "world_size": self.world_size,
            "task_names": list(self.task_names),
            "config": self.cfg.to_dict(),
            "loader": ckpt.to_plain(self.loader.state_dict()),
            "adapt": self.adapt.state_dict() if self.adapt is not None else None,
            # ZeRO-3: every rank's partitions of G go to its own file (save_checkpoint).
            "G": None if self.G is None or self._G_partitioned else self._G_on_cpu(),
            "G_step": self.G_step,
            "validation_tokens": self.validation_tokens,
            "train_seconds": self.train_seconds,
            "wall_seconds": time.time() - self.start_time,
            "bad_steps": self.bad_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "mixture_updates_skipped": self.mixture_updates_skipped,
        }

    def _check_compatible(self, state: dict, path: Path) -> None:
        """The checkpoint must come from the same tasks and world size; other changed settings are
        reported (one line) and used."""
        if list(state["task_names"]) != list(self.task_names):
            raise ConfigError(f"--resume: {path} was trained on other tasks; resume with the same data settings")
        if state["world_size"] != self.world_size:
            raise ConfigError(
                f"--resume: {path} was written by {state['world_size']} rank(s), this run has {self.world_size}; "
                "resume with the same number of ranks"
            )
        if (state["adapt"] is None) != (self.adapt is None):
            kind = "a static-mixture" if state["adapt"] is None else "an ADAPT"
            raise ConfigError(f"--resume: {path} is from {kind} run; resume with the same mixture.method")
        old_stage = state["config"]["training"]["zero_stage"]
        if old_stage != self.cfg.training.zero_stage:
            raise ConfigError(
                f"--resume: {path} was written at training.zero_stage {old_stage} (DeepSpeed's optimizer state is "
                f"laid out per stage); resume with training.zero_stage {old_stage}"
            )
        ignored = ("output_dir", "checkpoint.", "data.cache_dir", "data.num_proc", "training.max_bad_steps")
        changed = [
            key
            for key, value in _flatten(self.cfg.to_dict()).items()
            if not key.startswith(ignored) and _flatten(state["config"]).get(key) != value
        ]
        if changed and self.is_main:
            print(f"warning: resuming with changed settings: {', '.join(changed)}", file=sys.stderr, flush=True)

    @property
    def _G_partitioned(self) -> bool:
        """Under ZeRO-3 G is held as every rank's partitions (adapt_fast.model.zero3)."""
        return self.cfg.training.zero_stage == 3

    def _G_on_cpu(self) -> dict[str, torch.Tensor]:
        return {name: g.detach().cpu() for name, g in self.G.items()}

    def load_state_dict(self, state: dict, partitions: dict | None = None) -> None:
        """The trainer's state; `partitions`: this rank's partitions of G (ZeRO-3), saved beside it."""
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        if self.adapt is not None:
            self.adapt.load_state_dict(state["adapt"])
        G = partitions if partitions is not None else state["G"]
        self.G = None if G is None else {n: g.to(self.device) for n, g in G.items()}
        self.G_step = state["G_step"]
        self.validation_tokens = int(state["validation_tokens"])
        self.train_seconds = float(state["train_seconds"])
        # report.json's wall_seconds, like train_seconds, covers every invocation (each up to its last checkpoint);
        # set from this invocation's start, not subtracted: a resume that falls back to an older checkpoint loads twice
        self.start_time = self.invocation_start - float(state.get("wall_seconds", 0.0))
        self.bad_steps = int(state["bad_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.mixture_updates_skipped = int(state["mixture_updates_skipped"])

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the state after self.step (a collective call: every rank)."""
        name = ckpt.step_name(self.step)
        tmp_tag = ckpt.TMP_PREFIX + name
        tmp, final = self.ckpt_root / tmp_tag, self.ckpt_root / name
        if self.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tmp_tag, client_state={}, save_latest=False)
        ckpt.save_state(ckpt.rng_state(), tmp / ckpt.rng_file(self.rank))
        if self._G_partitioned and self.G is not None:
            ckpt.save_state(self._G_on_cpu(), tmp / ckpt.g_partition_file(self.rank))
        if self.is_main:
            ckpt.save_state(self.state_dict(), tmp / ckpt.TRAINER_STATE)
        self._barrier()
        if self.is_main:
            ckpt.write_marker(tmp, self.step, self.loader.consumed)
            ckpt.finalize(tmp, final)
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last)
        self._barrier()
        self.last_checkpoint_step = self.step
        return final

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_state(path / ckpt.TRAINER_STATE)
        self._check_compatible(state, path)
        try:
            load_path, _ = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except pickle.UnpicklingError:  # refused by weights_only: tampered with, or not ours
            raise
        except Exception as err:  # noqa: BLE001 - whole files (verified) that DeepSpeed cannot load into this model
            raise CheckpointMismatch(str(err)) from err
        if load_path is None:
            raise RuntimeError("DeepSpeed found no checkpoint there")
        self._replan_lr()
        rng = ckpt.load_state(path / ckpt.rng_file(self.rank))
        g_file = path / ckpt.g_partition_file(self.rank)
        self.load_state_dict(state, ckpt.load_state(g_file) if g_file.is_file() else None)
        ckpt.set_rng_state(rng)

    def _replan_lr(self) -> None:
        """Set the learning rate to this run's schedule at the loaded step. The checkpoint holds the rate its own plan
        gave; a resume with another budget re-plans the schedule (the same plan gives the same rate, bit for bit)."""
        sched = self.scheduler
        lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs

    def _resume(self, value: str) -> Path | None:
        """Load the newest usable checkpoint `--resume value` points at (every rank the same one);
        None when bare --resume finds no checkpoint in output_dir (the run starts from the beginning)."""
        candidates, explicit = ckpt.resume_candidates(value, self.out)
        if not candidates:
            set_aside = sorted(self.ckpt_root.glob(ckpt.BROKEN_PREFIX + ckpt.PREFIX + "*"))
            if set_aside:  # never start over silently when the run had checkpoints
                raise ConfigError(
                    f"--resume: the only checkpoints in {self.ckpt_root} were set aside as broken "
                    f"({', '.join(c.name for c in set_aside)}): pass one (--resume PATH) or --overwrite_output_dir"
                )
            if self.is_main:
                print(f"no checkpoint in {self.ckpt_root}: starting from the beginning", file=sys.stderr, flush=True)
            return None
        for path in candidates:
            # A checkpoint whose files fail `verify` (missing, cut short, checksum) is broken: set aside, and the
            # one before it tried. One that verifies but does not load was written by another kind of run (model,
            # ZeRO stage): nothing is renamed, and the run stops in one line.
            problem = ckpt.verify(path)
            mismatch = 0.0
            if problem is None:
                try:
                    self._load_checkpoint(path)
                except UserError:
                    raise
                except Exception as err:  # noqa: BLE001 (any failure to read our own files makes it broken)
                    cause = err.__cause__ if isinstance(err, CheckpointMismatch) else err
                    problem = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:300]
                    mismatch = float(isinstance(err, CheckpointMismatch))
            failed = torch.zeros(2 * self.world_size, dtype=torch.float64, device=self.device)
            failed[self.rank] = float(problem is not None)
            failed[self.world_size + self.rank] = mismatch
            failed = all_reduce(failed)
            if failed[self.world_size :].any():
                raise ConfigError(
                    f"--resume: {path} does not load into this run ({problem or 'on another rank'}); resume with "
                    "the settings it was written with (model.name, model.dtype, training.zero_stage)"
                )
            failed = failed[: self.world_size]
            if not failed.any():
                if self.loader.consumed > self.budget:
                    unit = self.cfg.budget.unit
                    raise ConfigError(
                        f"--resume: {path} has already spent {self.loader.consumed} {unit}, more than this run's "
                        f"budget of {self.budget}; resume with a budget of at least {self.loader.consumed}"
                    )
                if self.is_main:
                    print(
                        f"resuming from {path} (step {self.step}, {self.loader.consumed} / {self.budget} "
                        f"{self.cfg.budget.unit})",
                        file=sys.stderr,
                        flush=True,
                    )
                return path
            if explicit:
                raise ConfigError(f"--resume: checkpoint {path} is broken ({problem or 'on another rank'})")
            if problem is not None and self.rank == int(torch.nonzero(failed)[0]):
                print(f"warning: checkpoint {path} is broken ({problem}); trying the previous one", file=sys.stderr)
            self._barrier()
            if self.is_main:
                ckpt.set_aside(path)
            self._barrier()
        raise ConfigError(f"--resume: every checkpoint in {candidates[0].parent} is broken")

    def _tidy_output(self) -> None:
        """Rank 0, at the start: remove unfinished writes, and checkpoints this run supersedes (all of
        them on a fresh start, those after the resumed step on a resume). A fresh start (main() has made
        sure one was asked for) also removes an earlier run's TensorBoard events, final/ and report.json,
        so that none of them is taken for this run's."""
        import shutil

        ckpt.remove_unfinished(self.ckpt_root)
        if self.resumed_from is None:
            for folder in ("tensorboard", "final"):
                shutil.rmtree(self.out / folder, ignore_errors=True)
            (self.out / "report.json").unlink(missing_ok=True)
        same_root = self.resumed_from is not None and self.resumed_from.parent.resolve() == self.ckpt_root.resolve()
        superseded = [
            c for c in ckpt.complete_checkpoints(self.ckpt_root) if not same_root or ckpt.step_of(c) > self.step
        ]
        if superseded:
            what = "of an earlier run" if not same_root else f"after step {self.step}"
            print(
                f"removing {len(superseded)} checkpoint(s) {what} in {self.ckpt_root} (this run supersedes them)",
                file=sys.stderr,
                flush=True,
            )
            for c in superseded:
                shutil.rmtree(c, ignore_errors=True)

    def _open_writers(self) -> None:
        """metrics.jsonl and TensorBoard (rank 0). On a resume, metrics.jsonl keeps the rows up to the
        checkpoint's step (later ones are redone) and is appended to; TensorBoard purges later events."""
        from torch.utils.tensorboard import SummaryWriter

        path = self.out / "metrics.jsonl"
        self._tb_mixture: tuple | None = None  # the mixture last written to TensorBoard
        if self.resumed_from is None:
            self.metrics_file = open(path, "w")  # noqa: SIM115 (closed in close_writers)
            self.tb = SummaryWriter(str(self.out / "tensorboard"), max_queue=TB_QUEUE)
            return
        source = path
        run_dir = self.resumed_from.parent.parent
        if run_dir.resolve() != self.out.resolve():
            source = run_dir / "metrics.jsonl"
        kept = []
        if source.is_file():
            for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by the crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
        self.metrics_file = open(path, "a")  # noqa: SIM115 (closed in close_writers)
        self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1, max_queue=TB_QUEUE)

    def close_writers(self) -> None:
        if self.is_main and not self.metrics_file.closed:
            self.metrics_file.close()
            self.tb.close()

    # ------------------------------------------------------------------ helpers

    def _estimate_steps(self) -> int:
        """Optimizer steps the budget will take (for the cosine schedule). Under budget.unit loss a step's loss tokens
        are estimated from each task's share of loss tokens, weighted by the starting mixture (exact in expectation
        for a static mixture; ADAPT moves p, so its schedule is planned for p at the start)."""
        c = self.cfg
        per_step = c.tokens_per_micro_batch * self.world_size * c.training.grad_accum
        if c.budget.unit == "loss":
            train = self.data.train
            tokens = train.tokens_per_task().astype(np.float64)
            loss_share = np.divide(train.loss_tokens_per_task(), tokens, out=np.zeros_like(tokens), where=tokens > 0)
            p = np.where(tokens > 0, self.static_p, 0.0)  # a task without training data: the others take its share
            per_step *= float(np.dot(p, loss_share) / p.sum()) if p.sum() > 0 else 1.0
        steps = max(1, math.ceil(self.budget / max(per_step, 1.0)))
        return min(steps, c.training.max_steps) if c.training.max_steps else steps

    def _kernel_backend(self) -> str:
        from adapt_fast.kernels import resolve_backend

        try:
            return resolve_backend(self.cfg.kernels.backend, self.device)
        except ValueError as err:
            raise ConfigError(f"kernels.backend: {err}") from None

    @property
    def mixture(self) -> np.ndarray:
        return self.adapt.probs if self.adapt is not None else self.static_p

    def _empty_batch(self) -> MicroBatch:
        """One padding slot: keeps every rank's micro-step count equal after the budget ends."""
        return pack_items(self.data.train, [], self.K)

    # ------------------------------------------------------------------ validation and G

    def _validation_batches(self, examples_per_task: int | None, tasks: list[int] | None = None) -> list[MicroBatch]:
        """This rank's share of a validation batch: `examples_per_task` fresh examples of every task
        (seeded by the step), or the whole validation split when None; with `tasks`, only those tasks' examples of
        that same batch. Every rank gets the same number of micro-batches (empty ones fill in): under ZeRO-3 each
        forward gathers weights from all ranks."""
        val = self.data.validation
        if examples_per_task is None:
            chosen = np.arange(val.num_examples)
        else:
            rng = np.random.default_rng([self.cfg.seed, self.step, 31337])
            if self._val_examples_of_task is None:  # each task's examples, ascending: one sort, not K scans
                self._val_examples_of_task = val.examples_by_task()
            chosen = np.concatenate(
                [rng.permutation(members)[:examples_per_task] for members in self._val_examples_of_task]
            )
        if tasks is not None:
            chosen = chosen[np.isin(np.asarray(val.task_ids)[chosen], tasks)]
        batches = pack_examples(val, np.sort(chosen), self.cfg.tokens_per_micro_batch)
        if tasks is None:  # a subset of a batch already counted is not counted again
            self.validation_tokens += sum(b.num_tokens for b in batches)
        mine = batches[self.rank :: self.world_size]
        return mine + [self._empty_batch()] * (-(-len(batches) // self.world_size) - len(mine))

    def validation_losses(self, batches: list[MicroBatch]) -> tuple[np.ndarray, np.ndarray]:
        """Global per-task mean loss (K,) (nan where a task has no tokens) and loss-token counts."""
        from adapt_fast.model.ghost import validation_losses

        batches = [b.to(self.device) for b in batches]
        means, counts = validation_losses(self.model, batches, self.K, backend=self.backend)
        # 0 for a task with no tokens here (its mean is 0/0); a non-finite loss of a broken model stays so
        sums = torch.where(counts > 0, means.double() * counts.double(), 0.0)
        sums = all_reduce(sums.to(self.device)).cpu().numpy()
        counts = all_reduce(counts.double().to(self.device)).cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts

    def compute_G(self, batches: list[MicroBatch], losses: np.ndarray, counts: np.ndarray) -> None:
        """G = ∇Φ on the validation batch, all-reduced (every rank holds the same G)."""
        from adapt_fast.model.ghost import validation_gradient

        assert self.adapt is not None
        objective_losses = torch.tensor(losses[self.objective], dtype=torch.float64)
        w, _ = self.adapt.objective_weights(objective_losses)
        weights = np.zeros(self.K)
        weights[self.objective] = w.numpy()
        # validation_gradient divides by this rank's N_k; scale so the sum over ranks uses global N_k.
        local = np.zeros(self.K)
        for b in batches:
            local += b.loss_tokens_per_task().numpy()
        weights_local = np.where(counts > 0, weights * local / np.maximum(counts, 1), 0.0)
        batches = [b.to(self.device) for b in batches]
        grads = validation_gradient(
            self.model, batches, torch.tensor(weights_local, dtype=torch.float64), backend=self.backend
        )
        # ZeRO-3: each rank's partitions, already summed over the ranks; otherwise sum the whole G here.
        self.G = grads if self._G_partitioned else {name: all_reduce(g) for name, g in grads.items()}
        if self.cfg.meta.precondition == "adam":
            self._precondition_G()

    def _precondition_G(self) -> None:
        """G ← P·G with P = diag(1/(√v̂ + eps)) from AdamW's second moments (DESIGN.md section 1):
        the model's real step is preconditioned, so d_k = <P·G, g_k>. The moments are read where DeepSpeed
        keeps them (fp32, any ZeRO stage, bf16 or not): under ZeRO-3 this rank's partition, which is laid out
        like its partition of G; under ZeRO 1-2 gathered whole one parameter at a time (a collective); under
        ZeRO-0 from AdamW's state, of the fp32 master copy in bf16.
        Before AdamW's first step G is left as it is."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        from adapt_fast.model.ghost import trainable_parameters

        t = next((float(state["step"]) for state in self.torch_optimizer.state.values() if "step" in state), None)
        if t is None or self.step == self.bad_steps:  # no update yet (DeepSpeed's bf16 wrapper steps once at init)
            return
        beta2, eps = self.cfg.training.betas[1], 1e-8
        # ZeRO-0 in bf16/fp16: DeepSpeed's wrapper steps AdamW on fp32 copies, group by group, in order.
        wrapper = self.engine.optimizer
        lows, masters = (itertools.chain.from_iterable(getattr(wrapper, a, [])) for a in ("fp16_groups", "fp32_groups"))
        master_of = {id(low): master for low, master in zip(lows, masters, strict=False)}
        for name, param in trainable_parameters(self.model).items():
            if self._G_partitioned:
                v = safe_get_local_optimizer_state(param, "exp_avg_sq")
            else:
                v = safe_get_full_optimizer_state(param, "exp_avg_sq")  # ZeRO 1-2; None for a ZeRO-0 parameter
                if v is None:
                    v = self.torch_optimizer.state[master_of.get(id(param), param)]["exp_avg_sq"]
            g = self.G[name]
            compute = torch.promote_types(g.dtype, torch.float32)
            v_hat = v.to(g.device, compute).reshape(g.shape) / (1 - beta2**t)  # (offload: v is on the CPU)
            self.G[name] = (g.to(compute) / (v_hat.sqrt() + eps)).to(g.dtype)

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, batches: list[MicroBatch], update_mixture: bool) -> StepResult:
        from adapt_fast.model.ghost import GhostDots
        from adapt_fast.model.loss import per_task_loss

        W, K = self.world_size, self.K
        N = max(1, sum(b.global_loss_tokens for b in batches))
        # DeepSpeed averages gradients over ranks; scale so the result is the global token mean.
        weights = torch.full((K,), W / N, dtype=torch.float32, device=self.device)
        loss_sum = torch.zeros(K, dtype=torch.float64, device=self.device)
        count = torch.zeros(K, dtype=torch.float64, device=self.device)
        dots = torch.zeros(K, dtype=torch.float64, device=self.device)
        exact = update_mixture and self.cfg.meta.dots == "exact"
        # Fault injection (tests): a NaN loss, or a NaN gradient behind a finite loss.
        poison = float("nan") if self.step + 1 in self.inject_nan_steps else None
        poison_grad = poison
        if self.step + 1 in self.inject_nan_grad_steps:
            poison_grad = float("nan")
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            self._forward_prologue()
            if exact:
                from adapt_fast.model.ghost import exact_task_dots

                d_exact = exact_task_dots(self.model, batch, self.G, K, backend=self.backend)
                counts_here = batch.loss_tokens_per_task().double().to(self.device)
                dots += d_exact.to(self.device) * counts_here * W / N  # back to this batch's share of the loss
            if update_mixture and not exact:
                fold = self.cfg.kernels.fold_ghost_dots
                with GhostDots(self.model, self.G, batch.task_ids, K, backend=self.backend, fold_linear=fold) as ghost:
                    out = per_task_loss(
                        self.model, batch, weights, ghost_weight=ghost.head_ghost_weight, backend=self.backend
                    )
                    self.engine.backward(
                        out.loss if poison_grad is None else out.loss * poison_grad, scale_wrt_gas=False
                    )
                dots += ghost.dots.to(self.device, torch.float64) + out.ghost_dot.to(self.device, torch.float64)
            else:
                out = per_task_loss(self.model, batch, weights, backend=self.backend)
                self.engine.backward(out.loss if poison_grad is None else out.loss * poison_grad, scale_wrt_gas=False)
            if i < len(batches) - 1:
                self.engine.step()  # within the accumulation: no optimizer step
            loss_sum += out.loss_sum.to(self.device, torch.float64) * (1.0 if poison is None else poison)
            count += out.count.to(self.device, torch.float64)
        # Before the optimizer step, every rank learns whether any rank saw a non-finite loss or gradient.
        flags = torch.tensor(
            [float(not bool(torch.isfinite(loss_sum).all())), float(not self._gradients_finite())],
            dtype=torch.float64,
            device=self.device,
        )
        # One reduction and one device-to-host copy, before the optimizer step is queued (the dots too: read after it,
        # they would wait for the optimizer's kernels).
        parts = [loss_sum, count, flags, *([dots] if update_mixture else [])]
        reduced = all_reduce(torch.cat(parts)).cpu()
        loss_sum, count = reduced[:K].numpy(), reduced[K : 2 * K].numpy()
        bad = "non-finite loss" if reduced[2 * K] > 0 else "non-finite gradient" if reduced[2 * K + 1] > 0 else None
        if self._optimizer_step(skip=bad is not None) and bad is None:
            bad = "non-finite gradient"  # DeepSpeed's own overflow check skipped it
        d = None
        if update_mixture and bad is None:
            D = reduced[2 * K + 2 :].numpy() / W  # <G, ∇ task k's share of the global token-mean loss>
            with np.errstate(invalid="ignore", divide="ignore"):
                d = np.where(count > 0, D * count.sum() / np.maximum(count, 1), np.nan)
        loss = float(loss_sum.sum() / count.sum()) if count.sum() > 0 else math.nan  # no loss token: no loss
        return StepResult(loss=loss, loss_sum=loss_sum, count=count, dots=d, bad=bad)

    def _forward_prologue(self) -> None:
        """ZeRO's per-micro-batch bookkeeping that engine.forward (and the backward hook it registers) would do, for
        per_task_loss, which runs the model outside it (the fused loss takes hidden states, not the logits
        engine(...) would return). ZeRO-3 counts micro-steps here: without it every micro-batch's gradient replaced
        the one before (training.grad_accum > 1 trained on the last micro-batch only). ZeRO 1-3 learn whether this
        micro-batch ends the accumulation (ZeRO-1 then reduces gradients once per step, not once per micro-batch).
        (Going through engine(...) with a wrapper module instead was tried: the backward hook engine.forward puts on
        its outputs divided their gradient by grad_accum under engine.backward(loss, scale_wrt_gas=False), which
        halved ZeRO-0's gradients at grad_accum 2 but not ZeRO-3's.)"""
        optimizer = self.engine.optimizer
        clear = getattr(optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        if self.engine.zero_optimization():
            optimizer.set_gradient_accumulation_boundary(self.engine.is_gradient_accumulation_boundary())

    def _gradients_finite(self) -> bool:
        """This rank's gradients (ZeRO 1-3: its partition of the reduced ones) hold no inf/nan."""
        grads: list[torch.Tensor] = []
        averaged = getattr(self.engine.optimizer, "averaged_gradients", None)
        if self.cfg.training.zero_stage > 0 and isinstance(averaged, dict):
            for group in averaged.values():
                grads += [g for g in (group or []) if g is not None]
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads, float("inf"))  # max |g|: never overflows, nan propagates
        return bool(torch.isfinite(torch.stack(norms)).all())

    def _optimizer_step(self, skip: bool) -> bool:
        """The accumulation boundary's engine.step(). skip: the AdamW step itself is a no-op, so
        weights and moments stay as they were while DeepSpeed drops the gradients and advances its
        counters; the LR schedule advances either way (a skipped step still spent its tokens).
        Returns True if DeepSpeed itself skipped the step (its overflow check)."""
        skipped_before = self.engine.skipped_steps
        if skip:
            self.torch_optimizer.step = lambda *args, **kwargs: None  # shadows the method on this instance
        try:
            self.engine.step()
        finally:
            if skip:
                del self.torch_optimizer.step
        native_skip = self.engine.skipped_steps > skipped_before
        if native_skip:
            self.scheduler.step()  # DeepSpeed does not advance the schedule on the steps it skips
        return native_skip

    # ------------------------------------------------------------------ the loop

    def _done(self) -> bool:
        max_steps = self.cfg.training.max_steps
        return self.loader.remaining <= 0 or bool(max_steps and self.step >= max_steps)

    def one_step(self) -> dict:
        """Validation/G when due, one optimizer step, the mixture update; logs and returns the row."""
        cfg, meta = self.cfg, self.cfg.meta
        A = cfg.training.grad_accum
        is_val = self.step % meta.val_every == 0
        update = (
            self.adapt is not None and self.step >= meta.warmup and (self.step - meta.warmup) % meta.update_every == 0
        )
        eval_every = cfg.training.eval_every
        row: dict = {}
        # G only for ADAPT: a static mixture validates every training.eval_every steps (if set) and at the end
        due_G = self.adapt is not None and (is_val or (update and self.G is None))
        if due_G or (eval_every and self.step % eval_every == 0):
            val_batches = self._validation_batches(meta.val_examples_per_task)
            losses, counts = self.validation_losses(val_batches)
            row["val_loss"] = {n: float(losses[k]) for k, n in enumerate(self.task_names) if counts[k] > 0}
            if self.adapt is not None:
                self.adapt.set_reference(losses[self.objective])  # relative_loss: l_k(theta_0), from step 0
            if self.adapt is not None and due_G and self.step + meta.val_every > meta.warmup:
                if self._G_subset:  # G's backward needs only the objective's examples
                    val_batches = self._validation_batches(meta.val_examples_per_task, tasks=self.objective)
                self.compute_G(val_batches, losses, counts)
                self.G_step = self.step
        self.loader.set_mixture(self.mixture)
        mixture_used = self.mixture.copy()
        batches = []
        for a in range(A):  # every rank plans the same global micro-steps, so all stop together
            batch = self.loader.next_micro_batch(meta_step=update and a == 0)
            batches.append(batch if batch is not None else self._empty_batch())
        t0 = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])
        result = self.train_step(batches, update)
        self.train_seconds += time.perf_counter() - t0
        if result.bad is not None:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            row["bad_step"] = result.bad
            if update:
                row["mixture_update_skipped"] = True
            if self.is_main:
                print(
                    f"warning: step {self.step + 1}: {result.bad}, update skipped "
                    f"({self.bad_in_a_row} in a row; training.max_bad_steps {cfg.training.max_bad_steps})",
                    file=sys.stderr,
                    flush=True,
                )
        else:
            self.bad_in_a_row = 0
            if update and result.dots is not None:
                # a task absent from the batch (no loss token on any rank: d_k is nan) is not measured
                info = self.adapt.update(result.dots, lr, present=result.count > 0)
                skipped = bool(info.get("skipped", False))
                self.mixture_updates_skipped += int(skipped)
                row["meta_dots"] = {n: float(result.dots[k]) for k, n in enumerate(self.task_names)}
                row["mixture_update_skipped"] = skipped
        self.step += 1
        row = {
            "step": self.step,
            "tokens_consumed": self.loader.consumed,
            "loss": result.loss if math.isfinite(result.loss) else None,
            "lr": lr,
            "mixture": {n: float(mixture_used[k]) for k, n in enumerate(self.task_names)},
            **row,
        }
        self._log(row)
        return row

    def run(self) -> dict:
        from tqdm import tqdm

        bar = tqdm(
            total=self.budget,
            initial=self.loader.consumed,
            unit="tok",
            unit_scale=True,
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        try:
            with StopSignals() as signals:
                while not self._done():
                    row = self.one_step()
                    bar.update(self.loader.consumed - bar.n)
                    bar.set_postfix(
                        loss=f"{row['loss'] if row['loss'] is not None else float('nan'):.3f}",
                        tok_s=f"{self.loader.stats.tokens / max(self.train_seconds, 1e-9):.0f}",
                    )
                    if self.inject_signal and self.inject_signal[0] == self.step and self.is_main:
                        os.kill(os.getpid(), self.inject_signal[1])  # fault injection (tests)
                    if self.bad_in_a_row >= self.cfg.training.max_bad_steps:
                        self._stop_diverged()
                    signum = self._agreed_signal(signals)
                    if signum is not None and not self._done():  # after the last step: finish (below), then say so
                        self._stop_on_signal(signum)
                    if self.next_checkpoint is not None and self.loader.consumed >= self.next_checkpoint:
                        every = self.cfg.checkpoint.every_tokens
                        self.next_checkpoint = (self.loader.consumed // every + 1) * every
                        if not self._done():  # the last one is written below
                            self.save_checkpoint()
                bar.close()
                # The budget is spent: a signal from here on (a scheduler's time limit) waits for the last
                # checkpoint and the final outputs, seconds away, rather than leaving them half-written.
                if self.last_checkpoint_step != self.step:
                    self.save_checkpoint()
                report = self.finish(self.train_seconds)
        except BaseException:
            bar.close()
            self.close_writers()
            raise
        if signals.received is not None:  # said by the rank that got it (no collective after finish's last barrier)
            name = signal.Signals(signals.received).name
            print(f"{name} came after the last step: the final outputs were written first; the run is complete",
                  file=sys.stderr)  # fmt: skip
        return report

    def _agreed_signal(self, signals: StopSignals) -> int | None:
        """The stop signal any rank received (SIGTERM before SIGINT), the same on every rank."""
        if self.world_size == 1:  # no collective, no device tensor: no host-device sync every step
            return signals.received if signals.received in (signal.SIGTERM, signal.SIGINT) else None
        mine = torch.tensor(
            [float(signals.received == signal.SIGTERM), float(signals.received == signal.SIGINT)],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world_size > 1:
            mine = all_reduce(mine)
        if mine[0] > 0:
            return signal.SIGTERM
        if mine[1] > 0:
            return signal.SIGINT
        return None

    def _where(self) -> str:
        return f"step {self.step} ({self.loader.consumed} / {self.budget} {self.cfg.budget.unit})"

    def _stop_on_signal(self, signum: int) -> None:
        path = self.save_checkpoint()
        name = signal.Signals(signum).name
        message = ""
        if self.is_main:
            message = (
                f"stopped on {name} at {self._where()}; checkpoint {path}\n"
                f"resume with: {resume_command(self.argv, self.world_size)}"
            )
        raise RunStopped(message, EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT)

    def _stop_diverged(self) -> None:
        path = self.save_checkpoint()
        first = self.step - self.bad_in_a_row + 1
        message = ""
        if self.is_main:
            message = (
                f"error: {self.bad_in_a_row} non-finite steps in a row (steps {first}-{self.step}; "
                f"training.max_bad_steps {self.cfg.training.max_bad_steps}): stopped at {self._where()}. "
                f"The model and mixture are those of step {first - 1}, the last good one; checkpoint {path}. "
                "Lower training.lr or check the data."
            )
        raise RunStopped(message, EXIT_DIVERGED)

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(json_safe(row)) + "\n")
        self.metrics_file.flush()
        step = row["step"]
        self.tb.add_scalar("train/loss", row["loss"] if row["loss"] is not None else float("nan"), step)
        if "bad_step" in row:
            self.tb.add_scalar("train/bad_steps", self.bad_steps, step)
        self.tb.add_scalar("train/lr", row["lr"], step)
        self.tb.add_scalar("train/tokens_consumed", row["tokens_consumed"], step)
        # Per-task values: a scalar per task (its own curve) up to TB_PER_TASK_SCALARS tasks, else one histogram per
        # kind (a scalar costs ~40 us of the step: 1,600 tasks' would add ~100 ms a step, and no one reads 1,600
        # curves; metrics.jsonl and mixture.csv keep every value). The mixture only when it changed.
        mixture = tuple(row["mixture"].values())
        if mixture != self._tb_mixture:
            self._tb_mixture = mixture
            self.tb.add_scalar("mixture/entropy", mixture_entropy(np.array(mixture)), step)
            self._tb_per_task("mixture", row["mixture"], step)
        if row.get("val_loss"):
            values = list(row["val_loss"].values())
            self.tb.add_scalar("val_loss/mean", float(np.mean(values)), step)
            self.tb.add_scalar("val_loss/worst", float(np.max(values)), step)
            self._tb_per_task("val_loss", row["val_loss"], step)
        if "meta_dots" in row:
            self._tb_per_task("meta_dots", row["meta_dots"], step)

    def _tb_per_task(self, kind: str, values: dict[str, float | None], step: int) -> None:
        if len(values) <= TB_PER_TASK_SCALARS:
            for name, v in values.items():
                self.tb.add_scalar(f"{kind}/{name}", v if v is not None else float("nan"), step)
            return
        finite = np.array([v for v in values.values() if v is not None and math.isfinite(v)], dtype=np.float64)
        if finite.size:
            self.tb.add_histogram(kind, finite, step)

    # ------------------------------------------------------------------ the end

    def finish(self, train_seconds: float) -> dict:
        """Final validation on the whole split, report.json, plots, and final/ (save_pretrained)."""
        from adapt_fast.model.loading import unwrap

        val_losses, val_counts = self.validation_losses(self._validation_batches(None))
        stats = self.loader.stats
        # Every rank updates the mixture itself from all-reduced numbers: check they agree bitwise.
        mine = torch.tensor(self.mixture, dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        identical = all(torch.equal(g, gathered[0]) for g in gathered)
        cut, dropped, _ = max_len_losses(self.data)
        report = {
            "method": self.cfg.mixture.method,
            "budget_tokens": self.budget,
            "budget_unit": self.cfg.budget.unit,
            "tokens_consumed": self.loader.consumed,
            "tokens_fed": stats.tokens,
            "loss_tokens_consumed": stats.loss_tokens,
            "tokens_per_task": dict(zip(self.task_names, stats.tokens_per_task, strict=True)),
            "loss_tokens_per_task": dict(zip(self.task_names, stats.loss_tokens_per_task, strict=True)),
            "validation_tokens": self.validation_tokens,
            "padding_fraction": stats.padding_fraction,
            "examples_reused": stats.reused,
            "examples_cut_to_max_len": cut,
            "examples_dropped_by_max_len": dropped,
            "steps": self.step,
            "mixture_final": {n: float(p) for n, p in zip(self.task_names, self.mixture, strict=True)},
            "mixture_entropy_final": mixture_entropy(self.mixture),
            "val_loss_per_task": {n: float(val_losses[k]) for k, n in enumerate(self.task_names) if val_counts[k] > 0},
            "val_loss_mean": float(np.nanmean(val_losses)) if np.isfinite(val_losses).any() else None,
            "val_loss_worst": float(np.nanmax(val_losses)) if np.isfinite(val_losses).any() else None,
            "world_size": self.world_size,
            "mixture_identical_across_ranks": identical,
            "wall_seconds": time.time() - self.start_time,
            "train_seconds": train_seconds,
            "train_tokens_per_second": stats.tokens / max(train_seconds, 1e-9),
            "kernels": {"backend": self.backend, "fused_layers": self.fused_layers},
            "bad_steps": self.bad_steps,
            "mixture_updates_skipped": self.mixture_updates_skipped,
            "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
            "checkpoint": str(self.ckpt_root / ckpt.step_name(self.step)),
        }
        # ZeRO-3 holds each weight in partitions: every rank takes part in gathering them (layer by layer, onto
        # rank 0's CPU, as HF Trainer does); otherwise the module's own state dict is whole.
        state_dict = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.training.zero_stage == 3 else None
        if self.is_main:
            self._log_final_validation(report)
            self.close_writers()
            (self.out / "report.json").write_text(json.dumps(json_safe(report), indent=1))
            from adapt_fast.report import write_outputs

            write_outputs(self.out)
            model = unwrap(self.model)
            model.save_pretrained(self.out / "final", state_dict=state_dict)
            self.tokenizer.save_pretrained(self.out / "final")
            print(
                f"done: {self.step} steps, {report['tokens_consumed']} / {self.budget} {self.cfg.budget.unit}, "
                f"{report['train_tokens_per_second']:.0f} tokens/s; outputs in {self.out}",
                file=sys.stderr,
            )
        if self.world_size > 1:
            dist.barrier()
        return report

    def _log_final_validation(self, report: dict) -> None:
        """The whole validation split's losses at the last step, to TensorBoard (`final_val_loss/<task>`, `/mean`,
        `/worst`), beside the in-run batches' `val_loss/<task>`, as HF Trainer logs its final evaluation; not again
        when a finished run is resumed without new steps (its report.json is of this step, its events kept)."""
        if self.step == self.first_step:
            try:
                if json.loads((self.out / "report.json").read_text())["steps"] == self.step:
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no earlier report of this run: log
        self._tb_per_task("final_val_loss", report["val_loss_per_task"], self.step)
        for key in ("mean", "worst"):
            if report[f"val_loss_{key}"] is not None:
                self.tb.add_scalar(f"final_val_loss/{key}", report[f"val_loss_{key}"], self.step)


def json_safe(value):
    """`value` with every non-finite float (a task not measured, a broken model's loss) as None: strict JSON
    (null), which every parser reads, not Python's NaN / Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _resume_value(value: str | None) -> str | None:
    """--resume's value: None when absent or false, "true" when written alone, else a path (an empty one, as from
    `--resume "$CKPT"` with CKPT unset, is an error: it must not start a fresh run over the earlier one)."""
    if value == NO_VALUE:
        return "true"
    if value is not None and not value.strip():
        raise ConfigError("--resume: empty value (give a checkpoint or run folder, or --resume alone)")
    return None if value is None or value.strip().lower() in FALSE_WORDS else value


def _switch(name: str, value: str | None) -> bool:
    """A flag that takes no value (`--name`, or `--name true|false`); anything else is a mistake, such as
    `--overwrite_output_dir runs/x` for `--output_dir runs/x --overwrite_output_dir`: one line, exit 2."""
    if value is None:
        return False
    if value == NO_VALUE or value.strip().lower() in TRUE_WORDS:
        return True
    if value.strip().lower() in FALSE_WORDS:
        return False
    raise ConfigError(f"--{name} takes no value, got {value!r} (a folder goes to --output_dir)")


def check_earlier_run(out: Path, resume: str | None, overwrite: bool) -> None:
    """A fresh run never replaces an earlier run's checkpoints and metrics unasked (as HF's example scripts
    refuse a used output_dir without --overwrite_output_dir): with neither flag, one line and exit 2."""
    earlier = [name for name in ("metrics.jsonl", ckpt.CHECKPOINTS, "final") if (out / name).exists()]
    if resume is None and not overwrite and earlier:
        raise ConfigError(
            f"output_dir {out} holds an earlier run ({', '.join(earlier)}): pass --resume to continue it, "
            "or --overwrite_output_dir to start over (its checkpoints are then deleted)"
        )


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Train. `--resume` continues from the latest checkpoint in output_dir (from the beginning if
    there is none), `--resume PATH` from a checkpoint folder or a run's output_dir. A fresh run in an
    output_dir that holds an earlier run needs `--overwrite_output_dir`."""
    args = sys.argv[1:] if argv is None else list(argv)
    flags = ("resume", "overwrite_output_dir")
    if "-h" in args or "--help" in args:
        parse_cli(args, extra_flags=flags)  # prints the help and exits 0
    given = cli_values(args)  # read, not validated: which folder, and whether to resume, decide the base config
    resume = _resume_value(given.get("resume"))
    overwrite = _switch("overwrite_output_dir", given.get("overwrite_output_dir"))
    if resume is not None and overwrite:
        raise ConfigError("--resume continues the run in output_dir, --overwrite_output_dir starts over: pass one")
    saved = Path(given.get("output_dir") or Config().output_dir) / "config.yaml"
    resumed_config = resume is not None and "config" not in given and saved.is_file()
    # a resumed run keeps its own settings (unless --config names others); the command line goes on top
    cfg, _ = parse_cli(args, extra_flags=flags, default_config=saved if resumed_config else None)
    if resumed_config and "output_dir" not in given:
        cfg.output_dir = str(saved.parent)  # the folder resumed is the one named, not the one its config recorded
    out = check_output_dir(cfg.output_dir)  # before any work: one line, exit 2
    check_earlier_run(out, resume, overwrite=overwrite)
    if resume is not None:
        ckpt.resume_candidates(resume, out)  # a bad --resume PATH: one line, exit 2
    try:
        trainer = Trainer(cfg, resume=resume, argv=args)
        return trainer.run()
    finally:
        if dist.is_initialized() and argv is None:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
