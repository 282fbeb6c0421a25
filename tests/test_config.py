"""Configuration parsing and validation: every bad value is one ConfigError line, before any work."""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace

import pytest

from adapt_fast.config import Config, TrainingConfig, load_config, parse_cli
from adapt_fast.data.prepare import check_task_names
from adapt_fast.errors import ConfigError


def bad(overrides: list[str], needle: str, yaml_text: str | None = None, tmp_path=None) -> None:
    """load_config refuses these overrides (or this YAML) with a ConfigError containing `needle`."""
    path = None
    if yaml_text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- int fields


@pytest.mark.parametrize("value", ["1e999", "-1e999", "1e30", "99999999999999999999999", "1e99999999999"])
def test_int_field_out_of_range_is_refused(value):
    bad(["--budget.tokens", value], f"budget.tokens: bad value {value!r}")
    bad(["--seed", value], "seed: bad value")


@pytest.mark.parametrize("value", ["1.5e0", "2.5e0", "1e-1", "inf", "nan", "-inf"])
def test_int_field_in_exponent_form_must_be_a_whole_number(value):
    bad(["--training.max_steps", value], f"training.max_steps: bad value {value!r} (expected an integer")
    bad(["--budget.tokens", value], "budget.tokens: bad value")


def test_int_field_in_exponent_form_is_exact():
    cfg = load_config(None, ["--budget.tokens", "1e5", "--training.max_steps", "2.5E1", "--seed", "9007199254740993e0"])
    assert (cfg.budget.tokens, cfg.training.max_steps, cfg.seed) == (100_000, 25, 9007199254740993)
    assert isinstance(cfg.budget.tokens, int)


def test_int_field_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("budget:\n  tokens: 1e5\ntraining:\n  max_steps: 1.0e+2\n")  # YAML 1.1: a string, a float
    cfg = load_config(path)
    assert (cfg.budget.tokens, cfg.training.max_steps) == (100_000, 100)
    bad([], "training.max_steps: bad value 2.5", "training:\n  max_steps: 2.5\n", tmp_path)
    bad([], "training.max_steps: bad value inf", "training:\n  max_steps: .inf\n", tmp_path)


# ----------------------------------------------------------------------------- float fields


def all_fields() -> dict[str, object]:
    """Every `section.field` (or top-level field) of Config, with its type."""
    names = {}
    for name, annotation in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(annotation):
            names |= {f"{name}.{key}": sub for key, sub in typing.get_type_hints(annotation).items()}
        else:
            names[name] = annotation
    return names


def float_fields() -> list[str]:
    return [name for name, annotation in all_fields().items() if annotation is float]


def test_every_float_field_is_covered():
    assert {"mixture.lr", "mixture.entropy_weight", "training.lr", "data.lookahead"} <= set(float_fields())


@pytest.mark.parametrize("name", float_fields())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_float_fields_must_be_finite(name, value):
    bad([f"--{name}", value], f"{name} must be a finite number")


def test_floats_in_lists_and_dicts_must_be_finite():
    bad(["--mixture.method", "fixed", "--mixture.weights", "a=1,b=inf"], "mixture.weights.b must be a finite number")
    bad(["--training.betas", "0.9,nan"], "training.betas must be a finite number")


def test_weight_decay_must_not_be_negative():
    bad(["--training.weight_decay", "-0.1"], "training.weight_decay must be >= 0, got -0.1")
    assert load_config(None, ["--training.weight_decay", "0"]).training.weight_decay == 0.0


# ----------------------------------------------------------------------------- model.dtype float64


def test_float64_needs_zero_stage_1_or_more():
    bad(["--model.dtype", "float64"], "model.dtype float64 needs training.zero_stage 1 or more")
    for stage in ("1", "2", "3"):
        assert load_config(None, ["--model.dtype", "float64", "--training.zero_stage", stage]).model.dtype == "float64"


# ----------------------------------------------------------------------------- text fields


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("output_dir: null\n", "output_dir: bad value None (expected text)"),
        ("output_dir:\n", "output_dir: bad value None (expected text)"),
        ("model:\n  name: null\n", "model.name: bad value None (expected text)"),
        ("data:\n  tasks: null\n", "data.tasks: bad value None"),
        ("meta:\n  val_tasks: [copy, null]\n", "meta.val_tasks: bad value None (expected text)"),
    ],
)
def test_null_is_not_text(tmp_path, yaml_text, needle):
    bad([], needle, yaml_text, tmp_path)


@pytest.mark.parametrize("value", ["", "  "])
def test_output_dir_must_not_be_empty(value):
    bad(["--output_dir", value], "output_dir must not be empty")


# ----------------------------------------------------------------------------- task names


