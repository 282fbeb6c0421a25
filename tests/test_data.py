"""Data pipeline: formats, masking, cache, packing, the budget met exactly, bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from adapt_fast.config import load_config
from adapt_fast.data import cache as cache_module
from adapt_fast.data import formats
from adapt_fast.data.batch import IGNORE_INDEX
from adapt_fast.data.cache import TokenizedSplit, build_or_load
from adapt_fast.data.loader import MAX_WAIT, PackedLoader, largest_remainder, pack_examples
from adapt_fast.data.render import fit_to_max_len
from adapt_fast.data.synthetic import write_synthetic_suite
from adapt_fast.data.tokenizer import build_byte_tokenizer
from adapt_fast.errors import DataError

NI_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural-instructions"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("suite")
    write_synthetic_suite(root / "data", seed=0, examples_per_task=300)
    return build_or_load(root / "data", tokenizer, cache_dir=root / "cache", seed=0, progress=False)


def drain(loaders: list[PackedLoader], meta_every: int = 0) -> list[list]:
    """Run every rank's loader to the end; returns per-rank lists of micro-batches."""
    out: list[list] = [[] for _ in loaders]
    step = 0
    while True:
        batches = [ld.next_micro_batch(meta_step=bool(meta_every) and step % meta_every == 0) for ld in loaders]
        if batches[0] is None:
            assert all(b is None for b in batches)
            return out
        for r, b in enumerate(batches):
            out[r].append(b)
        step += 1


# ----------------------------------------------------------------------------- formats


@pytest.mark.skipif(not NI_SAMPLE.exists(), reason="no shared NI sample")
def test_every_ni_sample_task_loads_with_its_instance_count():
    manifest = (NI_SAMPLE / "MANIFEST.md").read_text()
    expected = {m[0]: int(m[1]) for m in re.findall(r"\| (task\S+\.json) \| [^|]+ \| (\d+) \|", manifest)}
    assert len(expected) == 17
    for name, count in expected.items():
        records = formats.load_ni_task_file(NI_SAMPLE / "tasks" / name)
        assert len(records) == count, name
        assert all(r["task"] == name.removesuffix(".json") and r["definition"] for r in records)
    by_category = formats.load_records(NI_SAMPLE, group_by="category")
    assert len(by_category) == sum(expected.values())
    assert "Program Execution" in {r["task"] for r in by_category}


def test_jsonl_parquet_and_datasets_folder_formats(tmp_path):
    rows = [
        {"task": "a", "prompt": "2+2=", "response": "4"},
        {"task": "b", "instruction": "Say hi", "input": "", "output": "hi"},
        {"task": "c", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = formats.load_records(tmp_path / "d.jsonl")
    assert [r["task"] for r in records] == ["a", "b", "c"]
    assert [r["output"] for r in records] == ["4", "hi", "y"]

    import datasets

    ds = datasets.Dataset.from_list([{"task": "a", "prompt": "p", "response": "r"}] * 3)
    ds.to_parquet(tmp_path / "d.parquet")
    assert len(formats.load_parquet(tmp_path / "d.parquet", "task")) == 3
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(tmp_path / "hf")
    hf = formats.load_records(tmp_path / "hf")
    assert sorted({r["split"] for r in hf}) == ["train", "validation"]


def test_split_uses_data_split_else_seeded_fraction():
    records = [formats._record(task="t", input=str(i), output="o") for i in range(50)]
    formats.assign_splits(records, val_fraction=0.2, val_examples=0, seed=1)
    first = [r["split"] for r in records]
    assert first.count("validation") == 10
    again = [formats._record(task="t", input=str(i), output="o") for i in range(50)]
    formats.assign_splits(again, val_fraction=0.2, val_examples=0, seed=1)
    assert [r["split"] for r in again] == first
    fixed = [formats._record(task="t", input=str(i), output="o") for i in range(50)]
    formats.assign_splits(fixed, val_fraction=0.2, val_examples=3, seed=1)
    assert [r["split"] for r in fixed].count("validation") == 3


def test_split_of_a_task_does_not_depend_on_the_other_tasks():
    """The evaluator loads one task (data.tasks); it must see the validation examples the full run held out."""

    def records(tasks):
        return [formats._record(task=t, input=f"{t}{i}", output="o") for t in tasks for i in range(40)]

    full, alone = records(["a", "b", "c"]), records(["c"])
    for rs in (full, alone):
        formats.assign_splits(rs, val_fraction=0.2, val_examples=0, seed=4)
    held_out = {r["input"] for r in full if r["split"] == "validation" and r["task"] == "c"}
    assert held_out == {r["input"] for r in alone if r["split"] == "validation"} and len(held_out) == 8


def test_data_splits_map_like_hf_and_a_task_without_validation_gets_one(tmp_path):
    """train*/validation/dev as HF names them; test is left out (never trained on, never steers the mixture; the
    evaluator's --split test asks for it);
    a task whose data has train rows only still gets val_fraction of them for validation."""
    import datasets

    def rows(task, n):
        return datasets.Dataset.from_list([{"task": task, "prompt": f"{task}{i}", "response": "r"} for i in range(n)])

    both = datasets.concatenate_datasets([rows("a", 20), rows("b", 20)])
    datasets.DatasetDict({"train_sft": both, "dev": rows("a", 5), "test": rows("b", 7)}).save_to_disk(tmp_path / "hf")
    records = formats.load_split_records(tmp_path / "hf", val_fraction=0.1)
    splits = ("train", "validation")
    count = {(t, s): sum(r["task"] == t and r["split"] == s for r in records) for t in "ab" for s in splits}
    assert count == {("a", "train"): 20, ("a", "validation"): 5, ("b", "train"): 18, ("b", "validation"): 2}
    with_test = formats.load_split_records(tmp_path / "hf", val_fraction=0.1, keep_test=True)  # evaluate --split test
    assert [r for r in with_test if r["split"] != "test"] == records
    assert sorted(r["input"] for r in with_test if r["split"] == "test") == sorted(f"b{i}" for i in range(7))

    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": "p", "response": "r", "split": s}) + "\n"
                                              for s in ("train", "val", "test", "weird")))  # fmt: skip
    with pytest.raises(DataError, match=r"s.jsonl:4: unknown split 'weird'"):
        formats.load_records(tmp_path / "s.jsonl")


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _splits(records: list[dict]) -> dict:
    from collections import Counter

    return dict(Counter((r["task"], r["split"]) for r in records))


