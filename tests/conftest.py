"""Shared test set-up: GPU tests are skipped where there is no CUDA device; Triton kernel tests are marked `triton`."""

from pathlib import Path

import pytest
import torch

SHARED_MEMORY = Path("/dev/shm")


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce (its shm comm op) leaves a 64 MiB file in /dev/shm per rank and port, and the
    multi-rank tests launch ranks on many ports: the session removes the files it created, so that repeated runs
    do not fill the shared-memory tmpfs (20 GiB of them ran the compiler out of memory here)."""
    pattern = "deepspeed_allreduce_buffer_*"
    before = set(SHARED_MEMORY.glob(pattern)) if SHARED_MEMORY.is_dir() else set()
    yield
    if SHARED_MEMORY.is_dir():
        for path in set(SHARED_MEMORY.glob(pattern)) - before:
            path.unlink(missing_ok=True)


def runs_triton_kernels(item: pytest.Item) -> bool:
    """The test takes the triton_device fixture (CUDA, or CPU under the interpreter) or a backend="triton" param."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "triton_device" in getattr(item, "fixturenames", ()) or params.get("backend") == "triton"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if runs_triton_kernels(item):
            item.add_marker(pytest.mark.triton)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
