"""The tokenised cache: tokenise once, then memory-map.

Layout of one cache entry `<cache_dir>/<key>/` (key = hash of the input files, the rendering
settings and the tokenizer):
    meta.json                       task names, counts, settings, statistics
    <split>/ids.npy                 (total tokens,) uint32, examples end to end
    <split>/loss_mask.npy           (total tokens,) uint8, 1 where the token carries the loss
    <split>/offsets.npy             (N + 1,) int64, example i is ids[offsets[i]:offsets[i+1]]
    <split>/task_ids.npy            (N,) int32
    <split>/lengths.npy             (N,) int32
    <split>/loss_tokens.npy         (N,) int32 (the first token of an example never carries loss)
for split in train, validation. An entry is written to a temporary folder (`.<key>-*`, with an `owner.json`
naming its host and process) and renamed, so a crash never leaves a half-written cache; a second run with the
same inputs reuses it without tokenising. The temporary folder of a build that was killed (its process gone)
is removed by the next build in that cache_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapt_fast.data import formats
from adapt_fast.data.render import fit_to_max_len, resolve_template, tokenize_record
from adapt_fast.errors import DataError

CACHE_VERSION = 4  # 2: splits seeded by task name; test splits left out; 3: chat messages under ni as a transcript;
# 4: a data folder's split-named files (train-*.parquet, test.jsonl) give their split; ShareGPT; dropped per task
SPLITS = ("train", "validation")
OWNER = "owner.json"  # in a build's temporary folder: {"host", "pid_namespace", "pid"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADAPT_FAST_CACHE", Path.home() / ".cache" / "adapt_fast"))


def group_by_task(task_ids: np.ndarray, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): positions sorted by task, ascending within a task; task k's are order[bounds[k]:bounds[k+1]]."""
    task_ids = np.asarray(task_ids)
    order = np.argsort(task_ids, kind="stable")
    return order, np.searchsorted(task_ids[order], np.arange(num_tasks + 1))


@dataclass
class TokenizedSplit:
    """One split of the tokenised data, memory-mapped. Examples are indexed 0..N-1."""

    ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    task_ids: np.ndarray
    lengths: np.ndarray
    loss_tokens: np.ndarray
    num_tasks: int

    @classmethod
    def open(cls, folder: Path, num_tasks: int) -> TokenizedSplit:
        arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r")
            for name in ("ids", "loss_mask", "offsets", "task_ids", "lengths", "loss_tokens")
        }
        return cls(num_tasks=num_tasks, **arrays)

    @property
    def num_examples(self) -> int:
        return int(self.lengths.shape[0])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss_mask) of example i (views into the memory map)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end], self.loss_mask[start:end]

    def examples_of_task(self, task: int) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.task_ids) == task)

    def examples_by_task(self) -> list[np.ndarray]:
        """Every task's example indices, ascending (examples_of_task of each k, from one sort instead of K scans)."""
        order, bounds = group_by_task(self.task_ids, self.num_tasks)
        return [order[bounds[k] : bounds[k + 1]] for k in range(self.num_tasks)]

    def tokens_per_task(self) -> np.ndarray:
        return np.bincount(self.task_ids, weights=self.lengths, minlength=self.num_tasks).astype(np.int64)

    def loss_tokens_per_task(self) -> np.ndarray:
        return np.bincount(self.task_ids, weights=self.loss_tokens, minlength=self.num_tasks).astype(np.int64)

    def examples_per_task(self) -> np.ndarray:
        return np.bincount(self.task_ids, minlength=self.num_tasks).astype(np.int64)


@dataclass
class TokenizedData:
    """Both splits plus the task names and what happened while building (truncations, drops)."""

    task_names: list[str]
    train: TokenizedSplit
    validation: TokenizedSplit
    meta: dict
    folder: Path
    from_cache: bool

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


# ----------------------------------------------------------------------------- cache key


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def cache_key(files: list[Path], settings: dict, tokenizer, root: Path) -> str:
    """Hash of every data file (its path under `root`, the data path, and its bytes), the settings and the tokenizer."""
    h = hashlib.sha256(f"adapt_fast-cache-v{CACHE_VERSION}".encode())
    for f in files:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- build


