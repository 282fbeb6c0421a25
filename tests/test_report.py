"""Run-folder outputs: metrics.jsonl -> mixture.csv, mixture.png, val_loss.png, and the CLI's errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from adapt_fast.errors import DataError
from adapt_fast.report import plot_mixture, plot_val_loss, read_metrics, write_mixture_csv, write_outputs

TASKS = ["copy", "reverse", "addition"]


def metrics_rows(tasks=TASKS, steps: int = 12, val_every: int = 4, update_every: int = 2) -> list[dict]:
    """Synthetic trainer rows: a mixture every step, val_loss every val_every steps, meta_dots on updates."""
    rng = np.random.default_rng(0)
    alpha = np.zeros(len(tasks))
    rows = []
    for step in range(1, steps + 1):
        alpha += rng.normal(0, 0.3, len(tasks))
        p = np.exp(alpha) / np.exp(alpha).sum()
        row = {"step": step, "tokens_consumed": 4096 * step, "loss": 3.0 / step, "lr": 1e-3,
               "mixture": dict(zip(tasks, p.round(6).tolist(), strict=True))}  # fmt: skip
        if step % val_every == 0:
            row["val_loss"] = {t: 3.0 - 0.1 * step + 0.2 * k for k, t in enumerate(tasks)}
        if step % update_every == 0:
            row["meta_dots"] = {t: float(rng.normal()) for t in tasks}
        rows.append(row)
    return rows


def write_run(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def check_png(path, min_bytes: int = 5000) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > min_bytes
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def test_read_metrics_round_trip_and_partial_last_line(tmp_path):
    rows = metrics_rows()
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "tokens_con')  # run still writing
    assert read_metrics(path) == rows


def test_read_metrics_malformed_line_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: malformed JSON"):
        read_metrics(path)
    path.write_text('{"step": 1, "mixture": [0.5, 0.5]}\n')
    with pytest.raises(DataError, match="'mixture' must be an object"):
        read_metrics(path)


def test_mixture_csv_columns_and_rows(tmp_path):
    rows = metrics_rows()
    path = tmp_path / "mixture.csv"
    write_mixture_csv(rows, path)
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["step", "tokens_consumed", *TASKS]
    assert len(table) == 1 + len(rows)  # every step has a mixture, with or without val_loss
    for line, row in zip(table[1:], rows, strict=True):
        assert int(line[0]) == row["step"] and int(line[1]) == row["tokens_consumed"]
        assert [float(v) for v in line[2:]] == pytest.approx([row["mixture"][t] for t in TASKS])
        assert sum(float(v) for v in line[2:]) == pytest.approx(1.0, abs=1e-5)


def test_write_outputs_writes_csv_and_nontrivial_pngs(tmp_path):
    run = tmp_path / "run"
    write_run(run, metrics_rows())
    paths = write_outputs(run)
    assert [p.name for p in paths] == ["mixture.csv", "mixture.png", "val_loss.png"]
    assert (run / "mixture.csv").stat().st_size > 100
    check_png(run / "mixture.png")
    check_png(run / "val_loss.png")


def test_plots_with_twenty_tasks_and_without_validation(tmp_path):
    tasks = [f"task{k:03d}_with_a_long_name" for k in range(20)]
    rows = metrics_rows(tasks, steps=40, val_every=1000)  # no validation step at all
    plot_mixture(rows, tmp_path / "mixture.png", title="20 tasks")
    wide = check_png(tmp_path / "mixture.png")
    assert wide.shape[1] > wide.shape[0]  # legend outside, on the right
    plot_val_loss(rows, tmp_path / "val_loss.png")
    check_png(tmp_path / "val_loss.png", min_bytes=3000)  # the "no validation steps" figure


def test_plots_of_many_tasks_summarise_them(tmp_path, monkeypatch):
    """400 tasks: a legend entry per task made 14,000-pixel-tall images (a minute to draw) whose bands no one could
    tell apart. Now the mixture stacks the 19 largest shares and the rest as one band; the loss plot draws the mean,
    the worst, the 10-90% band and the 5 tasks worst at the end."""
    import adapt_fast.report as report

    legends = []
    monkeypatch.setattr(report, "_legend", lambda ax, reverse=False: legends.append(ax.get_legend_handles_labels()[1]))
    tasks = [f"task{k:03d}" for k in range(400)]
    rows = metrics_rows(tasks, steps=30, val_every=3)
    for row in rows:  # task losses spread out, so "worst at the end" has an answer
        if "val_loss" in row:
            row["val_loss"] = {t: v + (k * 37 % 101) / 50 for k, (t, v) in enumerate(row["val_loss"].items())}
    plot_mixture(rows, tmp_path / "mixture.png")
    plot_val_loss(rows, tmp_path / "val_loss.png")
    for name in ("mixture.png", "val_loss.png"):
        assert check_png(tmp_path / name).shape[0] < 1000
    mixture_labels, loss_labels = legends
    mean_share = {t: np.mean([r["mixture"][t] for r in rows]) for t in tasks}
    largest = sorted(tasks, key=lambda t: -mean_share[t])[:19]
    assert sorted(mixture_labels) == sorted([*largest, "other 381 tasks"])
    final = rows[-1]["val_loss"] if "val_loss" in rows[-1] else [r for r in rows if "val_loss" in r][-1]["val_loss"]
    worst = sorted(tasks, key=lambda t: -final[t])[:5]
    assert loss_labels == ["10-90% of 400 tasks", "worst task", *worst, "mean"]


def test_single_row_renders(tmp_path):
    rows = metrics_rows(steps=1, val_every=1)
    plot_mixture(rows, tmp_path / "m.png")
    plot_val_loss(rows, tmp_path / "v.png")
    check_png(tmp_path / "m.png")
    check_png(tmp_path / "v.png", min_bytes=3000)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapt_fast.report", *args], capture_output=True, text=True)


def test_cli_regenerates_outputs_and_fails_in_one_line(tmp_path):
    run = tmp_path / "run"
    write_run(run, metrics_rows())
    ok = run_cli(str(run))
    assert ok.returncode == 0, ok.stderr
    assert {p.rsplit("/", 1)[-1] for p in ok.stdout.split()} == {"mixture.csv", "mixture.png", "val_loss.png"}
    assert (run / "mixture.png").is_file()
    assert run_cli(str(run / "metrics.jsonl")).stdout == ok.stdout  # the metrics file named instead of its folder
    a_file = run_cli(str(run / "mixture.csv"))
    assert a_file.returncode == 2 and "a file, not a run folder" in a_file.stderr

    missing = run_cli(str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr

    (tmp_path / "empty").mkdir()
    no_metrics = run_cli(str(tmp_path / "empty"))
    assert no_metrics.returncode == 2 and "metrics.jsonl" in no_metrics.stderr

    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    malformed = run_cli(str(tmp_path / "empty"))
    assert malformed.returncode == 2 and "metrics.jsonl:2" in malformed.stderr and "Traceback" not in malformed.stderr
