"""Backend selection: the Triton kernels on CUDA, their plain-PyTorch references elsewhere.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), for tests. Triton decides between
compiling and interpreting a function when `@triton.jit` runs, from TRITON_INTERPRET:
  * its own library functions (tl.zeros, tl.sum, ...) are decorated when `triton` is first imported, so the
    interpreter works only if the variable was set before that (`interpreter_ready` checks);
  * our kernels are re-read at every launch: `launchable(kernel)` returns the kernel in the mode the
    environment asks for now.
"""

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), read now, not at import."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """True when Triton's library was imported in interpreter mode (TRITON_INTERPRET=1 set before `import triton`)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map a backend name to "triton" or "torch" for tensors on `device`.

    "auto" -> "triton" on CUDA (when Triton is installed), "torch" elsewhere. "triton" on a non-CUDA device is
    allowed only under TRITON_INTERPRET=1 (the interpreter runs kernels on CPU tensors). Raises ValueError.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("kernel backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpret_mode():
            raise ValueError(f"kernel backend 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
        if device.type != "cuda" and not interpreter_ready():
            raise ValueError("kernel backend 'triton' on CPU: TRITON_INTERPRET=1 must be set before triton is imported")
    return name


_reference_depth = 0


@contextlib.contextmanager
def reference_kernels():
    """Inside: the fused layers (adapt_fast.model.fused_layers) run their modules' own PyTorch forward. For what
    the kernels' autograd functions cannot do, e.g. the forward-mode jvp of GhostDots (no jvp rule)."""
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


def reference_forced() -> bool:
    return _reference_depth > 0


def launchable(kernel):
    """`kernel` (made by @triton.jit) compiled or interpreted, as TRITON_INTERPRET says at this moment.

    The @triton.jit device functions it calls (looked up in its module's globals when it runs) are switched to
    the same mode in place: a kernel cannot call a helper of the other mode.
    """
    from triton.runtime.interpreter import InterpretedFunction

    want_interpreted = interpret_mode()
    _match_device_functions(kernel.fn, want_interpreted)
    if isinstance(kernel, InterpretedFunction) == want_interpreted:
        return kernel
    return _rebuild(kernel.fn, want_interpreted)


def _match_device_functions(fn, interpreted: bool) -> None:
    """Rebind the @triton.jit functions that `fn` names in its globals (and those they name) to `interpreted`."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name in fn.__code__.co_names:
        helper = fn.__globals__.get(name)
        if not isinstance(helper, (JITFunction, InterpretedFunction)):
            continue
        if isinstance(helper, InterpretedFunction) != interpreted:
            fn.__globals__[name] = _rebuild(helper.fn, interpreted)
        _match_device_functions(helper.fn, interpreted)


@functools.cache
def _rebuild(fn, interpreted: bool):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return InterpretedFunction(fn) if interpreted else JITFunction(fn)
