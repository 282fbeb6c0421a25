"""Evaluation: scoring functions, the trainer's split and prompts, packed loss vs a plain forward, batched
greedy generation, the Python API and the CLI (JSON, table, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adapt_fast.config import Config, save_config
from adapt_fast.data.cache import build_or_load
from adapt_fast.data.synthetic import write_synthetic_suite
from adapt_fast.data.tokenizer import EOS_ID, build_byte_tokenizer
from adapt_fast.errors import DataError
from adapt_fast.evaluate import (
    evaluate,
    exact_match,
    format_table,
    generate_responses,
    lcs_length,
    load_split,
    main,
    prompt_ids,
    references,
    rouge_l,
    rouge_l_max,
    select_records,
    tokenize_split,
    validation_loss,
)
from adapt_fast.model.loading import load_model_and_tokenizer

SUITE_TASKS = ("copy", "reverse", "addition", "keyword")

# ----------------------------------------------------------------------------- scoring


def test_exact_match_normalises_and_takes_any_reference():
    assert exact_match("  Hello   World\n", ["hello world"]) == 1.0
    assert exact_match("b", ["a", "B "]) == 1.0
    assert exact_match("b", "b") == 1.0
    assert exact_match("hello", ["hello world"]) == 0.0
    assert exact_match("", [""]) == 1.0


def test_rouge_l_identical_disjoint_and_hand_computed():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("The  Cat sat", "the cat SAT ") == 1.0  # normalised first
    assert rouge_l("a b c", "d e f") == 0.0
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0 and rouge_l("", " ") == 1.0
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7
    assert rouge_l("a b c", "a x c d") == pytest.approx(4 / 7)
    assert rouge_l_max("a b c", ["d e f", "a x c d", "a b"]) == pytest.approx(0.8)  # best: "a b" (P 2/3, R 1)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example


def test_perfect_predictions_score_one(tmp_path):
    records = load_split(write_synthetic_suite(tmp_path, examples_per_task=8, tasks=SUITE_TASKS))
    for record in records:
        refs = references(record)
        assert refs == [record["output"]]
        assert exact_match(refs[0], refs) == 1.0 and rouge_l_max(refs[0], refs) == 1.0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_synthetic_suite(tmp_path_factory.mktemp("suite"), examples_per_task=12, tasks=SUITE_TASKS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny-llama preset (random init) and its byte tokenizer saved as a plain HF folder."""
    folder = tmp_path_factory.mktemp("model")
    model, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def varied_model():
    """A tiny-llama with large random weights, so greedy outputs differ from token to token."""
    model, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu", seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model, tokenizer


# ----------------------------------------------------------------------------- same split, same tokens, same loss


def test_split_and_tokens_match_the_trainers_cache(suite, tmp_path):
    tokenizer = build_byte_tokenizer()
    for val_fraction, seed in ((0.1, 0), (0.3, 5)):
        records = select_records(load_split(suite, val_fraction=val_fraction, seed=seed), "validation")
        data = build_or_load(suite, tokenizer, val_fraction=val_fraction, seed=seed, cache_dir=tmp_path, progress=False)
        split = tokenize_split(records, tokenizer, data.task_names, "ni")
        for name in ("ids", "loss_mask", "offsets", "task_ids", "loss_tokens"):
            assert np.array_equal(getattr(split, name), getattr(data.validation, name)), name
    # a task filter changes the per-task seeds in the trainer; load_split filters first, as build_or_load does
    records = select_records(load_split(suite, tasks=["copy", "keyword"]), "validation")
    data = build_or_load(suite, tokenizer, tasks=["copy", "keyword"], cache_dir=tmp_path, progress=False)
    split = tokenize_split(records, tokenizer, data.task_names, "ni")
    assert np.array_equal(split.ids, data.validation.ids)


def test_prompt_is_the_training_prompt(suite):
    tokenizer = build_byte_tokenizer()
    record = load_split(suite)[0]
    ids = prompt_ids(record, tokenizer, "ni")
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("Definition: ") and text.endswith(f"Input: {record['input']}\nOutput: ")
    assert ids[0] == tokenizer.bos_token_id