def test_duplicate_task_names_are_refused():
    data = SimpleNamespace(task_names=["copy", "addition", "reverse"])
    assert check_task_names(["reverse", "copy"], data, "meta.val_tasks") == [2, 0]
    with pytest.raises(ConfigError, match=r"^meta.val_tasks: task\(s\) listed more than once: copy$"):
        check_task_names(["copy", "addition", "copy"], data, "meta.val_tasks")
    for key in ("data.tasks", "meta.val_tasks"):  # refused before any data is read, too
        with pytest.raises(ConfigError, match=rf"^{key}: task\(s\) listed more than once: copy$"):
            load_config(None, [f"--{key}", "copy,sort,copy"])


def test_task_lists_can_come_from_files_as_sni_splits_give_them(tmp_path):
    """`@file` reads one name per line (SNI's splits/default/train_tasks.txt); in YAML, on the command line, mixed
    with names; the saved config holds the names. A missing or empty file is a one-line error."""
    (tmp_path / "train_tasks.txt").write_text("# SNI training tasks\ntask001_a\n\n  task002_b \n")
    cfg = load_config(None, ["--data.tasks", f"@{tmp_path / 'train_tasks.txt'},task003_c"])
    assert cfg.data.tasks == ["task001_a", "task002_b", "task003_c"]
    (tmp_path / "c.yaml").write_text(f"meta:\n  val_tasks: ['@{tmp_path / 'train_tasks.txt'}']\n")
    assert load_config(tmp_path / "c.yaml").meta.val_tasks == ["task001_a", "task002_b"]
    with pytest.raises(ConfigError, match=r"^data.tasks: cannot read the list .*nope.txt \(no such file\)$"):
        load_config(None, ["--data.tasks", f"@{tmp_path / 'nope.txt'}"])
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"^data.tasks: the list .*empty.txt names nothing$"):
        load_config(None, ["--data.tasks", f"@{tmp_path / 'empty.txt'}"])


# ----------------------------------------------------------------------------- removed fields


def test_log_every_is_gone_but_old_run_configs_still_load(tmp_path, capsys):
    assert "log_every" not in {f.name for f in dataclasses.fields(TrainingConfig)}
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  lr: 0.002\n  log_every: 1\n")  # a run's config.yaml from before
    assert load_config(path).training.lr == 0.002
    assert "training.log_every is no longer used" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        parse_cli(["--budget.tokens", "5", flag], extra_flags=("resume",))
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--resume" in out.splitlines()[0]
    fields, flags = out.split("\nFlags:\n")
    lines = {line.split()[0]: line for line in fields.splitlines() if line.startswith("  ")}
    expected = set(all_fields())
    assert set(lines) == expected
    assert all(len(line.split()) > 3 for line in lines.values())  # every field says what it means
    assert flags.split()[0] == "--resume" and "config.yaml" in flags
    assert lines["budget.tokens"].split()[1:3] == ["int", "150000"]
    assert lines["training.betas"].split()[1:4] == ["list[float]", "[0.9,", "0.95]"]
    assert lines["output_dir"].split()[1:3] == ["str", '"runs/default"']


# ----------------------------------------------------------------------------- the trainer's command line


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--budget.tokens", "1e999"], "budget.tokens: bad value '1e999'"),
        (["--training.max_steps", "1.5e0"], "training.max_steps: bad value '1.5e0'"),
        (["--mixture.lr", "inf"], "mixture.lr must be a finite number"),
        (["--model.dtype", "float64"], "model.dtype float64 needs training.zero_stage 1 or more"),
        # a flag written without its value is not the text "true" (it made a run folder named `true`)
        (["--data.cache_dir"], "--data.cache_dir: missing value (expected text)"),
        (["--budget.tokens", "--seed", "3"], "--budget.tokens: missing value"),
        (["--config"], "--config: missing value"),
        # HF's habit `--overwrite_output_dir FOLDER` used to overwrite the *default* output_dir
        (["--overwrite_output_dir", "runs/mine"], "--overwrite_output_dir takes no value, got 'runs/mine'"),
        (["--resume", "--overwrite_output_dir"], "--resume continues the run in output_dir, --overwrite_output_dir"),
        (["--resume="], "--resume: empty value"),  # `--resume "$CKPT"`, CKPT unset: started over the earlier run
    ],
)
def test_trainer_command_line_is_one_line_exit_2(tmp_path, capsys, extra, needle):
    from adapt_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--output_dir", str(tmp_path / "run"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err[-1000:]
    assert not (tmp_path / "run").exists()


def test_trainer_help_exits_0(capsys):
    from adapt_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "mixture.method" in capsys.readouterr().out


