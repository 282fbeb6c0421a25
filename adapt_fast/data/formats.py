"""Task data on disk -> a list of records, one per example, each naming its task and split.

Formats (DESIGN.md section 7):
- Super-NaturalInstructions task files: a folder of `*.json` (or `tasks/*.json`) with Definition,
  Positive Examples, Instances (input, list of outputs) and Categories. A task is a file, or its
  first category with `group_by: category`.
- JSONL / Parquet files (or a folder of them) and HF `datasets` folders (`save_to_disk`) with a task
  column and prompt/response, instruction/input/output, or chat `messages`.

A record is a plain dict (so it goes straight into `datasets.Dataset.from_list`):
    task, split ("train" | "validation" | "" | "test"), source (file name), definition, positive_examples
    (JSON string of [{input, output}]), input, output (the first reference), references (JSON list
    of every reference output), messages (JSON string of chat messages or "").
Splits left empty here are assigned by `assign_splits` (seeded, per task). Split names in the data
map as HF users name them: train* -> train; validation, valid, val, dev -> validation; test* is left
out (never trained on, never steers the mixture, not even read) unless a loader is asked to keep it
(`keep_test`: the evaluator's --split test).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from adapt_fast.errors import DataError

RECORD_KEYS = (
    "task",
    "split",
    "source",
    "definition",
    "positive_examples",
    "input",
    "output",
    "references",
    "messages",
)


def _record(**fields) -> dict:
    record = dict.fromkeys(RECORD_KEYS, "")
    record.update(fields)
    return record


def _first(value) -> str:
    """NI fields are often lists of strings; take the first (or the string itself)."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def _text(value, where: str, field: str, *, optional: bool = False) -> str:
    """A text field of an example as a string: numbers are written out; null (unless `optional`),
    lists, objects and strings that are not valid Unicode (lone surrogates) are refused, so that no
    example trains on the text "None" or on a Python printout."""
    if value is None and optional:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: {field!r} is {kind}, expected text")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: {field!r} is not valid Unicode (a lone surrogate)") from None
    return text


def split_name(name: str, where: str) -> str:
    """A split name in the data -> "train", "validation", "test" or "" (none given)."""
    name = name.strip().lower()
    if not name:
        return ""
    if name.startswith("train"):
        return "train"
    if name in ("validation", "valid", "val", "dev") or name.startswith("validation"):
        return "validation"
    if name.startswith("test"):
        return "test"
    raise DataError(f"{where}: unknown split {name!r} (expected train, validation/valid/val/dev or test)")


# ----------------------------------------------------------------------------- NI task files


def load_ni_task_file(path: Path, group_by: str = "task", keep_test: bool = False) -> list[dict]:
    """One Super-NaturalInstructions task file -> records (split "" unless an instance has one; test instances
    are skipped unread unless keep_test)."""
    try:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not isinstance(task, dict):
        raise DataError(f"{path}: expected a JSON object with Definition and Instances")
    instances = task.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{path}: task has no instances")
    if group_by == "category":
        name = _first(task.get("Categories"))
        if not name:
            raise DataError(f"{path}: no Categories to group by (use data.group_by task)")
    else:
        name = path.stem
    positives = [
        {"input": str(ex.get("input", "")), "output": _first(ex.get("output"))}
        for ex in task.get("Positive Examples") or []
        if isinstance(ex, dict)
    ]
    definition = _first(task.get("Definition"))
    shared = {"definition": definition, "positive_examples": json.dumps(positives, ensure_ascii=False)}
    records = []
    for i, inst in enumerate(instances):
        where = f"{path}: instance {i}"
        if not isinstance(inst, dict):
            raise DataError(f"{where} is not a JSON object")
        split = split_name(_text(inst.get("split"), where, "split", optional=True), where)
        if split == "test" and not keep_test:  # not read further: a test split may come without answers
            continue
        if "input" not in inst or "output" not in inst:
            raise DataError(f"{path}: instance {i} lacks 'input' or 'output'")
        outputs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        outputs = [_text(o, where, "output") for o in outputs]
        if not outputs:
            raise DataError(f"{path}: instance {i} has no output")
        records.append(
            _record(
                task=name,
                split=split,
                source=path.name,
                input=_text(inst["input"], where, "input"),
                output=outputs[0],
                references=json.dumps(outputs, ensure_ascii=False),
                **shared,
            )
        )
    return records  # empty when every instance is in the test split (load_records says so if nothing else is)


def is_ni_folder(path: Path) -> bool:
    return path.is_dir() and bool(ni_task_files(path))


def ni_task_files(path: Path) -> list[Path]:
    folder = path / "tasks" if (path / "tasks").is_dir() else path
    return sorted(p for p in folder.glob("*.json") if p.is_file())


# ----------------------------------------------------------------------------- tabular formats