def test_a_data_folder_takes_splits_from_file_names_as_hf_does(tmp_path):
    """A Hub download (data/train-0000x-of-00002.parquet, data/test-00000-of-00001.parquet, README.md) is one dataset:
    its shards are not tasks, and its test shard is neither trained on nor read (unless evaluate --split test asks);
    train.jsonl / validation.jsonl / test.jsonl beside each other are splits, not three tasks."""
    import datasets

    def shard(name, n, response="r"):
        rows = [{"prompt": f"{name}{i}", "response": response} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(tmp_path / "hub" / "data" / f"{name}.parquet")

    shard("train-00000-of-00002", 6)
    shard("train-00001-of-00002", 4)
    shard("test-00000-of-00001", 3, response=None)  # a test split without answers
    (tmp_path / "hub" / "README.md").write_text("# card")
    (tmp_path / "hub" / ".gitattributes").write_text("*.parquet filter=lfs")
    for root in (tmp_path / "hub", tmp_path / "hub" / "data"):
        assert _splits(formats.load_records(root)) == {("hub", "train"): 10}
    with pytest.raises(DataError, match="test-00000-of-00001.parquet row 0: 'response' is null"):
        formats.load_records(tmp_path / "hub", keep_test=True)  # read only when asked for

    rows = [{"task": t, "prompt": f"{t}{i}", "response": "r"} for t in "ab" for i in range(4)]
    for name in ("train", "validation", "test"):
        _write_rows(tmp_path / "files" / f"{name}.jsonl", rows)
    assert _splits(formats.load_records(tmp_path / "files")) == {
        ("a", "train"): 4, ("b", "train"): 4, ("a", "validation"): 4, ("b", "validation"): 4,
    }  # fmt: skip
    assert _splits(formats.load_records(tmp_path / "files", keep_test=True))[("a", "test")] == 4
    _write_rows(tmp_path / "files_no_task" / "dev.jsonl", [{"prompt": "p", "response": "r"}])
    _write_rows(tmp_path / "files_no_task" / "train.jsonl", [{"prompt": "p", "response": "r"}] * 2)
    assert _splits(formats.load_records(tmp_path / "files_no_task")) == {
        ("files_no_task", "validation"): 1, ("files_no_task", "train"): 2,
    }  # fmt: skip
    _write_rows(tmp_path / "clash" / "test.jsonl", [{"prompt": "p", "response": "r", "split": "train"}])
    with pytest.raises(DataError, match="clash/test.jsonl:1: split 'train' in a file of the test split"):
        formats.load_records(tmp_path / "clash", keep_test=True)
    # a task named like a split only after its first word is a task: copy_test.jsonl, devops.jsonl
    _write_rows(tmp_path / "tasks" / "copy_test.jsonl", [{"prompt": "p", "response": "r"}])
    _write_rows(tmp_path / "tasks" / "devops.jsonl", [{"prompt": "p", "response": "r"}])
    assert _splits(formats.load_records(tmp_path / "tasks")) == {("copy_test", ""): 1, ("devops", ""): 1}


def test_every_data_file_of_a_folder_is_read_or_refused_never_skipped(tmp_path):
    """Subfolders, upper-case suffixes and gzip-compressed JSONL are read; a file it cannot read (CSV) stops the run
    in one line naming it, rather than training on part of the data; hidden files and documentation are skipped."""
    import gzip

    folder = tmp_path / "d"
    _write_rows(folder / "top.jsonl", [{"prompt": "p", "response": "r"}] * 2)
    _write_rows(folder / "sub" / "more.JSONL", [{"prompt": "p", "response": "r"}] * 3)
    with gzip.open(folder / "packed.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (folder / "LICENSE").write_text("MIT")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_text("")
    assert _splits(formats.load_records(folder)) == {("top", ""): 2, ("more", ""): 3, ("packed", ""): 1}
    assert formats.data_files(folder) == sorted([folder / "packed.jsonl.gz", folder / "sub/more.JSONL",
                                                 folder / "top.jsonl"])  # fmt: skip
    (folder / "extra.csv").write_text("prompt,response\np,r\n")
    with pytest.raises(DataError, match=r"d: files that are not data it reads: extra.csv \(data files are"):
        formats.load_records(folder)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot read"):
        formats.load_records(tmp_path / "bad.jsonl.gz")


def test_json_files_are_read_by_what_they_hold(tmp_path):
    """As datasets' json loader: a list of rows (LLaMA-Factory's files), JSON Lines in a .json (Dataset.to_json's
    output), an NI task object (a byte-order mark allowed); an object that is no NI task is named in the error."""
    rows = [
        {"task": "a", "instruction": "Add", "input": "1 1", "output": "2"},
        {"task": "b", "prompt": "p", "response": "r"},
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert [(r["task"], r["output"]) for r in formats.load_records(tmp_path / "list.json")] == [("a", "2"), ("b", "r")]
    _write_rows(tmp_path / "lines.json", rows)
    assert [r["task"] for r in formats.load_records(tmp_path / "lines.json")] == ["a", "b"]
    ni = {"Definition": ["Copy."], "Instances": [{"input": "x", "output": ["x"]}]}
    (tmp_path / "ni" / "task1_copy.json").parent.mkdir()
    (tmp_path / "ni" / "task1_copy.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ni).encode())
    assert [r["task"] for r in formats.load_records(tmp_path / "ni")] == ["task1_copy"]
    (tmp_path / "ni" / "stats.json").write_text(json.dumps({"rows": 3}))
    with pytest.raises(DataError, match=r"stats.json: task has no instances \(a JSON object that is not an NI task"):
        formats.load_records(tmp_path / "ni")


def test_sharegpt_conversations_load_as_chat_messages(tmp_path):
    """Axolotl's and LLaMA-Factory's ShareGPT rows (from/value; human, gpt, system) are chat messages; so are
    role/content messages that kept ShareGPT's role names. A conversation must end with the assistant's turn."""
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    kept_names = [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]
    _write_rows(
        tmp_path / "sg.jsonl", [{"task": "math", "conversations": turns}, {"task": "math", "messages": kept_names}]
    )
    first, second = formats.load_records(tmp_path / "sg.jsonl")
    assert [m["role"] for m in json.loads(first["messages"])] == ["system", "user", "assistant"]
    assert (first["output"], second["output"]) == ("4", "hello")
    assert [m["role"] for m in json.loads(second["messages"])] == ["user", "assistant"]
    _write_rows(tmp_path / "ends.jsonl", [{"conversations": turns[:2]}])
    with pytest.raises(
        DataError, match=r"ends.jsonl:1: 'conversations' must end with an assistant turn \(its last is 'user'\)"
    ):
        formats.load_records(tmp_path / "ends.jsonl")
    _write_rows(tmp_path / "odd.jsonl", [{"conversations": [{"from": "narrator", "value": "x"}, *turns[2:]]}])
    with pytest.raises(DataError, match="odd.jsonl:1: 'conversations': unknown ShareGPT role 'narrator'"):
        formats.load_records(tmp_path / "odd.jsonl")


def test_llama_factory_alpaca_dolly_and_axolotl_turn_weights(tmp_path, tokenizer):
    """LLaMA-Factory's Alpaca `system` and `history` become the conversation before the question (they were
    dropped); Dolly's instruction/context/response load; Axolotl's per-turn `weight` 0 keeps a turn out of the loss
    (under assistant_turns all), and turns after the last of weight 1 are not trained on."""
    from adapt_fast.data.render import tokenize_record

    rows = [
        {"task": "t", "instruction": "Add", "input": "1 2", "output": "3", "system": "Be exact.",
         "history": [["2 2?", "4"]]},
        {"task": "t", "instruction": "Say", "context": "hi", "response": "hi", "category": "open_qa"},
        {"task": "t", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "weight": 0},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "z", "weight": 0},
        ]},
    ]  # fmt: skip
    alpaca, dolly, weighted = formats.load_records(_write_rows(tmp_path / "d.jsonl", rows))
    assert [(m["role"], m["content"]) for m in json.loads(alpaca["messages"])] == [
        ("system", "Be exact."), ("user", "2 2?"), ("assistant", "4"), ("user", "Add\n1 2"), ("assistant", "3"),
    ]  # fmt: skip
    assert (dolly["definition"], dolly["input"], dolly["output"]) == ("Say", "hi", "hi")
    assert [m["content"] for m in json.loads(weighted["messages"])] == ["a", "x", "b", "y"] and weighted[
        "output"
    ] == "y"
    ids, mask = tokenize_record(weighted, tokenizer, "ni", assistant_turns="all")
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "y" + tokenizer.eos_token, trained  # x has weight 0
    rows[2]["messages"][3]["weight"] = 0
    with pytest.raises(DataError, match="d.jsonl:3: 'messages': every assistant turn has weight 0"):
        formats.load_records(_write_rows(tmp_path / "d.jsonl", rows))


def test_tool_calls_nan_and_preference_rows(tmp_path, tokenizer):
    """OpenAI tool calling: an assistant turn of tool_calls has content null; under the ni transcript its calls are
    written out as JSON (they were refused). A NaN where text belongs (pandas' missing value) is an error, not the
    text "nan"; preference (DPO) rows are named as such."""
    from adapt_fast.data.render import tokenize_record

    call = [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"q": "1+1"}'}}]
    messages = [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "2", "tool_call_id": "c1"}, {"role": "assistant", "content": "2"},
    ]  # fmt: skip
    (record,) = formats.load_records(_write_rows(tmp_path / "tools.jsonl", [{"messages": messages}]))
    ids, mask = tokenize_record(record, tokenizer, "ni", assistant_turns="all")
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == json.dumps(call) + "2" + tokenizer.eos_token
    messages[1]["tool_calls"] = None
    with pytest.raises(DataError, match="tools.jsonl:1: 'content' is null, expected text"):
        formats.load_records(_write_rows(tmp_path / "tools.jsonl", [{"messages": messages}]))
    (tmp_path / "nan.jsonl").write_text('{"prompt": "p", "response": NaN}\n')
    with pytest.raises(DataError, match="nan.jsonl:1: 'response' is null, expected text"):
        formats.load_records(tmp_path / "nan.jsonl")
    _write_rows(tmp_path / "dpo.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"response' missing \(prompt/chosen/rejected is preference \(DPO\) data"):
        formats.load_records(tmp_path / "dpo.jsonl")


def test_a_row_without_the_task_column_that_other_rows_have_is_an_error(tmp_path):
    """It would silently form a task named after the file; eval is a validation split name (TRL's, Axolotl's)."""
    _write_rows(
        tmp_path / "part.jsonl", [{"task": "a", "prompt": "p", "response": "r"}, {"prompt": "q", "response": "r"}]
    )
    with pytest.raises(DataError, match=r"part.jsonl:2: no 'task' key, which other rows of the file have"):
        formats.load_records(tmp_path / "part.jsonl")
    _write_rows(tmp_path / "ev.jsonl", [{"prompt": "p", "response": "r", "split": s} for s in ("train", "eval")])
    assert [r["split"] for r in formats.load_records(tmp_path / "ev.jsonl")] == ["train", "validation"]


def test_values_that_are_not_text_are_refused_and_trl_conversations_load(tmp_path):
    """null, objects and lone surrogates never become training text ("None", a Python printout); TRL's
    conversational prompt/completion (message lists) becomes chat messages."""
    conversation = {
        "prompt": [{"role": "user", "content": "sky?"}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    (tmp_path / "conv.jsonl").write_text(json.dumps(conversation) + "\n")
    (record,) = formats.load_records(tmp_path / "conv.jsonl")
    assert (record["input"], record["output"]) == ("sky?", "Blue.")
    assert json.loads(record["messages"])[-1] == {"role": "assistant", "content": "Blue."}

    bad_rows = {
        "null_response": ({"prompt": "p", "response": None}, "'response' is null"),
        "no_response": ({"prompt": "p"}, "response column 'response' missing"),
        "null_prompt": ({"prompt": None, "response": "r"}, "'prompt' is null"),  # was trained as BOS + "r"
        "list_prompt": ({"prompt": ["a"], "response": "r"}, "'prompt' is list"),  # the error said 'input'
        "null_task": ({"task": None, "prompt": "p", "response": "r"}, "task column 'task' is null"),
        "object_response": ({"prompt": "p", "response": {"x": 1}}, "'response' is dict"),
        "null_content": ({"messages": [{"role": "assistant", "content": None}]}, "'content' is null"),
        "string_messages": ({"messages": ["hi", "there"]}, "role/content"),
        "list_task": ({"task": ["x"], "prompt": "p", "response": "r"}, "'task' is list"),
        "empty_task": ({"task": "", "prompt": "p", "response": "r"}, "task column 'task' is empty"),  # was the file's
        "id_list": ({"prompt": "p", "response": [101, 2023]}, "'response' is a list holding int"),  # trained "101"
        "surrogate": ('{"prompt": "a\\ud800b", "response": "c"}', "lone surrogate"),
    }  # fmt: skip
    for name, (row, message) in bad_rows.items():
        (tmp_path / f"{name}.jsonl").write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(DataError, match=re.escape(f"{name}.jsonl:1: ") + ".*" + re.escape(message)):
            formats.load_records(tmp_path / f"{name}.jsonl")
    (tmp_path / "refs.jsonl").write_text(json.dumps({"prompt": "p", "response": ["a", "b"]}) + "\n")  # references
    assert [(r["output"], json.loads(r["references"])) for r in formats.load_records(tmp_path / "refs.jsonl")] == [
        ("a", ["a", "b"])
    ]
    alpaca = {"instruction": "i", "input": None, "output": "o"}  # Alpaca's input may be null or empty
    (tmp_path / "alpaca.jsonl").write_text(json.dumps(alpaca) + "\n")
    assert formats.load_records(tmp_path / "alpaca.jsonl")[0]["input"] == ""
    # a task column no row has is a typo (it merged every task into one named after the file); the default
    # column may be absent (a one-task file)
    (tmp_path / "two.jsonl").write_text(json.dumps({"task": "a", "prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match="two.jsonl: no row has the task column 'nope'"):
        formats.load_records(tmp_path / "two.jsonl", task_column="nope")
    assert formats.load_records(tmp_path / "alpaca.jsonl")[0]["task"] == "alpaca"
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"task": ["a", None], "prompt": ["p", "q"], "response": ["r", "s"]}  # Parquet's null: a row without one
    pq.write_table(pa.table(rows), tmp_path / "mixed.parquet")
    assert [r["task"] for r in formats.load_records(tmp_path / "mixed.parquet")] == ["a", "mixed"]
    with pytest.raises(DataError, match=r"data.tasks names tasks not in the data: nope \(tasks: a\)"):
        formats.load_split_records(tmp_path / "two.jsonl", tasks=["a", "nope"])  # the error lists what there is
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="latin1.jsonl:2: not UTF-8"):
        formats.load_records(tmp_path / "latin1.jsonl")
    ni = tmp_path / "ni"
    ni.mkdir()
    (ni / "t.json").write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "q", "output": [None]}]}))
    with pytest.raises(DataError, match="instance 0: 'output' is null"):
        formats.load_records(ni)


