"""Shared test set-up: GPU tests are skipped where there is no CUDA device; Triton kernel tests are marked `triton`."""

import pytest
import torch


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
