"""The trainer end to end on CPU: static shares, ADAPT's direction, DeepSpeed with 2 ranks, outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapt_fast.mixture import static_mixture
from adapt_fast.train import main

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--tokens_per_micro_batch", "1024",
    "--data.max_len", "512",
    "--data.synthetic_examples", "120",
    "--training.warmup_steps", "2",
]  # fmt: skip


def train(tmp_path: Path, name: str, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    report = main([*SMALL, "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), *args])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return report, rows


@pytest.mark.parametrize(
    "method,extra",
    [
        ("uniform", []),
        ("proportional", []),
        ("temperature", ["--mixture.temperature", "3"]),
        ("fixed", ["--mixture.weights", "copy=3,addition=1,keyword=0,random_output=1,reverse=2,sort=1"]),
    ],
)
def test_static_methods_give_their_shares(tmp_path, method, extra):
    report, rows = train(tmp_path, method, "--mixture.method", method, "--budget.tokens", "30000", *extra)
    assert report["tokens_consumed"] == 30000
    names = list(report["tokens_per_task"])
    expected = np.array([rows[0]["mixture"][n] for n in names])
    if method == "uniform":
        assert np.allclose(expected, 1 / len(names))
    if method == "fixed":
        w = np.array([1, 3, 0, 1, 2, 1], dtype=float)  # tasks in name order
        assert np.allclose(expected, w / w.sum())
    assert all(r["mixture"] == rows[0]["mixture"] for r in rows)
    shares = np.array([report["tokens_per_task"][n] for n in names]) / report["tokens_consumed"]
    assert np.abs(shares - expected).max() < 0.03, (shares, expected)


def test_proportional_and_temperature_match_the_data(tmp_path):
    report, rows = train(tmp_path, "prop", "--mixture.method", "temperature", "--budget.tokens", "2000")
    names = list(report["tokens_per_task"])
    from adapt_fast.config import load_config
    from adapt_fast.data.prepare import load_data, load_tokenizer

    cfg = load_config(None, [*SMALL, "--data.cache_dir", str(tmp_path / "cache")])
    data = load_data(cfg, load_tokenizer(cfg), progress=False)
    train_split = data.train
    p = static_mixture("temperature", train_split.tokens_per_task(), train_split.examples_per_task(), names, 2.0)
    assert np.allclose([rows[0]["mixture"][n] for n in names], p)


def test_loss_budget_plans_the_schedule_for_the_mixture_it_trains_on(tmp_path):
    """budget.unit loss: a step's loss tokens depend on which tasks fill it (copy answers at length, keyword in a
    word). The linear schedule reaches its floor at the last step, not early (planned for the whole data's loss
    share, a run mostly on keyword took more steps than planned and spent the last quarter of them at the floor)."""
    report, rows = train(
        tmp_path, "loss_unit", "--data.tasks", "copy,keyword", "--mixture.method", "fixed",
        "--mixture.weights", "copy=1,keyword=6", "--budget.unit", "loss", "--budget.tokens", "3000",
        "--training.lr_schedule", "linear", "--training.lr", "1e-3", "--training.min_lr_ratio", "0.1",
    )  # fmt: skip
    assert report["loss_tokens_consumed"] == 3000 and len(rows) >= 8
    assert_schedule_ends_at_the_last_step(rows)

    # a task with validation examples only: its share of p goes to the others, so it plans no steps
    data = tmp_path / "val_only.jsonl"
    rows_in = [{"task": t, "prompt": "p" * 30, "response": "r" * n, "split": s}
               for t, n, splits in (("a", 20, ["train"] * 60 + ["validation"] * 2), ("b", 2, ["train"] * 60),
                                    ("c", 5, ["validation"] * 3))
               for s in splits]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    report, rows = train(
        tmp_path, "val_only", "--data.path", str(data), "--mixture.method", "uniform", "--budget.unit", "loss",
        "--budget.tokens", "1500", "--training.lr_schedule", "linear", "--training.lr", "1e-3",
        "--training.min_lr_ratio", "0.1", "--tokens_per_micro_batch", "512",
    )  # fmt: skip
    assert report["loss_tokens_consumed"] == 1500 and report["tokens_per_task"]["c"] == 0 and len(rows) >= 8
    assert_schedule_ends_at_the_last_step(rows)


def assert_schedule_ends_at_the_last_step(rows: list[dict], lr: float = 1e-3, floor: float = 1e-4) -> None:
    """A linear schedule planned for the run's real length: at most one step at the floor, the last one near it."""
    at_floor = [r["step"] for r in rows if r["lr"] <= floor * (1 + 1e-9)]
    assert len(at_floor) <= 1, (at_floor, len(rows))
    assert rows[-1]["lr"] < floor + 0.35 * (lr - floor), [r["lr"] for r in rows]  # near the end of the decay


