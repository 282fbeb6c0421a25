"""End to end: training throughput of adapt_fast against TRL's SFTTrainer with Liger-Kernel on DeepSpeed.

The stack our users run today is HF transformers + TRL + Liger-Kernel on DeepSpeed; this script trains the same
model on the same tokenised examples with each stack, every stack in its own process (fresh GPU memory
statistics), at the same DeepSpeed ZeRO stage, learning rate and dtype:

  trl         TRL SFTTrainer, examples padded to the longest of each micro-batch (sdpa attention), Liger-Kernel's
              layer kernels when it is installed (`use_liger_kernel`) and TRL's fused LM head, completion-only
              loss; tokens per step / mean example length examples per step, in micro-batches of at most
              tokens per step / max-len rows (gradient accumulation)
  trl_grouped the same with HF's length-grouped sampler (batches of similar lengths: less padding)
  trl_packed  the same with TRL's packing (best-fit, padding-free rows of `--tokens-per-step` tokens): flash
              attention when flash-attn is installed, else sdpa, where transformers finds the examples from the
              position_ids restarts (TRL turns the KV cache off) and masks a dense (T, T) block-diagonal
  uniform     adapt_fast with a static uniform mixture: packed micro-batches of `--tokens-per-step` slots,
              varlen attention, the fused per-task loss kernel
  adapt       adapt_fast with ADAPT: the mixture updated every step from one-pass ghost dots, G = grad of the
              smooth worst-case validation loss recomputed every `--val-every` steps (its time counts)
  adapt_folded `adapt` with kernels.fold_ghost_dots (the linear layers' dots inside their weight-gradient GEMM)
  uniform_unfused  `uniform` with kernels.fused_layers false (HF's own RMSNorm and MLP): what the layer kernels
              give; these two run only when named in --stacks

Measured over the steps after `--warmup-steps`: non-padding tokens per second (the budget's unit), loss tokens per
second, seconds per step, and the peak GPU memory of the whole run. The data are a JSONL suite written here
(`--tasks` tasks, example lengths log-normal around `--length-median` bytes; the byte tokenizer of the presets makes
a byte one token), tokenised once through adapt_fast's cache and handed to TRL as `input_ids` + `completion_mask`.
Writes <out>/<gpu name>/end_to_end.json and end_to_end.md.

    python bench/end_to_end.py [--model llama-3.2-1b --tokens-per-step 16384 --steps 30 --zero-stage 2]
                               [--stacks trl,trl_grouped,trl_packed,uniform,adapt --out bench/results]

`--device cpu --model tiny-llama` (tiny sizes, fp32) checks the script itself, for tests.
Needs `pip install .[bench]` (TRL, Liger-Kernel); a stack that cannot run is reported with its reason.
"""

import argparse
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without install

STACKS = ("uniform", "adapt", "trl", "trl_grouped", "trl_packed", "adapt_folded", "uniform_unfused")
DEFAULT_STACKS = STACKS[:5]  # run in this order: ours first, so that a run cut short still compares something


# ----------------------------------------------------------------------------- data


