"""``recurrent-lens harvest``: a store written, resumed and trained from; a full disk named."""

from tests.support.cli import checkpoint, run, small  # noqa: F401 (checkpoint is a fixture)

from recurrent_lens.sae import load


def test_harvest_then_train_from_the_store(checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    assert run("harvest", "--model", checkpoint, "--dataset", checkpoint / "docs.txt", "--context-length", 16,
               "--layers", "1", "--heads", "2", "--positions-per-seq", 4, "--no-progress", "--out", store) == 0
    assert "blocks.1.mixer.hook_state.h2" in capsys.readouterr().out
    assert run("harvest", "--model", checkpoint, "--dataset", checkpoint / "docs.txt", "--context-length", 16,
               "--layers", "1", "--heads", "2", "--positions-per-seq", 4, "--no-progress", "--out", store) == 0
    out = tmp_path / "from_store"
    assert run("train-sae", "--states", store, "--out", out, "--steps", 4, "--batch-size", 16, "--n-features", 8,
               "--k", 2, "--buffer-size", 16, "--no-progress") == 0
    assert load(str(out / "blocks.1.mixer.hook_state.h2")).cfg.metadata["train_steps"] == 4


def test_a_full_disk_mid_harvest_ends_with_the_file_named(checkpoint, tmp_path, capsys, monkeypatch):
    import errno

    import recurrent_lens.states.store as store_mod

    def no_space(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", no_space)
    argv = small(checkpoint, tmp_path, "--layers", "0", "--heads", "1")
    argv = ["harvest", *argv[1:argv.index("--steps")], "--layers", "0", "--heads", "1", "--out", tmp_path / "store",
            "--no-progress"]
    assert run(*argv) == 1
    err = capsys.readouterr().err
    shard = tmp_path / "store" / "blocks.0.mixer.hook_state.h1" / "shard_00000.safetensors"
    assert f"recurrent-lens harvest: error: [Errno 28] cannot write {shard}: No space left on device" in err, err
    assert not list((tmp_path / "store").rglob(".tmp-*"))
