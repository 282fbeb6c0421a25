"""Checkpoints of a run: written whole or not at all, and found again after a crash.

Layout, under `<output_dir>/checkpoints/`:

    step-00000012/                          one checkpoint (the optimizer step it was taken after)
        mp_rank_00_model_states.pt          DeepSpeed's files: weights, optimizer, LR scheduler
        zero_pp_rank_*_optim_states.pt      (ZeRO stages 1-3: each rank's optimizer partition)
        trainer_state.pt                    the trainer's own state (see Trainer.state_dict)
        rng-rank0.pt, rng-rank1.pt, ...     each rank's RNG states
        g-rank0.pt, g-rank1.pt, ...         ZeRO-3 with ADAPT: each rank's partitions of G
        COMPLETE.json                       written last: step, budget units consumed, every file's
                                            size and CRC-32

A checkpoint is written into `.tmp-step-00000012/` and renamed to `step-00000012/` only once it is
whole (COMPLETE.json inside), so a crash or a SIGKILL mid-write leaves a `.tmp-*` folder that nothing
reads (the next run removes it). On resume the newest checkpoint whose files match its COMPLETE.json
(sizes and CRC-32s: torch.load checks neither, so a truncated or bit-flipped file would otherwise load)
and load is used; a broken one is reported in one line, set aside as `broken-step-*`, and the one
before it is tried. `keep_last` bounds how many complete checkpoints stay.

Safety: everything here is read with `torch.load(weights_only=True)`, DeepSpeed's own files included
(`SafeCheckpointEngine` replaces DeepSpeed's loader and allows exactly the few DeepSpeed classes its
optimizer states hold). A checkpoint never runs code when it is loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapt_fast.errors import ConfigError

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.pt"
PREFIX, TMP_PREFIX, BROKEN_PREFIX = "step-", ".tmp-", "broken-"
FORMAT = 1
CHUNK = 8 << 20  # bytes read at a time to checksum a file


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def g_partition_file(rank: int) -> str:
    """Under ZeRO-3: this rank's partitions of the validation gradient G."""
    return f"g-rank{rank}.pt"


# ----------------------------------------------------------------------------- finding checkpoints


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` that were written whole (COMPLETE.json present), newest first."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        name = folder.name
        if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and (folder / MARKER).is_file():
            found.append(folder)
    return sorted(found, key=step_of, reverse=True)


def verify(folder: Path) -> str | None:
    """None if every file COMPLETE.json lists is there with its size and its CRC-32, else what is wrong
    (one line). Markers written before CRC-32s were recorded (no "crc32" entry) are checked by size only."""
    try:
        manifest = json.loads((folder / MARKER).read_text())
        files, crcs = manifest["files"], manifest.get("crc32", {})
        if not isinstance(files, dict) or not files:
            return f"{MARKER} lists no files"
        if not isinstance(crcs, dict):
            return f"{MARKER} unreadable (crc32 is not a mapping)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MARKER} unreadable ({type(err).__name__})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    for name in files:  # sizes first: a truncated file is reported without reading all the others
        if name not in crcs:
            continue
        try:
            if checksum(folder / name) != crcs[name]:
                return f"{name} is corrupted (its CRC-32 is not the one written)"
        except OSError as err:
            return f"{name} unreadable ({type(err).__name__})"
    return None


def checksum(path: Path, fsync: bool = False) -> int:
    """zlib.crc32 of a file's bytes, read CHUNK bytes at a time; fsync=True also flushes the file to
    disk (best effort, as `_fsync`)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
        if fsync:
            try:
                os.fsync(f.fileno())
            except OSError:
                pass
    return crc


def resume_candidates(value: str, output_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoints `--resume VALUE` points at, newest first, and whether VALUE named one checkpoint.

    VALUE "true" (bare `--resume`): the checkpoints of output_dir. Otherwise a path: one checkpoint
    folder (step-*/ with COMPLETE.json), a checkpoints/ folder, or a run's output_dir.
    """
    if value.strip().lower() in ("", "true", "1", "yes", "on", "latest"):
        return complete_checkpoints(output_dir / CHECKPOINTS), False
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"--resume: no such checkpoint or run folder: {value}")
    if (path / MARKER).is_file():
        return [path], True
    if path.name.startswith(TMP_PREFIX):
        raise ConfigError(f"--resume: {value} is a checkpoint that was never finished (no {MARKER})")
    for root in (path / CHECKPOINTS, path):
        found = complete_checkpoints(root)
        if found:
            return found, False
    raise ConfigError(f"--resume: no complete checkpoint in {value}")


# ----------------------------------------------------------------------------- writing


def write_marker(folder: Path, step: int, consumed: int) -> None:
    """COMPLETE.json: the last file of a checkpoint (size and CRC-32 of all the others, for `verify`).
    Every file is read once, to checksum it and flush it to disk, so the marker never gets there before
    the data it vouches for."""
    tmp = folder / (MARKER + ".tmp")
    files, crcs = {}, {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MARKER, tmp.name):
            name = str(p.relative_to(folder))
            files[name] = p.stat().st_size
            crcs[name] = checksum(p, fsync=True)
    marker = {"format": FORMAT, "step": step, "consumed": consumed, "files": files, "crc32": crcs}
    tmp.write_text(json.dumps(marker, indent=1))
    _fsync(tmp)
    tmp.rename(folder / MARKER)


def finalize(tmp: Path, final: Path) -> None:
    """Make the finished `.tmp-*` folder the checkpoint `final` (replacing an older one of that name)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(final.parent)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    old = complete_checkpoints(root)[keep_last:]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def remove_unfinished(root: Path) -> None:
    """Remove `.tmp-*` folders (checkpoints a crash interrupted) and step-* folders without COMPLETE.json."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name.startswith(TMP_PREFIX) or (folder.name.startswith(PREFIX) and not (folder / MARKER).exists()):
            shutil.rmtree(folder, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Rename a broken checkpoint to broken-step-* (kept for inspection, never resumed from)."""
    target = folder.with_name(BROKEN_PREFIX + folder.name)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    folder.rename(target)
    return target


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    _fsync(path)


# ----------------------------------------------------------------------------- state files


def to_plain(obj: Any) -> Any:
    """numpy arrays and scalars -> lists and Python numbers, recursively (weights_only-loadable)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def save_state(obj: Any, path: Path) -> None:
    """torch.save of tensors, lists, dicts, numbers and strings (nothing that needs code to load)."""
    torch.save(obj, path)
    _fsync(path)


def load_state(path: Path) -> Any:
    """Our own state files: torch.load(weights_only=True), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Python, numpy (global) and torch (CPU and CUDA) RNG states, weights_only-loadable."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": to_plain(np_state),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": int(np_state["state"]["pos"]),
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj: Any) -> Any:
    """random.setstate wants (version, tuple of ints, gauss) tuples; keep them tuples."""
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuples(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- DeepSpeed's files


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoint files hold (loss scaler, ZeRO stage enum, fragment
    addresses); weights_only loading allows these and nothing else that is not plain data."""
    allowed: list = []
    candidates = (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    )
    import importlib

    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        allowed += [getattr(module, n) for n in names if hasattr(module, n)]
    return allowed


def install_safe_loader(engine) -> None:
    """Make `engine.load_checkpoint` read every file with torch.load(weights_only=True)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # a decoupled/async engine: leave it, but say so
        return

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
