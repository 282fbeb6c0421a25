"""Checkpoint integrity: COMPLETE.json records every file's size and CRC-32, and `verify` checks both.

torch.load checks neither (it ignores the zip CRCs), so a file whose bytes were flipped without changing
its size (disk or network corruption) would load silently; `verify` must report it as it reports a
truncated file, and a resume must then fall back to the checkpoint before it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from adapt_fast import checkpoint as ckpt


def flip(path: Path, offset: int, n: int) -> None:
    """Invert n bytes of a file at offset: its content changes, its size does not."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A small checkpoint: a few files (one in a subfolder, one torch.save'd) and COMPLETE.json."""
    folder = tmp_path / ckpt.step_name(3)
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "b.bin").write_bytes(b"x" * 1000)
    ckpt.save_state({"w": torch.arange(1000, dtype=torch.float32)}, folder / ckpt.TRAINER_STATE)
    ckpt.write_marker(folder, step=3, consumed=1234)
    return folder


def test_an_intact_checkpoint_verifies(folder):
    marker = json.loads((folder / ckpt.MARKER).read_text())
    assert marker["step"] == 3 and marker["consumed"] == 1234
    assert set(marker["files"]) == set(marker["crc32"]) == {"a.bin", "sub/b.bin", ckpt.TRAINER_STATE}
    assert ckpt.verify(folder) is None


def test_a_same_size_byte_flip_is_detected(folder):
    flip(folder / "a.bin", 5000, 400)
    problem = ckpt.verify(folder)
    assert problem is not None and "a.bin" in problem and "corrupted" in problem and "\n" not in problem


def test_a_flip_inside_a_tensor_loads_but_does_not_verify(folder):
    """The case the checksum is for: torch.load reads the flipped file without complaint."""
    path = folder / ckpt.TRAINER_STATE
    flip(path, tensor_data_offset(path), 16)
    assert not torch.equal(ckpt.load_state(path)["w"], torch.arange(1000, dtype=torch.float32))
    assert ckpt.TRAINER_STATE in ckpt.verify(folder)


def test_truncation_and_missing_files_are_still_reported(folder):
    with open(folder / "sub" / "b.bin", "r+b") as f:
        f.truncate(999)
    assert ckpt.verify(folder) == "sub/b.bin has 999 bytes, 1000 were written"
    (folder / "sub" / "b.bin").unlink()
    assert ckpt.verify(folder) == "sub/b.bin is missing"


def test_a_marker_without_checksums_verifies_by_size(folder):
    """COMPLETE.json written before CRC-32s were recorded: checkpoints of earlier runs still resume."""
    marker = json.loads((folder / ckpt.MARKER).read_text())
    marker.pop("crc32", None)  # the marker as it was written then: step, consumed, sizes
    (folder / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.verify(folder) is None
    flip(folder / "a.bin", 5000, 400)
    assert ckpt.verify(folder) is None  # size only: a same-size flip cannot be seen
    with open(folder / "a.bin", "r+b") as f:
        f.truncate(100)
    assert ckpt.verify(folder) == "a.bin has 100 bytes, 10240 were written"


def test_a_malformed_crc32_entry_is_reported(folder):
    marker = json.loads((folder / ckpt.MARKER).read_text())
    marker["crc32"] = ["not", "a", "mapping"]
    (folder / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.verify(folder).startswith(f"{ckpt.MARKER} unreadable")


def test_checksum_is_zlib_crc32_across_chunks(tmp_path, monkeypatch):
    import zlib

    path = tmp_path / "f"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    monkeypatch.setattr(ckpt, "CHUNK", 1000)  # many chunks, the last one partial
    assert ckpt.checksum(path) == ckpt.checksum(path, fsync=True) == zlib.crc32(data)


def tensor_data_offset(path: Path) -> int:
    """Where the bytes of the largest tensor of a torch.save file start (inside its zip record)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # local file header: name and extra field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


# ----------------------------------------------------------------------------- end to end


BASE = [  # a static mixture: the corruption, not ADAPT, is under test
    "--mixture.method", "uniform", "--budget.tokens", "2000", "--checkpoint.every_tokens", "1000",
    "--checkpoint.keep_last", "3", "--tokens_per_micro_batch", "512", "--data.max_len", "256",
    "--data.synthetic_examples", "40",
]  # fmt: skip


def test_resume_skips_a_checkpoint_with_flipped_bytes(tmp_path, capsys):
    """The reviewer's reproduction, tiny: flip bytes inside the weights of the newest checkpoint (same
    size); --resume must report it broken, set it aside and resume from the one before it."""
    from adapt_fast.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is faster on a shared CPU
    try:
        argv = [*BASE, "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
        main(argv)
        root = tmp_path / "run" / ckpt.CHECKPOINTS
        final, previous = [ckpt.step_of(c) for c in ckpt.complete_checkpoints(root)][:2]
        weights = root / ckpt.step_name(final) / "mp_rank_00_model_states.pt"
        flip(weights, tensor_data_offset(weights), 400)
        capsys.readouterr()
        report = main([*argv, "--resume"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    broken = [line for line in err.splitlines() if "broken" in line]
    assert len(broken) == 1 and ckpt.step_name(final) in broken[0] and "corrupted" in broken[0], err[-2000:]
    assert report["resumed_from"].endswith(ckpt.step_name(previous))
    assert (root / (ckpt.BROKEN_PREFIX + ckpt.step_name(final))).is_dir()
    assert ckpt.verify(root / ckpt.step_name(final)) is None  # the step was redone and written again
