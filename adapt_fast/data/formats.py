"""Task data on disk -> a list of records, one per example, each naming its task and split.

Formats (DESIGN.md section 7):
- Super-NaturalInstructions task files: a folder of `*.json` (or `tasks/*.json`) with Definition,
  Positive Examples, Instances (input, list of outputs) and Categories. A task is a file, or its
  first category with `group_by: category`.
- JSONL / Parquet files (or a folder of them) and HF `datasets` folders (`save_to_disk`) with a task
  column and prompt/response, instruction/input/output, or chat `messages`.

A record is a plain dict (so it goes straight into `datasets.Dataset.from_list`):
    task, split ("train" | "validation" | ""), source (file name), definition, positive_examples
    (JSON string of [{input, output}]), input, output (the first reference), references (JSON list
    of every reference output), messages (JSON string of chat messages or "").
Splits left empty here are assigned by `assign_splits` (seeded, per task).
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- NI task files


def load_ni_task_file(path: Path, group_by: str = "task") -> list[dict]:
    """One Super-NaturalInstructions task file -> records (split "" unless an instance has one)."""
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
        if not isinstance(inst, dict) or "input" not in inst or "output" not in inst:
            raise DataError(f"{path}: instance {i} lacks 'input' or 'output'")
        outputs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        outputs = [str(o) for o in outputs]
        if not outputs:
            raise DataError(f"{path}: instance {i} has no output")
        records.append(
            _record(
                task=name,
                split=str(inst.get("split", "")),
                source=path.name,
                input=str(inst["input"]),
                output=outputs[0],
                references=json.dumps(outputs, ensure_ascii=False),
                **shared,
            )
        )
    return records


def is_ni_folder(path: Path) -> bool:
    return path.is_dir() and bool(ni_task_files(path))


def ni_task_files(path: Path) -> list[Path]:
    folder = path / "tasks" if (path / "tasks").is_dir() else path
    return sorted(p for p in folder.glob("*.json") if p.is_file())


# ----------------------------------------------------------------------------- tabular formats


def _tabular_record(row: dict, where: str, task_column: str, default_task: str) -> dict:
    """prompt/response | instruction/input/output | messages -> a record. `where` names file and line."""
    task = row.get(task_column)
    task = default_task if task is None or task == "" else str(task)
    split = str(row.get("split") or "")
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise DataError(f"{where}: 'messages' is not a JSON list") from None
        messages = [dict(m) for m in messages] if isinstance(messages, (list, tuple, np.ndarray)) else None
        if (
            not messages
            or any("role" not in m or "content" not in m for m in messages)
            or messages[-1]["role"] != "assistant"
        ):
            raise DataError(f"{where}: 'messages' must be a list of role/content ending with an assistant turn")
        out = str(messages[-1]["content"])
        prompt = "\n".join(str(m["content"]) for m in messages[:-1])
        return _record(
            task=task,
            split=split,
            source=where,
            input=prompt,
            output=out,
            references=json.dumps([out], ensure_ascii=False),
            messages=json.dumps(messages, ensure_ascii=False),
        )
    if "prompt" in row:
        response_key, definition, text = "response", "", row["prompt"]
        if response_key not in row:
            response_key = "completion" if "completion" in row else response_key
    elif "instruction" in row:
        response_key, definition, text = "output", str(row["instruction"]), row.get("input", "")
    elif "input" in row:
        response_key, definition, text = "output", "", row["input"]
    else:
        raise DataError(f"{where}: no prompt column (expected prompt/response, instruction/input/output or messages)")
    if response_key not in row or row[response_key] is None:
        raise DataError(f"{where}: response column {response_key!r} missing")
    outputs = row[response_key]
    outputs = [str(o) for o in outputs] if isinstance(outputs, (list, tuple, np.ndarray)) else [str(outputs)]
    if not outputs:
        raise DataError(f"{where}: response column {response_key!r} is empty")
    return _record(
        task=task,
        split=split,
        source=where,
        definition=definition,
        input="" if text is None else str(text),
        output=outputs[0],
        references=json.dumps(outputs, ensure_ascii=False),
    )


def load_jsonl(path: Path, task_column: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            records.append(_tabular_record(row, where, task_column, path.stem))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def load_parquet(path: Path, task_column: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({type(err).__name__})") from None
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{path}: no examples")
    return [_tabular_record(row, f"{path} row {i}", task_column, path.stem) for i, row in enumerate(rows)]


def load_hf_folder(path: Path, task_column: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot load the datasets folder ({type(err).__name__})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    records = []
    for split_name, ds in splits:
        split = {"validation": "validation", "valid": "validation", "val": "validation", "test": "validation"}.get(
            split_name, "train" if split_name else ""
        )
        for i, row in enumerate(ds):
            record = _tabular_record(row, f"{path} [{split_name or 'data'}] row {i}", task_column, path.name)
            record["split"] = record["split"] or split
            records.append(record)
    if not records:
        raise DataError(f"{path}: no examples")
    return records


# ----------------------------------------------------------------------------- entry point


def data_files(path: Path) -> list[Path]:
    """The files that make up a data path (used for loading and for the cache key)."""
    if path.is_file():
        return [path]
    if is_ni_folder(path):
        return ni_task_files(path)
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
    if not files:
        raise DataError(f"{path}: no NI task files (*.json), JSONL or Parquet files, nor a datasets folder")
    return files


def load_records(path: str | Path, group_by: str = "task", task_column: str = "task") -> list[dict]:
    """All examples under `path` as records (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if group_by not in ("task", "category"):
        raise DataError(f"unknown group_by {group_by!r} (choose from task, category)")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        return load_hf_folder(path, task_column)
    records: list[dict] = []
    for file in data_files(path):
        if file.suffix == ".json":
            records += load_ni_task_file(file, group_by)
        elif file.suffix == ".jsonl":
            records += load_jsonl(file, task_column)
        elif file.suffix == ".parquet":
            records += load_parquet(file, task_column)
        else:
            raise DataError(f"{file}: unknown data format (expected .json NI task, .jsonl or .parquet)")
    return records


def assign_splits(records: list[dict], val_fraction: float, val_examples: int, seed: int) -> None:
    """Give every record without a split one, per task: the data's own split wins, else a seeded
    `val_examples` (if > 0) or `val_fraction` of the task's examples go to validation (at least one
    when the task has two or more examples and val_fraction > 0)."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r["task"], []).append(i)
    for task_index, (task, indices) in enumerate(sorted(by_task.items())):
        if any(records[i]["split"] for i in indices):
            for i in indices:
                records[i]["split"] = records[i]["split"] or "train"
                if records[i]["split"] not in ("train", "validation"):
                    raise DataError(f"{records[i]['source']}: unknown split {records[i]['split']!r} in task {task}")
            continue
        n = len(indices)
        n_val = val_examples if val_examples > 0 else int(round(val_fraction * n))
        if val_fraction > 0 or val_examples > 0:
            n_val = max(n_val, 1) if n >= 2 else 0
        n_val = min(n_val, n - 1)
        rng = np.random.default_rng([seed, task_index, 7919])
        val = set(rng.permutation(n)[:n_val].tolist())
        for j, i in enumerate(indices):
            records[i]["split"] = "validation" if j in val else "train"


def load_split_records(
    path: str | Path, *, group_by: str = "task", task_column: str = "task", tasks: list[str] | None = None,
    val_fraction: float = 0.1, val_examples: int = 0, seed: int = 0, option: str = "data.tasks",
) -> list[dict]:  # fmt: skip
    """Records of `path`, kept to `tasks` (if given; `option` names the setting in the error), then split
    by `assign_splits`. The trainer's cache and the evaluator both call this, so their splits agree."""
    records = load_records(path, group_by=group_by, task_column=task_column)
    if tasks:
        unknown = sorted(set(tasks) - {r["task"] for r in records})
        if unknown:
            raise DataError(f"{path}: {option} names tasks not in the data: {', '.join(unknown)}")
        records = [r for r in records if r["task"] in set(tasks)]
    assign_splits(records, val_fraction, val_examples, seed)
    return records