def _tokenized_features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "task": Value("string"),
            "ids": Sequence(Value("int32")),
            "loss_mask": Sequence(Value("uint8")),
            "status": Value("string"),
            "length": Value("int32"),
        }
    )


def _tokenize_batch(
    batch: dict, tokenizer, template: str, num_positive_examples: int, max_len: int, truncate: bool,
    assistant_turns: str = "last", truncation_mode: str = "keep_start",
):  # fmt: skip
    out = {"ids": [], "loss_mask": [], "status": [], "length": []}
    keys = list(batch.keys())
    for row in zip(*(batch[k] for k in keys), strict=True):
        record = dict(zip(keys, row, strict=True))
        ids, mask = tokenize_record(record, tokenizer, template, num_positive_examples, assistant_turns)
        ids, mask, status = fit_to_max_len(ids, mask, max_len, truncate, truncation_mode)
        out["ids"].append(ids)
        out["loss_mask"].append(mask)
        out["status"].append(status)
        out["length"].append(len(ids))
    return out


def _write_split(folder: Path, dataset, task_index: dict[str, int]) -> dict:
    """Stream the tokenised dataset into the split's .npy files: two passes over Arrow record batches
    (column-wise, no per-row Python objects: a million examples take seconds, not minutes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    folder.mkdir(parents=True)
    arrow = dataset.with_format("arrow")
    n = len(dataset)
    if n:
        status = arrow["status"]
        kept = ~pc.equal(status, "dropped").to_numpy(zero_copy_only=False)
        truncated = int(pc.sum(pc.equal(status, "truncated")).as_py() or 0)
        lengths = arrow["length"].to_numpy().astype(np.int32)[kept]
    else:
        kept, truncated, lengths = np.zeros(0, dtype=bool), 0, np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=np.uint32, shape=(total,))
    mask = np.lib.format.open_memmap(folder / "loss_mask.npy", mode="w+", dtype=np.uint8, shape=(total,))
    loss_tokens = np.zeros(len(lengths), dtype=np.int32)
    task_ids = np.zeros(len(lengths), dtype=np.int32)
    row, j = 0, 0  # rows of the dataset read so far, kept examples written so far
    for table in arrow.iter(batch_size=65536) if n else []:
        keep = kept[row : row + table.num_rows]
        row += table.num_rows
        m = int(keep.sum())
        if m == 0:
            continue
        chosen = table.filter(keep)
        start, end = offsets[j], offsets[j + m]
        flat_ids = pc.list_flatten(chosen["ids"]).to_numpy(zero_copy_only=False)
        flat_mask = pc.list_flatten(chosen["loss_mask"]).to_numpy(zero_copy_only=False).astype(np.uint8)
        ids[start:end] = flat_ids
        mask[start:end] = flat_mask
        # loss tokens of an example: its mask summed, less its first token (nothing predicts it)
        rel = offsets[j : j + m + 1] - start
        cum = np.concatenate([[0], np.cumsum(flat_mask, dtype=np.int64)])
        first = np.where(rel[1:] > rel[:-1], flat_mask[np.minimum(rel[:-1], max(len(flat_mask) - 1, 0))], 0)
        loss_tokens[j : j + m] = cum[rel[1:]] - cum[rel[:-1]] - first
        task_ids[j : j + m] = [task_index[t] for t in chosen["task"].to_pylist()]
        j += m
    ids.flush()
    mask.flush()
    for name, arr in (("offsets", offsets), ("lengths", lengths), ("loss_tokens", loss_tokens), ("task_ids", task_ids)):
        np.save(folder / f"{name}.npy", arr)
    dropped = Counter(arrow["task"].filter(pc.invert(pa.array(kept))).to_pylist()) if n else Counter()
    return {
        "examples": len(lengths),
        "truncated": truncated,
        "dropped": int((~kept).sum()),
        "dropped_per_task": dict(sorted(dropped.items())),
    }


def build_or_load(
    records_path: str | Path,
    tokenizer,
    *,
    group_by: str = "task",
    task_column: str = "task",
    template: str = "auto",
    num_positive_examples: int = 0,
    assistant_turns: str = "last",
    val_fraction: float = 0.1,
    val_examples: int = 0,
    max_len: int = 1024,
    truncate: bool = True,
    truncation_mode: str = "keep_start",
    tasks: list[str] | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    num_proc: int = 1,
    progress: bool = True,
) -> TokenizedData:
    """Tokenise the data at `records_path` through the cache (see module docstring)."""
    path = Path(records_path)
    template = resolve_template(template, tokenizer)
    settings = {
        "group_by": group_by,
        "task_column": task_column,
        "template": template,
        "num_positive_examples": num_positive_examples,
        "assistant_turns": assistant_turns,
        "val_fraction": val_fraction,
        "val_examples": val_examples,
        "max_len": max_len,
        "truncate": truncate,
        "tasks": sorted(tasks or []),
        "seed": seed,
    }
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if formats.is_hf_folder(path):
        settings["default_task"] = path.name  # the task of rows without a task column
    elif path.is_dir():  # a split-named file's default task may be the folder's name, or its parent's
        settings["folder"] = [path.resolve().parent.name, path.resolve().name]
    if truncate and truncation_mode != "keep_start":  # keyed only when it changes the arrays: caches built before
        settings["truncation_mode"] = truncation_mode  # the setting existed stay valid
    files = formats.data_files(path)
    key = cache_key(files, settings, tokenizer, path)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = root / key
    if (entry / "meta.json").exists():
        return _open(entry, from_cache=True)

    records = formats.load_split_records(
        path, group_by=group_by, task_column=task_column, tasks=tasks,
        val_fraction=val_fraction, val_examples=val_examples, seed=seed,
    )  # fmt: skip
    task_names = sorted({r["task"] for r in records})
    task_index = {name: i for i, name in enumerate(task_names)}

    import datasets

    if not progress:
        datasets.disable_progress_bars()
    meta = {"version": CACHE_VERSION, "task_names": task_names, "settings": settings, "source": str(path)}
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        (tmp / OWNER).write_text(json.dumps({**_this_process(), "pid": os.getpid()}))
        for split in SPLITS:
            rows = [r for r in records if r["split"] == split]
            ds = (
                datasets.Dataset.from_list(rows)
                if rows
                else datasets.Dataset.from_dict({k: [] for k in formats.RECORD_KEYS})
            )
            ds = ds.map(
                _tokenize_batch,
                batched=True,
                batch_size=256,
                # datasets runs num_proc=1 in a pool of one, each batch pickled across a pipe: in-process instead
                num_proc=num_proc if num_proc > 1 and len(rows) >= 4 * 256 * num_proc else None,
                remove_columns=[c for c in ds.column_names if c != "task"],
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "template": template,
                    "num_positive_examples": num_positive_examples,
                    "max_len": max_len,
                    "truncate": truncate,
                    "truncation_mode": truncation_mode,
                    "assistant_turns": assistant_turns,
                },
                features=_tokenized_features(),  # typed: a batch whose rows are all dropped is no list<null>
                desc=f"tokenising {split}",
                keep_in_memory=True,
            )
            meta[split] = _write_split(tmp / split, ds, task_index)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(entry, from_cache=False)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _this_process() -> dict:
    """Where this process's PIDs mean something: the host and the PID namespace (containers that share a host name,
    such as Docker with --net=host, do not share PIDs)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace}


def remove_abandoned_builds(root: Path) -> list[Path]:
    """Remove the temporary folders of builds in this host's PID namespace whose process is gone (killed mid-build:
    SIGKILL, the OOM killer); a build in progress, or one elsewhere sharing the folder, is left alone. Returns them."""
    removed = []
    here = _this_process()
    for tmp in root.glob(".*-*"):
        try:
            owner = json.loads((tmp / OWNER).read_text())
            same_pids = all(owner[key] == value for key, value in here.items())
            abandoned = same_pids and not _process_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):  # not ours, or its owner file not written yet
            continue
        if abandoned and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _open(entry: Path, from_cache: bool) -> TokenizedData:
    meta = json.loads((entry / "meta.json").read_text())
    k = len(meta["task_names"])
    return TokenizedData(
        task_names=meta["task_names"],
        train=TokenizedSplit.open(entry / "train", k),
        validation=TokenizedSplit.open(entry / "validation", k),
        meta=meta,
        folder=entry,
        from_cache=from_cache,
    )
