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


# Tasks added for bench/reproduce.py (the ADAPT comparison); the ones above are unchanged.
_PRAISE_UNSEEN = ("superb", "lovely", "brilliant")  # never in a training task: the held-out keyword task


def _has_digit(rng):
    s = list(_letters(rng, 4, 16))
    positive = bool(rng.integers(0, 2))
    if positive:
        s[int(rng.integers(0, len(s)))] = str(int(rng.integers(0, 10)))
    return "".join(s), "yes" if positive else "no"


def _length_class(rng):
    s = _letters(rng, 4, 16)
    return s, "long" if len(s) > 10 else "short"


def _last_letter(rng):
    s = _letters(rng, 4, 16)
    return s, s[-1]


def _parity(rng):
    n = int(rng.integers(0, 10 ** int(rng.integers(1, 7))))
    return str(n), "odd" if n % 2 else "even"


def _multiply(rng):
    a, b = int(rng.integers(10, 1000)), int(rng.integers(2, 10))
    return f"{a}*{b}", str(a * b)


def _has_capital(rng):
    s = list(_letters(rng, 4, 16))
    positive = bool(rng.integers(0, 2))
    if positive:
        i = int(rng.integers(0, len(s)))
        s[i] = s[i].upper()
    return "".join(s), "yes" if positive else "no"


def _praise_unseen(rng):
    words = list(rng.choice(_WORDS, size=int(rng.integers(4, 9))))
    positive = bool(rng.integers(0, 2))
    if positive:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(_PRAISE_UNSEEN)))
    return " ".join(words), "yes" if positive else "no"


def _count_words(rng):
    words = list(rng.choice(_WORDS, size=int(rng.integers(2, 10))))
    return " ".join(words), str(len(words))


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
        # bench/reproduce.py: more training tasks ...
        SyntheticTask(
            "has_digit", "Text Classification", "Answer yes if the input has a digit, else no.", _has_digit, 1.0
        ),
        SyntheticTask(
            "length_class",
            "Text Classification",
            "Answer long if the input has more than 10 letters, else short.",
            _length_class,
            1.0,
        ),
        SyntheticTask("last_letter", "Program Execution", "Write the last letter of the input.", _last_letter, 1.0),
        SyntheticTask("parity", "Mathematics", "Answer even if the number is even, else odd.", _parity, 1.0),
        SyntheticTask("multiply", "Mathematics", "Multiply the two numbers and write the product.", _multiply, 1.0),
        # ... and held-out tasks related to them (never trained on in the bench): last_letter with a paraphrased
        # definition, has_digit's kind of detection for capitals, keyword with unseen praise words, counting words.
        SyntheticTask(
            "final_letter", "Program Execution", "Give the final character of the string.", _last_letter, 1.0
        ),
        SyntheticTask(
            "has_capital",
            "Text Classification",
            "Answer yes if the input has a capital letter, else no.",
            _has_capital,
            1.0,
        ),
        SyntheticTask(
            "praise_unseen",
            "Text Classification",
            "Answer yes if the sentence praises something, else no.",
            _praise_unseen,
            1.0,
        ),
        SyntheticTask("count_words", "Mathematics", "Count the words of the sentence.", _count_words, 1.0),
    )
}

DEFAULT_SUITE = ("copy", "reverse", "sort", "addition", "keyword", "random_output")


def write_synthetic_suite(
    folder: str | Path,
    seed: int = 0,
    examples_per_task: int = 400,
    tasks: tuple[str, ...] | list[str] = DEFAULT_SUITE,
    num_positive_examples: int = 2,
    sizes: dict[str, float] | None = None,
) -> Path:
    """Write `folder/tasks/<task>.json` NI files for `tasks`; returns the folder. Deterministic.

    sizes: optional per-task overrides of SyntheticTask.size (examples relative to examples_per_task)."""
    out = Path(folder) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(tasks):
        task = SYNTHETIC_TASKS[name]
        rng = np.random.default_rng([seed, index, 104729])
        size = task.size if sizes is None else sizes.get(name, task.size)
        n = max(4, int(round(examples_per_task * size)))
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
