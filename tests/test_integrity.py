"""Fingerprints of weights and data: what they see, what they ignore, and the cheap path for large files."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

import recurrent_lens.integrity as integrity
from recurrent_lens.integrity import ResumeMismatchError, check_same, file_digest, first_nonfinite, weights_fingerprint
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


def test_weights_edited_after_loading_are_other_weights(tmp_path):
    """The files alone would say "same checkpoint": an edit made in memory (or a change in an unsampled block
    of a large file, which shows in the loaded parameters) must not resume as the same weights."""
    from recurrent_lens import HookedRecurrentModel

    tiny_qwen3_5(seed=0).save_pretrained(tmp_path / "a")
    model = HookedRecurrentModel.from_pretrained(str(tmp_path / "a"))
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.blocks[0].ln1.weight[3] += 1e-3
    after = weights_fingerprint(model)
    assert after["sha256"] == before["sha256"] and after["parameters_sha256"] != before["parameters_sha256"]
    with pytest.raises(ResumeMismatchError, match="other weights: parameters_sha256: recorded"):
        check_same("weights", before, after, str(tmp_path / "run"), "a training run")


def test_a_field_an_older_version_did_not_record_is_named(tmp_path):
    recorded = {"kind": "checkpoint files", "sha256": "abc", "config_sha256": "def"}
    current = {**recorded, "parameters_sha256": "123"}
    with pytest.raises(ResumeMismatchError, match=r"parameters_sha256: not recorded \(by an older recurrent_lens\)"):
        check_same("weights", recorded, current, str(tmp_path), "a training run")
