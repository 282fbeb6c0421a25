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

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from adapt_fast.errors import DataError, first_line, some_of

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
    if isinstance(value, float) and not np.isfinite(value):  # NaN: how pandas writes a missing value
        value = None
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
    if name in ("validation", "valid", "val", "dev", "eval", "evaluation") or name.startswith("validation"):
        return "validation"
    if name.startswith("test"):
        return "test"
    raise DataError(f"{where}: unknown split {name!r} (expected train, validation/valid/val/dev/eval or test)")


def _row_split(name: str, file_split: str, where: str) -> str:
    """A row's split: its own, else its file's; one that contradicts its file's name is an error."""
    split = split_name(name, where)
    if split and file_split and split != file_split:
        raise DataError(f"{where}: split {name.strip()!r} in a file of the {file_split} split (named so)")
    return split or file_split


# A data folder's files take their split from their names, as HF's load_dataset reads a folder: the first word (up
# to -, _, ., a space or a digit) of the file's name, else of the nearest folder above it, if it is one of these.
SPLIT_WORDS = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "eval": "validation", "evaluation": "validation",
    "test": "test", "testing": "test",
}  # fmt: skip
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# Not data, skipped in a data folder without a word (a Hub download's README.md, .gitattributes, LICENSE, ...).
DOC_SUFFIXES = ("", ".md", ".txt", ".rst", ".yaml", ".yml", ".py", ".lock", ".cff", ".html")


def suffix_of(path: Path) -> str:
    """The data suffix of a file name, lower case: `.jsonl.gz` as a whole."""
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    """The file name without its data suffix (`a.jsonl.gz` -> `a`)."""
    return path.name[: len(path.name) - len(suffix_of(path))] if suffix_of(path) else path.name


def _split_word(name: str) -> str:
    return SPLIT_WORDS.get(re.split(r"[-._ 0-9]", name.lower(), maxsplit=1)[0], "")


def split_of_file(rel: Path) -> str:
    """The split a file's path inside a data folder names ("" when none): `train-00000-of-00002.parquet`,
    `validation.jsonl`, `test/part-0.jsonl` (the file's name first, then the folders above it, nearest first)."""
    for name in (stem_of(rel), *reversed(rel.parts[:-1])):
        if split := _split_word(name):
            return split
    return ""


def default_task_of_file(root: Path, rel: Path) -> str:
    """The task of a folder file's rows that name none: the file's name; for a file named after its split (the
    shards of a Hub download, `train.jsonl` beside `test.jsonl`), the nearest folder above it whose name is not a
    split nor `data`, up to the data folder's own name (its parent's when it is called `data`)."""
    if not _split_word(stem_of(rel)):
        return stem_of(rel)
    for name in reversed(rel.parts[:-1]):
        if not _split_word(name) and name.lower() != "data":
            return name
    root = root.resolve()
    return root.parent.name if root.name.lower() == "data" and root.parent.name else root.name


# ----------------------------------------------------------------------------- NI task files


def load_ni_task_file(path: Path, group_by: str = "task", keep_test: bool = False) -> list[dict]:
    """One Super-NaturalInstructions task file -> records (split "" unless an instance has one; test instances
    are skipped unread unless keep_test)."""
    task = _load_json(path)
    if not isinstance(task, dict):
        raise DataError(f"{path}: expected a JSON object with Definition and Instances")
    return ni_task_records(task, path, group_by, keep_test)


