"""The kernels issue's targets against one GPU run's results, in one table (no GPU needed: it reads JSON).

    python bench/kernel_targets.py --out OUT        # OUT: the folder bench/gpu_checks.sh's stages wrote into

Reads, for each GPU folder OUT/<gpu>/ holding them: loss_kernel.json (and OUT/logit_std4/<gpu>/loss_kernel.json,
the peaked-logits run), ghost_dot.json and meta_gradient.json, and pytest's summary line of the `gpu` tests in
OUT/<gpu>/gpu_tests.txt and of the `triton` tests on CUDA in OUT/<gpu>/triton_tests_on_gpu.txt. Writes
OUT/<gpu>/kernel_targets.json and .md: each target (benchmarks, not tests) with what was measured and whether it
was met, missing results marked missing, and which of the two ways of taking the linear layers' ghost dots
(separate, or folded into the weight gradient) a mixture-update step ran faster with.
"""

import argparse
import json
import re
import sys
from pathlib import Path

GHOST_DOT_FRACTION = 0.6  # ghost dots at >= 60% of the measured bf16 matmul rate
META_SPEEDUP = 10.0  # one-pass meta-gradient >= 10x faster than K per-task backward passes


def read_json(path: Path) -> dict | None:
    """The file's JSON, or None when it is missing or cut off (a benchmark killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def target(name: str, value: float | None, bound: float, at_least: bool = False, note: str = "") -> dict:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return dict(target=name, value=value, bound=f"{'>=' if at_least else '<='} {bound:g}", met=met, note=note)


def loss_targets(result: dict | None, label: str) -> list[dict]:
    """loss_kernel.py's own target rows (ratios and bounds), renamed with `label`."""
    if result is None:
        return [target(f"loss layer ({label})", None, 1.0, note="loss_kernel.json missing")]
    return [target(f"{t['target']} ({label})", t["ratio"], t["at_most"]) for t in result["targets"]]


def ghost_targets(result: dict | None) -> list[dict]:
    if result is None:
        return [target("ghost dot / bf16 matmul rate", None, GHOST_DOT_FRACTION, True, "ghost_dot.json missing")]
    return [
        target(f"ghost dot / bf16 matmul rate, {r['out']}x{r['inp']}", r["fraction_of_matmul"], GHOST_DOT_FRACTION,
               at_least=True, note=f"rel err {r['rel_err_vs_reference']:.1e}")
        for r in result["rows"]
    ]  # fmt: skip


def meta_targets(result: dict | None) -> list[dict]:
    if result is None:
        return [target("one-pass meta-gradient speedup vs K backward passes", None, META_SPEEDUP, True,
                       "meta_gradient.json missing")]  # fmt: skip
    err = result["dots_rel_err"]
    note = f"K={result['tasks']}, {result['model']}, dots rel err {'-' if err is None else format(err, '.1e')}"
    return [target("one-pass meta-gradient speedup vs K backward passes", result["speedup_one_pass_vs_exact"],
                   META_SPEEDUP, at_least=True, note=note)]  # fmt: skip


def gpu_test_summary(path: Path) -> dict:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 skipped in 9.1s"), or missing."""
    if not path.exists():
        return {"status": f"{path.name} missing"}
    summary = r"=+ .*\d+ (passed|failed|skipped|errors?)\b.* in [\d.]+s"  # "==== 2 passed, 1 skipped in 9.1s ===="
    lines = [line for line in path.read_text().splitlines() if re.match(summary, line)]
    if not lines:
        return {"status": "no pytest summary line (cut short?)"}
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}
    if counts.get("failed") or any(k.startswith("error") for k in counts):
        return {"status": "failures", **counts}
    return {"status": "all passed" if counts.get("passed") else "none ran", **counts}


def folded_or_separate(result: dict | None) -> str:
    if result is None or "folded_overhead_vs_train_step" not in result:
        return "unknown (meta_gradient.json missing)"
    separate, folded = result["one_pass_overhead_vs_train_step"], result["folded_overhead_vs_train_step"]
    if separate is None or folded is None:
        return "unknown (meta_gradient.py stopped before timing both)"
    faster = "folded" if folded < separate else "separate"
    return (f"{faster}: a mixture-update step costs {separate:.2f}x a training step with separate ghost dots, "
            f"{folded:.2f}x with them folded into the weight gradient (kernels.fold_ghost_dots)")  # fmt: skip


def summarize(out: Path, gpu_folder: Path) -> dict:
    std4 = out / "logit_std4" / gpu_folder.name / "loss_kernel.json"
    rows = [
        *loss_targets(read_json(gpu_folder / "loss_kernel.json"), "logit std 1"),
        *(loss_targets(read_json(std4), "logit std 4") if std4.exists() else []),
        *ghost_targets(read_json(gpu_folder / "ghost_dot.json")),
        *meta_targets(read_json(gpu_folder / "meta_gradient.json")),
    ]
    return {
        "gpu": gpu_folder.name,
        "gpu_tests": gpu_test_summary(gpu_folder / "gpu_tests.txt"),
        "triton_tests": gpu_test_summary(gpu_folder / "triton_tests_on_gpu.txt"),
        "targets": rows,
        "ghost_dots_faster": folded_or_separate(read_json(gpu_folder / "meta_gradient.json")),
    }


def summary_line(label: str, tests: dict) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in tests.items() if k != "status")
    return f"{label}: {tests['status']}{f' ({counts})' if counts else ''}."


def markdown(summary: dict) -> str:
    lines = [
        f"# Kernel targets, {summary['gpu']}",
        "",
        summary_line("`gpu` tests", summary["gpu_tests"]),
        summary_line("The CPU suite's Triton kernel tests on this GPU (`-m triton`)", summary["triton_tests"]),
        "",
        "| target | measured | bound | met | note |",
        "|---|---:|---|---|---|",
    ]
    for t in summary["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "missing"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {t['bound']} | {met} | {t['note']} |")
    lines += ["", f"Linear layers' ghost dots, faster way: {summary['ghost_dots_faster']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder bench/gpu_checks.sh's stages wrote into")
    args = parser.parse_args()
    folders = sorted({p.parent for name in ("loss_kernel.json", "ghost_dot.json", "meta_gradient.json", "gpu_tests.txt")
                      for p in args.out.glob(f"*/{name}") if p.parent.name != "logit_std4"})  # fmt: skip
    if not folders:
        print(f"bench/kernel_targets.py: no benchmark results or gpu_tests.txt under {args.out}", file=sys.stderr)
        return 2
    for folder in folders:
        summary = summarize(args.out, folder)
        (folder / "kernel_targets.json").write_text(json.dumps(summary, indent=2) + "\n")
        (folder / "kernel_targets.md").write_text(markdown(summary))
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