# ----------------------------------------------------------------------------- masking and cache


def test_loss_only_on_response_and_eos(suite, tokenizer):
    split = suite.train
    for i in range(0, split.num_examples, 97):
        ids, mask = split.example(i)
        ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
        text = tokenizer.decode(ids[~mask].tolist())
        response = tokenizer.decode(ids[mask][:-1].tolist())
        assert ids[mask][-1] == tokenizer.eos_token_id
        assert text.endswith("Output: ") and "Definition:" in text
        assert not mask[: int(np.argmax(mask))].any() and mask[int(np.argmax(mask)) :].all()
        assert len(response) > 0


def test_chat_template_that_rewrites_the_prompt_still_ends_the_answer_with_eos():
    """When the generation prompt is not a prefix of the full rendering, the loss falls on the answer's
    tokens, and EOS ends them, as on every other path, so that the model learns to stop."""
    from adapt_fast.data.render import tokenize_record

    tok = build_byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}U:{{ m.content }}\n{% else %}A:{{ m.content }}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    record = formats._record(task="t", input="hi", output="yo", messages=json.dumps(messages))
    ids, mask = tokenize_record(record, tok, "chat")
    assert tok.decode(ids) == "U:hi\nA: yo" + tok.eos_token
    answer = tok.encode("yo", add_special_tokens=False) + [tok.eos_token_id]
    assert [i for i, m in zip(ids, mask, strict=True) if m] == answer


