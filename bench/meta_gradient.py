"""Whole-model meta-gradient: one-pass ghost dots against K separate per-task backward passes (CUDA, bf16).

On a Llama-3.2-1B-shaped model from random init and one packed micro-batch of T tokens holding K tasks, times
  * `train_step`: forward + backward of the token-mean loss (a plain training step, for the overhead),
  * `one_pass`:   the same step with every linear layer's ghost dot and the loss kernel's head ghost
                  (GhostDots, kernels.backend triton): what an ADAPT mixture-update step costs,
  * `one_pass_folded`: the same with each linear layer's dots folded into its weight gradient (fold_linear),
  * `exact`:      exact_task_dots, one backward per task (K of them) and K dot products with G,
and checks that the two sets of dots agree (bf16 model: agreement to bf16 rounding, reported, not asserted).
Writes <out>/<gpu name>/meta_gradient.json and meta_gradient.md.

    python bench/meta_gradient.py [--model llama-3.2-1b --tokens 16384 --tasks 20 --out bench/results]

`--device cpu --model tiny-llama` (tiny sizes, TRITON_INTERPRET=1) checks the script itself, for tests.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without install

from harness import add_run_options, device_name, median_ms, results_dir, run_device  # noqa: E402 (bench/ folder)


def packed_batch(tokens: int, tasks: int, vocab: int, example_len: int, seed: int = 0):
    """A MicroBatch of `tokens` slots: examples of about example_len tokens (half prompt), tasks in turn."""
    from adapt_fast.data.batch import IGNORE_INDEX, MicroBatch

    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(tokens - sum(lengths), int(torch.randint(example_len // 2, example_len * 3 // 2, (1,),
                                                                        generator=gen))))  # fmt: skip
    n = len(lengths)
    task_of = sorted(i % tasks for i in range(n))  # grouped by task, in task order
    input_ids = torch.randint(0, vocab, (tokens,), generator=gen)
    labels = input_ids.clone()
    position_ids = torch.empty(tokens, dtype=torch.int64)
    task_ids = torch.empty(tokens, dtype=torch.int64)
    cu = [0]
    for length, k in zip(lengths, task_of, strict=True):
        s = cu[-1]
        labels[s : s + max(1, length // 2)] = IGNORE_INDEX  # the prompt and the first token carry no loss
        position_ids[s : s + length] = torch.arange(length)
        task_ids[s : s + length] = k
        cu.append(s + length)
    offsets = torch.searchsorted(task_ids, torch.arange(tasks + 1))
    return MicroBatch(
        input_ids=input_ids, labels=labels, position_ids=position_ids,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), task_ids=task_ids, task_offsets=offsets,
        max_seqlen=max(lengths), num_examples=n,
    )  # fmt: skip


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--example-len", type=int, default=512)
    add_run_options(parser, repeats=5)
    parser.add_argument(
        "--no-fused-layers",
        dest="fused_layers",
        action="store_false",
        help="HF's own RMSNorm and MLP instead of the fused kernels (kernels.fused_layers false)",
    )
    args = parser.parse_args()
    device = run_device(args, "bench/meta_gradient.py")
    cuda = device.type == "cuda"

    from adapt_fast.model.fused_layers import use_fused_layers
    from adapt_fast.model.ghost import GhostDots, exact_task_dots, task_mean_dots, trainable_parameters
    from adapt_fast.model.loading import load_model_and_tokenizer
    from adapt_fast.model.loss import per_task_loss

    K = args.tasks
    model, _ = load_model_and_tokenizer(args.model, dtype=torch.bfloat16, device=device, seed=0)
    model.train()
    fused_layers = use_fused_layers(model, "triton") if args.fused_layers else {}  # as the trainer runs it
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = packed_batch(args.tokens, K, vocab, args.example_len).to(device)
    n = int(batch.loss_tokens_per_task().sum())
    weights = torch.full((K,), 1.0 / n, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    G = {name: torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 1e-3
         for name, p in trainable_parameters(model).items()}  # fmt: skip

    def train_step():
        out = per_task_loss(model, batch, weights, backend="triton")
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def one_pass(fold_linear: bool = False):
        with GhostDots(model, G, batch.task_ids, K, backend="triton", fold_linear=fold_linear) as ghost:
            out = per_task_loss(model, batch, weights, ghost_weight=ghost.head_ghost_weight, backend="triton")
            out.loss.backward()
        model.zero_grad(set_to_none=True)
        return task_mean_dots(ghost.dots + out.ghost_dot, out.count, n)[0]

    def exact():
        return exact_task_dots(model, batch, G, K, backend="triton")

    def ratio(a: str, b: str) -> float | None:
        return results[a]["seconds"] / results[b]["seconds"] if a in results and b in results else None

    def dots_err(a: str) -> float | None:
        if a not in results or "exact" not in results:
            return None
        got, want = torch.tensor(results[a]["dots"]), torch.tensor(results["exact"]["dots"])
        return float((got - want).abs().max() / want.abs().max())

    def write() -> None:
        """meta_gradient.json and .md from what has been measured so far (None for what has not)."""
        summary = {
            "gpu": device_name(device), "torch": torch.__version__, "model": args.model,
            "parameters": sum(p.numel() for p in model.parameters()), "tokens": args.tokens, "loss_tokens": n,
            "tasks": K, "fused_layers": fused_layers, "results": results,
            "speedup_one_pass_vs_exact": ratio("exact", "one_pass"),
            "one_pass_overhead_vs_train_step": ratio("one_pass", "train_step"),
            "dots_rel_err": dots_err("one_pass"),
            "folded_overhead_vs_train_step": ratio("one_pass_folded", "train_step"),
            "folded_dots_rel_err": dots_err("one_pass_folded"),
        }  # fmt: skip
        folder = results_dir(args.out, summary["gpu"])
        (folder / "meta_gradient.json").write_text(json.dumps(summary, indent=2))

        def fmt(key: str, spec: str) -> str:
            return "-" if summary[key] is None else format(summary[key], spec)

        md = [
            f"# Whole-model meta-gradient ({args.model}, T={args.tokens}, K={K}, bf16, {summary['gpu']})",
            "",
            "| what | ms | peak GiB |",
            "|---|---|---|",
            *(f"| {k} | {v['seconds'] * 1e3:.1f} | {gib(v['peak_memory_gib'])} |" for k, v in results.items()),
            "",
            f"One pass is {fmt('speedup_one_pass_vs_exact', '.1f')}x faster than K={K} backward passes (target >= "
            f"10x) and costs {fmt('one_pass_overhead_vs_train_step', '.2f')}x a plain training step; dots agree to "
            f"{fmt('dots_rel_err', '.1e')} (max relative, bf16). With each linear layer's dots folded into its "
            f"weight gradient (GhostDots fold_linear, not the trainer's path yet) a mixture-update step costs "
            f"{fmt('folded_overhead_vs_train_step', '.2f')}x a training step; dots agree to "
            f"{fmt('folded_dots_rel_err', '.1e')}.",
        ]
        (folder / "meta_gradient.md").write_text("\n".join(md) + "\n")
        print("\n".join(md), flush=True)

    results = {}
    for name, fn, repeats in (("train_step", train_step, args.repeats), ("one_pass", one_pass, args.repeats),
                              ("one_pass_folded", lambda: one_pass(fold_linear=True), args.repeats),
                              ("exact", exact, max(1, args.repeats // 2))):  # fmt: skip
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        last = {}
        ms = median_ms(lambda fn=fn, last=last: last.update(value=fn()), warmup=1, repeats=repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        results[name] = {"seconds": ms / 1e3, "peak_memory_gib": peak}
        if name != "train_step":
            results[name]["dots"] = last["value"].double().cpu().tolist()
        print(f"{name}: {ms:.1f} ms, peak {gib(peak)} GiB", flush=True)
        write()  # after each: a run stopped at its time limit keeps what it measured


if __name__ == "__main__":
    main()