def write_suite(folder: Path, tasks: int, examples: int, median: int, sigma: float, max_len: int, seed: int) -> Path:
    """A JSONL of `examples` prompt/response pairs over `tasks` tasks: random lower-case words, total length
    log-normal around `median` bytes (clipped to [24, max_len - 16]), the response 10-50% of it."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ", dtype=np.uint8)  # ~1 space in 7: words
    lengths = np.clip(rng.lognormal(math.log(median), sigma, examples), 24, max_len - 16).astype(int)
    path = folder / "suite.jsonl"
    with path.open("w") as f:
        for i, n in enumerate(lengths):
            n_response = max(4, int(n * rng.uniform(0.1, 0.5)))
            text = alphabet[rng.integers(0, alphabet.size, n)].tobytes().decode()
            prompt, response = text[: n - n_response], text[n - n_response :]
            f.write(json.dumps({"task": f"task_{i % tasks:02d}", "prompt": prompt, "response": response}) + "\n")
    return path


def adapt_fast_overrides(args, stack: str, data: Path, work: Path, dtype: str) -> list[str]:
    """adapt_fast's config for a stack (also what tokenises the data for TRL: same cache key, same examples)."""
    adapt = stack.startswith("adapt")
    method = "adapt" if adapt else "uniform"
    val_every = args.val_every if adapt else 1 << 30  # uniform: validation at step 0 only
    pairs = {
        "model.name": args.model, "model.dtype": dtype, "data.path": data, "data.max_len": args.max_len,
        "data.val_examples": args.val_examples, "data.cache_dir": work / "cache", "data.template": "ni",
        "tokens_per_micro_batch": args.tokens_per_step, "budget.tokens": (args.steps + 2) * args.tokens_per_step,
        "mixture.method": method, "meta.val_every": val_every, "meta.update_every": 1, "meta.warmup": 1,
        "meta.val_examples_per_task": args.val_examples, "training.max_steps": args.steps,
        "training.zero_stage": args.zero_stage, "training.lr": args.lr, "training.warmup_steps": 0,
        "training.lr_schedule": "constant", "training.weight_decay": 0.0,
        "training.gradient_checkpointing": args.gradient_checkpointing, "kernels.backend": "auto",
        "output_dir": work / f"run-{stack}", "seed": 0, "kernels.fused_layers": stack != "uniform_unfused",
        "kernels.fold_ghost_dots": stack == "adapt_folded",
    }  # fmt: skip
    return [item for key, value in pairs.items() for item in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Wall-clock time and tokens of each step; throughput over the steps after the warm-up."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.start = self._now()

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def step_done(self, tokens: int, loss_tokens: int) -> None:
        self.ends.append(self._now())
        self.tokens.append(tokens)
        self.loss_tokens.append(loss_tokens)

    def summary(self, warmup: int) -> dict:
        if len(self.ends) <= warmup:
            raise RuntimeError(f"only {len(self.ends)} steps ran; need more than --warmup-steps {warmup}")
        seconds = self.ends[-1] - self.ends[warmup - 1] if warmup > 0 else self.ends[-1] - self.start
        tokens, loss_tokens = sum(self.tokens[warmup:]), sum(self.loss_tokens[warmup:])
        steps = len(self.ends) - warmup
        return {
            "steps_measured": steps,
            "seconds": seconds,
            "seconds_per_step": seconds / steps,
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            "tokens_per_step": tokens / steps,
            "tokens_per_second": tokens / seconds,
            "loss_tokens_per_second": loss_tokens / seconds,
        }


def peak_memory_gib(cuda: bool) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


# ----------------------------------------------------------------------------- the stacks


def run_adapt_fast(args, stack: str, data: Path, work: Path) -> dict:
    import torch

    from adapt_fast.config import load_config
    from adapt_fast.train import Trainer

    cuda = torch.cuda.is_available()
    cfg = load_config(None, adapt_fast_overrides(args, stack, data, work, "bfloat16" if cuda else "float32"))
    trainer = Trainer(cfg)
    clock = StepClock(cuda)
    losses = []
    try:
        while not trainer._done():
            before, before_loss = trainer.loader.stats.tokens, trainer.loader.stats.loss_tokens
            row = trainer.one_step()
            clock.step_done(trainer.loader.stats.tokens - before, trainer.loader.stats.loss_tokens - before_loss)
            losses.append(row["loss"])
    finally:
        trainer.close_writers()
    return {
        **clock.summary(args.warmup_steps),
        "peak_memory_gib": peak_memory_gib(cuda),
        "padding_fraction": trainer.loader.stats.padding_fraction,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "kernels": trainer.backend,
        "fused_layers": trainer.fused_layers,
        "train_examples": trainer.data.train.num_examples,  # the pool the stack drew from
        "train_example_tokens": int(np.sum(trainer.data.train.lengths)),
        "mixture_final_min": float(trainer.mixture.min()),
        "mixture_final_max": float(trainer.mixture.max()),
    }


def run_trl(args, variant: str, data: Path, work: Path) -> dict:
    """TRL's SFTTrainer; variant "trl" (padded, random batches), "trl_grouped" (padded, length-grouped) or
    "trl_packed" (padding-free packed rows, flash attention)."""
    import dataclasses

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from adapt_fast.config import load_config
    from adapt_fast.data.prepare import load_data, load_tokenizer
    from adapt_fast.model.loading import preset_config

    cuda = torch.cuda.is_available()
    cfg = load_config(None, adapt_fast_overrides(args, "uniform", data, work, "float32"))
    tokenizer = load_tokenizer(cfg)
    split = load_data(cfg, tokenizer, progress=False).train  # the examples adapt_fast trains on, same tokens
    rows = {"input_ids": [], "completion_mask": []}
    for i in range(split.num_examples):
        ids, loss_mask = split.example(i)
        rows["input_ids"].append(ids.tolist())
        rows["completion_mask"].append(loss_mask.astype(np.int64).tolist())
    dataset = Dataset.from_dict(rows)
    mean_len = float(np.mean(split.lengths))

    dtype = torch.bfloat16 if cuda else torch.float32
    packed = variant == "trl_packed"
    attn = "flash_attention_2" if packed and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    torch.manual_seed(0)
    if Path(args.model).is_dir():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_config(preset_config(args.model), dtype=dtype, attn_implementation=attn)

    liger = importlib.util.find_spec("liger_kernel") is not None and cuda
    deepspeed = {  # the same ZeRO stage as adapt_fast; HF fills the "auto" values from the arguments below
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    # Padded: about tokens-per-step / mean length examples per optimizer step, in micro-batches of at most
    # tokens-per-step / max-len rows (so that a micro-batch of the longest examples holds no more slots than one of
    # adapt_fast's), accumulated. Packed: one row of tokens-per-step slots per step.
    examples_per_step = max(1, round(args.tokens_per_step / mean_len))
    batch_size = 1 if packed else min(examples_per_step, max(1, args.tokens_per_step // args.max_len))
    accumulation = 1 if packed else max(1, round(examples_per_step / batch_size))
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    by_version = {  # names that moved between transformers versions (5.17 on the GPU machine, 5.23 here)
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing":
            args.gradient_checkpointing,
    }  # fmt: skip
    if variant == "trl_grouped":
        if "train_sampling_strategy" in fields:
            by_version["train_sampling_strategy"] = "group_by_length"
        else:
            by_version["group_by_length"] = True
    config = SFTConfig(
        output_dir=str(work / f"run-{variant}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        deepspeed=deepspeed,
        use_liger_kernel=liger,
        packing=packed,
        max_length=args.tokens_per_step if packed else args.max_len,
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        seed=0,
        **by_version,
    )
    clock = StepClock(cuda)
    losses: list[float] = []

    slots = [0, 0]  # slots in the (B, L) tensors fed, non-padding tokens among them
    step = [0, 0, 0.0]  # tokens, loss tokens and loss of the optimizer step so far (its micro-batches' shares)

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")  # padding-free rows have none: every slot is a token
            tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            slots[0] += inputs["input_ids"].numel()
            slots[1] += tokens
            step[0] += tokens
            step[1] += int((inputs["labels"] != -100).sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            step[2] += float(loss)  # this micro-batch's share of the step's mean loss
            return loss

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):  # after the optimizer step
            clock.step_done(step[0], step[1])
            losses.append(step[2])
            step[:] = [0, 0, 0.0]

    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[Clock()])  # fmt: skip
    # the tokens left after TRL's own preparation (labels, truncation, dropping empty examples; packing into rows)
    example_tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]))
    trainer.train()
    return {
        **clock.summary(args.warmup_steps),
        "peak_memory_gib": peak_memory_gib(cuda),
        "padding_fraction": 1.0 - slots[1] / max(slots[0], 1),
        "batch_size": batch_size,
        "gradient_accumulation": accumulation,
        "liger_kernel": liger,
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "train_examples": len(dataset),
        "train_example_tokens": example_tokens,
        "attention": attn,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_stack(args, stack: str, data: Path, work: Path) -> dict:
    if not stack.startswith("trl"):
        return run_adapt_fast(args, stack, data, work)
    return run_trl(args, stack, data, work)


def skip_reason(stack: str) -> str | None:
    if stack.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install .[bench])"
    return None


# ----------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args) -> None:
    """One stack in this process: its result (or its error) as JSON in --result."""
    try:
        result = {"ok": True, **run_stack(args, args.only, args.data, args.work)}
    except Exception as err:  # reported in the table, the other stacks still run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    Path(args.result).write_text(json.dumps(result))


def markdown(results: dict, settings: dict, gpu: str) -> str:
    trl = {name: r["tokens_per_second"] for name, r in results.items() if name.startswith("trl") and r.get("ok")}
    best = max(trl, key=trl.get) if trl else None  # the strongest baseline that ran
    lines = [
        f"# End to end: tokens/s on {gpu}",
        "",
        f"{settings['model']}, {settings['tokens_per_step']} tokens per step, {settings['steps']} steps "
        f"(the first {settings['warmup_steps']} not timed), ZeRO-{settings['zero_stage']}, "
        f"{settings['tasks']} tasks, examples log-normal around {settings['length_median']} bytes. "
        f"Against the fastest TRL run: {best or 'none ran'}.",
        "",
        "| stack | tokens/s | vs best TRL | loss tokens/s | s/step | tokens/step | peak GiB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for stack, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {stack} | - | - | - | - | - | - | {r.get('skipped') or r.get('error', '')} |")
            continue
        ratio = f"{r['tokens_per_second'] / trl[best]:.2f}x" if best else "-"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        notes = []
        if "batch_size" in r:
            accumulation = r["gradient_accumulation"]
            batch = f"batch {r['batch_size']}" + (f" x {accumulation}" if accumulation > 1 else "")
            notes.append(f"{batch}, {r['attention']}, liger {'on' if r['liger_kernel'] else 'off'}")
            if not r["deepspeed"]:
                notes.append("not on DeepSpeed")
        if "kernels" in r:
            fused = ", ".join(f"{n} {c}" for n, c in r["fused_layers"].items()) or "none"
            notes.append(f"kernels {r['kernels']} (fused layers: {fused})")
        notes.append(f"padding {100 * r['padding_fraction']:.1f}%")
        notes.append(f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
        lines.append(
            f"| {stack} | {r['tokens_per_second']:,.0f} | {ratio} | {r['loss_tokens_per_second']:,.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['tokens_per_step']:,.0f} | {mem} | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, gpu: str, settings: dict, results: dict) -> None:
    import torch
    from harness import results_dir

    folder = results_dir(out, gpu)
    report = {"device": gpu, "torch": torch.__version__, "settings": settings, "results": results}
    (folder / "end_to_end.json").write_text(json.dumps(report, indent=1))
    (folder / "end_to_end.md").write_text(markdown(results, settings, gpu))


def main() -> None:
    from harness import add_run_options, device_name, run_device  # bench/ is the script's folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--stacks", default=",".join(DEFAULT_STACKS), help=f"from {', '.join(STACKS)}")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--length-median", type=int, default=300)
    parser.add_argument("--length-sigma", type=float, default=0.8)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--val-examples", type=int, default=4, help="validation examples per task (ADAPT's G)")
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--stack-timeout", type=int, default=300, help="seconds per stack")
    add_run_options(parser)
    parser.add_argument("--only", choices=STACKS, help=argparse.SUPPRESS)  # child process: one stack
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)

    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        raise SystemExit(f"bench/end_to_end.py: unknown stacks {', '.join(unknown)} (choose from {', '.join(STACKS)})")
    gpu = device_name(run_device(args, "bench/end_to_end.py"))
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "data", "work", "result", "out")}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="end_to_end-") as tmp:
        work = Path(tmp)
        data = write_suite(work, args.tasks, args.examples, args.length_median, args.length_sigma, args.max_len, 0)
        passed = [a for a in sys.argv[1:]]
        for stack in stacks:
            reason = skip_reason(stack)
            if reason:
                results[stack] = {"ok": False, "skipped": reason}
                print(f"{stack}: skipped ({reason})", flush=True)
                write_results(args.out, gpu, settings, results)
                continue
            result_file = work / f"{stack}.json"
            env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))  # fmt: skip
            if args.device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            command = [sys.executable, __file__, *passed, "--only", stack, "--data", str(data), "--work", str(work),
                       "--result", str(result_file)]  # fmt: skip
            started = time.perf_counter()
            try:
                subprocess.run(command, env=env, timeout=args.stack_timeout, check=False)
                ended = {"ok": False, "error": "the stack's process ended without a result (its output is above)"}
                results[stack] = json.loads(result_file.read_text()) if result_file.exists() else ended
            except subprocess.TimeoutExpired:
                results[stack] = {"ok": False, "error": f"over --stack-timeout {args.stack_timeout} s"}
            results[stack]["process_seconds"] = time.perf_counter() - started
            r = results[stack]
            status = f"{r['tokens_per_second']:,.0f} tokens/s" if r.get("ok") else r.get("error")
            print(f"{stack}: {status}", flush=True)

            write_results(args.out, gpu, settings, results)  # after every stack: a run cut short keeps them
    print(markdown(results, settings, gpu))


if __name__ == "__main__":
    main()