def test_chat_messages_without_a_chat_template_render_as_a_transcript():
    """Under the ni template (a tokenizer without a chat template) a conversation keeps its roles and turns, and the
    answer follows an 'Assistant: ' cue (it was the contents joined by newlines, the answer glued on)."""
    from adapt_fast.data.render import tokenize_record

    tok = build_byte_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "AAA"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "BBB"},
    ]
    record = formats._record(task="t", input="unused", output="BBB", messages=json.dumps(messages))
    ids, mask = tokenize_record(record, tok, "ni")
    prompt = "System: Be brief.\n\nUser: hi\n\nAssistant: AAA\n\nUser: again\n\nAssistant: "
    assert tok.decode(ids) == tok.bos_token + prompt + "BBB" + tok.eos_token
    assert [i for i, m in zip(ids, mask, strict=True) if m] == tok.encode("BBB", add_special_tokens=False) + [
        tok.eos_token_id
    ]  # the last assistant turn carries the loss
    all_ids, all_mask = tokenize_record(record, tok, "ni", assistant_turns="all")  # and every one, on request
    carried = tok.decode([i for i, m in zip(ids, all_mask, strict=True) if m])
    assert all_ids == ids and carried == "AAABBB" + tok.eos_token


def test_every_assistant_turn_carries_the_loss_with_assistant_turns_all():
    """data.assistant_turns all (TRL's assistant_only_loss) under a chat template: each assistant turn's content and
    end-of-turn token; the user turns and the generation cues stay context. `last` (the default) is the final one."""
    from adapt_fast.data.render import tokenize_record

    tok = build_byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    record = formats._record(task="t", input="", output="a2", messages=json.dumps(messages))
    eos = tok.eos_token
    for turns, carried in (("last", "a2" + eos), ("all", "a1" + eos + "a2" + eos)):
        ids, mask = tokenize_record(record, tok, "chat", assistant_turns=turns)
        assert tok.decode(ids) == f"<user>q1{eos}<assistant>a1{eos}<user>q2{eos}<assistant>a2{eos}"
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == carried, turns
    plain = formats._record(task="t", input="q", output="a")  # no conversation: the same either way
    assert tokenize_record(plain, tok, "chat", assistant_turns="all") == tokenize_record(plain, tok, "chat")


def test_microbatch_labels_isolate_examples(suite):
    loader = PackedLoader(suite.train, 1024, 5000, np.ones(suite.num_tasks) / suite.num_tasks)
    batch = loader.next_micro_batch()
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.labels[starts] == IGNORE_INDEX).all()
    assert (batch.position_ids[starts] == 0).all()
    shifted = batch.shift_labels()
    ends = batch.cu_seqlens[1:].long() - 1
    assert (shifted[ends] == IGNORE_INDEX).all()  # no position predicts the next example's first token
    for k in range(batch.num_tasks):  # task ranges are contiguous and in task order
        lo, hi = batch.task_offsets[k], batch.task_offsets[k + 1]
        assert (batch.task_ids[lo:hi] == k).all()
    rows = batch.to_rows()
    assert rows["input_ids"].shape[0] == batch.num_examples
    flat = rows["index"][rows["attention_mask"]]
    assert (batch.input_ids[flat] == rows["input_ids"][rows["attention_mask"]]).all()


def test_second_load_hits_the_cache(tmp_path, tokenizer, monkeypatch):
    write_synthetic_suite(tmp_path / "data", seed=3, examples_per_task=20)
    first = build_or_load(tmp_path / "data", tokenizer, cache_dir=tmp_path / "c", progress=False)
    assert not first.from_cache

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr("adapt_fast.data.cache._tokenize_batch", no_tokenising)
    second = build_or_load(tmp_path / "data", tokenizer, cache_dir=tmp_path / "c", progress=False)
    assert second.from_cache and second.folder == first.folder
    assert np.array_equal(second.train.ids, first.train.ids)
    monkeypatch.undo()  # a change of settings is a different entry
    other = build_or_load(tmp_path / "data", tokenizer, cache_dir=tmp_path / "c", max_len=64, progress=False)
    assert other.folder != first.folder