def test_packed_loss_equals_one_example_at_a_time(suite, varied_model):
    model, tokenizer = varied_model
    records = select_records(load_split(suite), "all", max_examples_per_task=3)
    names = sorted({r["task"] for r in records})
    split = tokenize_split(records, tokenizer, names, "ni")
    sums, counts = validation_loss(model, split, tokens_per_micro_batch=256)  # several examples per micro-batch
    ref_sums, ref_counts = np.zeros(len(names)), np.zeros(len(names), dtype=np.int64)
    with torch.no_grad():
        for i in range(split.num_examples):
            ids, mask = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in split.example(i))
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            ce = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            k = int(split.task_ids[i])
            ref_sums[k] += float(ce[mask[1:].bool()].sum())
            ref_counts[k] += int(mask[1:].sum())
    assert np.array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums / counts, ref_sums / ref_counts, rtol=1e-5)


# ----------------------------------------------------------------------------- generation


def test_batched_left_padded_generation_equals_one_at_a_time(suite, varied_model):
    model, tokenizer = varied_model
    records = select_records(load_split(suite), "all", max_examples_per_task=1)
    prompts = [prompt_ids(r, tokenizer, "ni") for r in records]
    assert len({len(p) for p in prompts}) > 1  # rows really get padded
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate_responses(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert len(set(batched)) > 1  # the outputs really differ


class ScriptedLM(torch.nn.Module):
    """Stands in for an HF model: generate() appends a fixed continuation, records what it was given."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.generation_config = SimpleNamespace(eos_token_id=EOS_ID)
        self.continuation = continuation
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        new = torch.tensor(self.continuation[: generation_config.max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_generation_decodes_new_tokens_up_to_eos_with_left_padding():
    tokenizer = build_byte_tokenizer()
    ab = tokenizer.encode("ab", add_special_tokens=False)
    model = ScriptedLM(ab + [EOS_ID] + tokenizer.encode("zz", add_special_tokens=False))
    prompts = [tokenizer.encode("long prompt"), tokenizer.encode("p")]
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=10, batch_size=2) == ["ab", "ab"]
    input_ids, mask, config = model.calls[0]
    assert config.do_sample is False and config.max_new_tokens == 10 and config.eos_token_id == [EOS_ID]
    short = 1 if input_ids.shape[1] > len(prompts[1]) and mask[1, 0] == 0 else 0  # row of the short prompt
    assert mask[short].tolist() == [0] * (input_ids.shape[1] - len(prompts[1])) + [1] * len(prompts[1])  # left pad
    assert input_ids[short, -len(prompts[1]) :].tolist() == prompts[1]
    assert generate_responses(model, tokenizer, prompts[:1], max_new_tokens=1, batch_size=1) == ["a"]


# ----------------------------------------------------------------------------- API and CLI


def test_evaluate_in_process(suite, model_dir):
    model, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu")
    model.set_attn_implementation("sdpa")
    model.train()
    records = select_records(load_split(suite), "validation", max_examples_per_task=2)
    result = evaluate(
        model, tokenizer, records, generate=True, max_new_tokens=3, batch_size=4, tokens_per_micro_batch=512,
        return_predictions=True,
    )  # fmt: skip
    assert model.training and model.config._attn_implementation == "sdpa"  # restored
    assert set(result["tasks"]) == set(SUITE_TASKS)
    for task in result["tasks"].values():
        assert set(task) == {"examples", "loss_tokens", "val_loss", "exact_match", "rouge_l"}
        assert task["examples"] >= 1 and task["loss_tokens"] > 0
        assert 3.0 < task["val_loss"] < 8.0  # about log(264) for a random model
        assert 0.0 <= task["exact_match"] <= 1.0 and 0.0 <= task["rouge_l"] <= 1.0
    losses = [t["val_loss"] for t in result["tasks"].values()]
    assert result["mean"]["val_loss"] == pytest.approx(np.mean(losses))
    assert result["worst"]["val_loss"] == pytest.approx(max(losses))
    assert len(result["predictions"]) == len(records) == result["overall"]["examples"]
    table = format_table(result)
    assert all(name in table for name in SUITE_TASKS) and "mean" in table and "worst" in table
    assert "val loss" in table.splitlines()[0]
    short = format_table(result, most=3).splitlines()  # more tasks than `most`: the highest-loss one, then a note
    assert short[2].split()[0] == max(result["tasks"], key=lambda n: result["tasks"][n]["val_loss"]), short
    assert f"the 1 of {len(SUITE_TASKS)} tasks with the highest loss" in short[3] and short[-1].startswith("worst")

    loss_only = evaluate(model, tokenizer, records, generate=False, max_new_tokens=4, batch_size=4,
                         tokens_per_micro_batch=512)  # fmt: skip
    assert "exact_match" not in loss_only["tasks"]["copy"] and "exact_match" not in loss_only["mean"]
    assert loss_only["tasks"]["copy"]["val_loss"] == pytest.approx(result["tasks"]["copy"]["val_loss"])


def test_cli_generate_writes_json(suite, model_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapt_fast.evaluate", "--model", str(model_dir), "--data", str(suite), "--generate",
         "--max_new_tokens", "3", "--max_examples_per_task", "2", "--tokens_per_micro_batch", "256", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) >= {"tasks", "mean", "worst", "overall", "settings"}
    assert set(result["tasks"]) == set(SUITE_TASKS)
    assert all({"val_loss", "exact_match", "rouge_l"} <= set(t) for t in result["tasks"].values())
    assert all(t["examples"] <= 2 for t in result["tasks"].values())
    assert "ROUGE-L" in proc.stderr and "worst" in proc.stderr


def test_split_test_scores_the_datas_test_rows_that_training_never_reads(model_dir, tmp_path):
    """--split test: exactly the rows marked test; keeping them does not move the train/validation split; `all` is
    train + validation. A test split without answers (hidden labels) does not stop the trainer's loading."""
    rows = [{"task": t, "prompt": f"{t} {i}", "response": "r", "split": ""} for t in "ab" for i in range(10)]
    rows += [{"task": t, "prompt": f"{t} test {i}", "response": "t", "split": "test"} for t in "ab" for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = load_split(data, val_fraction=0.2, seed=5)
    kept = load_split(data, val_fraction=0.2, seed=5, keep_test=True)
    assert [r for r in kept if r["split"] != "test"] == trained and len(trained) == 20
    assert sorted(r["input"] for r in kept if r["split"] == "test") == sorted(r["prompt"] for r in rows[20:])
    assert len(select_records(kept, "all")) == 20 and len(select_records(kept, "test")) == 6
    result = main(
        ["--model", str(model_dir), "--data", str(data), "--split", "test", "--tokens_per_micro_batch", "256"]
    )
    assert result["overall"]["examples"] == 6 and set(result["tasks"]) == {"a", "b"}
    assert "test loss" in format_table(result).splitlines()[0]  # the column names the split scored

    hidden = tmp_path / "hidden.jsonl"
    unanswered = {"task": "", "prompt": "?", "split": "test"}  # no answer, not even a task name: never read
    hidden.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:20], unanswered]))
    assert [(r["input"], r["split"]) for r in load_split(hidden, val_fraction=0.2, seed=5)] == [
        (r["input"], r["split"]) for r in trained
    ]
    with pytest.raises(DataError, match="hidden.jsonl:21: task column 'task' is empty"):  # read for --split test
        load_split(hidden, keep_test=True)
    (tmp_path / "only_test.jsonl").write_text(json.dumps(unanswered) + "\n")
    with pytest.raises(DataError, match="no examples outside the data's test split"):
        load_split(tmp_path / "only_test.jsonl")

    # NI task files: a test instance without an output, and a file whose instances are all test, do not stop training
    ni = tmp_path / "ni"
    ni.mkdir()
    task = {"Definition": ["d"], "Categories": ["c"], "Positive Examples": []}
    instances = [{"input": f"i{i}", "output": ["o"]} for i in range(6)] + [{"input": "hidden", "split": "test"}]
    (ni / "task1.json").write_text(json.dumps({**task, "Instances": instances}))
    all_test = [{"input": "x", "output": ["y"], "split": "test"}]
    (ni / "task2.json").write_text(json.dumps({**task, "Instances": all_test}))
    assert sorted({r["task"] for r in load_split(ni)}) == ["task1"] and len(load_split(ni)) == 6
    with pytest.raises(DataError, match="instance 6 lacks 'input' or 'output'"):
        load_split(ni, keep_test=True)


