"""Outputs of a run folder, rebuilt from its `metrics.jsonl`.

    python -m adapt_fast.report RUN_DIR      # writes RUN_DIR/mixture.csv, mixture.png, val_loss.png

`metrics.jsonl` holds one JSON object per step: step, tokens_consumed, loss, lr, mixture {task: p};
validation steps add val_loss {task: loss}, mixture updates add meta_dots {task: d}. Tasks are listed
in the order they first appear. Plots use matplotlib's object API on the Agg canvas (no display, no
pyplot global state), so they can be drawn from a training process.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from adapt_fast.errors import DataError, UserError, exit_on_user_error

OUTPUTS = ("mixture.csv", "mixture.png", "val_loss.png")
PLOT_MAX_TASKS = 20  # more tasks than this: the plots draw the largest (mixture) or worst (loss) few and a summary


# ----------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> list[dict]:
    """One dict per line of a metrics.jsonl. A cut-off last line (a run still writing) is skipped;
    any other malformed line is a DataError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__})") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) and not line.endswith("\n"):
                break  # partial last line of a run in progress
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        for key in ("mixture", "val_loss", "meta_dots"):
            if key in row and not isinstance(row[key], dict):
                raise DataError(f"{path}:{lineno}: {key!r} must be an object {{task: value}}")
        rows.append(row)
    return rows


def task_names(rows: list[dict], key: str) -> list[str]:
    """Tasks named under `key` (mixture, val_loss, ...) in all rows, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get(key) or {}))
    return list(names)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[str], list[list[float]]]:
    """(tokens consumed, task names, values[task][row]) over the rows that have `key`; NaN where missing."""
    rows = [r for r in rows if r.get(key)]
    names = task_names(rows, key)
    x = [_number(r.get("tokens_consumed", r.get("step"))) for r in rows]
    values = [[_number(r[key].get(name)) for r in rows] for name in names]
    return x, names, values


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- CSV


def write_mixture_csv(rows: list[dict], path: str | Path) -> None:
    """Columns step, tokens_consumed, then one column per task (its share p); one row per logged mixture."""
    rows = [r for r in rows if r.get("mixture")]
    names = task_names(rows, "mixture")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "tokens_consumed", *names])
        for r in rows:
            shares = [r["mixture"].get(n, "") for n in names]
            writer.writerow([r.get("step", ""), r.get("tokens_consumed", ""), *shares])


# ----------------------------------------------------------------------------- plots


def _colors(n: int) -> list[str]:
    """n distinguishable colours: tab10 up to 10, tab20 up to 20, then tab20 + tab20b + tab20c (cycled)."""
    from matplotlib import colormaps

    if n <= 10:
        palette = list(colormaps["tab10"].colors)
    elif n <= 20:
        palette = list(colormaps["tab20"].colors)
    else:
        palette = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    return [to_hex(palette[i % len(palette)]) for i in range(n)]


def _figure(num_series: int) -> tuple[Figure, object]:
    """A figure with room on the right for a legend of `num_series` entries."""
    columns = 1 if num_series <= 24 else 2
    fig = Figure(figsize=(9 + 2.2 * columns, 5), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _legend(ax, reverse: bool = False) -> None:
    """Legend outside the axes on the right; `reverse` lists the last series first (top of a stack)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if reverse:
        handles, labels = handles[::-1], labels[::-1]
    n = len(handles)
    ax.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8 if n <= 12 else 7,
        ncol=1 if n <= 24 else 2, frameon=False, borderaxespad=0.0,
    )  # fmt: skip


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color="0.4", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: str | Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight")


