"""One writer per output directory: a second run on it fails at once naming the holder, the first run's
result stays intact, and a lock left by a dead process is taken over with a warning."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.cli import main
from recurrent_lens.sae import SAETrainer, TrainConfig, load
from recurrent_lens.sae.trainer import MultiCellTrainer
from recurrent_lens.states.store import StateStore, harvest_to_store
from recurrent_lens.states.files import LOCK_NAME, DirectoryLock, DirectoryLockedError

ROOT = Path(__file__).resolve().parents[2]
CELLS = [("blocks.0.mixer.hook_state", 1)]
HARVEST = dict(positions_per_seq=2, batch_size=2, shard_size=4, progress=False)


def start(script: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.05)


# The first run: a harvest (or training) whose token source pauses inside the run, holding the lock,
# until the test creates the file "go".
PAUSING_SOURCE = """
    import os, sys, time, torch
    from tests.support.helpers import tiny_gdn
    out, flags = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)

    def windows(n):
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            if i == 2:
                open(os.path.join(flags, "started"), "w").close()
                while not os.path.exists(os.path.join(flags, "go")):
                    time.sleep(0.02)
            yield torch.randint(0, 61, (10,), generator=g)
"""


def test_second_harvest_on_one_out_dir_fails_fast_and_the_first_completes(tmp_path):
    out, flags = tmp_path / "store", tmp_path / "flags"
    flags.mkdir()
    first = start(PAUSING_SOURCE + """
    from recurrent_lens.states.store import harvest_to_store
    harvest_to_store(tiny_gdn(seed=0), [("blocks.0.mixer.hook_state", 1)], windows(6), out, positions_per_seq=2,
                     batch_size=2, shard_size=4, progress=False)
    """, out, flags)
    try:
        wait_for(flags / "started", first)
        t0 = time.monotonic()
        with pytest.raises(DirectoryLockedError) as info:
            harvest_to_store(tiny_gdn(seed=0), CELLS, torch.randint(0, 61, (6, 10)), out, **HARVEST)
        assert time.monotonic() - t0 < 5
        message = str(info.value)
        assert f"out_dir: {str(out)!r} is in use by another run: pid {first.pid} on this host" in message
        assert "Wait for it to finish or stop it, or choose another directory" in message
        (flags / "go").touch()
        assert first.wait(120) == 0, first.communicate()
    finally:
        first.kill()
        first.wait()
    store = StateStore(out)
    assert store.complete and store.sequences_done == 6 and store.count(store.cells[0]) == 12
    assert not (out / LOCK_NAME).exists()


def test_second_multicell_trainer_on_one_out_dir_fails_and_the_first_result_is_intact(tmp_path):
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    first = start(PAUSING_SOURCE + """
    from recurrent_lens.sae import TrainConfig
    from recurrent_lens.sae.trainer import train_cells
    cfg = TrainConfig(n_steps=3, batch_size=8, n_features=16, k=2, buffer_size=8, model_batch_size=2,
                      positions_per_seq=2, progress=False)
    train_cells(tiny_gdn(seed=0), [("blocks.0.mixer.hook_state", 1)], windows(10**6), cfg, out_dir=out)
    """, out, flags)
    cfg = TrainConfig(n_steps=3, batch_size=8, n_features=16, k=2, buffer_size=8, model_batch_size=2,
                      positions_per_seq=2, progress=False)
    try:
        wait_for(flags / "started", first)
        with pytest.raises(DirectoryLockedError, match=f"is in use by another run: pid {first.pid} on this host"):
            MultiCellTrainer(tiny_gdn(seed=0), CELLS, torch.randint(0, 61, (8, 10)), cfg, out_dir=str(out))
        (flags / "go").touch()
        assert first.wait(120) == 0, first.communicate()
    finally:
        first.kill()
        first.wait()
    sae = load(str(out / "blocks.0.mixer.hook_state.h1"))
    assert sae.cfg.metadata["train_steps"] == 3
    assert json.loads((out / "blocks.0.mixer.hook_state.h1" / "train_log.json").read_text())["train"]
    assert not (out / LOCK_NAME).exists()


def test_trainers_hold_the_lock_until_train_returns(tmp_path):
    model, tokens = tiny_gdn(seed=0), torch.randint(0, 61, (8, 10))
    cfg = TrainConfig(n_steps=2, batch_size=8, n_features=16, k=2, buffer_size=16, progress=False)
    one = str(tmp_path / "one")
    trainer = SAETrainer(model, "blocks.0.mixer.hook_state", 1, tokens, cfg, out_dir=one)
    with pytest.raises(DirectoryLockedError, match=f"out_dir: .* pid {os.getpid()}"):
        SAETrainer(model, "blocks.0.mixer.hook_state", 1, tokens, cfg, out_dir=one)
    trainer.train()
    assert not (tmp_path / "one" / LOCK_NAME).exists()
    SAETrainer(model, "blocks.0.mixer.hook_state", 1, tokens, cfg, out_dir=one).train()  # free again

    multi = MultiCellTrainer(model, CELLS, tokens, cfg, out_dir=str(tmp_path / "many"))
    with pytest.raises(DirectoryLockedError, match="out_dir: .* is in use by another run"):
        MultiCellTrainer(model, CELLS, tokens, cfg, out_dir=str(tmp_path / "many"))
    multi.train(until_step=1)
    assert not (tmp_path / "many" / LOCK_NAME).exists()
    MultiCellTrainer(model, CELLS, tokens, cfg, out_dir=str(tmp_path / "many")).train()
    assert load(str(tmp_path / "many" / "blocks.0.mixer.hook_state.h1")).cfg.metadata["train_steps"] == 2


def test_a_refused_construction_leaves_the_directory_unlocked(tmp_path):
    model, tokens = tiny_gdn(seed=0), torch.randint(0, 61, (8, 10))
    cfg = TrainConfig(n_steps=2, batch_size=8, n_features=16, k=2, buffer_size=16, progress=False)
    with pytest.raises(ValueError, match="tokens: expected non-empty"):
        MultiCellTrainer(model, CELLS, tokens, cfg, out_dir=str(tmp_path), val_tokens=torch.zeros(2, 3, 4))
    assert not (tmp_path / LOCK_NAME).exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with pytest.warns(RuntimeWarning, match=f"took over the stale lock .* of pid {pid} .* no longer running"):
        store = harvest_to_store(tiny_gdn(seed=0), CELLS, torch.randint(0, 61, (4, 10)), out, **HARVEST)
    assert store.complete and store.count(store.cells[0]) == 8 and not (out / LOCK_NAME).exists()


def test_locks_of_other_hosts_and_unreadable_locks_are_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "t"}))
    with pytest.raises(DirectoryLockedError, match=f"pid \\d+ on host 'elsewhere'.* delete .*{LOCK_NAME} and retry"):
        DirectoryLock(tmp_path, "out_dir").acquire()
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(DirectoryLockedError, match="no readable pid, host and start time"):
        DirectoryLock(tmp_path, "out_dir").acquire()


def test_the_context_manager_releases_on_exceptions(tmp_path):
    with pytest.raises(KeyError):
        with DirectoryLock(tmp_path, "out_dir") as lock:
            assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
            raise KeyError("boom")
    assert not lock.held and not (tmp_path / LOCK_NAME).exists()


def test_cli_train_sae_refuses_a_locked_out(tmp_path, capsys):
    with DirectoryLock(tmp_path, "out_dir"):
        with pytest.raises(SystemExit) as e:
            main(["train-sae", "--arch", "gdn", "--out", str(tmp_path), "--steps", "2", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: {str(tmp_path)!r} is in use by another run: pid {os.getpid()} on this host" in err
    assert not (tmp_path / LOCK_NAME).exists() and not (tmp_path / "cfg.json").exists()