def test_cli_takes_split_settings_from_a_run_config(suite, model_dir, tmp_path, capsys):
    cfg = Config()
    cfg.data.path, cfg.data.val_fraction, cfg.data.tasks, cfg.seed = str(suite), 0.25, ["copy", "addition"], 3
    save_config(cfg, tmp_path / "config.yaml")
    result = main(["--model", str(model_dir), "--config", str(tmp_path / "config.yaml"), "--seed", "4"])
    assert set(result["tasks"]) == {"copy", "addition"}
    assert result["settings"]["val_fraction"] == 0.25 and result["settings"]["seed"] == 4  # the flag wins
    expected = select_records(load_split(suite, tasks=["copy", "addition"], val_fraction=0.25, seed=4), "validation")
    assert result["overall"]["examples"] == len(expected)
    assert json.loads(capsys.readouterr().out)["tasks"].keys() == result["tasks"].keys()  # JSON on stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/no_model", "--data", "{suite}"], "no_model"),
        (["--model", "{tmp}", "--data", "{suite}"], "not a model folder"),  # checked before its tokenizer files
        (["--model", "{model}", "--tokenizer", "{tmp}", "--data", "{suite}"], "--tokenizer"),
        (["--model", "{model}", "--data", "{tmp}/no_data"], "no_data: no such file or folder"),
        (["--model", "{model}", "--data", "{tmp}/bad.jsonl"], "bad.jsonl:1: malformed JSON"),
        (["--model", "{model}", "--data", "{suite}", "--split", "test"], "no examples in split 'test' (none of"),
        (["--model", "{model}", "--data", "{suite}", "--split", "tests"], "invalid choice"),
        (["--model", "{model}", "--data", "{suite}", "--tasks", "nope"], "tasks not in the data: nope"),
        (["--data", "{suite}"], "--model"),
    ],
)
def test_cli_errors_are_one_line(args, message, suite, model_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    argv = [a.format(tmp=tmp_path, suite=suite, model=model_dir) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


# ----------------------------------------------------------------------------- CLI: checked before anything is loaded


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if the CLI loads the data or the model: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded data or a model before checking the arguments")

    monkeypatch.setattr("adapt_fast.evaluate.load_split", refuse)
    monkeypatch.setattr("adapt_fast.evaluate._load_model", refuse)


def _one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "device, message",
    [
        pytest.param("cuda", "no cuda device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
        ("cuda:99", "cuda:99"),
        ("gpu", "not a device"),
        ("cuda:x", "not a device"),
        ("", "not a device"),
        ("meta", "not supported"),
    ],
)
def test_cli_refuses_an_unusable_device_up_front(device, message, suite, capsys, nothing_loaded):
    err = _one_line_error(["--model", "tiny-llama", "--data", str(suite), "--device", device], capsys)
    assert "--device" in err and message in err


def test_cli_subprocess_cuda_without_cuda_is_one_line(suite):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["--model", "tiny-llama", "--data", str(suite), "--device", "cuda"]
    proc = subprocess.run([sys.executable, "-m", "adapt_fast.evaluate", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --device 'cuda'") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(
    "out, message",
    [
        ("{tmp}/missing/result.json", "no such folder"),
        ("{tmp}", "is a folder"),
        ("{tmp}/a_file/result.json", "is not a folder"),
        ("{suite}/tasks.jsonl", "is the --data file"),
    ],
)
def test_cli_checks_out_before_evaluating(out, message, tmp_path, capsys, nothing_loaded):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "suite").mkdir()
    data = tmp_path / "suite" / "tasks.jsonl"
    data.write_text('{"task": "t", "input": "a", "output": "b"}\n')
    out = out.format(tmp=tmp_path, suite=tmp_path / "suite")
    data_arg = str(data) if "tasks.jsonl" in out else str(tmp_path / "suite")
    err = _one_line_error(["--model", "tiny-llama", "--data", data_arg, "--generate", "--out", out], capsys)
    assert "--out" in err and message in err
    assert data.read_text() == '{"task": "t", "input": "a", "output": "b"}\n'  # not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "suite"]  # no probe file left behind


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_cli_refuses_an_unwritable_out_folder(suite, tmp_path, capsys, nothing_loaded):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = _one_line_error(["--model", "tiny-llama", "--data", str(suite), "--out", str(locked / "r.json")], capsys)
    finally:
        locked.chmod(0o700)
    assert "cannot write" in err


def test_cli_out_check_leaves_an_existing_file_alone(suite, tmp_path, monkeypatch):
    """The up-front check of an existing --out neither truncates nor replaces it (only the final write does)."""
    from adapt_fast.evaluate import check_out

    out = tmp_path / "result.json"
    out.write_text("previous\n")
    check_out(str(out), str(suite))
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_cli_keeps_the_result_when_out_breaks_during_the_run(suite, tmp_path, capsys, monkeypatch):
    """--out passes the check, then its folder goes away while evaluating: the JSON still reaches stdout."""
    folder = tmp_path / "results"
    folder.mkdir()
    tokenizer = build_byte_tokenizer()
    monkeypatch.setattr("adapt_fast.evaluate._load_model", lambda *a: (None, tokenizer))

    def fake_evaluate(model, tokenizer, records, **kwargs):
        folder.rmdir()
        return {"tasks": {}, "mean": {}, "worst": {}, "overall": {"examples": len(records)}}

    monkeypatch.setattr("adapt_fast.evaluate.evaluate", fake_evaluate)
    monkeypatch.setattr("adapt_fast.evaluate.format_table", lambda result: "table")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny-llama", "--data", str(suite), "--out", str(folder / "r.json")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["overall"]["examples"] > 0
    assert captured.err.endswith("error: " + str(folder / "r.json") + ": cannot write (No such file or directory); "
                                 "the JSON result is on stdout\n")  # fmt: skip


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--val_examples", "-3", "--val_examples must be >= 0, got -3"),
        ("--num_positive_examples", "-1", "--num_positive_examples must be >= 0"),
        ("--seed", "-1", "--seed must be >= 0"),
        ("--max_examples_per_task", "-1", "--max_examples_per_task must be >= 0"),
        ("--max_len", "1", "--max_len must be >= 2"),
        ("--max_new_tokens", "0", "--max_new_tokens must be >= 1"),
        ("--batch_size", "0", "--batch_size must be >= 1"),
        ("--tokens_per_micro_batch", "-5", "--tokens_per_micro_batch must be >= 1"),
        ("--val_fraction", "nan", "--val_fraction must be in [0, 1)"),
        ("--val_examples", "2.5", "invalid int value"),
    ],
)
def test_cli_refuses_bad_numbers_up_front(flag, value, message, suite, capsys, nothing_loaded):
    err = _one_line_error(["--model", "tiny-llama", "--data", str(suite), flag, value], capsys)
    assert message in err


def test_cli_names_the_config_field_of_a_bad_config_value(suite, tmp_path, capsys, nothing_loaded):
    cfg = Config()
    cfg.data.path, cfg.seed = str(suite), -2  # the config's own check names the field
    save_config(cfg, tmp_path / "config.yaml")
    err = _one_line_error(["--model", "tiny-llama", "--config", str(tmp_path / "config.yaml")], capsys)
    assert "seed must be >= 0" in err and "got -2" in err