def _is_message_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _messages(value, where: str, column: str) -> list[dict]:
    """Chat messages (a list of role/content objects, or its JSON string) ending with an assistant turn."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {column!r} is not a JSON list") from None
    if not _is_message_list(value) or any("role" not in m or "content" not in m for m in value):
        raise DataError(f"{where}: {column!r} must be a list of role/content objects ending with an assistant turn")
    messages = [{**m, "role": _text(m["role"], where, "role"), "content": _text(m["content"], where, "content")}
                for m in value]  # fmt: skip
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {column!r} must end with an assistant turn")
    return messages


def _tabular_record(
    row: dict, where: str, task_column: str, default_task: str, null_task_missing: bool = False, keep_test: bool = False
) -> dict | None:
    """prompt/response (or completion) | instruction/input/output | chat messages (also TRL's
    conversational prompt/completion) -> a record, or None for a test-split row unless keep_test (it is not read:
    a test split without answers does not stop training). `where` names file and line."""
    split = split_name(_text(row.get("split"), where, "split", optional=True), where)
    if split == "test" and not keep_test:
        return None
    task = row.get(task_column)
    if task_column in row and task is None and not null_task_missing:  # Parquet/HF: null is how a row lacks it
        raise DataError(f"{where}: task column {task_column!r} is null")
    if task == "":
        raise DataError(f"{where}: task column {task_column!r} is empty")
    task = default_task if task is None else _text(task, where, task_column)
    messages = None
    if row.get("messages") is not None:
        messages = _messages(row["messages"], where, "messages")
    elif _is_message_list(row.get("prompt")):  # TRL conversational: prompt and completion are message lists
        completion = row.get("completion", row.get("response"))
        messages = _messages(list(row["prompt"]) + list(completion if _is_message_list(completion) else []),
                             where, "prompt + completion")  # fmt: skip
    if messages is not None:
        out = messages[-1]["content"]
        return _record(
            task=task,
            split=split,
            source=where,
            input="\n".join(m["content"] for m in messages[:-1]),
            output=out,
            references=json.dumps([out], ensure_ascii=False),
            messages=json.dumps(messages, ensure_ascii=False),
        )
    if "prompt" in row:
        response_key, definition, text = "response", "", _text(row["prompt"], where, "prompt")
        if response_key not in row:
            response_key = "completion" if "completion" in row else response_key
    elif "instruction" in row:  # Alpaca: the input may be empty or null
        definition = _text(row["instruction"], where, "instruction")
        response_key, text = "output", _text(row.get("input"), where, "input", optional=True)
    elif "input" in row:
        response_key, definition, text = "output", "", _text(row["input"], where, "input")
    else:
        raise DataError(f"{where}: no prompt column (expected prompt/response, instruction/input/output or messages)")
    if response_key not in row:
        raise DataError(f"{where}: response column {response_key!r} missing")
    if row[response_key] is None:
        raise DataError(f"{where}: {response_key!r} is null, expected text")
    outputs = row[response_key]
    if isinstance(outputs, (list, tuple, np.ndarray)):  # several reference answers: texts, not token ids
        outputs = list(outputs)
        if not all(isinstance(o, str) for o in outputs):
            kinds = sorted({type(o).__name__ for o in outputs if not isinstance(o, str)})
            raise DataError(
                f"{where}: {response_key!r} is a list holding {', '.join(kinds)}: a list there is several reference "
                "texts (pre-tokenised ids are not read; give the text)"
            )
    else:
        outputs = [outputs]
    outputs = [_text(o, where, response_key) for o in outputs]
    if not outputs:
        raise DataError(f"{where}: response column {response_key!r} is empty")
    return _record(
        task=task,
        split=split,
        source=where,
        definition=definition,
        input=text,
        output=outputs[0],
        references=json.dumps(outputs, ensure_ascii=False),
    )


def _check_task_column(present: bool, where: str, task_column: str) -> None:
    """A task column other than the default that no row has is a typo, not a one-task file: refuse it
    (every row would silently become one task named after the file)."""
    if not present and task_column != "task":
        raise DataError(f"{where}: no row has the task column {task_column!r} (data.task_column)")


def load_jsonl(path: Path, task_column: str, keep_test: bool = False) -> list[dict]:
    records, has_task_column = [], False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark is dropped, not an error
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            has_task_column |= task_column in row
            records.append(_tabular_record(row, where, task_column, path.stem, keep_test=keep_test))
    _check_task_column(has_task_column or not records, str(path), task_column)
    if not records:
        raise DataError(f"{path}: no examples")
    return [r for r in records if r is not None]  # empty when every row is in the test split


def load_parquet(path: Path, task_column: str, keep_test: bool = False) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({type(err).__name__})") from None
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{path}: no examples")
    _check_task_column(task_column in table.column_names, str(path), task_column)
    records = [_tabular_record(row, f"{path} row {i}", task_column, path.stem, True, keep_test)
               for i, row in enumerate(rows)]  # fmt: skip
    return [r for r in records if r is not None]


def load_hf_folder(path: Path, task_column: str, keep_test: bool = False) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot load the datasets folder ({type(err).__name__})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    records = []
    for name, ds in splits:
        split = split_name(name, f"{path} [{name}]")
        if split == "test" and not keep_test:  # never trained on, never steers the mixture, not read
            continue
        _check_task_column(task_column in ds.column_names, f"{path} [{name or 'data'}]", task_column)
        for i, row in enumerate(ds):
            record = _tabular_record(row, f"{path} [{name or 'data'}] row {i}", task_column, path.name, True, keep_test)
            if record is not None:
                record["split"] = record["split"] or split
                records.append(record)
    return records


# ----------------------------------------------------------------------------- entry point


def is_hf_folder(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def data_files(path: Path) -> list[Path]:
    """The files that make up a data path (used for loading and for the cache key)."""
    if path.is_file():
        return [path]
    if is_hf_folder(path):  # before the NI check: its top-level *.json are metadata, not tasks
        return sorted(p for p in path.rglob("*") if p.is_file())
    if is_ni_folder(path):
        return ni_task_files(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
    if not files:
        raise DataError(f"{path}: no NI task files (*.json), JSONL or Parquet files, nor a datasets folder")
    return files


def load_records(
    path: str | Path, group_by: str = "task", task_column: str = "task", keep_test: bool = False
) -> list[dict]:
    """All examples under `path` as records (see module docstring); the data's test split only with keep_test
    (split "test")."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if group_by not in ("task", "category"):
        raise DataError(f"unknown group_by {group_by!r} (choose from task, category)")
    records: list[dict] = []
    if is_hf_folder(path):
        records = load_hf_folder(path, task_column, keep_test)
    else:
        for file in data_files(path):
            if file.suffix == ".json":
                records += load_ni_task_file(file, group_by, keep_test)
            elif file.suffix == ".jsonl":
                records += load_jsonl(file, task_column, keep_test)
            elif file.suffix == ".parquet":
                records += load_parquet(file, task_column, keep_test)
            else:
                raise DataError(f"{file}: unknown data format (expected .json NI task, .jsonl or .parquet)")
    if not records:
        raise DataError(f"{path}: no examples" + ("" if keep_test else " outside the data's test split"))
    return records


