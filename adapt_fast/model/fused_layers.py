"""Fused layer kernels in a loaded HF model: its RMSNorms, gated MLPs and RoPE through adapt_fast.kernels.

    counts = use_fused_layers(model, backend="triton")      # after loading, before DeepSpeed; {"rms_norm": n, ...}

What Liger-Kernel's `apply_liger_kernel_to_*` does for the layers, with our kernels, for any architecture whose
modules pass the checks below (nothing is matched by model name):
  * an RMSNorm (class name ending in "RMSNorm", one weight (H,), an `eps` or `variance_epsilon`) whose own forward
    gives exactly what `rms_norm_reference` gives in one of its forms (Llama's, or Gemma's 1 + w) on probe inputs in
    fp32 and bf16 (where the roundings differ); a module matching none keeps its forward;
  * an MLP with gate_proj, up_proj and down_proj linear layers whose own forward computes, on a probe,
    down_proj(act(gate_proj(x)) * up_proj(x)) with act silu (Llama, Qwen) or GELU's tanh form (Gemma): it becomes
    down_proj(swiglu(gate_proj(x), up_proj(x))), or geglu;
  * an attention module whose forward calls its modeling file's `apply_rotary_pos_emb`, when that function gives
    exactly what `rope_reference` gives on probe inputs in fp32 and bf16: the function is replaced in the modeling
    file's namespace (as Liger-Kernel does) by a dispatcher that runs `rope` only inside the forward of a swapped
    attention module (a context variable says so); every other caller, other models' attention included, and
    every call it cannot take (another unsqueeze_dim, shapes or dtypes the kernel does not take) get the original.
Each module keeps its parameters, submodules and hooks (DeepSpeed's, GhostDots') and changes class to a subclass
whose forward calls the kernel, so `isinstance` and state dicts are unchanged. Inside `reference_kernels()` (the
forward-mode jvp of GhostDots, which the kernels' autograd functions cannot take) the class's own forward runs.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from adapt_fast.kernels import geglu, reference_forced, rms_norm, rms_norm_reference, rope, rope_reference, swiglu
from adapt_fast.kernels.gated_mlp import geglu_reference, swiglu_reference
from adapt_fast.kernels.rotary import rope_shape_error
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


# activation -> (kernel, reference, the use_fused_layers count)
GATED_MLPS = {"silu": (swiglu, swiglu_reference, "swiglu_mlp"), "gelu_tanh": (geglu, geglu_reference, "geglu_mlp")}


class _FusedGatedMLP:
    """Mixin before an HF gated MLP class; `_fused` = (activation, backend), activation a key of GATED_MLPS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_forced():
            return super().forward(x)
        activation, backend = self._fused
        return self.down_proj(GATED_MLPS[activation][0](self.gate_proj(x), self.up_proj(x), backend=backend))


ROPE_FUNCTION = "apply_rotary_pos_emb"
_rope_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("adapt_fast_rope_backend", default=None)


class _FusedRoPEAttention:
    """Mixin before an HF attention class; `_fused` = (backend,): its modeling file's apply_rotary_pos_emb (the
    dispatcher of `_rope_dispatcher`) runs the kernel while this forward runs."""

    def forward(self, *args, **kwargs):
        token = _rope_backend.set(self._fused[0])
        try:
            return super().forward(*args, **kwargs)
        finally:
            _rope_backend.reset(token)


def _rope_dispatcher(original: Callable) -> Callable:
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) that runs `rope` inside a swapped attention forward
    (outside reference_kernels()) on inputs it takes, else `original`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        backend = _rope_backend.get()
        if (
            backend is None
            or reference_forced()
            or args
            or kwargs not in ({}, {"unsqueeze_dim": 1})
            or q.dtype == torch.float64
            or cos.requires_grad
            or sin.requires_grad
            or rope_shape_error(q, k, cos, sin)
        ):
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, k, cos, sin, backend=backend)

    apply_rotary_pos_emb.adapt_fast_original = original
    return apply_rotary_pos_emb


def rope_function_namespace(module: nn.Module) -> dict | None:
    """The globals of `module`'s modeling file if its forward calls that file's apply_rotary_pos_emb and the
    function (its original, if already replaced) computes rope_reference exactly on probes in fp32 and bf16; None
    otherwise."""
    forward = inspect.unwrap(type(module).forward)  # under decorators made with functools.wraps: HF's own
    code, namespace = getattr(forward, "__code__", None), getattr(forward, "__globals__", None)
    if code is None or ROPE_FUNCTION not in code.co_names or not callable(namespace.get(ROPE_FUNCTION)):
        return None
    function = namespace[ROPE_FUNCTION]
    function = getattr(function, "adapt_fast_original", function)
    gen = torch.Generator().manual_seed(0)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            q, k = torch.randn(2, 3, 5, 8, generator=gen).to(dtype), torch.randn(2, 1, 5, 8, generator=gen).to(dtype)
            cos, sin = torch.randn(2, 5, 8, generator=gen).to(dtype), torch.randn(2, 5, 8, generator=gen).to(dtype)
            own, expected = function(q, k, cos, sin), rope_reference(q, k, cos, sin)
            if len(own) != 2 or not all(torch.equal(a, b) for a, b in zip(own, expected, strict=True)):
                return None
    except Exception:  # another signature or another rotation (partial, interleaved): not this RoPE
        return None
    return namespace


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


def gated_mlp_activation(module: nn.Module) -> str | None:
    """The GATED_MLPS key act if `module` is an MLP whose own forward is down_proj(act(gate_proj(x)) * up_proj(x)),
    else None: checked on a probe input with small random linear layers put in place of its own (no hooks run,
    ZeRO-3 partitions untouched)."""
    names = ("gate_proj", "up_proj", "down_proj")
    if isinstance(module, _FusedGatedMLP) or not type(module).__name__.endswith("MLP"):
        return None
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return None
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
            gate, up = probe["gate_proj"](x), probe["up_proj"](x)
            for activation, (_, reference, _) in GATED_MLPS.items():
                if torch.equal(own, probe["down_proj"](reference(gate, up))):
                    return activation
        return None
    except Exception:  # a forward that needs more than x, or other shapes: not this MLP
        return None
    finally:
        module._modules.update(saved)


def use_fused_layers(model: nn.Module, backend: str = "triton") -> dict[str, int]:
    """Swap every RMSNorm, gated MLP and RoPE attention of `model` (see the module docstring) to the fused kernels
    run by `backend`. Returns how many of each were swapped."""
    counts = {"rms_norm": 0, "swiglu_mlp": 0, "geglu_mlp": 0, "rope_attention": 0}
    for module in list(model.modules()):
        form = rms_norm_form(module)
        if form is not None:
            _swap_class(module, _FusedRMSNorm, (*form, backend))
            counts["rms_norm"] += 1
        elif activation := gated_mlp_activation(module):
            _swap_class(module, _FusedGatedMLP, (activation, backend))
            counts[GATED_MLPS[activation][2]] += 1
        elif not isinstance(module, _FusedRoPEAttention) and (namespace := rope_function_namespace(module)):
            if not hasattr(namespace[ROPE_FUNCTION], "adapt_fast_original"):
                namespace[ROPE_FUNCTION] = _rope_dispatcher(namespace[ROPE_FUNCTION])
            _swap_class(module, _FusedRoPEAttention, (backend,))
            counts["rope_attention"] += 1
    return counts