def plot_mixture(rows: list[dict], path: str | Path, title: str | None = None) -> None:
    """Stacked area of the task shares p against tokens consumed (PNG)."""
    x, names, values = _series(rows, "mixture")
    values = [[0.0 if math.isnan(v) else v for v in vs] for vs in values]
    if len(names) > PLOT_MAX_TASKS:  # the tasks with the largest mean share, the others as one grey band
        keep = sorted(range(len(names)), key=lambda k: -sum(values[k]))[: PLOT_MAX_TASKS - 1]
        rest = sorted(set(range(len(names))) - set(keep))
        other = [sum(col) for col in zip(*(values[k] for k in rest), strict=True)]
        keep.sort()  # in the order of the data, as below
        names = [names[k] for k in keep] + [f"other {len(rest):,} tasks"]
        values = [values[k] for k in keep] + [other]
        colors = _colors(len(keep)) + ["#c8c8c8"]
    else:
        colors = _colors(len(names))
    fig, ax = _figure(len(names))
    if not x:
        _placeholder(ax, "no mixture logged")
    else:
        if len(x) == 1:  # one logged step: draw it as a thin band so it is visible
            x, values = [x[0], x[0] + 1], [vs * 2 for vs in values]
        ax.stackplot(x, values, labels=names, colors=colors, linewidth=0.3, edgecolor="white")
        ax.set_xlim(min(x), max(x))
        ax.set_ylim(0, max(1.0, max(sum(col) for col in zip(*values, strict=True))))
        ax.set_xlabel("tokens consumed")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel("task share p")
        ax.margins(0)
        _legend(ax, reverse=True)  # top-down like the stack
    ax.set_title(title or "task mixture")
    _save(fig, path)


def plot_val_loss(rows: list[dict], path: str | Path, title: str | None = None) -> None:
    """Per-task validation loss against tokens consumed (lines; the task mean dashed), PNG. Past PLOT_MAX_TASKS tasks:
    the mean, the worst, the band between the 10th and 90th percentile over tasks, and the 5 tasks worst at the end.
    Without validation steps the figure says so."""
    x, names, values = _series(rows, "val_loss")
    many = len(names) > PLOT_MAX_TASKS
    fig, ax = _figure(9 if many else len(names) + 1)
    if not x:
        _placeholder(ax, "no validation steps")
    else:
        marker = "o" if len(x) <= 30 else None
        columns = [np.asarray(col, dtype=np.float64) for col in zip(*values, strict=True)]  # per row, over tasks
        if many:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a row without any finite value: a gap
                low, high = (np.array([np.nanpercentile(c, q) for c in columns]) for q in (10, 90))
                worst = [np.nanmax(c) for c in columns]
            ax.fill_between(x, low, high, color="0.85", label=f"10-90% of {len(names):,} tasks")
            ax.plot(x, worst, label="worst task", color="tab:red", linewidth=1.5)
            last = [vs[-1] for vs in values]
            top = sorted((k for k in range(len(names)) if not math.isnan(last[k])), key=lambda k: -last[k])[:5]
            palette = [c for i, c in enumerate(_colors(10)) if i not in (3, 7)]  # not the worst's red, not grey
            shown = [(names[k], values[k], color) for k, color in zip(top, palette, strict=False)]
            linewidth = 0.9
        else:
            shown = list(zip(names, values, _colors(len(names)), strict=True))
            linewidth = 1.2
        for name, vs, color in shown:
            ax.plot(x, vs, label=name, color=color, marker=marker, markersize=3, linewidth=linewidth)
        if len(names) > 1:
            mean = [_nanmean(c) for c in columns]
            ax.plot(x, mean, label="mean", color="black", linestyle="--", linewidth=1.8)
        ax.set_xlabel("tokens consumed")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel("validation loss (nats / token)")
        ax.grid(True, alpha=0.3)
        _legend(ax)
    ax.set_title(title or ("validation loss over tasks" if many else "validation loss per task"))
    _save(fig, path)


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


# ----------------------------------------------------------------------------- run folder


def write_outputs(run_dir: str | Path) -> list[Path]:
    """Write mixture.csv, mixture.png and val_loss.png into run_dir from run_dir/metrics.jsonl (run_dir may name
    that file itself)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name == "metrics.jsonl":  # the run's metrics file named instead of its folder
        run_dir = run_dir.parent
    elif run_dir.is_file():
        raise UserError(f"{run_dir}: a file, not a run folder (give the folder that holds metrics.jsonl)")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(f"{metrics}: no such file (not a run folder, or the run logged nothing yet)")
    rows = read_metrics(metrics)
    if not rows:
        raise DataError(f"{metrics}: no metrics rows")
    paths = [run_dir / name for name in OUTPUTS]
    write_mixture_csv(rows, paths[0])
    plot_mixture(rows, paths[1], title=f"task mixture: {run_dir.resolve().name}")
    plot_val_loss(rows, paths[2], title=f"validation loss per task: {run_dir.resolve().name}")
    return paths


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m adapt_fast.report RUN_DIR", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    for path in write_outputs(argv[0]):
        print(path)


if __name__ == "__main__":
    main()
