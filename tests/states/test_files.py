"""The file helpers of :mod:`recurrent_lens.states.files`: ``atomic_write`` on a full disk."""

import errno
import os
import re
import shutil
from collections import namedtuple

import pytest
from safetensors import SafetensorError

from recurrent_lens.states.files import atomic_write


def test_a_full_disk_names_the_file_whatever_the_writer_raises(tmp_path, monkeypatch):
    """``OSError(ENOSPC)``, safetensors' own error saying so, or ``torch.save``'s short write on a full disk:
    an ``OSError`` naming the target, nothing left behind, an existing file unchanged."""
    target = tmp_path / "cfg.json"
    target.write_text("old")

    def failing(error):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"\0" * 100)
            raise error
        return write

    errors = [OSError(errno.ENOSPC, "No space left on device"),
              SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
              RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 0))
    for error in errors:
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(target))}: No space left on device") as e:
            atomic_write(str(target), failing(error))
        assert e.value.errno == errno.ENOSPC and e.value.__cause__ is error
        assert os.listdir(tmp_path) == ["cfg.json"] and target.read_text() == "old"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not a full disk: the writer's own error
        atomic_write(str(target), failing(errors[2]))
    assert os.listdir(tmp_path) == ["cfg.json"]