def test_a_build_killed_mid_way_is_cleaned_up_by_the_next_one(tmp_path, tokenizer):
    """SIGKILL while tokenising leaves the temporary folder (nothing can remove it then); the next build in that
    cache_dir removes it, and leaves alone the folder of a build still running (here: this process's)."""
    write_synthetic_suite(tmp_path / "data", seed=3, examples_per_task=20)
    cache = tmp_path / "c"
    hang = (
        "import time, adapt_fast.data.cache as c\n"
        "from adapt_fast.data.tokenizer import build_byte_tokenizer\n"
        "c._tokenize_batch = lambda *a, **k: time.sleep(3600)\n"
        f"c.build_or_load({str(tmp_path / 'data')!r}, build_byte_tokenizer(), cache_dir={str(cache)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", hang], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 120
        while not list(cache.glob(".*/owner.json")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    (killed,) = cache.glob(".*-*")
    running = cache / ".0123abcd-running"
    running.mkdir()
    (running / "owner.json").write_text(json.dumps({**cache_module._this_process(), "pid": os.getpid()}))
    elsewhere = cache / ".4567cdef-other-container"  # same host name, another PID namespace: its PIDs are not ours
    elsewhere.mkdir()
    other = {"host": socket.gethostname(), "pid_namespace": "pid:[1]", "pid": 2**22 + 1}
    (elsewhere / "owner.json").write_text(json.dumps(other))
    data = build_or_load(tmp_path / "data", tokenizer, cache_dir=cache, progress=False)
    assert not killed.exists() and running.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted([data.folder.name, running.name, elsewhere.name])


def test_cache_key_covers_a_datasets_folder_data_and_name(tmp_path, tokenizer):
    """A re-saved DatasetDict is tokenised again (its dataset_dict.json alone does not change), and a copy
    under another name (the task of rows without a task column) is a different entry."""
    import shutil

    import datasets

    def save(n):
        ds = datasets.Dataset.from_list([{"prompt": f"q{i}", "response": "r" * n} for i in range(10)])
        datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "sentiment")

    save(1)
    first = build_or_load(tmp_path / "sentiment", tokenizer, cache_dir=tmp_path / "c", progress=False)
    shutil.rmtree(tmp_path / "sentiment")
    save(30)
    second = build_or_load(tmp_path / "sentiment", tokenizer, cache_dir=tmp_path / "c", progress=False)
    assert not second.from_cache and second.train.ids.size > first.train.ids.size
    shutil.copytree(tmp_path / "sentiment", tmp_path / "summarize")
    copy = build_or_load(tmp_path / "summarize", tokenizer, cache_dir=tmp_path / "c", progress=False)
    assert not copy.from_cache and copy.task_names == ["summarize"]


def test_a_tokenising_batch_that_drops_every_row(tmp_path, tokenizer):
    """300 over-long rows (more than one 256-row map batch, all dropped), then short ones: no untyped column."""
    rows = [{"prompt": "p" * 200, "response": "r"}] * 300 + [{"prompt": "p", "response": "r"}] * 300
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_or_load(tmp_path / "d.jsonl", tokenizer, cache_dir=tmp_path / "c", max_len=64, truncate=False,
                         val_fraction=0, progress=False)  # fmt: skip
    assert data.meta["train"] == {"examples": 300, "truncated": 0, "dropped": 300, "dropped_per_task": {"d": 300}}


# ----------------------------------------------------------------------------- budget and shares


