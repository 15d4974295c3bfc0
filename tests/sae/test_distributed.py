"""torchrun with the gloo backend, 2 processes: data-parallel SAEs equal one process's, cells split across ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.cli import main
from recurrent_lens.sae import load
from recurrent_lens.states.store import harvest_to_store
from recurrent_lens.states.files import DirectoryLock

CELLS = [("blocks.0.mixer.hook_state", 1), ("blocks.1.mixer.hook_write", 3)]
NAMES = [f"{h}.h{k}" for h, k in CELLS]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    tokens = torch.randint(0, 61, (40, 24), generator=torch.Generator().manual_seed(3))
    harvest_to_store(tiny_gdn(seed=0), CELLS, tokens, str(path), positions_per_seq=8, progress=False)
    return path


def train_args(store, out, *extra):
    return ["train-sae", "--states", str(store), "--out", str(out), "--steps", "20", "--batch-size", "64",
            "--n-features", "32", "--k", "4", "--lr", "0.003", "--no-progress", "--threads", "1", *extra]


def torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "recurrent_lens", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def params(path):
    return {k: v for k, v in load(str(path)).state_dict().items()}


def test_data_parallel_and_distributed_cells_match_one_process(store, tmp_path):
    assert main(train_args(store, tmp_path / "one")) == 0
    torchrun(*train_args(store, tmp_path / "ddp"))
    torchrun(*train_args(store, tmp_path / "cells", "--distribute-cells"))
    for name in NAMES:
        one = params(tmp_path / "one" / name)
        ddp = params(tmp_path / "ddp" / name)
        cells = params(tmp_path / "cells" / name)
        assert one.keys() == ddp.keys() == cells.keys()
        for key in one:
            torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-4, msg=f"{name} {key} (data-parallel)")
            torch.testing.assert_close(cells[key], one[key], rtol=0, atol=1e-6, msg=f"{name} {key} (cells)")
        assert load(str(tmp_path / "ddp" / name)).cfg.metadata["train_steps"] == 20
    manifest = json.loads((tmp_path / "ddp" / "checkpoint.json").read_text())
    assert (manifest["world_size"], manifest["mode"]) == (2, "data")
    # each rank of the cells run trained only its own cell and wrote its own checkpoint manifest
    assert sorted(p.name for p in (tmp_path / "cells").glob("checkpoint*.json")) == [
        "checkpoint.rank0.json", "checkpoint.rank1.json"]


def test_a_locked_out_stops_every_rank_at_once(store, tmp_path):
    """Rank 0 alone takes the lock; when it cannot, every rank stops with the message (none waits for it)."""
    out = tmp_path / "locked"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with DirectoryLock(out, "out_dir"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "recurrent_lens", *train_args(store, out)], capture_output=True, text=True,
                              timeout=120, env=env)
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another run: pid {os.getpid()}") == 2, done.stderr[-3000:]
    assert "(rank 0 could not lock it)" in done.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_a_frozen_rank_ends_every_rank_after_the_timeout(store, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0 ends within a bounded time with an error naming the timeout,
    the collective and its rank, a non-zero status, and the last checkpoint still loadable."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "frozen"
    argv = [*train_args(store, out, "--checkpoint-every", "2", "--timeout", "5")]
    argv[argv.index("--steps") + 1] = "100000"
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "recurrent_lens", *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.json").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint was written"
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=40)
        took = time.monotonic() - stopped
    finally:
        procs[1].kill()
        procs[1].communicate()
        if procs[0].poll() is None:
            procs[0].kill()
    assert procs[0].returncode not in (0, None), err[-3000:]
    assert "--timeout 5" in err and "rank 0" in err, err[-3000:]
    assert any(op in err for op in ("all_reduce", "barrier", "broadcast", "all_gather")), err[-3000:]
    assert took < 30
    manifest = json.loads((out / "checkpoint.json").read_text())
    step = manifest["step"]
    assert step >= 2 and not manifest["complete"]
    for name in NAMES:
        assert (out / name / f"checkpoint-{step:08d}.pt").exists()
        torch.load(out / name / f"checkpoint-{step:08d}.pt", weights_only=True)
    for rank in range(2):
        torch.load(out / f"data-{step:08d}.rank{rank}.pt", weights_only=True)


def test_a_divergence_on_one_rank_stops_every_rank_at_once(tmp_path):
    """A NaN in the store rows one rank reads: both ranks stop at the same check (the divergence check is itself
    a collective at every log step), long before the timeout."""
    import time

    import numpy as np

    states = np.random.default_rng(0).standard_normal((2000, 3, 5)).astype(np.float32)
    states[777, 0, 0] = np.nan
    (tmp_path / "ref" / "layer_0").mkdir(parents=True)
    np.save(tmp_path / "ref" / "layer_0" / "head_0.npy", states)
    argv = ["train-sae", "--states", str(tmp_path / "ref"), "--out", str(tmp_path / "out"), "--steps", "200",
            "--batch-size", "32", "--n-features", "32", "--k", "4", "--buffer-size", "64", "--no-progress",
            "--threads", "1", "--timeout", "300"]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "recurrent_lens", *argv], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and time.monotonic() - start < 120, done.stderr[-3000:]
    assert "training diverged: non-finite training states" in done.stderr and "store row 777" in done.stderr
    assert not (tmp_path / "out" / "blocks.0.mixer.hook_state.h0" / "cfg.json").exists()
