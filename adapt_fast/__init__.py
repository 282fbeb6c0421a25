"""adapt_fast: budget-constrained multi-task instruction tuning with a learned task mixture (ADAPT)."""

from pathlib import Path

__version__ = "0.1.0"

# kernels/ lives at the top of the repository and is installed as adapt_fast.kernels. When the
# package is used from a source checkout (PYTHONPATH=repo), let `adapt_fast.kernels` resolve there.
_source_root = Path(__file__).resolve().parent.parent
if (_source_root / "kernels" / "__init__.py").exists() and not (Path(__file__).parent / "kernels").exists():
    __path__.append(str(_source_root))  # noqa: F821  (module __path__)
