"""Train a causal LM on many tasks under a token budget, learning the task mixture (ADAPT).

    deepspeed adapt_fast/train.py --config CONFIG.yaml [--section.field value ...]
    python -m adapt_fast.train [--config CONFIG.yaml] [--section.field value ...]   (world size 1)

With no --config it runs the embedded default: the synthetic NI-format suite and a tiny Llama from
random init (CPU when there is no GPU). One optimizer step:

1. (every meta.val_every steps) a fresh validation batch holding every task: per-task losses ℓ_k;
   for ADAPT also G = ∇Φ, Φ = τ·logΣexp(ℓ_k/τ) over the objective tasks (meta.val_tasks).
2. A micro-batches from the packed loader, which follows the current mixture p and stops at the
   budget. Forward + backward through the DeepSpeed engine; on steps that update the mixture the
   same backward also yields the per-task dot products D_k = <G, ∇ task k's share of the loss>
   (ghost hooks + the fused loss kernel), all-reduced, so d_k = D_k·N/N_k.
3. The optimizer step; ADAPT updates α from d (DESIGN.md section 1) identically on every rank.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# A file run by the deepspeed launcher has its own folder, not the repository, on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from adapt_fast.config import Config, check_output_dir, parse_cli, save_config
from adapt_fast.data.batch import MicroBatch
from adapt_fast.data.loader import PackedLoader, pack_examples, pack_items
from adapt_fast.data.prepare import check_task_names, load_data, load_tokenizer, make_loader, resolve_budget
from adapt_fast.errors import ConfigError, UserError, exit_on_user_error
from adapt_fast.mixture import AdaptMixture, AdaptSettings, mixture_entropy, static_mixture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ----------------------------------------------------------------------------- distributed set-up


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); a run without the
    launcher is world size 1. Returns (rank, world_size, device)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
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


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warm-up, then cosine decay to min_ratio at total_steps (a multiplier of the peak lr)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- the trainer


@dataclass
class StepResult:
    loss: float
    loss_sum: np.ndarray  # (K,) global
    count: np.ndarray  # (K,) global loss tokens
    dots: np.ndarray | None  # (K,) d_k on mixture updates


class Trainer:
    """Everything one run needs: data, model engine, mixture, loader, writers."""

    def __init__(self, cfg: Config):
        import deepspeed

        from adapt_fast.model.loading import load_model_and_tokenizer

        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.out = check_output_dir(cfg.output_dir) if self.is_main else Path(cfg.output_dir)
        self.start_time = time.time()

        # Data: rank 0 tokenises first (fills the cache), the others then read it.
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
        if cfg.meta.precondition == "adam" and (cfg.training.zero_stage > 0 or torch.cuda.is_available()):
            raise ConfigError("meta.precondition adam needs training.zero_stage 0 in fp32 (the optimizer's moments)")
        self.objective = check_task_names(cfg.meta.val_tasks, self.data, "meta.val_tasks") or list(range(self.K))
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
            )
            self.adapt: AdaptMixture | None = AdaptMixture(self.task_names, settings, proportional, self.objective)
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

        # Model and DeepSpeed engine.
        dtype = DTYPES.get(cfg.model.dtype) if cfg.model.dtype != "auto" else None
        model, _ = load_model_and_tokenizer(
            cfg.model.name,
            dtype=dtype,
            device=self.device,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.seed,
        )
        if len(self.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise ConfigError(f"model.name {cfg.model.name}: its vocabulary is smaller than the tokenizer's")
        self.model_dtype = next(model.parameters()).dtype
        t = cfg.training
        self.total_steps = self._estimate_steps()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": t.grad_accum,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": self.model_dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if t.grad_clip > 0:
            ds_config["gradient_clipping"] = t.grad_clip
        schedule = lr_lambda(t.warmup_steps, self.total_steps, t.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
        )
        self.model = self.engine.module
        self.backend = self._kernel_backend()
        self.step = 0
        self.G: dict[str, torch.Tensor] | None = None
        self.validation_tokens = 0
        self.last_val_loss: dict[str, float] = {}

        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
            self.metrics_file = open(self.out / "metrics.jsonl", "w")  # noqa: SIM115 (closed in finish)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------ helpers

    def _estimate_steps(self) -> int:
        """Optimizer steps the budget will take (for the cosine schedule)."""
        c = self.cfg
        per_step = c.tokens_per_micro_batch * self.world_size * c.training.grad_accum
        if c.budget.unit == "loss":
            train = self.data.train
            per_step *= float(np.sum(train.loss_tokens)) / max(1.0, float(np.sum(train.lengths)))
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

    def _head_name(self) -> str:
        from adapt_fast.model.loading import lm_head_and_softcap

        weight, _ = lm_head_and_softcap(self.model)
        return next(n for n, p in self.model.named_parameters() if p is weight)

    # ------------------------------------------------------------------ validation and G

    def _validation_batches(self, examples_per_task: int | None) -> list[MicroBatch]:
        """This rank's share of a validation batch: `examples_per_task` fresh examples of every task
        (seeded by the step), or the whole validation split when None."""
        val = self.data.validation
        if examples_per_task is None:
            chosen = np.arange(val.num_examples)
        else:
            rng = np.random.default_rng([self.cfg.seed, self.step, 31337])
            task_ids = np.asarray(val.task_ids)
            chosen = np.concatenate(
                [rng.permutation(np.flatnonzero(task_ids == k))[:examples_per_task] for k in range(self.K)]
            )
        batches = pack_examples(val, np.sort(chosen), self.cfg.tokens_per_micro_batch)
        self.validation_tokens += sum(b.num_tokens for b in batches)
        return batches[self.rank :: self.world_size]

    def validation_losses(self, batches: list[MicroBatch]) -> tuple[np.ndarray, np.ndarray]:
        """Global per-task mean loss (K,) (nan where a task has no tokens) and loss-token counts."""
        from adapt_fast.model.ghost import validation_losses

        batches = [b.to(self.device) for b in batches]
        means, counts = validation_losses(self.model, batches, self.K, backend=self.backend)
        sums = torch.nan_to_num(means.double() * counts.double(), nan=0.0)
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
        self.G = {name: all_reduce(g) for name, g in grads.items()}
        if self.cfg.meta.precondition == "adam":
            self._precondition_G()

    def _precondition_G(self) -> None:
        """G ← P·G with P = diag(1/(√v̂ + eps)) from AdamW's second moments (DESIGN.md section 1):
        the model's real step is preconditioned, so d_k = <P·G, g_k>. Before AdamW has a moment
        (step 0) G is left as it is."""
        from adapt_fast.model.ghost import trainable_parameters

        beta2, eps = self.cfg.training.betas[1], 1e-8
        for name, param in trainable_parameters(self.model).items():
            state = self.optimizer.state.get(param, {})
            if "exp_avg_sq" not in state or name not in self.G:
                continue
            t = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2**t)
            self.G[name] = self.G[name] / (v_hat.sqrt() + eps).to(self.G[name].dtype)

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, batches: list[MicroBatch], update_mixture: bool) -> StepResult:
        from adapt_fast.model.ghost import GhostDots
        from adapt_fast.model.loss import per_task_loss

        W = self.world_size
        N = max(1, sum(b.global_loss_tokens for b in batches))
        # DeepSpeed averages gradients over ranks; scale so the result is the global token mean.
        weights = torch.full((self.K,), W / N, dtype=torch.float32, device=self.device)
        loss_sum = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        count = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        dots = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        exact = update_mixture and self.cfg.meta.dots == "exact"
        ghost_head = self.G[self._head_name()] if update_mixture and not exact else None
        for batch in batches:
            batch = batch.to(self.device)
            if exact:
                from adapt_fast.model.ghost import exact_task_dots

                d_exact = exact_task_dots(self.model, batch, self.G, self.K, backend=self.backend)
                counts_here = batch.loss_tokens_per_task().double().to(self.device)
                dots += d_exact.to(self.device) * counts_here * W / N  # back to this batch's share of the loss
            if update_mixture and not exact:
                with GhostDots(self.model, self.G, batch.task_ids, self.K, backend=self.backend) as ghost:
                    out = per_task_loss(self.model, batch, weights, ghost_weight=ghost_head, backend=self.backend)
                    self.engine.backward(out.loss, scale_wrt_gas=False)
                dots += ghost.dots.to(self.device, torch.float64) + out.ghost_dot.to(self.device, torch.float64)
            else:
                out = per_task_loss(self.model, batch, weights, backend=self.backend)
                self.engine.backward(out.loss, scale_wrt_gas=False)
            self.engine.step()
            loss_sum += out.loss_sum.to(self.device, torch.float64)
            count += out.count.to(self.device, torch.float64)
        loss_sum = all_reduce(loss_sum).cpu().numpy()
        count = all_reduce(count).cpu().numpy()
        d = None
        if update_mixture:
            D = all_reduce(dots).cpu().numpy() / W  # <G, ∇ task k's share of the global token-mean loss>
            with np.errstate(invalid="ignore", divide="ignore"):
                d = np.where(count > 0, D * count.sum() / np.maximum(count, 1), np.nan)
        return StepResult(loss=float(loss_sum.sum() / max(count.sum(), 1)), loss_sum=loss_sum, count=count, dots=d)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        A = cfg.training.grad_accum
        bar = tqdm(total=self.budget, unit="tok", unit_scale=True, disable=not self.is_main, dynamic_ncols=True)
        train_seconds = 0.0
        while not cfg.training.max_steps or self.step < cfg.training.max_steps:
            meta = cfg.meta
            is_val = self.step % meta.val_every == 0
            update = (
                self.adapt is not None
                and self.step >= meta.warmup
                and (self.step - meta.warmup) % meta.update_every == 0
            )
            row: dict = {}
            if is_val or (update and self.G is None):
                val_batches = self._validation_batches(meta.val_examples_per_task)
                losses, counts = self.validation_losses(val_batches)
                row["val_loss"] = {n: float(losses[k]) for k, n in enumerate(self.task_names) if counts[k] > 0}
                if self.adapt is not None and self.step + meta.val_every > meta.warmup:
                    self.compute_G(val_batches, losses, counts)
            self.loader.set_mixture(self.mixture)
            mixture_used = self.mixture.copy()
            batches = []
            for a in range(A):  # every rank plans the same global micro-steps, so all stop together
                batch = self.loader.next_micro_batch(meta_step=update and a == 0)
                batches.append(batch if batch is not None else self._empty_batch())
            t0 = time.perf_counter()
            lr = float(self.scheduler.get_last_lr()[0])
            result = self.train_step(batches, update)
            train_seconds += time.perf_counter() - t0
            if update and result.dots is not None:
                d = np.nan_to_num(result.dots, nan=0.0)  # a task absent from the batch contributes nothing
                info = self.adapt.update(d, lr)
                row["meta_dots"] = {n: float(result.dots[k]) for k, n in enumerate(self.task_names)}
                row["mixture_update_skipped"] = bool(info.get("skipped", False))
            self.step += 1
            row = {
                "step": self.step,
                "tokens_consumed": self.loader.consumed,
                "loss": result.loss,
                "lr": lr,
                "mixture": {n: float(mixture_used[k]) for k, n in enumerate(self.task_names)},
                **row,
            }
            self._log(row)
            bar.update(self.loader.consumed - bar.n)
            bar.set_postfix(
                loss=f"{result.loss:.3f}", tok_s=f"{self.loader.stats.tokens / max(train_seconds, 1e-9):.0f}"
            )
            if self.loader.remaining <= 0:
                break
        bar.close()
        return self.finish(train_seconds)

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        step = row["step"]
        self.tb.add_scalar("train/loss", row["loss"], step)
        self.tb.add_scalar("train/lr", row["lr"], step)
        self.tb.add_scalar("train/tokens_consumed", row["tokens_consumed"], step)
        for name, p in row["mixture"].items():
            self.tb.add_scalar(f"mixture/{name}", p, step)
        for name, v in row.get("val_loss", {}).items():
            self.tb.add_scalar(f"val_loss/{name}", v, step)
        for name, v in row.get("meta_dots", {}).items():
            self.tb.add_scalar(f"meta_dots/{name}", v, step)

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
        }
        if self.is_main:
            self.metrics_file.close()
            self.tb.close()
            (self.out / "report.json").write_text(json.dumps(report, indent=1))
            from adapt_fast.report import write_outputs

            write_outputs(self.out)
            model = unwrap(self.model)
            model.save_pretrained(self.out / "final")
            self.tokenizer.save_pretrained(self.out / "final")
            print(
                f"done: {self.step} steps, {report['tokens_consumed']} / {self.budget} {self.cfg.budget.unit}, "
                f"{report['train_tokens_per_second']:.0f} tokens/s; outputs in {self.out}",
                file=sys.stderr,
            )
        if self.world_size > 1:
            dist.barrier()
        return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(sys.argv[1:] if argv is None else argv, extra_flags=("resume",))
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    except UserError:
        raise
    finally:
        if dist.is_initialized() and argv is None:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