def test_outputs_and_final_model_generate(tmp_path):
    report, rows = train(tmp_path, "run", "--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2")
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "mixture.csv", "mixture.png", "val_loss.png", "report.json"):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "final_val_loss/mean", "final_val_loss/worst"} <= set(tags)
    for name, loss in report["val_loss_per_task"].items():  # the whole split's losses, at the last step
        (final,) = events.Scalars(f"final_val_loss/{name}")
        assert final.step == report["steps"] and final.value == pytest.approx(loss, rel=1e-6)
    # the finished run resumed: nothing to train, its final validation not logged a second time
    train(tmp_path, "run", "--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2", "--resume")
    assert len(EventAccumulator(str(out / "tensorboard")).Reload().Scalars("final_val_loss/mean")) == 1
    for key in (
        "method", "budget_tokens", "tokens_consumed", "tokens_per_task", "validation_tokens", "padding_fraction",
        "steps", "mixture_final", "val_loss_per_task", "wall_seconds", "train_tokens_per_second",
    ):  # fmt: skip
        assert key in report, key
    assert report["tokens_consumed"] == 6000 == rows[-1]["tokens_consumed"]
    assert any("val_loss" in r for r in rows) and any("meta_dots" in r for r in rows)
    assert all({"step", "tokens_consumed", "loss", "lr", "mixture"} <= set(r) for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("Definition: Repeat the input string exactly.\n\nInput: abc\nOutput: ", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_adapt_moves_tokens_away_from_the_random_task(tmp_path):
    # Two learnable tasks form the objective; random outputs (letters) pull the model away from
    # their answers (yes/no, digits), so d_random turns negative and its share falls well below 1/3.
    # (copy/reverse are not learned by this tiny model within a CPU test's budget: all d are noise.)
    report, rows = train(
        tmp_path,
        "adapt",
        "--data.tasks", "keyword,addition,random_output",
        "--meta.val_tasks", "keyword,addition",
        "--budget.tokens", "40000",
        "--training.lr", "3e-3",
        "--meta.warmup", "3",
        "--meta.val_every", "4",
        "--mixture.lr", "0.1",
    )  # fmt: skip
    final = report["mixture_final"]
    assert final["random_output"] < 0.5 / 3, final
    assert report["tokens_per_task"]["random_output"] < min(
        report["tokens_per_task"]["keyword"], report["tokens_per_task"]["addition"]
    )


def test_relative_loss_divides_by_the_losses_at_theta_0(tmp_path, monkeypatch):
    """l_k(theta_0) is step 0's validation loss even when the first G comes after meta.warmup steps."""
    from adapt_fast.mixture.adapt import AdaptMixture

    references = []
    real = AdaptMixture.objective_weights

    def recording(self, val_losses):
        out = real(self, val_losses)
        references.append(self.l0.copy())
        return out

    monkeypatch.setattr(AdaptMixture, "objective_weights", recording)
    report, rows = train(
        tmp_path, "relative", "--mixture.relative_loss", "true", "--meta.val_every", "2", "--meta.warmup", "3",
        "--training.max_steps", "4", "--budget.tokens", "30000",
    )  # fmt: skip
    assert len(references) == 1 and "val_loss" in rows[2] and "meta_dots" in rows[3]  # G at step 2, update at 3
    at_theta_0 = [rows[0]["val_loss"][name] for name in sorted(rows[0]["val_loss"])]
    assert references[0].tolist() == at_theta_0
    assert references[0].tolist() != [rows[2]["val_loss"][name] for name in sorted(rows[2]["val_loss"])]


def test_adapt_starts_from_the_users_weights(tmp_path):
    """mixture.prior fixed: p_0 = (1 - eps) * weights / sum(weights) + eps / K, a task left out at eps / K."""
    weights = {"copy": 3.0, "addition": 1.0, "keyword": 0.0, "random_output": 1.0, "reverse": 2.0}
    spec = ",".join(f"{k}={v}" for k, v in weights.items())
    _, rows = train(tmp_path, "prior", "--mixture.prior", "fixed", "--mixture.weights", spec,
                    "--training.max_steps", "1", "--budget.tokens", "30000")  # fmt: skip
    total, eps, K = sum(weights.values()), 0.05, 6
    expected = {name: (1 - eps) * weights.get(name, 0.0) / total + eps / K for name in rows[0]["mixture"]}
    assert rows[0]["mixture"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_lr_schedules():
    from adapt_fast.train import lr_lambda

    for schedule, middle in (("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)):
        f = lr_lambda(warmup_steps=4, total_steps=104, min_ratio=0.1, schedule=schedule)
        assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # warm-up, then the peak at step 4
        assert f(4) == 1.0 and np.isclose(f(54), middle) and np.isclose(f(104), 0.1 if middle < 1 else 1.0)
        assert f(200) == f(104)  # past the estimate: held at the end value
    cosine, linear = (lr_lambda(0, 100, 0.0, s) for s in ("cosine", "linear"))
    assert cosine(25) > linear(25) and cosine(75) < linear(75)  # cosine stays high longer, then drops faster


def test_bad_config_is_one_line_exit_2(tmp_path):
    for args, needle in (
        (["--nope.field", "1"], "unknown config key"),
        (["--budget.tokens", "-5"], "budget"),
        (["--mixture.method", "magic"], "mixture.method"),
        (["--meta.val_tasks", "copy,not_a_task"], "not_a_task"),
        (["--model.name", "no-such-model"], "no-such-model"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "adapt_fast.train", *args, "--output_dir", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert needle in result.stderr.strip().splitlines()[-1], result.stderr[-500:]


def zero3_all_partitioned(tmp_path: Path) -> str:
    """A DeepSpeed JSON that keeps every weight partitioned under ZeRO-3 (tiny models' weights would otherwise all
    be persistent, i.e. whole on every rank): the ghost hooks then meet weights that are not gathered."""
    path = tmp_path / "ds_zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "auto", "stage3_param_persistence_threshold": 0}}))
    return str(path)


def rows_agree(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics rows agree: losses (rtol 1e-5), meta dots (1e-3 of the largest), mixtures (1e-5)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        loss_x, loss_y = (np.nan if r["loss"] is None else r["loss"] for r in (x, y))  # null: no loss tokens
        assert np.isclose(loss_x, loss_y, rtol=1e-5, equal_nan=True)
        assert x.keys() == y.keys()
        if "meta_dots" in x:
            u, v = (np.array(list(r["meta_dots"].values()), dtype=float) for r in (x, y))
            ok = np.isfinite(v)
            assert np.array_equal(np.isfinite(u), ok), (u, v)
            assert np.abs(u[ok] - v[ok]).max(initial=0) <= 1e-3 * np.abs(v[ok]).max(initial=0), (u, v)
        assert np.allclose(list(x["mixture"].values()), list(y["mixture"].values()), atol=1e-5)


@pytest.mark.skipif(shutil.which("deepspeed", path=str(Path(sys.executable).parent)) is None, reason="no launcher")
def test_two_rank_deepspeed_adapt_zero2_and_zero3(tmp_path):
    """2 ranks through the deepspeed launcher, 2 micro-batches per step: ADAPT under ZeRO-2, and under ZeRO-3 with
    every weight partitioned (G in partitions too, gathered per layer); both learn the mixture, and the two runs
    agree step by step."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = {}
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        result = subprocess.run(
            [
                launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000 + stage),
                "adapt_fast/train.py", *SMALL, "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
                "--budget.tokens", "12345", "--training.zero_stage", str(stage), "--meta.warmup", "1",
                "--meta.val_every", "2", "--training.deepspeed_config", zero3_all_partitioned(tmp_path),
                "--training.grad_accum", "2",
            ],
            capture_output=True, text=True, cwd=REPO, timeout=900, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["world_size"] == 2
        assert report["tokens_consumed"] == 12345
        assert report["mixture_identical_across_ranks"] is True
        rows[stage] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("meta_dots" in r for r in rows[stage])
        assert report["mixture_final"] != rows[stage][0]["mixture"]  # the mixture was learned, not left alone
    rows_agree(rows[3], rows[2])


def test_one_pass_dots_match_exact_in_the_trainer(tmp_path):
    common = ["--budget.tokens", "5000", "--meta.warmup", "1", "--meta.val_every", "2", "--training.max_steps", "4"]
    _, one_pass = train(tmp_path, "one_pass", *common)
    _, exact = train(tmp_path, "exact", *common, "--meta.dots", "exact")
    compared = 0
    for a, b in zip(one_pass, exact, strict=True):
        if "meta_dots" not in a:
            continue
        x = np.array(list(a["meta_dots"].values()), dtype=float)
        y = np.array(list(b["meta_dots"].values()), dtype=float)
        ok = np.isfinite(y)
        assert np.abs(x[ok] - y[ok]).max() <= 1e-3 * np.abs(y[ok]).max(), (x, y)
        compared += 1
    assert compared >= 2


def test_preconditioned_dots_agree_across_zero_stages(tmp_path):
    """meta.precondition adam reads AdamW's second moments where DeepSpeed keeps them: the torch optimizer (ZeRO-0),
    gathered fp32 partitions (ZeRO-2), this rank's partition laid out like G's (ZeRO-3, every weight partitioned),
    the fp32 master copies (ZeRO-0 in bf16, whose wrapper steps AdamW once at start-up on zero gradients)."""
    common = ["--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2", "--meta.precondition", "adam"]
    common += ["--training.deepspeed_config", zero3_all_partitioned(tmp_path)]
    report, rows0 = train(tmp_path, "pre0", *common)
    assert report["tokens_consumed"] == 6000
    dots = [np.array(list(r["meta_dots"].values()), dtype=float) for r in rows0 if "meta_dots" in r]
    assert len(dots) >= 4
    assert np.nanmax(np.abs(dots[-1])) > 10 * np.nanmax(np.abs(dots[0]))  # P = 1/(sqrt(v) + eps) is large here
    for stage in (2, 3):
        _, rows = train(tmp_path, f"pre{stage}", *common, "--training.zero_stage", str(stage))
        rows_agree(rows, rows0)
    _, bf16 = train(tmp_path, "bf16", *common, "--model.dtype", "bfloat16")
    first = [np.array(list(r["meta_dots"].values()), dtype=float) for r in bf16 if "meta_dots" in r][0]  # no P yet
    assert np.allclose(first, dots[0], rtol=0.1, equal_nan=True), (first, dots[0])  # nan: a floor left for later


def test_train_mode_eval_mode_and_gradient_checkpointing(tmp_path, monkeypatch):
    """A model from a folder (from_pretrained leaves it in eval mode) trains in training mode and is measured
    in eval mode, as under HF Trainer; training.gradient_checkpointing recomputes the decoder layers in the
    backward and changes nothing else (losses, meta dots, mixture)."""
    import torch

    import adapt_fast.model.ghost as ghost_module
    import adapt_fast.model.loss as loss_module
    from adapt_fast.model.loading import base_model, load_model_and_tokenizer, unwrap

    folder = tmp_path / "model"
    for part in load_model_and_tokenizer("tiny-llama", seed=3):
        part.save_pretrained(folder)
    calls: list[tuple[bool, bool]] = []  # (gradients enabled, model in training mode) per loss forward
    layer_runs = [0]  # forwards of the first decoder layer's MLP, recomputes included
    hooked: set[int] = set()
    original = loss_module.per_task_loss

    def recording(model, *args, **kwargs):
        module = unwrap(model)
        if id(module) not in hooked:
            hooked.add(id(module))
            mlp = base_model(module).layers[0].mlp  # a submodule: the layer's own hooks stay outside the checkpoint
            mlp.register_forward_pre_hook(lambda *_: layer_runs.__setitem__(0, layer_runs[0] + 1))
        calls.append((torch.is_grad_enabled(), module.training))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(loss_module, "per_task_loss", recording)
    monkeypatch.setattr(ghost_module, "per_task_loss", recording)
    common = ["--model.name", str(folder), "--budget.tokens", "5000", "--meta.warmup", "1", "--meta.val_every", "2",
              "--training.max_steps", "4"]  # fmt: skip
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        layer_runs[0] = 0
        name = f"gc_{checkpointing}"
        runs[checkpointing] = (*train(tmp_path, name, *common, "--training.gradient_checkpointing", str(checkpointing)),
                               layer_runs[0], sum(grad for grad, _ in calls))  # fmt: skip
        assert {mode for grad, mode in calls if grad} == {True}  # training steps and G
        assert {mode for grad, mode in calls if not grad} == {False}  # validation losses
    (report, rows, mlp_runs, _), (report_gc, rows_gc, mlp_runs_gc, backward_passes) = runs[False], runs[True]
    assert mlp_runs_gc == mlp_runs + backward_passes  # each forward with gradients ran layer 0 again in its backward
    assert len(rows) == len(rows_gc) == 4
    for a, b in zip(rows, rows_gc, strict=True):
        assert np.isclose(a["loss"], b["loss"], rtol=1e-6)
        if "meta_dots" in a:
            x, y = (np.array(list(r["meta_dots"].values()), dtype=float) for r in (a, b))
            assert np.allclose(x, y, rtol=1e-5, atol=1e-9 * np.nanmax(np.abs(x)), equal_nan=True)
    assert np.allclose(list(report["mixture_final"].values()), list(report_gc["mixture_final"].values()), rtol=1e-6)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    """Every key of the example configs is a field of today's Config (their placeholder paths replaced)."""
    import yaml

    from adapt_fast.config import load_config

    cfg = load_config(str(path), ["--data.path", "", "--model.name", "tiny-llama"])
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
            if (section, key) not in (("data", "path"), ("model", "name")):
                field = getattr(cfg, section) if key is None else getattr(getattr(cfg, section), key)
                assert field == value, (section, key)


def test_zero3_adapt_equals_zero0(tmp_path):
    """ADAPT under ZeRO-3 (one rank, every weight partitioned) on Gemma 3 (tied, soft-capped head, scaled
    embedding dotted by jvp with its weight gathered in the backward), 2 micro-batches per step: the same losses,
    meta dots and mixtures as ZeRO-0."""
    common = ["--model.name", "tiny-gemma3", "--budget.tokens", "9000", "--meta.warmup", "1", "--meta.val_every", "2"]
    common += ["--training.deepspeed_config", zero3_all_partitioned(tmp_path), "--training.grad_accum", "2"]
    _, rows0 = train(tmp_path, "z0", *common)
    _, rows3 = train(tmp_path, "z3", *common, "--training.zero_stage", "3")
    assert sum("meta_dots" in r for r in rows3) >= 3
    rows_agree(rows3, rows0)


def test_deepspeed_config_is_merged_and_conflicts_are_refused(tmp_path):
    from adapt_fast.config import load_config
    from adapt_fast.errors import ConfigError
    from adapt_fast.train import merge_deepspeed_config

    # a run's config.yaml stays readable (evaluate) where its DeepSpeed JSON is not: only the trainer needs the file
    assert load_config(None, ["--training.deepspeed_config", "/no/such.json"]).training.deepspeed_config

    ours = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
        "communication_data_type": "fp32",
    }))  # fmt: skip
    merged = merge_deepspeed_config(ours, str(path))
    assert merged == {
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False}, "communication_data_type": "fp32",
        "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
    }  # fmt: skip
    assert ours["zero_optimization"] == {"stage": 2}  # not modified
    hf_style = {  # HF's documented ZeRO-2 config: optimizer and scheduler blocks whose every value is "auto"
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": "auto", "overlap_comm": True}, "train_batch_size": "auto",
    }  # fmt: skip
    path.write_text(json.dumps(hf_style))
    assert merge_deepspeed_config(ours, str(path)) == {**ours, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    for text, needle in (
        ('{"zero_optimization": {"stage": 3}}', "zero_optimization.stage is 3"),
        ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps is 4"),
        ('{"wall_clock_breakdown": 1, "gradient_clipping": 2.0}', "but the trainer sets it itself"),
        ('{"optimizer": {"type": "Lamb"}}', "optimizer type Lamb"),
        ('{"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}}', "optimizer.params.lr is 3e-05"),
        ('{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}}', "training.warmup_steps"),
        ('{"bf16": {"enabled": true}}', "bf16.enabled is true"),
        ("[1, 2]", "must hold a JSON object"),
        ("{nope", "is not valid JSON"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match="training.deepspeed_config: ") as err:
            merge_deepspeed_config(ours, str(path))
        assert needle in str(err.value), (text, str(err.value))


def test_zero_offload_uses_deepspeed_cpu_adam_and_equals_zero2(tmp_path):
    """A DeepSpeed JSON that offloads the optimizer gets DeepSpeed's CPU Adam (AdamW mode; DeepSpeed refuses torch's
    AdamW there): the run, preconditioned meta dots included (moments on the CPU), equals ZeRO-2 without offload."""
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    common = ["--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2", "--meta.precondition", "adam"]
    common += ["--training.zero_stage", "2"]
    _, plain = train(tmp_path, "plain", *common)
    _, offloaded = train(tmp_path, "offload", *common, "--training.deepspeed_config", str(offload))
    rows_agree(offloaded, plain)


def test_bf16_zero0_adamw_counts_only_real_steps(tmp_path):
    """In bf16 at ZeRO-0 DeepSpeed's wrapper steps AdamW once on zero gradients at start-up; left counted, the bias
    correction made the first update 0.73x as large (loss after it 1e-3 above ZeRO-2's). Now the two agree."""
    common = ["--mixture.method", "uniform", "--budget.tokens", "6000", "--model.dtype", "bfloat16"]
    _, rows0 = train(tmp_path, "bf16_z0", *common)
    _, rows2 = train(tmp_path, "bf16_z2", *common, "--training.zero_stage", "2")
    assert len(rows0) == 6
    assert np.allclose([r["loss"] for r in rows0], [r["loss"] for r in rows2], rtol=2e-4, atol=0)


def test_shipped_deepspeed_json_runs(tmp_path):
    """configs/deepspeed_zero3.json (HF-style "auto" for what the trainer sets) is accepted by DeepSpeed as is."""
    report, rows = train(
        tmp_path, "ds_json", "--training.zero_stage", "3", "--training.max_steps", "3", "--meta.warmup", "1",
        "--training.deepspeed_config", str(REPO / "configs" / "deepspeed_zero3.json"),
    )  # fmt: skip
    assert report["steps"] == 3 and "meta_dots" in rows[-1]
    given = json.loads((tmp_path / "ds_json" / "deepspeed_config.json").read_text())
    assert given["zero_optimization"]["stage"] == 3 and given["zero_optimization"]["overlap_comm"] is True
    assert given["train_micro_batch_size_per_gpu"] == 1 and given["bf16"] == {"enabled": False}  # "auto" resolved


def test_deepspeed_refusing_the_json_is_one_line_exit_2(tmp_path):
    """DeepSpeed validates its config in deepspeed.initialize, and under ZeRO-3 already in zero.Init while a model
    folder loads: both refusals are one error line."""
    from adapt_fast.model.loading import load_model_and_tokenizer

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": "abc", "no_such": 1}}))
    folder = tmp_path / "tiny_folder"
    for part in load_model_and_tokenizer("tiny-llama"):
        part.save_pretrained(folder)
    for extra in ([], ["--training.zero_stage", "3", "--model.name", str(folder)]):
        result = subprocess.run(
            [sys.executable, "-m", "adapt_fast.train", *SMALL, "--data.cache_dir", str(tmp_path / "cache"),
             "--output_dir", str(tmp_path / "out"), "--training.deepspeed_config", str(bad), *extra],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: training.deepspeed_config: DeepSpeed refuses it"), last
        assert "stage3_param_persistence_threshold" in last and "no_such" in last


def test_zero3_loads_a_model_folder_into_its_partitions(tmp_path, monkeypatch):
    """Under ZeRO-3 a model folder loads inside deepspeed.zero.Init (transformers' HfDeepSpeedConfig route), so it is
    partitioned before DeepSpeed's engine sees it; the ADAPT run equals ZeRO-0 from the same folder."""
    from adapt_fast.model import loading
    from adapt_fast.model.zero3 import is_partitioned

    folder = tmp_path / "tiny_folder"
    for part in loading.load_model_and_tokenizer("tiny-llama"):
        part.save_pretrained(folder)
    loaded = []
    load = loading.load_model_and_tokenizer

    def spy(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(is_partitioned(next(model.parameters())))
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", spy)
    common = ["--model.name", str(folder), "--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2"]
    common += ["--training.deepspeed_config", zero3_all_partitioned(tmp_path)]
    _, rows0 = train(tmp_path, "folder_z0", *common)
    _, rows3 = train(tmp_path, "folder_z3", *common, "--training.zero_stage", "3")
    assert loaded == [False, True]
    rows_agree(rows3, rows0)


def test_zero3_static_mixture_equals_zero0(tmp_path):
    """ZeRO-3 partitions the head weight, which the fused loss reads outside the head's forward: the run and the saved
    final model (gathered from the partitions) equal the ZeRO-0 run, with 2 micro-batches per step (ZeRO-3 counts
    micro-steps in engine.forward, which per_task_loss bypasses: the second replaced the first's gradient)."""
    import torch
    from transformers import AutoModelForCausalLM

    common = ["--mixture.method", "uniform", "--budget.tokens", "6000", "--training.grad_accum", "2"]
    _, rows0 = train(tmp_path, "z0", *common)
    _, rows3 = train(tmp_path, "z3", *common, "--training.zero_stage", "3")
    assert np.allclose([r["loss"] for r in rows0], [r["loss"] for r in rows3], rtol=1e-6)
    w0 = AutoModelForCausalLM.from_pretrained(tmp_path / "z0" / "final").state_dict()
    w3 = AutoModelForCausalLM.from_pretrained(tmp_path / "z3" / "final").state_dict()
    assert all(torch.allclose(w0[k], w3[k], atol=1e-5) for k in w0)


def test_a_model_adapt_cannot_dot_in_one_pass_is_refused_before_training(tmp_path, capsys):
    """A mixture-of-experts model (experts and router are not modules the ghost dots know) is refused when the
    trainer starts, in one line naming the way out, before a token is spent; a static mixture trains it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from adapt_fast.data.tokenizer import build_byte_tokenizer

    config = MixtralConfig(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=1024,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    build_byte_tokenizer().save_pretrained(tmp_path / "moe")
    with pytest.raises(SystemExit) as exc:
        train(tmp_path, "adapt", "--model.name", str(tmp_path / "moe"), "--budget.tokens", "3000")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "experts.gate_up_proj (MixtralExperts)" in errors[0] and "meta.dots exact" in errors[0]
    assert not (tmp_path / "adapt" / "metrics.jsonl").exists()
    report, _ = train(tmp_path, "uniform", "--model.name", str(tmp_path / "moe"), "--budget.tokens", "3000",
                      "--mixture.method", "uniform")  # fmt: skip
    assert report["tokens_consumed"] == 3000


def test_tensorboard_per_task_values_stay_cheap(tmp_path, monkeypatch):
    """The mixture goes to TensorBoard only when it changes (a static one once), with its entropy; validation as
    mean and worst plus a scalar per task, or, past TB_PER_TASK_SCALARS tasks, one histogram per kind instead of a
    scalar per task (each costs the step ~40 us: 1,600 tasks' would add ~100 ms a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import adapt_fast.train as train_module

    _, rows = train(tmp_path, "static", "--budget.tokens", "6000", "--mixture.method", "uniform",
                    "--training.eval_every", "2")  # fmt: skip
    events = EventAccumulator(str(tmp_path / "static" / "tensorboard")).Reload()
    names = list(rows[0]["mixture"])
    assert [e.step for e in events.Scalars(f"mixture/{names[0]}")] == [1] and len(rows) > 2
    assert [e.step for e in events.Scalars("val_loss/worst")] == [r["step"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 3, 5]  # static: before every eval_every-th step

    monkeypatch.setattr(train_module, "TB_PER_TASK_SCALARS", 2)
    _, rows = train(tmp_path, "adapt", "--budget.tokens", "6000", "--meta.warmup", "1", "--meta.val_every", "2")
    events = EventAccumulator(str(tmp_path / "adapt" / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    assert not any(tag.startswith(("mixture/copy", "val_loss/copy", "meta_dots/")) for tag in scalars), scalars
    assert {"mixture/entropy", "val_loss/mean", "val_loss/worst"} <= scalars
    assert {"mixture", "val_loss", "meta_dots"} <= histograms
    changed = [r["step"] for i, r in enumerate(rows) if i == 0 or r["mixture"] != rows[i - 1]["mixture"]]
    assert [e.step for e in events.Histograms("mixture")] == changed and len(changed) > 1


def test_a_validation_batch_costlier_than_the_training_between_warns(tmp_path, capsys):
    """Every step's G over 8 examples of each of 6 tasks costs more than one 512-token step: one warning naming the
    two settings that trade it off."""
    train(tmp_path, "v", "--budget.tokens", "1024", "--tokens_per_micro_batch", "512", "--meta.val_every", "1")
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ADAPT's validation batch")]
    assert "meta.val_examples_per_task 8 of 6 tasks" in line and "lower meta.val_examples_per_task, raise" in line
    train(tmp_path, "w", "--budget.tokens", "1024", "--meta.val_every", "10")
    assert "validation batch" not in capsys.readouterr().err


def test_host_overhead_bench_smoke(tmp_path):
    """bench/host_overhead.py runs end to end (3 tasks, 12 steps): every step kind timed, host time inside the step."""
    cmd = [sys.executable, str(REPO / "bench" / "host_overhead.py"), "--out", str(tmp_path / "out"), "--tasks", "3",
           "--steps", "12", "--work", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = json.loads((tmp_path / "out" / "host_overhead.json").read_text())["results"]["3"]
    assert set(kinds) == {"plain", "update", "val+update"}
    for r in kinds.values():
        assert 0 < r["model_ms"] < r["step_ms"] and 0 < r["host_ms"] < r["step_ms"]
    assert kinds["val+update"]["parts_ms"]["validation batch"] > 0 and kinds["plain"]["parts_ms"]["loader plan"] > 0
    assert (tmp_path / "out" / "host_overhead.md").read_text().count("\n| 3 |") == 3


def test_G_backward_covers_only_the_objectives_tasks(tmp_path, monkeypatch):
    """With meta.val_tasks naming some tasks, G's backward packs only their validation examples (the others have
    weight 0 in Φ: their backward was wasted work, K times the target tasks' at 1,600 tasks); the dots are those of
    G over the whole batch."""
    import adapt_fast.train as train_module

    seen = []
    compute_G = train_module.Trainer.compute_G

    def spy(self, batches, losses, counts):
        seen.append({int(t) for b in batches for t in b.task_ids.unique() if t >= 0})
        return compute_G(self, batches, losses, counts)

    monkeypatch.setattr(train_module.Trainer, "compute_G", spy)
    args = ["--data.tasks", "keyword,addition,copy,reverse", "--meta.val_tasks", "keyword,addition",
            "--budget.tokens", "8000", "--meta.warmup", "1", "--meta.val_every", "3"]  # fmt: skip
    _, rows = train(tmp_path, "subset", *args)
    names = sorted(["keyword", "addition", "copy", "reverse"])
    assert seen and all(s == {names.index("keyword"), names.index("addition")} for s in seen), seen

    whole = train_module.Trainer._validation_batches
    monkeypatch.setattr(  # the batch of every task for G too, as before
        train_module.Trainer, "_validation_batches", lambda self, n, tasks=None: whole(self, n)
    )
    seen.clear()
    _, reference = train(tmp_path, "whole", *args)
    assert all(len(s) == 4 for s in seen), seen
    dots = [(r["meta_dots"], q["meta_dots"]) for r, q in zip(rows, reference, strict=True) if "meta_dots" in r]
    assert dots
    for a, b in dots:
        for task in a:
            if a[task] is not None:
                assert a[task] == pytest.approx(b[task], rel=1e-4, abs=1e-9), (task, a, b)
