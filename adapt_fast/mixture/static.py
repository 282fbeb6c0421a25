"""Static task mixtures: the baselines ADAPT is compared with (DESIGN.md section 1, "Baselines").

Every method returns p (K,) float64, p >= 0, sum(p) == 1, in the order of `task_names`. The trainer
feeds p to the same loader and budget as ADAPT; only ADAPT changes p during training.

Task sizes n_k: the number of training tokens of task k, or, when `cap` > 0, the T5/FLAN
examples-proportional size min(examples_k, cap). The same n_k serve "proportional" (p_k ∝ n_k) and
"temperature" (p_k ∝ n_k^(1/T)), so temperature T = 1 is exactly proportional and T -> inf is
uniform over the tasks that have any data.
"""

from __future__ import annotations

import math

import numpy as np

from adapt_fast.errors import ConfigError

STATIC_METHODS = ("uniform", "proportional", "temperature", "fixed")


def task_sizes(train_tokens: np.ndarray, train_examples: np.ndarray, cap: int = 0) -> np.ndarray:
    """n (K,) float64: training tokens per task, or min(examples, cap) when cap > 0 (T5/FLAN)."""
    if cap < 0:
        raise ConfigError(f"mixture.cap must be >= 0, got {cap}")
    sizes = np.minimum(np.asarray(train_examples, dtype=np.float64), cap) if cap > 0 else train_tokens
    return np.asarray(sizes, dtype=np.float64)


def static_mixture(
    method: str,
    train_tokens: np.ndarray,
    train_examples: np.ndarray,
    task_names: list[str],
    temperature: float = 2.0,
    cap: int = 0,
    weights: dict[str, float] | None = None,
) -> np.ndarray:
    """A fixed mixture p (K,) float64 summing to 1.

    method        uniform      p_k = 1/K
                  proportional p_k ∝ n_k (n_k: training tokens, or min(examples_k, cap) when cap > 0)
                  temperature  p_k ∝ n_k^(1/T), same n_k; T = 1 is proportional, T = inf is uniform
                                over the tasks with data (a task with n_k = 0 always gets 0)
                  fixed        p_k ∝ weights[task_names[k]]; tasks not named in `weights` get 0
    train_tokens   (K,) training tokens per task (>= 0)
    train_examples (K,) training examples per task (>= 0)
    Raises ConfigError (one line) for an unknown method, a bad temperature or cap, weights naming
    unknown tasks, negative or non-finite weights, or nothing to sample from.
    """
    K = len(task_names)
    tokens = np.asarray(train_tokens, dtype=np.float64)
    examples = np.asarray(train_examples, dtype=np.float64)
    if K == 0 or tokens.shape != (K,) or examples.shape != (K,):
        raise ValueError(f"need K >= 1 tasks and (K,) counts; got K={K}, {tokens.shape}, {examples.shape}")
    if not all(np.all(np.isfinite(x) & (x >= 0)) for x in (tokens, examples)):
        raise ValueError("train_tokens and train_examples must be finite and >= 0")

    if method == "uniform":
        return np.full(K, 1.0 / K)

    if method in ("proportional", "temperature"):
        n = task_sizes(tokens, examples, cap)
        if not n.sum() > 0:
            unit = "examples" if cap else "tokens"
            raise ConfigError(f"mixture.method {method}: every task has zero training {unit}")
        if method == "proportional":
            return n / n.sum()
        T = float(temperature)
        if not T > 0:  # also rejects nan; T = inf is allowed (uniform)
            raise ConfigError(f"mixture.temperature must be > 0, got {temperature}")
        # n^(1/T) in log space: large n with small T would overflow
        logw = np.full(K, -np.inf)
        logw[n > 0] = np.log(n[n > 0]) / T
        w = np.exp(logw - logw.max())
        return w / w.sum()

    if method == "fixed":
        if not weights:
            raise ConfigError("mixture.method fixed needs mixture.weights (task=weight,...)")
        unknown = sorted(set(weights) - set(task_names))
        if unknown:
            raise ConfigError(f"mixture.weights names unknown tasks: {', '.join(unknown)}")
        bad = sorted(name for name, v in weights.items() if not (math.isfinite(float(v)) and float(v) >= 0))
        if bad:
            raise ConfigError(f"mixture.weights must be finite and >= 0; bad: {', '.join(bad)}")
        w = np.array([float(weights.get(name, 0.0)) for name in task_names])
        if not w.sum() > 0:
            raise ConfigError("mixture.weights must not all be zero")
        return w / w.sum()

    raise ConfigError(f"unknown mixture method {method!r}; expected one of {', '.join(STATIC_METHODS)}")