@pytest.mark.parametrize("unit", ["tokens", "loss"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_budget_met_exactly(suite, unit, world_size):
    p = np.random.default_rng(world_size).dirichlet(np.ones(suite.num_tasks))
    for budget in (1, 777, 40_003, 123_457):
        loaders = [
            PackedLoader(suite.train, 2048, budget, p, unit=unit, rank=r, world_size=world_size, seed=5)
            for r in range(world_size)
        ]
        per_rank = drain(loaders, meta_every=3)
        fed = sum(int((b.task_ids >= 0).sum()) for batches in per_rank for b in batches)
        loss = sum(int((b.labels != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
        assert (fed if unit == "tokens" else loss) == budget
        assert loaders[0].consumed == budget
        assert all(ld.stats.tokens == loaders[0].stats.tokens for ld in loaders)


def test_ranks_draw_disjoint_examples(suite):
    budget = int(np.asarray(suite.train.lengths).sum()) // 2  # within one epoch: no reuse
    p = suite.train.tokens_per_task() / suite.train.tokens_per_task().sum()
    loaders = [PackedLoader(suite.train, 2048, budget, p, rank=r, world_size=2, seed=1) for r in range(2)]
    per_rank = drain(loaders)
    assert loaders[0].stats.reused == 0

    def example_starts(batches):
        # identify examples by their token content and task (synthetic examples are distinct)
        keys = set()
        for b in batches:
            for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist(), strict=True):
                if b.task_ids[s] >= 0:
                    keys.add(tuple(b.input_ids[s:e].tolist()))
        return keys

    a, b = example_starts(per_rank[0]), example_starts(per_rank[1])
    assert a and b and not (a & b)


def test_shares_follow_the_mixture_and_can_change(suite):
    K = suite.num_tasks
    p = np.array([0.4, 0.05, 0.2, 0.15, 0.1, 0.1])[:K]
    loader = PackedLoader(suite.train, 4096, 400_000, p, seed=2)
    for _ in range(40):
        loader.next_micro_batch()
    shares = np.array(loader.stats.tokens_per_task) / loader.stats.tokens
    assert np.abs(shares - p).max() < 0.01, shares
    before = np.array(loader.stats.tokens_per_task)
    q = np.roll(p, 2)
    loader.set_mixture(q)
    for _ in range(40):
        loader.next_micro_batch()
    after = (np.array(loader.stats.tokens_per_task) - before) / (loader.stats.tokens - before.sum())
    assert np.abs(after - q).max() < 0.02, after


def test_meta_steps_hold_every_task(suite):
    p = np.array([0.9] + [0.1 / (suite.num_tasks - 1)] * (suite.num_tasks - 1))
    loader = PackedLoader(suite.train, 2048, 100_000, p, meta_floor_examples=2, meta_floor_fraction=1.0, seed=0)
    for _ in range(10):
        batch = loader.next_micro_batch(meta_step=True)
        examples = np.bincount(batch.task_ids[batch.cu_seqlens[:-1].long()].clamp(min=0), minlength=suite.num_tasks)
        assert (examples >= 2).all()


def test_padding_under_half_a_percent_on_the_demo_suite(tmp_path, tokenizer):
    cfg = load_config(None, [])
    write_synthetic_suite(tmp_path / "d", seed=0, examples_per_task=cfg.data.synthetic_examples)
    data = build_or_load(tmp_path / "d", tokenizer, cache_dir=tmp_path / "c", progress=False)
    loader = PackedLoader(data.train, 4096, cfg.budget.tokens, np.ones(data.num_tasks) / data.num_tasks)
    drain([loader], meta_every=cfg.meta.update_every)
    assert loader.stats.padding_fraction < 0.005


def lognormal_split(
    num_examples: int, num_tasks: int, median: int, max_len: int, seed: int, at_max_len: np.ndarray | None = None
) -> TokenizedSplit:
    """A split of instruction-like lengths (lognormal, sigma 1, clipped to [16, max_len]; the examples marked in
    at_max_len exactly max_len); every token a loss token but the first. Only the lengths matter to the loader."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.0, num_examples).round(), 16, max_len).astype(np.int64)
    if at_max_len is not None:
        lengths[at_max_len] = max_len
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.ones(int(offsets[-1]), dtype=np.int32)
    tasks = rng.integers(0, num_tasks, num_examples)
    return TokenizedSplit(ids, np.ones_like(ids, dtype=np.uint8), offsets, tasks, lengths, lengths - 1, num_tasks)


@pytest.mark.parametrize(
    "median, max_len, meta_every", [(256, 2048, 4), (1024, 2048, 4), (600, 1024, 1), (600, 4096, 1)]
)
def test_long_examples_pack_tightly_and_meta_steps_keep_the_shares(median, max_len, meta_every):
    """One rank, 4096-slot micro-batches: about ten (median 256) or three (median 1024) examples per micro-batch, or
    a meta step every micro-step (with a fifth of the examples a whole micro-batch long). Subset-sum placement keeps
    padding under DESIGN's 0.5%, and under 3% with the long fifth (about 1-2%; best fit with swaps left 0.3-3.5%);
    every drawn example is placed within a bounded wait; neither the floors nor the pool's slack swell the small
    tasks' shares beyond what the floors give them by design."""
    seed = int(np.random.default_rng().integers(1 << 30))
    split = lognormal_split(20_000, 20, median, max_len, seed)
    if max_len > 2048:  # a fifth of the examples as long as a whole micro-batch
        cut = np.random.default_rng(seed).random(split.num_examples) < 0.2
        split = lognormal_split(20_000, 20, median, max_len, seed, at_max_len=cut)
    p = np.linspace(1, 10, 20)
    p /= p.sum()
    loader = PackedLoader(split, 4096, 4096 * 1200, p, seed=seed)
    longest_wait, step = 0, 0
    while loader.next_micro_batch(meta_step=step % meta_every == 0) is not None:
        longest_wait = max(longest_wait, *loader.leftover_waits, 0)
        step += 1
    assert loader.stats.padding_fraction < (0.005 if max_len <= 2048 else 0.03), (seed, loader.stats.padding_fraction)
    shares = np.array(loader.stats.tokens_per_task) / loader.stats.tokens
    # a floor every micro-step gives the smallest tasks more than p by design: a quarter of every step goes to the
    # floors, whatever p (drawing for floors that could not fit, or a whole example for each sliver of quota in the
    # top-up, gave them several times more)
    assert np.abs(shares / p - 1).max() < (0.1 if meta_every > 1 else 3.0), (seed, shares / p)
    assert longest_wait <= 4 * MAX_WAIT, seed


def test_many_tasks_on_one_rank_keep_waits_pool_and_floors_bounded():
    """400 tasks, each a sliver of a 4096-slot step, a meta step every step: when every task with a positive part drew
    a whole example, the pool grew with the number of tasks (about 50 steps deep here), the oldest examples waited the
    whole run and the floors never went in. Now a task draws once its part covers half an example."""
    seed = int(np.random.default_rng().integers(1 << 30))
    split = lognormal_split(40_000, 400, 300, 2048, seed)
    loader = PackedLoader(split, 4096, 10**9, np.ones(400), seed=seed)
    longest_wait, deepest_pool = 0, 0
    for _ in range(600):
        loader.next_micro_batch(meta_step=True)
        longest_wait = max(longest_wait, *loader.leftover_waits, 0)
        deepest_pool = max(deepest_pool, int(np.asarray(split.lengths)[loader.leftovers].sum()))
    assert longest_wait <= 2 * MAX_WAIT, seed
    assert deepest_pool <= 25 * 4096, (seed, deepest_pool / 4096)
    assert loader.floor_age.max() < 400, seed  # the floors rotate through all 400 tasks
    assert loader.stats.padding_fraction < 0.005, seed


@pytest.mark.parametrize(
    "num_tasks,world_size,allow_repeat,unit,floors,expected",
    [
        (7, 1, True, "tokens", 1, "45f1e5245cdb7815"),
        (60, 2, False, "loss", 2, "93d37556e9afb59f"),
        (300, 1, True, "tokens", 1, "b5847f0b248dadfa"),
        (25, 3, True, "loss", 0, "4bf64c1c65bea23f"),
    ],
)
def test_the_loaders_plans_are_pinned(num_tasks, world_size, allow_repeat, unit, floors, expected):
    """Every rank's micro-batches (segments and task offsets) over whole runs, hashed: a change that moves any
    example shows here. The hashes are those of the loader before the plan stopped asking all K streams (db554de),
    which that change kept exactly; update them only for a change meant to alter the plans."""
    import hashlib

    split = lognormal_split(2_000, num_tasks, 150, 1024, seed=num_tasks)
    budget = int(np.asarray(split.lengths).sum()) * (3 if allow_repeat else 1) // 4
    p = np.random.default_rng(num_tasks).dirichlet(np.ones(num_tasks))
    digest = hashlib.sha256()
    for rank in range(world_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = PackedLoader(split, 2048, budget, p, seed=3, rank=rank, world_size=world_size, unit=unit,
                                  allow_repeat=allow_repeat, meta_floor_examples=floors)  # fmt: skip
            step = 0
            while (batch := loader.next_micro_batch(meta_step=step % 2 == 1)) is not None:
                digest.update(batch.cu_seqlens.numpy().tobytes() + batch.task_offsets.numpy().tobytes())
                step += 1
    assert digest.hexdigest()[:16] == expected


@pytest.mark.parametrize("allow_repeat", [True, False])
def test_the_plans_view_of_each_task_follows_its_stream(allow_repeat):
    """The plan reads each task's next example and whether it can still draw from per-task arrays (so a step does
    not ask K streams); they must stay what the streams say: across epochs, tasks that run out, and a resume."""
    seed = int(np.random.default_rng().integers(1 << 30))
    split = lognormal_split(3_000, 60, 120, 1024, seed)
    budget = int(np.asarray(split.lengths).sum()) * (3 if allow_repeat else 1) // 2
    p = np.random.default_rng(seed).dirichlet(np.ones(60))
    loader = PackedLoader(split, 2048, budget, p, seed=seed, allow_repeat=allow_repeat)

    def agrees(loader: PackedLoader) -> None:
        for k in range(loader.num_tasks):
            ahead = loader._peek(k, 1)
            assert loader._live_mask[k] == loader._has_data(k), (seed, k)
            assert loader._next_length[k] == (split.lengths[ahead[0]] if ahead else -1), (seed, k)

    step = 0
    while loader.next_micro_batch(meta_step=step % 3 == 0) is not None:
        step += 1
        if step % 40 == 0:
            agrees(loader)
            resumed = PackedLoader(split, 2048, budget, p, seed=seed, allow_repeat=allow_repeat)
            resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
            agrees(resumed)
    agrees(loader)
    assert allow_repeat == any(s.epoch > 0 for s in loader.streams), seed  # epochs crossed / tasks ran out
    assert allow_repeat or not loader._live_mask.all(), seed


def test_budget_above_the_data_warns_or_errors(suite):
    total = int(np.asarray(suite.train.lengths).sum())
    p = np.ones(suite.num_tasks) / suite.num_tasks
    with pytest.warns(UserWarning, match="reused"):
        loader = PackedLoader(suite.train, 4096, total + 5000, p)
    drain([loader])
    assert loader.consumed == total + 5000 and loader.stats.reused > 0
    with pytest.raises(DataError, match="allow_repeat"):
        PackedLoader(suite.train, 4096, total + 1, p, allow_repeat=False)


def test_no_repeat_run_uses_each_example_at_most_once(suite):
    total = int(np.asarray(suite.train.lengths).sum())
    p = np.ones(suite.num_tasks) / suite.num_tasks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = PackedLoader(suite.train, 4096, total, p, allow_repeat=False)
    drain([loader])
    assert loader.consumed == total and loader.stats.reused == 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_last_step_cut_to_the_budget_follows_the_mixture(suite, world_size):
    """A budget inside one step: the cut takes items in weighted fair order, so each task gets its share within an
    example (a prefix in plan order, task by task, gave the tasks last in name order nothing)."""
    K = suite.num_tasks
    p = np.arange(1, K + 1, dtype=float)
    p /= p.sum()
    budget = 3000
    loaders = [PackedLoader(suite.train, 4096, budget, p, rank=r, world_size=world_size) for r in range(world_size)]
    drain(loaders)
    got = np.array(loaders[0].stats.tokens_per_task)
    assert got.sum() == budget
    longest = int(np.max(suite.train.lengths))
    assert np.all(np.abs(got - p * budget) <= longest), (got, p * budget)


def test_a_task_that_runs_out_into_the_last_step_keeps_its_share_of_the_cut(tokenizer):
    """allow_repeat false: the small task's last examples are drawn into the final step's pool, so it is no longer
    live there; the cut still gives it half (it gave it nothing: [0, 400])."""
    from adapt_fast.evaluate import tokenize_split

    records = [formats._record(task=t, input="x" * 20, output="y" * 14) for t, n in (("a", 8), ("b", 400))
               for _ in range(n)]  # fmt: skip
    split = tokenize_split(records, tokenizer, ["a", "b"], "ni")
    for allow_repeat in (True, False):
        loader = PackedLoader(split, 2048, 400, np.array([0.5, 0.5]), allow_repeat=allow_repeat)
        drain([loader])
        assert loader.stats.micro_steps == 1 and sum(loader.stats.tokens_per_task) == 400
        assert abs(loader.stats.tokens_per_task[0] - 200) <= 36, (allow_repeat, loader.stats.tokens_per_task)


def test_reuse_counts_examples_fed_twice_not_drawn_into_the_pool(suite):
    """On a task smaller than the look-ahead pool, a budget of half its tokens draws into the pool past the end of
    its first epoch but feeds no example twice: no reuse, no warning (both used to count the draws). Past the data,
    reuse is what pigeonholes force, at least."""
    k = int(np.argmin(suite.train.examples_per_task()))
    p = np.zeros(suite.num_tasks)
    p[k] = 1.0
    tokens = int(suite.train.tokens_per_task()[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = PackedLoader(suite.train, 4 * tokens // 3, tokens // 2, p)
        drain([loader])
    assert loader.consumed == tokens // 2 and loader.streams[k].epoch > 0  # drawn past the first epoch
    assert loader.stats.reused == 0 and loader.stats.examples <= suite.train.examples_per_task()[k]
    with pytest.warns(UserWarning, match="ran out of examples after"):
        loader = PackedLoader(suite.train, 4 * tokens // 3, 2 * tokens, p)
        drain([loader])
    assert loader.stats.reused >= loader.stats.examples - suite.train.examples_per_task()[k] > 0


def test_a_task_running_out_is_reported_once(suite):
    """Under a budget below the data, a uniform mixture runs the smallest task out: with allow_repeat its examples
    are reused and one warning says so (before, only report.json's examples_reused did); without it, the other
    tasks take its share and a warning names it (before, the mixture was silently abandoned)."""
    from adapt_fast.errors import DataWarning

    total = int(np.asarray(suite.train.lengths).sum())
    p = np.ones(suite.num_tasks) / suite.num_tasks
    names = [f"t{k}" for k in range(suite.num_tasks)]
    for allow_repeat, needle in ((True, "ran out of examples after"), (False, "have no training examples left")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = PackedLoader(suite.train, 2048, total * 9 // 10, p, allow_repeat=allow_repeat, task_names=names)
            drain([loader])
        mine = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
        assert mine and all(needle in m for m in mine), mine
        assert any(name in mine[0] for name in names)
        assert len(mine) == 1 if allow_repeat else len(mine) >= 1
        assert (loader.stats.reused > 0) == allow_repeat


def test_data_warnings_print_as_one_warning_line(capsys, monkeypatch):
    from adapt_fast.errors import DataWarning, exit_on_user_error

    @exit_on_user_error
    def command():
        warnings.warn("task x ran out", DataWarning, stacklevel=2)
        return 7

    assert command() == 7
    assert capsys.readouterr().err == "warning: task x ran out\n"
    monkeypatch.setenv("RANK", "1")  # every rank finds the same: only rank 0 says it
    assert command() == 7
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")

    @exit_on_user_error
    def interrupted():  # Ctrl-C while loading or tokenising, before the trainer's own handler: no traceback
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        interrupted()
    assert exc.value.code == 130 and capsys.readouterr().err.startswith("aborted (Ctrl-C): no checkpoint")


def test_largest_remainder():
    assert largest_remainder(10, np.array([1, 1, 1])).tolist() == [4, 3, 3]
    counts = largest_remainder(1001, np.random.default_rng(0).random(7))
    assert counts.sum() == 1001


def test_pack_examples_places_each_once(suite):
    examples = np.arange(0, suite.validation.num_examples)
    batches = pack_examples(suite.validation, examples, 1024)
    assert sum(b.num_examples for b in batches) == len(examples)
    assert all(b.num_tokens <= 1024 for b in batches)


def test_loader_state_round_trip(suite):
    p = np.ones(suite.num_tasks) / suite.num_tasks
    a = PackedLoader(suite.train, 1024, 60_000, p, seed=4)
    for _ in range(7):
        a.next_micro_batch()
    b = PackedLoader(suite.train, 1024, 60_000, p, seed=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == json.loads(json.dumps(a.state_dict()))  # every field restored (leftover waits too)
    rest_a, rest_b = drain([a]), drain([b])
    assert len(rest_a[0]) == len(rest_b[0])
    for x, y in zip(rest_a[0], rest_b[0], strict=True):
        assert x.input_ids.equal(y.input_ids) and x.task_ids.equal(y.task_ids)


# ----------------------------------------------------------------------------- bad input


def run_inspect(*args: str, subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """The inspect command, in a subprocess or (faster) in this process with its exit code and stderr."""
    if subprocess_run:
        cmd = [sys.executable, "-m", "adapt_fast.data", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    import contextlib
    import io

    from adapt_fast.data.__main__ import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path):
    cache = ["--data.cache_dir", str(tmp_path / "cache")]
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "task1.json").write_text('{"Definition": ["x"], "Instances": [')
    result = run_inspect("--data.path", str(bad_json), *cache, subprocess_run=True)
    assert_one_line_error(result, "task1.json", "malformed JSON")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "task2.json").write_text(json.dumps({"Definition": ["x"], "Instances": []}))
    assert_one_line_error(run_inspect("--data.path", str(empty), *cache), "task2.json", "no instances")

    assert_one_line_error(run_inspect("--data.group_by", "nope", *cache), "data.group_by")

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"task": "a", "prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "q"}))
    assert_one_line_error(run_inspect("--data.path", str(jsonl), *cache), "rows.jsonl:2", "response")

    bad_line = tmp_path / "broken.jsonl"
    bad_line.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n{not json\n")
    assert_one_line_error(run_inspect("--data.path", str(bad_line), *cache), "broken.jsonl:2", "malformed JSON")

    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert_one_line_error(run_inspect("--data.path", str(ok), "--data.template", "chat", *cache), "no chat template")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p" * 100, "response": "r"}) + "\n")
    args = ("--data.path", str(long), "--data.max_len", "64", "--data.truncate", "false", "--data.val_fraction", "0")
    assert_one_line_error(run_inspect(*args, *cache), "no training examples left: all 1", "data.max_len (64)")


def test_too_long_examples_are_dropped_and_counted(tmp_path):
    """Counted in the report, and said in one warning line, naming a task that lost every example."""
    rows = [{"task": "a", "prompt": "p" * n, "response": "r"} for n in (10, 20, 500, 30, 600)]
    rows += [{"task": "b", "prompt": "p" * 300, "response": "r"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_inspect(
        "--data.path",
        str(tmp_path / "d.jsonl"),
        "--data.max_len",
        "100",
        "--data.truncate",
        "false",
        "--data.val_fraction",
        "0",
        "--budget.tokens",
        "50",
        "--tokens_per_micro_batch",
        "128",
        "--data.cache_dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dropped_by_max_len"] == 3
    assert report["tasks"]["a"]["train_examples"] == 3
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned[0] == (
        "warning: 3 example(s) longer than data.max_len (100 tokens): 0 cut to it, 3 dropped (data.truncate false); "
        "every example of b was dropped; raise data.max_len to keep them whole"
    ), result.stderr
    assert report["tokens_consumed"] == 50


def test_truncation_mode_keep_end_keeps_the_response_of_a_long_prompt(tmp_path, tokenizer):
    """TRL's truncation_mode: keep_start (the default) cuts the end, so an example whose prompt alone fills max_len
    has no response left and is dropped (the warning says keep_end would keep it); keep_end cuts the prompt's start."""
    ids, mask = list(range(10)), [0] * 7 + [1] * 3
    assert fit_to_max_len(ids, mask, 5, True) == ([], [], "dropped")
    assert fit_to_max_len(ids, mask, 5, True, "keep_end") == ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], "truncated")
    assert fit_to_max_len(ids, mask, 12, True, "keep_end") == (ids, mask, "")

    rows = [{"task": "a", "prompt": "p" * n, "response": "resp"} for n in (10, 20, 500, 30, 600)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ("--data.path", str(tmp_path / "d.jsonl"), "--data.max_len", "100", "--data.val_fraction", "0",
              "--budget.tokens", "50", "--tokens_per_micro_batch", "128",
              "--data.cache_dir", str(tmp_path / "c"))  # fmt: skip
    start = run_inspect(*common)
    assert json.loads(start.stdout)["dropped_by_max_len"] == 2
    assert "data.truncation_mode keep_end would keep their responses" in start.stderr
    end = run_inspect(*common, "--data.truncation_mode", "keep_end")
    report = json.loads(end.stdout)
    assert report["dropped_by_max_len"] == 0 and report["tasks"]["a"]["train_examples"] == 5, end.stderr
    data = build_or_load(tmp_path / "d.jsonl", tokenizer, cache_dir=tmp_path / "c", max_len=100, val_fraction=0.0,
                         truncation_mode="keep_end", progress=False)  # fmt: skip
    longest = int(np.argmax(data.train.lengths))
    example, loss_mask = data.train.example(longest)
    assert len(example) == 100 and tokenizer.decode(example[-5:-1].tolist()) == "resp" and loss_mask[-5:].all()


def test_meta_floors_that_do_not_fit_rotate_and_leave_room_for_p(tmp_path, tokenizer):
    """Long examples, every step a meta step: the floors take at most meta_floor_fraction of a step (the tasks
    that waited longest first), every task still gets its floor every few steps, and the realised shares follow
    p, which they cannot when the floors take all the room they want."""
    write_synthetic_suite(tmp_path / "d", seed=0, examples_per_task=200, tasks=("copy", "reverse", "sort", "uppercase"),
                          num_positive_examples=2)  # fmt: skip
    split = build_or_load(tmp_path / "d", tokenizer, cache_dir=tmp_path / "c", progress=False).train
    capacity = 6 * int(np.median(split.lengths))  # the 4 floors take about 2/3 of a step
    p = np.array([0.55, 0.15, 0.15, 0.15])
    shares = {}
    for fraction in (0.25, 1.0):
        with pytest.warns(UserWarning, match="reused"):
            loader = PackedLoader(split, capacity, 10**9, p, seed=1, meta_floor_fraction=fraction)
        max_age = 0
        for _ in range(300):
            loader.next_micro_batch(meta_step=True)
            max_age = max(max_age, int(loader.floor_age.max()))
        shares[fraction] = np.array(loader.stats.tokens_per_task) / loader.stats.tokens
        assert max_age <= 4  # every task gets its floor at least every 5 meta steps
    assert np.abs(shares[0.25] - p).max() < 0.02, shares
    assert np.abs(shares[1.0] - p).max() > 0.05, shares  # uncapped floors crowd out the mixture
