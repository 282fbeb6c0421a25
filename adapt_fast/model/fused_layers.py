"""Fused layer kernels in a loaded HF model: its RMSNorms and SwiGLU MLPs through adapt_fast.kernels.

    counts = use_fused_layers(model, backend="triton")      # after loading, before DeepSpeed; {"rms_norm": n, ...}

What Liger-Kernel's `apply_liger_kernel_to_*` does for the layers, with our kernels, for any architecture whose
modules pass the checks below (nothing is matched by model name):
  * an RMSNorm (class name ending in "RMSNorm", one weight (H,), an `eps` or `variance_epsilon`) whose own forward
    gives exactly what `rms_norm_reference` gives in one of its forms (Llama's, or Gemma's 1 + w) on probe inputs in
    fp32 and bf16 (where the roundings differ); a module matching none keeps its forward;
  * an MLP with gate_proj, up_proj and down_proj linear layers whose own forward computes, on a probe,
    down_proj(silu(gate_proj(x)) * up_proj(x)): it becomes down_proj(swiglu(gate_proj(x), up_proj(x))).
Each module keeps its parameters, submodules and hooks (DeepSpeed's, GhostDots') and changes class to a subclass
whose forward calls the kernel, so `isinstance` and state dicts are unchanged. Inside `reference_kernels()` (the
forward-mode jvp of GhostDots, which the kernels' autograd functions cannot take) the class's own forward runs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from adapt_fast.kernels import reference_forced, rms_norm, rms_norm_reference, swiglu
from adapt_fast.model.ghost import forward_with
from adapt_fast.model.zero3 import full_shape

# (offset, cast_before_weight): Llama / Qwen / Mistral (weight * x.to(dtype)), the same rounded once, Gemma (1 + w)
RMS_NORM_FORMS = ((0.0, True), (0.0, False), (1.0, False))


class _FusedRMSNorm:
    """Mixin before an HF RMSNorm class; `_fused` = (eps, offset, cast_before_weight, backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_forced():
            return super().forward(x)
        eps, offset, cast_before_weight, backend = self._fused
        return rms_norm(x, self.weight, eps, offset, cast_before_weight, backend=backend)


class _FusedSwiGLUMLP:
    """Mixin before an HF gated MLP class with a silu activation; `_fused` = (backend,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_forced():
            return super().forward(x)
        (backend,) = self._fused
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))


@functools.cache
def _fused_class(mixin: type, cls: type) -> type:
    return type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def _swap_class(module: nn.Module, mixin: type, settings: tuple) -> None:
    module.__class__ = _fused_class(mixin, type(module))
    module._fused = settings


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def rms_norm_form(module: nn.Module) -> tuple[float, float, bool] | None:
    """(eps, offset, cast_before_weight) if `module` is an RMSNorm that rms_norm reproduces exactly, else None.
    Probed with its own forward on random (3, H) inputs, fp32 and bf16, and a random weight put in place of its own
    (so the probe works on ZeRO-3 partitions too, and skips every hook)."""
    if not type(module).__name__.endswith("RMSNorm") or isinstance(module, (_FusedRMSNorm, nn.RMSNorm)):
        return None
    params = dict(module.named_parameters(recurse=False))
    eps = _norm_eps(module)
    if set(params) != {"weight"} or eps is None or any(True for _ in module.children()):
        return None
    shape = full_shape(params["weight"])
    if len(shape) != 1:
        return None
    gen = torch.Generator().manual_seed(0)
    forms = list(RMS_NORM_FORMS)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(3, shape[0], generator=gen) * 2).to(dtype)
            weight = (torch.randn(shape[0], generator=gen) * 0.5 + 1.0).to(dtype)
            with torch.no_grad():
                own = forward_with(module, {"weight": weight}, (x,), {})
                forms = [f for f in forms if torch.equal(own, rms_norm_reference(x, weight, eps, *f))]
    except Exception:  # a forward that needs more than x: not a plain RMSNorm
        return None
    return (eps, *forms[0]) if forms else None


def is_swiglu_mlp(module: nn.Module) -> bool:
    """An MLP whose own forward is down_proj(silu(gate_proj(x)) * up_proj(x)): checked on a probe input with small
    random linear layers put in place of its own (no hooks run, ZeRO-3 partitions untouched)."""
    names = ("gate_proj", "up_proj", "down_proj")
    if isinstance(module, _FusedSwiGLUMLP) or not type(module).__name__.endswith("MLP"):
        return False
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the probe layers' init must not move the caller's random stream
        torch.manual_seed(0)
        probe = {"gate_proj": nn.Linear(8, 16), "up_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)}
    x = torch.randn(3, 8, generator=gen)
    saved = {n: module._modules[n] for n in names}
    try:
        module._modules.update(probe)
        with torch.no_grad():
            own = type(module).forward(module, x)
            expected = probe["down_proj"](nn.functional.silu(probe["gate_proj"](x)) * probe["up_proj"](x))
        return torch.equal(own, expected)
    except Exception:  # a forward that needs more than x, or other shapes: not this MLP
        return False
    finally:
        module._modules.update(saved)


def use_fused_layers(model: nn.Module, backend: str = "triton") -> dict[str, int]:
    """Swap every RMSNorm and SwiGLU MLP of `model` (see the module docstring) to the fused kernels run by
    `backend`. Returns how many of each were swapped."""
    counts = {"rms_norm": 0, "swiglu_mlp": 0}
    for module in list(model.modules()):
        form = rms_norm_form(module)
        if form is not None:
            _swap_class(module, _FusedRMSNorm, (*form, backend))
            counts["rms_norm"] += 1
        elif is_swiglu_mlp(module):
            _swap_class(module, _FusedSwiGLUMLP, (backend,))
            counts["swiglu_mlp"] += 1
    return counts
