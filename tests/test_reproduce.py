"""bench/reproduce.py --quick end to end: every method and ablation runs, tables and plots come out, reruns resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NI_DATA = REPO.parent / "shared" / "data" / "natural-instructions"  # as in bench/reproduce.py


def test_reproduce_quick(tmp_path):
    out = tmp_path / "rq"
    cmd = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--quick", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (out / "errors.log").exists(), (out / "errors.log").read_text()[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    runs = sorted((out / "runs").rglob("*.json"))
    assert len(runs) == summary["runs"] > 0
    synthetic = summary["synthetic"]
    for budget, entry in synthetic.items():
        rows = entry["variants"]
        assert {"uniform", "proportional", "proportional_cap", "temperature", "adapt", "adapt_rms"} <= set(rows), budget
        for row in rows.values():
            assert abs(sum(row["tokens_share"].values()) - 1) < 1e-6
            assert all(x is not None for x in row["loss_mean"] + row["em_mean"] + row["heldout_em_mean"])
    assert any(name.startswith("adapt_") for e in synthetic.values() for name in e["variants"])
    assert ("ni" in summary) == NI_DATA.is_dir()  # the NI part runs where the shared sample is
    assert summary["findings"]

    text = (out / "results.md").read_text()
    assert "| method |" in text and "## Findings" in text
    codes = {json.loads(f.read_text())["code"] for f in runs}  # every run names the sources it ran
    assert len(codes) == 1 and f"(sources `{codes.pop()}`)" in text and "Code: commit `" in text
    assert list((out / "plots").glob("synthetic_b*.png"))
    assert not (out / "work" / "runs").exists() or not list((out / "work" / "runs").iterdir())

    # A rerun finds every run done and only rebuilds the tables.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(runs)} runs planned, {len(runs)} done already, 0 to do" in again.stdout