def test_a_bool_flag_alone_switches_it_on():
    cfg = load_config(None, ["--training.gradient_checkpointing", "--seed", "3"])
    assert cfg.training.gradient_checkpointing is True and cfg.seed == 3


def test_bare_resume_takes_the_runs_own_settings_with_the_command_line_on_top(tmp_path, monkeypatch):
    """`--output_dir X --resume` continues X with the settings in X/config.yaml; before, every setting not repeated on
    the command line fell back to its default (a 60k budget became 150k) and config.yaml was rewritten with them."""
    from adapt_fast import train
    from adapt_fast.config import save_config

    out = tmp_path / "run"
    out.mkdir()
    earlier = ["--budget.tokens", "60000", "--meta.warmup", "2", "--checkpoint.every_tokens", "16000"]
    save_config(load_config(None, [*earlier, "--output_dir", str(out)]), out / "config.yaml")
    seen = {}

    class Recorder:
        def __init__(self, cfg, resume, argv):
            seen.update(cfg=cfg, resume=resume)

        def run(self):
            return {}

    monkeypatch.setattr(train, "Trainer", Recorder)
    monkeypatch.setattr(train.ckpt, "resume_candidates", lambda value, output_dir: ([], False))
    train.main(["--output_dir", str(out), "--resume", "--training.max_steps", "8"])
    cfg = seen["cfg"]
    assert seen["resume"] == "true"
    assert (cfg.budget.tokens, cfg.meta.warmup, cfg.checkpoint.every_tokens) == (60000, 2, 16000)
    assert cfg.training.max_steps == 8  # the command line on top
    train.main(["--output_dir", str(out), "--resume", "--budget.tokens", "80000"])
    assert seen["cfg"].budget.tokens == 80000 and seen["cfg"].meta.warmup == 2
    # the command line is checked on top of the saved settings, not alone against the defaults
    wide = ["--tokens_per_micro_batch", "8192", "--data.max_len", "8192", "--output_dir", str(out)]
    save_config(load_config(None, wide), out / "config.yaml")
    train.main(["--output_dir", str(out), "--resume", "--data.max_len", "6000"])
    assert (seen["cfg"].tokens_per_micro_batch, seen["cfg"].data.max_len) == (8192, 6000)
    # a bare --resume continues the folder it names (here the default), whatever output_dir its config.yaml records
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default").mkdir(parents=True)
    save_config(load_config(None, [*earlier, "--output_dir", "runs/moved_away"]), tmp_path / "runs/default/config.yaml")
    train.main(["--resume"])
    assert seen["cfg"].output_dir == "runs/default" and seen["cfg"].budget.tokens == 60000


def test_resume_command_drops_overwrite_output_dir():
    from adapt_fast.train import resume_command

    command = resume_command(["--output_dir", "runs/demo", "--overwrite_output_dir", "--seed", "3"], 1)
    assert command == "python -m adapt_fast.train --output_dir runs/demo --seed 3 --resume"


def test_a_yaml_section_with_every_field_commented_out_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  # path: /data/ni\nbudget:\n  tokens: 5000\n")
    cfg = load_config(path, [])
    assert cfg.budget.tokens == 5000 and cfg.data.path == ""


def test_a_yaml_file_with_both_budgets_is_refused(tmp_path):
    bad([], "budget.tokens and budget.fraction are alternatives", "budget: {tokens: 1000, fraction: 0.5}\n", tmp_path)
    assert load_config(None, ["--budget.tokens", "1000", "--budget.fraction", "0.5"]).budget.tokens == 0  # CLI: last
    bad(["--budget.fraction", "0"], "budget.fraction must be > 0, got 0")  # was silently budget.tokens' default
    saved = tmp_path / "saved.yaml"  # a saved config.yaml writes the unused alternative as 0
    saved.write_text("budget: {tokens: 1000, fraction: 0.0}\n")
    assert load_config(saved, []).budget.tokens == 1000


@pytest.mark.parametrize(
    "key,hint",
    [("learning_rate", "did you mean training.lr?"), ("max_steps", "did you mean training.max_steps?"),
     ("data.pth", "did you mean data.path?"), ("deepspeed", "did you mean training.deepspeed_config?"),
     ("trainng.lr", "did you mean training.lr?")],
)  # fmt: skip
def test_an_unknown_key_suggests_the_field_meant(key, hint):
    bad([f"--{key}", "1"], hint)


def test_weights_a_method_ignores_are_reported():
    from adapt_fast.errors import DataWarning

    with pytest.warns(DataWarning, match="ignored with mixture.method uniform"):
        load_config(None, ["--mixture.method", "uniform", "--mixture.weights", "a=1"])


def test_a_negative_seed_is_refused_before_any_work():
    bad(["--seed", "-1"], "seed must be >= 0")
