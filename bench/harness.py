"""What the GPU benchmarks share: their run options, the device check, timing, and where results go.

add_run_options(parser, repeats=20)          # --repeats (when given), --out, --device
device = run_device(args, "bench/x.py")      # exits with one line when CUDA is asked for and missing
median_ms(fn)                                # CUDA events on the GPU, the wall clock on CPU (smoke runs)
copy_gb_per_s(device)                        # the measured memory ceiling: a device-to-device copy's bandwidth
results_dir(args.out, device_name(device))   # <out>/<gpu name>/
error_text(e)                                # an exception as one short line, for a results table
with swapped_tiles(module, tiles): ...       # a kernel module launching other tiles (the benchmarks' sweeps)

    python bench/harness.py                  # prints that folder's name for this machine's GPU (cpu without one)
"""

import argparse
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def add_run_options(parser: argparse.ArgumentParser, repeats: int | None = None) -> None:
    """--repeats (timed runs per measurement, when `repeats` is given), --out (results folder) and --device (cuda,
    or cpu for a smoke run of the script at tiny sizes)."""
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")


def run_device(args: argparse.Namespace, script: str) -> torch.device:
    """args.device, after checking that CUDA is there when asked for (else exit with one line)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU, none found (--device cpu for a smoke run)")
    return device


def median_ms(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median milliseconds of fn(): CUDA events when the run uses the GPU, else the wall clock (smoke runs)."""
    cuda = torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if not cuda:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gb_per_s(device: torch.device, nbytes: int = 2**31, repeats: int = 20) -> float:
    """GB/s of a device-to-device copy of `nbytes` (bytes read plus bytes written), the ceiling memory-bound
    kernels are measured against (METHOD.md: measure it, don't take the datasheet's). On CPU, 1 MiB (smoke runs)."""
    n = nbytes // 2 if device.type == "cuda" else 2**19
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * 2 * n / (median_ms(lambda: dst.copy_(src), repeats=repeats) * 1e-3) / 1e9


def error_text(error: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line (compiler errors span many, and break the markdown tables), at most `limit`
    characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def default_tiles(module):
    """The bf16 tiles a kernel module launches with here: its _INTERPRETER_CONFIG under TRITON_INTERPRET=1, else its
    _CUDA_CONFIG."""
    from adapt_fast.kernels.backend import interpret_mode

    return getattr(module, _tiles_name(interpret_mode()))


@contextlib.contextmanager
def swapped_tiles(module, tiles):
    """Runs `module`'s bf16 kernels with `tiles` in place of default_tiles(module) (benchmark sweeps only: the
    launchers read the table at every call)."""
    from adapt_fast.kernels.backend import interpret_mode

    name = _tiles_name(interpret_mode())
    default = getattr(module, name)
    setattr(module, name, tiles)
    try:
        yield
    finally:
        setattr(module, name, default)


def _tiles_name(interpreted: bool) -> str:
    return "_INTERPRETER_CONFIG" if interpreted else "_CUDA_CONFIG"


def device_name(device: torch.device) -> str:
    """The GPU's name (results go to a folder named after it), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def folder_name(gpu: str) -> str:
    """`gpu` with the characters a folder name should not hold replaced by "_" ("NVIDIA H200" -> "NVIDIA_H200")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu)


def results_dir(out: Path, gpu: str) -> Path:
    """<out>/<folder_name(gpu)>, created."""
    folder = out / folder_name(gpu)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


if __name__ == "__main__":  # the results folder's name on this machine, for bench/stages.sh
    print(folder_name(device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))))
