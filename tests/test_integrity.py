"""Fingerprints of weights and data: what they see, what they ignore, and the cheap path for large files."""

import shutil

import torch
from safetensors.torch import save_file

import recurrent_lens.integrity as integrity
from recurrent_lens.integrity import file_digest, first_nonfinite, weights_fingerprint
from tests.support.helpers import tiny_qwen3_5


def test_large_files_are_sampled_header_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "_FULL_BYTES", 256)
    monkeypatch.setattr(integrity, "_BLOCK_BYTES", 16)
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(400, dtype=torch.float32)}, str(path))
    raw = bytearray(path.read_bytes())
    base = file_digest(path)
    start = 8 + int.from_bytes(raw[:8], "little")
    for offset in (start, len(raw) - 1):  # the first data byte and the last byte lie in sampled blocks
        changed = bytearray(raw)
        changed[offset] ^= 1
        path.write_bytes(bytes(changed))
        assert file_digest(path) != base, offset
    path.write_bytes(bytes(raw))
    assert file_digest(path) == base


def test_a_checkpoint_is_its_files_wherever_they_lie(tmp_path):
    from recurrent_lens import HookedRecurrentModel

    tiny_qwen3_5(seed=0).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = (HookedRecurrentModel.from_pretrained(str(tmp_path / n)) for n in ("a", "b"))
    assert weights_fingerprint(a)["kind"] == "checkpoint files"
    assert weights_fingerprint(a) == weights_fingerprint(b)
    tiny_qwen3_5(seed=1).save_pretrained(tmp_path / "b")
    assert weights_fingerprint(a)["sha256"] != weights_fingerprint(b)["sha256"]


def test_first_nonfinite_row():
    x = torch.zeros(5, 2, 3)
    assert first_nonfinite(x) is None
    x[3, 1, 2], x[4, 0, 0] = float("-inf"), float("nan")
    assert first_nonfinite(x) == 3