def _load_json(path: Path):
    """A .json file's content (a byte-order mark dropped); DataError for one that is not UTF-8 or not JSON."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def ni_task_records(task: dict, path: Path, group_by: str, keep_test: bool, file_split: str = "") -> list[dict]:
    """A parsed NI task object (from `path`) -> records; an instance without a split of its own takes file_split."""
    instances = task.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(
            f"{path}: task has no instances"
            + ("" if "Definition" in task else " (a JSON object that is not an NI task file: move it out of the data)")
        )
    if group_by == "category":
        name = _first(task.get("Categories"))
        if not name:
            raise DataError(f"{path}: no Categories to group by (use data.group_by task)")
    else:
        name = stem_of(path)
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
        split = _row_split(_text(inst.get("split"), where, "split", optional=True), file_split, where)
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


def ni_task_files(path: Path) -> list[Path]:
    folder = path / "tasks" if (path / "tasks").is_dir() else path
    return sorted(p for p in folder.glob("*.json") if p.is_file())


# ----------------------------------------------------------------------------- tabular formats


def _is_message_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


# ShareGPT (Axolotl's and LLaMA-Factory's `conversations` of from/value turns) -> chat roles.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip


def _messages(value, where: str, column: str) -> list[dict]:
    """Chat messages (a list of role/content objects, or ShareGPT's from/value, or its JSON string) ending with an
    assistant turn; ShareGPT's roles (human, gpt, ...) become user, assistant, ..."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {column!r} is not a JSON list") from None
    if _is_message_list(value) and all("from" in m and "value" in m and "role" not in m for m in value):
        unknown = sorted({str(m["from"]) for m in value} - set(SHAREGPT_ROLES))
        if unknown:
            raise DataError(f"{where}: {column!r}: unknown ShareGPT role {unknown[0]!r} (expected one of "
                            f"{', '.join(SHAREGPT_ROLES)})")  # fmt: skip
        value = [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in value]
    if not _is_message_list(value) or any("role" not in m or "content" not in m for m in value):
        raise DataError(f"{where}: {column!r} must be a list of role/content (or ShareGPT from/value) objects "
                        "ending with an assistant turn")  # fmt: skip
    messages = []
    for m in value:
        role = _text(m["role"], where, "role")
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        weight = m.get("weight", 1)  # Axolotl's per-turn weight: a turn of weight 0 carries no loss
        if isinstance(weight, bool) or weight not in (0, 1):
            raise DataError(f"{where}: {column!r}: a turn's 'weight' is {weight!r}, expected 0 or 1")
        calls = m.get("tool_calls")  # OpenAI's tool calling: an assistant turn of calls has content null
        content = _text(m["content"], where, "content", optional=bool(calls))
        messages.append({**m, "role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {column!r} must end with an assistant turn (its last is {messages[-1]['role']!r})")
    trained = [i for i, m in enumerate(messages) if carries_loss(m)]
    if not trained:
        raise DataError(f"{where}: {column!r}: every assistant turn has weight 0 (nothing to train on)")
    return messages[: trained[-1] + 1]  # the turns after the last one of weight 1 carry no loss: not trained on


def carries_loss(message: dict) -> bool:
    """An assistant turn that may carry the loss (not one of Axolotl's weight 0)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def turn_text(message: dict) -> str:
    """A chat turn as text: its content, then its tool calls (OpenAI's `tool_calls`) as JSON, if any."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    return "\n".join(filter(None, [message["content"], json.dumps(calls, ensure_ascii=False)]))


def _alpaca_messages(row: dict, where: str, instruction: str, text: str) -> list[dict] | None:
    """LLaMA-Factory's Alpaca rows with a `system` prompt or a `history` of [query, answer] pairs as chat messages
    (its user turn: the instruction, then the input on a new line), or None for a plain Alpaca row."""
    system, history = _text(row.get("system"), where, "system", optional=True), row.get("history")
    history = [] if history is None else history
    if not system and len(history) == 0:
        return None
    pairs = history if isinstance(history, (list, tuple, np.ndarray)) else None
    if pairs is None or not all(isinstance(p, (list, tuple, np.ndarray)) and len(p) == 2 for p in pairs):
        raise DataError(f"{where}: 'history' must be a list of [query, answer] pairs")
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in pairs:
        messages += [{"role": "user", "content": _text(query, where, "history")},
                     {"role": "assistant", "content": _text(answer, where, "history")}]  # fmt: skip
    user = instruction + (f"\n{text}" if text else "")
    return [*messages, {"role": "user", "content": user}]


def _tabular_record(
    row: dict, where: str, task_column: str, default_task: str, null_task_missing: bool = False,
    keep_test: bool = False, file_split: str = "",
) -> dict | None:  # fmt: skip
    """prompt/response (or completion) | instruction/input/output | chat messages or ShareGPT conversations (also
    TRL's conversational prompt/completion) -> a record, or None for a test-split row unless keep_test (it is not
    read: a test split without answers does not stop training). `where` names file and line; a row without a split
    of its own takes `file_split` (its file's)."""
    split = _row_split(_text(row.get("split"), where, "split", optional=True), file_split, where)
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
    elif row.get("conversations") is not None:  # ShareGPT
        messages = _messages(row["conversations"], where, "conversations")
    elif _is_message_list(row.get("prompt")):  # TRL conversational: prompt and completion are message lists
        completion = row.get("completion", row.get("response"))
        messages = _messages(list(row["prompt"]) + list(completion if _is_message_list(completion) else []),
                             where, "prompt + completion")  # fmt: skip
    if messages is not None:
        out = turn_text(messages[-1])
        return _record(
            task=task,
            split=split,
            source=where,
            input="\n".join(turn_text(m) for m in messages[:-1]),
            output=out,
            references=json.dumps([out], ensure_ascii=False),
            messages=json.dumps(messages, ensure_ascii=False),
        )
    if "prompt" in row:
        response_key, definition, text = "response", "", _text(row["prompt"], where, "prompt")
        if response_key not in row:
            response_key = "completion" if "completion" in row else response_key
    elif "instruction" in row:  # Alpaca (the input may be empty or null), Dolly (context, response)
        definition = _text(row["instruction"], where, "instruction")
        context = "input" if "input" in row or "context" not in row else "context"
        response_key = "output" if "output" in row or "response" not in row else "response"
        text = _text(row.get(context), where, context, optional=True)
        if (conversation := _alpaca_messages(row, where, definition, text)) is not None:
            answer = {"role": "assistant", "content": _text(row.get(response_key), where, response_key)}
            as_chat = {**row, "messages": [*conversation, answer]}
            return _tabular_record(as_chat, where, task_column, default_task, null_task_missing, keep_test, file_split)
    elif "input" in row:
        response_key, definition, text = "output", "", _text(row["input"], where, "input")
    else:
        raise DataError(
            f"{where}: no prompt column (expected prompt/response, instruction/input/output, messages or ShareGPT "
            f"conversations; the row has {', '.join(sorted(map(str, row))[:8])})"
        )
    if response_key not in row:
        hint = ""
        if "chosen" in row:
            hint = " (prompt/chosen/rejected is preference (DPO) data: rename chosen to response)"
        raise DataError(f"{where}: response column {response_key!r} missing{hint}")
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


def _rows_records(
    rows, path: Path, task_column: str, keep_test: bool, file_split: str, default_task: str | None,
    null_task_missing: bool = False,
) -> list[dict]:  # fmt: skip
    """(where, row) pairs of one file -> its records. A task column that some rows have and others lack is an error
    (those rows would silently form a task named after the file); so is a `data.task_column` that no row has."""
    default_task = default_task or stem_of(path)
    records, with_task, without_task = [], False, None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        if task_column in row:
            with_task = True
        elif without_task is None:
            without_task = where
        records.append(_tabular_record(row, where, task_column, default_task, null_task_missing, keep_test, file_split))
    if not records:
        raise DataError(f"{path}: no examples")
    _check_task_column(with_task, str(path), task_column)
    if with_task and without_task is not None and not null_task_missing:
        raise DataError(f"{without_task}: no {task_column!r} key, which other rows of the file have (data.task_column)")
    return [r for r in records if r is not None]  # empty when every row is in the test split


def load_jsonl(
    path: Path, task_column: str, keep_test: bool = False, file_split: str = "", default_task: str | None = None
) -> list[dict]:
    """A JSON Lines file (`.jsonl`, gzip-compressed `.jsonl.gz`, or a `.json` holding JSON Lines) -> records."""

    def rows():
        with gzip.open(path, "rb") if suffix_of(path) == ".jsonl.gz" else open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig")  # -sig: a byte-order mark is dropped, not an error
                except UnicodeDecodeError:
                    raise DataError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: malformed JSON ({err.msg})") from None

    try:
        return _rows_records(rows(), path, task_column, keep_test, file_split, default_task)
    except (OSError, EOFError) as err:  # gzip: not a gzip file, cut short
        raise DataError(f"{path}: cannot read ({first_line(err)})") from None


def load_json(
    path: Path, group_by: str, task_column: str, keep_test: bool = False, file_split: str = "",
    default_task: str | None = None,
) -> list[dict]:  # fmt: skip
    """A `.json` file, read by what it holds, as `datasets`' json loader does: an object is an NI task file, a list
    of objects is rows (LLaMA-Factory's files), JSON Lines (what Dataset.to_json writes) are rows."""
    try:
        content = _load_json(path)
    except DataError as err:
        if "Extra data" not in str(err):
            raise
        return load_jsonl(path, task_column, keep_test, file_split, default_task)
    if isinstance(content, dict):
        return ni_task_records(content, path, group_by, keep_test, file_split)
    if isinstance(content, list):
        rows = ((f"{path} row {i}", row) for i, row in enumerate(content))
        return _rows_records(rows, path, task_column, keep_test, file_split, default_task)
    raise DataError(f"{path}: expected an NI task object or a list of rows, got {type(content).__name__}")


def load_parquet(
    path: Path, task_column: str, keep_test: bool = False, file_split: str = "", default_task: str | None = None
) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({type(err).__name__})") from None
    rows = ((f"{path} row {i}", row) for i, row in enumerate(table.to_pylist()))
    return _rows_records(rows, path, task_column, keep_test, file_split, default_task, null_task_missing=True)


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
    if not path.is_dir():
        return False
    saved_dataset = ("dataset_info.json", "state.json")  # not a bare dataset_info.json (LLaMA-Factory's registry)
    return (path / "dataset_dict.json").exists() or all((path / f).exists() for f in saved_dataset)


def data_files(path: Path) -> list[Path]:
    """The files that make up a data path (used for loading and for the cache key): the file itself; a datasets
    folder's files; an NI repository's `tasks/*.json`; else every `.jsonl`, `.jsonl.gz`, `.json` and `.parquet`
    file under the folder, subfolders included (hidden ones and documentation skipped; any other file is an error,
    not silently left out)."""
    if path.is_file():
        return [path]
    if is_hf_folder(path):  # before the NI check: its top-level *.json are metadata, not tasks
        return sorted(p for p in path.rglob("*") if p.is_file())
    if (path / "tasks").is_dir() and ni_task_files(path):  # the NI repository's layout
        return ni_task_files(path)
    files, unread = [], []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if suffix_of(file) in DATA_SUFFIXES:
            files.append(file)
        elif suffix_of(file) not in DOC_SUFFIXES and not file.name.upper().startswith(("LICENSE", "README")):
            unread.append(str(rel))
    if unread:
        raise DataError(
            f"{path}: files that are not data it reads: {some_of(unread)} (data files are .jsonl, .jsonl.gz, .json and "
            ".parquet, in any subfolder; convert or move the others)"
        )
    if not files:
        raise DataError(f"{path}: no NI task files (*.json), JSONL or Parquet files, nor a datasets folder")
    return files


def load_records(
    path: str | Path, group_by: str = "task", task_column: str = "task", keep_test: bool = False
) -> list[dict]:
    """All examples under `path` as records (see module docstring); the data's test split only with keep_test
    (split "test"). In a folder, a file named after a split (`train-00000-of-00002.parquet`, `test.jsonl`, files
    under `validation/`) holds that split, and its rows' task defaults to the folder's (default_task_of_file); a
    test file is not read unless keep_test."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if group_by not in ("task", "category"):
        raise DataError(f"unknown group_by {group_by!r} (choose from task, category)")
    if is_hf_folder(path):
        records = load_hf_folder(path, task_column, keep_test)
        if not records:
            raise DataError(f"{path}: no examples" + ("" if keep_test else " outside the data's test split"))
        return records
    records: list[dict] = []
    for file in data_files(path):
        split, task = "", None
        if path.is_dir():
            rel = file.relative_to(path)
            split, task = split_of_file(rel), default_task_of_file(path, rel)
        if split == "test" and not keep_test:  # never trained on, never steers the mixture, not read
            continue
        suffix = suffix_of(file)
        if suffix == ".json":
            records += load_json(file, group_by, task_column, keep_test, split, task)
        elif suffix in (".jsonl", ".jsonl.gz"):
            records += load_jsonl(file, task_column, keep_test, split, task)
        elif suffix == ".parquet":
            records += load_parquet(file, task_column, keep_test, split, task)
        else:
            raise DataError(f"{file}: unknown data format (expected .jsonl, .jsonl.gz, .json or .parquet)")
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
            raise DataError(f"{option} names tasks not in the data: {some_of(unknown)} (tasks: {listed})")
        records = [r for r in records if r["task"] in set(tasks)]
    assign_splits(records, val_fraction, val_examples, seed)
    return records
