"""A synthetic suite of Super-NaturalInstructions-format task files, deterministic from a seed.

Tasks of clearly different difficulty and size: copying is easy, reversal and sorting harder,
multi-digit addition harder still, keyword classification is a one-word answer, and `random_output`
has outputs unrelated to its inputs (nothing to learn: its loss stays at the entropy of its outputs).
The demo and the tests train on it; it is written as real NI task files so it goes through the same
loading path as user data.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Generator = Callable[[np.random.Generator], tuple[str, str]]

_WORDS = (
    "apple river stone cloud paper lamp garden window silver music ocean forest candle bridge "
    "mountain tiger pencil rocket castle winter summer yellow orange purple button mirror"
).split()
_KEYWORDS = ("excellent", "wonderful", "great")


def _letters(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(rng.choice(list(string.ascii_lowercase), size=n))


def _copy(rng):
    s = _letters(rng, 4, 16)
    return s, s


def _reverse(rng):
    s = _letters(rng, 4, 16)
    return s, s[::-1]


def _sort(rng):
    s = _letters(rng, 4, 14)
    return s, "".join(sorted(s))


def _add(rng):
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(2, 6)))) for _ in range(2))
    return f"{a}+{b}", str(a + b)


def _keyword(rng):
    words = list(rng.choice(_WORDS, size=int(rng.integers(4, 9))))
    positive = bool(rng.integers(0, 2))
    if positive:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(_KEYWORDS)))
    return " ".join(words), "yes" if positive else "no"


def _random_output(rng):
    return _letters(rng, 4, 12), _letters(rng, 4, 12)


def _uppercase(rng):
    s = _letters(rng, 4, 16)
    return s, s.upper()


def _count(rng):
    s = _letters(rng, 3, 20)
    return s, str(len(s))


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    category: str
    definition: str
    generate: Generator
    size: float  # examples relative to the suite's examples_per_task


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("copy", "Program Execution", "Repeat the input string exactly.", _copy, 1.0),
        SyntheticTask("reverse", "Program Execution", "Write the input string backwards.", _reverse, 0.6),
        SyntheticTask("sort", "Program Execution", "Sort the letters of the input alphabetically.", _sort, 0.8),
        SyntheticTask("addition", "Mathematics", "Add the two numbers and write the sum.", _add, 2.0),
        SyntheticTask(
            "keyword", "Text Classification", "Answer yes if the sentence has a word of praise, else no.", _keyword, 1.5
        ),
        SyntheticTask("random_output", "Misc.", "Write the secret code for the input.", _random_output, 0.5),
        SyntheticTask("uppercase", "Program Execution", "Write the input string in capital letters.", _uppercase, 0.7),
        SyntheticTask("count", "Mathematics", "Count the letters of the input.", _count, 0.9),
    )
}

DEFAULT_SUITE = ("copy", "reverse", "sort", "addition", "keyword", "random_output")


def write_synthetic_suite(
    folder: str | Path,
    seed: int = 0,
    examples_per_task: int = 400,
    tasks: tuple[str, ...] | list[str] = DEFAULT_SUITE,
    num_positive_examples: int = 2,
) -> Path:
    """Write `folder/tasks/<task>.json` NI files for `tasks`; returns the folder. Deterministic."""
    out = Path(folder) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(tasks):
        task = SYNTHETIC_TASKS[name]
        rng = np.random.default_rng([seed, index, 104729])
        n = max(4, int(round(examples_per_task * task.size)))
        pairs = [task.generate(rng) for _ in range(n + num_positive_examples)]
        document = {
            "Contributors": ["adapt_fast synthetic suite"],
            "Source": ["synthetic"],
            "Categories": [task.category],
            "Definition": [task.definition],
            "Positive Examples": [
                {"input": i, "output": o, "explanation": ""} for i, o in pairs[:num_positive_examples]
            ],
            "Negative Examples": [],
            "Instances": [
                {"id": f"{name}-{j}", "input": i, "output": [o]}
                for j, (i, o) in enumerate(pairs[num_positive_examples:])
            ],
        }
        (out / f"{name}.json").write_text(json.dumps(document, indent=1))
    return Path(folder)