def assign_splits(records: list[dict], val_fraction: float, val_examples: int, seed: int) -> None:
    """Give every record (but the data's test ones) a split, per task: a task with validation examples in the data
    keeps them (the rest train); otherwise a seeded `val_examples` (if > 0) or `val_fraction` of the task's
    examples go to validation (at least one when the task has two or more examples and
    val_fraction > 0). The draw depends on the seed and the task's name only, not on which other
    tasks are loaded, so a run on a subset of tasks (or the evaluator) sees the same split."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r["split"] != "test":
            by_task.setdefault(r["task"], []).append(i)
    for task, indices in sorted(by_task.items()):
        if any(records[i]["split"] == "validation" for i in indices):
            for i in indices:
                records[i]["split"] = records[i]["split"] or "train"
            continue
        n = len(indices)
        n_val = val_examples if val_examples > 0 else int(round(val_fraction * n))
        if val_fraction > 0 or val_examples > 0:
            n_val = max(n_val, 1) if n >= 2 else 0
        n_val = min(n_val, n - 1)
        task_hash = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
        rng = np.random.default_rng([seed, task_hash, 7919])
        val = set(rng.permutation(n)[:n_val].tolist())
        for j, i in enumerate(indices):
            records[i]["split"] = "validation" if j in val else "train"


def load_split_records(
    path: str | Path, *, group_by: str = "task", task_column: str = "task", tasks: list[str] | None = None,
    val_fraction: float = 0.1, val_examples: int = 0, seed: int = 0, option: str = "data.tasks",
    keep_test: bool = False,
) -> list[dict]:  # fmt: skip
    """Records of `path`, kept to `tasks` (if given; `option` names the setting in the error), then split
    by `assign_splits` (the data's test records, with keep_test, stay "test" and do not change the others' split).
    The trainer's cache and the evaluator both call this, so their splits agree."""
    records = load_records(path, group_by=group_by, task_column=task_column, keep_test=keep_test)
    if tasks:
        present = sorted({r["task"] for r in records})
        unknown = sorted(set(tasks) - set(present))
        if unknown:
            listed = ", ".join(present[:20]) + (f", ... ({len(present)} in all)" if len(present) > 20 else "")
            raise DataError(f"{option} names tasks not in the data: {', '.join(unknown)} (tasks: {listed})")
        records = [r for r in records if r["task"] in set(tasks)]
    assign_splits(records, val_fraction, val_examples, seed)
    return records
