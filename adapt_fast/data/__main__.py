"""Inspect the data pipeline: tokenise (through the cache), pack the whole budget under a static
mixture, print one JSON object of statistics.

    python -m adapt_fast.data --data.path PATH [--data.group_by task|category]
        [--budget.tokens N | --budget.fraction F] [--budget.unit tokens|loss]
        [--tokens_per_micro_batch N] [--mixture.method uniform|proportional]

Same config names and the same one-line errors (exit code 2) as the trainer.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

from adapt_fast.config import parse_cli
from adapt_fast.data.prepare import load_data, load_tokenizer, make_loader, resolve_budget
from adapt_fast.errors import ConfigError, exit_on_user_error
from adapt_fast.mixture import static_mixture


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(sys.argv[1:] if argv is None else argv)
    if cfg.mixture.method == "adapt":
        cfg.mixture.method = "uniform"  # the inspector packs under a static mixture (adapt starts uniform)
    if cfg.mixture.method not in ("uniform", "proportional", "temperature", "fixed"):
        raise ConfigError(f"mixture.method {cfg.mixture.method!r} is not a static mixture")
    tokenizer = load_tokenizer(cfg)
    data = load_data(cfg, tokenizer, progress=sys.stderr.isatty())
    train, val = data.train, data.validation
    p = static_mixture(
        cfg.mixture.method,
        train.tokens_per_task(),
        train.examples_per_task(),
        data.task_names,
        temperature=cfg.mixture.temperature,
        cap=cfg.mixture.cap,
        weights=cfg.mixture.weights,
    )
    budget = resolve_budget(cfg, train)
    with warnings.catch_warnings(record=True) as caught:  # the loader's warnings go into the report
        warnings.simplefilter("always")
        loader = make_loader(cfg, data, p, budget)
        start, micro_batches = time.perf_counter(), 0
        while loader.next_micro_batch() is not None:
            micro_batches += 1
        seconds = time.perf_counter() - start
    s = loader.stats
    report = {
        "data": str(data.meta["source"]),
        "cache": str(data.folder),
        "from_cache": data.from_cache,
        "tasks": {
            name: {
                "mixture": round(float(p[k]), 6),
                "train_examples": int(train.examples_per_task()[k]),
                "train_tokens": int(train.tokens_per_task()[k]),
                "train_loss_tokens": int(train.loss_tokens_per_task()[k]),
                "validation_examples": int(val.examples_per_task()[k]),
                "validation_tokens": int(val.tokens_per_task()[k]),
                "tokens_consumed": s.tokens_per_task[k],
                "share_consumed": round(s.tokens_per_task[k] / max(s.tokens, 1), 6),
            }
            for k, name in enumerate(data.task_names)
        },
        "budget": budget,
        "budget_unit": cfg.budget.unit,
        "tokens_per_micro_batch": cfg.tokens_per_micro_batch,
        "micro_batches": micro_batches,
        "tokens_consumed": s.tokens,
        "loss_tokens_consumed": s.loss_tokens,
        "padding_fraction": round(s.padding_fraction, 6),
        "truncated_by_max_len": data.meta["train"]["truncated"] + data.meta["validation"]["truncated"],
        "dropped_by_max_len": data.meta["train"]["dropped"] + data.meta["validation"]["dropped"],
        "truncated_by_budget": s.truncated,
        "examples_reused": s.reused,
        "warnings": [str(w.message) for w in caught],
        "packing_seconds": round(seconds, 3),
        "packing_tokens_per_second": round(s.tokens / seconds, 1) if seconds > 0 else None,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
