"""The CLI on a real checkpoint format: train-sae and harvest on a tiny saved Qwen3.5 with a tokenizer."""

import json
import os
import re
import subprocess
import sys

import pytest
from tests.support.cli import checkpoint, run, small  # noqa: F401 (checkpoint is a fixture)
from tests.support.helpers import tiny_qwen3_5

from recurrent_lens.sae import load
from recurrent_lens.states.files import DirectoryLock


def test_train_sae_on_a_checkpoint_writes_one_sae_per_cell(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(*small(checkpoint, out, "--layers", "0,1", "--heads", "0,3", "--val-sequences", 4)) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == [f"blocks.{l}.mixer.hook_state.h{h}" for l in (0, 1) for h in (0, 3)]
    for name in names:
        sae = load(str(out / name))
        assert sae.cfg.metadata["hook_name"] == name.rsplit(".h", 1)[0] and (sae.cfg.d_k, sae.cfg.d_v) == (8, 12)
        log = json.loads((out / name / "train_log.json").read_text())
        assert log["train"][-1]["step"] == 6 and log["val"]
    assert "saved 4 SAE(s)" in capsys.readouterr().out


def test_write_hooks_and_dtype(checkpoint, tmp_path):
    out = tmp_path / "w"
    assert run(*small(checkpoint, out, "--layers", "2", "--hook-kind", "write", "--heads", "1",
                      "--dtype", "bfloat16")) == 0
    assert load(str(out / "blocks.2.mixer.hook_write.h1")).cfg.metadata["train_steps"] == 6


@pytest.mark.parametrize("extra, message", [
    (["--layers", "3"], "not a recurrent layer"),
    (["--layers", "9"], "not a recurrent layer"),
    (["--hook", "blocks.0.mixer.hook_read"], "hook_name"),
    (["--layers", "0", "--heads", "4"], "--heads"),
    ([], "name the hooks"),
])
def test_bad_cells_are_parser_errors(checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run(*small(checkpoint, tmp_path / "o", *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_dataset_shorter_than_one_context(checkpoint, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the cat\n")
    argv = small(checkpoint, tmp_path / "o", "--layers", "0")
    argv[argv.index("--dataset") + 1] = short
    with pytest.raises(SystemExit):
        run(*argv)
    assert "shorter than one context" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    from recurrent_lens import HookedRecurrentModel

    monkeypatch.setattr(HookedRecurrentModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (small(checkpoint, blocker / "out", "--layers", "0"),
                 ["train-sae", "--out", blocker / "toy", "--no-progress"]):
        with pytest.raises(SystemExit):
            run(*argv)
        assert "--out: cannot write" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "recurrent_lens", "train-sae", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--distribute-cells" in done.stdout


def test_store_commands_refuse_locked_corrupt_and_warn_on_incomplete_stores(checkpoint, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "out"
    harvest = ["harvest", "--model", checkpoint, "--dataset", checkpoint / "docs.txt", "--context-length", 16,
               "--layers", "1", "--heads", "2", "--positions-per-seq", 4, "--no-progress", "--out", store]
    train = ["train-sae", "--states", store, "--out", out, "--steps", 2, "--batch-size", 16, "--n-features", 8,
             "--k", 2, "--buffer-size", 16, "--no-progress"]
    assert run(*harvest) == 0
    for argv, locked in ((harvest, store), (train, out)):
        with DirectoryLock(locked, "out_dir"), pytest.raises(SystemExit) as e:
            run(*argv)
        assert e.value.code == 2 and f"argument --out: {str(locked)!r} is in use by another run: pid {os.getpid()}" \
            in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if p.is_file()]  # the refused run wrote nothing

    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    n = manifest["sequences_done"]
    with pytest.warns(RuntimeWarning, match=re.escape(f"is INCOMPLETE: its harvest stopped after {n} sequences "
                                                      f"({4 * n} states per cell) and never finished")):
        assert run(*train) == 0

    shard = store / "blocks.1.mixer.hook_state.h2" / "shard_00000.safetensors"
    data = shard.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["position"]["data_offsets"] = [o - 8 for o in header["position"]["data_offsets"]]  # into the header
    raw = json.dumps(header).encode().ljust(size)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])
    with pytest.raises(SystemExit) as e:
        run(*[tmp_path / "again" if a == out else a for a in train])
    assert e.value.code == 2
    assert "argument --states: " in (err := capsys.readouterr().err) and "'position' field 'data_offsets'" in err


def test_train_from_a_reference_layout_store(tmp_path):
    import numpy as np

    (tmp_path / "ref" / "layer_9").mkdir(parents=True)
    np.save(tmp_path / "ref" / "layer_9" / "head_4.npy", np.random.rand(64, 3, 5).astype(np.float32))
    assert run("train-sae", "--states", tmp_path / "ref", "--out", tmp_path / "o", "--steps", 3, "--batch-size", 16,
               "--n-features", 8, "--k", 2, "--buffer-size", 16, "--no-progress") == 0
    sae = load(str(tmp_path / "o" / "blocks.9.mixer.hook_state.h4"))
    assert (sae.cfg.d_k, sae.cfg.d_v, sae.cfg.metadata["head"]) == (3, 5, 4)


def test_torchrun_data_parallel_on_a_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "ddp"
    argv = [str(a) for a in small(checkpoint, out, "--layers", "0", "--heads", "1", "--threads", "1")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "recurrent_lens", *argv], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert load(str(out / "blocks.0.mixer.hook_state.h1")).cfg.metadata["train_steps"] == 6
    assert json.loads((out / "checkpoint.json").read_text())["world_size"] == 2


def test_resume_checks_the_weights_and_the_data_not_how_the_path_is_spelled(checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    monkeypatch.chdir(tmp_path)
    cells = ["--context-length", 16, "--layers", "1", "--heads", "2", "--positions-per-seq", 4, "--no-progress"]
    harvest = ["harvest", "--dataset", ck / "docs.txt", *cells, "--out", tmp_path / "store"]
    assert run(*harvest, "--model", "./ck", "--sequences", 3) == 0
    assert run(*harvest, "--model", ck.resolve(), "--sequences", 5) == 0  # the same checkpoint, spelled otherwise
    tiny_qwen3_5(seed=1).save_pretrained(ck)  # new weights in place, same shapes
    (tmp_path / "other.txt").write_text((ck / "docs.txt").read_text().replace("cat", "dog"))
    for argv, message in [(["--model", "./ck"], "other weights: sha256: recorded"),
                          (["--model", checkpoint, "--dataset", tmp_path / "other.txt"], "other data .*content: ")]:
        with pytest.raises(SystemExit) as exit_:
            run(*harvest, *argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --out" in err and re.search(message, err) and "or delete" in err, err
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["sequences_done"] == 5
    # the original checkpoint and corpus elsewhere hold the same bytes: the same weights and data
    assert run(*harvest, "--model", checkpoint, "--dataset", checkpoint / "docs.txt", "--sequences", 6) == 0

    out = tmp_path / "sae"
    cell = ["--layers", "0", "--heads", "1", "--checkpoint-every", 2]
    assert run(*small(checkpoint, out, *cell)) == 0
    for argv, message in [(small(ck, out, *cell), "other weights"),
                          (small(checkpoint, out, *cell, "--dataset", tmp_path / "other.txt"), "other data")]:
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_divergence_exits_non_zero_and_saves_no_sae(tmp_path, capsys):
    import numpy as np

    states = np.random.default_rng(0).standard_normal((2000, 3, 5)).astype(np.float32)
    states[777, 0, 0] = np.nan
    (tmp_path / "ref" / "layer_0").mkdir(parents=True)
    np.save(tmp_path / "ref" / "layer_0" / "head_0.npy", states)
    argv = ["train-sae", "--states", tmp_path / "ref", "--steps", 200, "--batch-size", 32, "--n-features", 32,
            "--k", 4, "--buffer-size", 64, "--no-progress"]
    assert run(*argv, "--out", tmp_path / "nan") == 1
    err = capsys.readouterr().err
    assert "blocks.0.mixer.hook_state.h0: training diverged: non-finite training states" in err
    assert "store row 777" in err and not (tmp_path / "nan" / "blocks.0.mixer.hook_state.h0" / "cfg.json").exists()
    states[777, 0, 0] = 0
    np.save(tmp_path / "ref" / "layer_0" / "head_0.npy", states)
    assert run(*argv, "--lr", "1e6", "--out", tmp_path / "lr") == 1
    assert "training diverged" in capsys.readouterr().err
    assert run(*argv, "--lr", "30", "--out", tmp_path / "finite") == 1  # diverged, but finite
    assert "training diverged: normalised MSE above TrainConfig.max_nmse=1000" in capsys.readouterr().err


def test_dataset_defects_deep_in_the_file_are_parser_errors_before_training(checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    import numpy as np

    from recurrent_lens.sae.trainer import MultiCellTrainer

    monkeypatch.setattr(MultiCellTrainer, "train", lambda self: pytest.fail("training started"))
    lines = (checkpoint / "docs.txt").read_bytes().split(b"\n")
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"\n".join(lines[:50] + [b"the \xfe cat"] + lines[50:]))
    ids = np.random.default_rng(0).integers(0, 12, (40, 16))
    ids[33, 7] = 500
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    cases = [(bad_text, r"bad.txt, line 51: expected UTF-8 text, got byte 0xfe at byte 5 of the line"),
             (tmp_path / "ids.npy", r"ids.npy', row 33: expected token ids in [0, 97) (d_vocab), got 500"),
             (tmp_path / "junk.npy", r"junk.npy': expected a .npy array of token ids")]
    for dataset, message in cases:
        for command in ("train-sae", "harvest"):
            argv = small(checkpoint, tmp_path / command, "--layers", "0")
            argv[argv.index("--dataset") + 1] = dataset
            if dataset.suffix == ".npy":
                at = argv.index("--context-length")
                del argv[at:at + 2]
            if command == "harvest":
                argv = ["harvest", *argv[1:argv.index("--steps")], "--layers", "0", "--out", tmp_path / "store"]
            with pytest.raises(SystemExit) as e:
                run(*argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and "argument --dataset: " in err and message in err, (command, err)


@pytest.mark.parametrize("command", ["train-sae", "harvest"])
def test_skip_positions_leaving_nothing_names_the_option(checkpoint, tmp_path, capsys, command):
    argv = small(checkpoint, tmp_path / "o", "--layers", "0", "--skip-positions", "16")
    if command == "harvest":
        argv = ["harvest", *argv[1:argv.index("--steps")], "--layers", "0", "--skip-positions", "16",
                "--out", tmp_path / "store"]
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert ("argument --skip-positions: expected fewer than the 16 positions of a sequence (--context-length), "
            "got 16") in err, err


def test_batch_larger_than_the_buffer_or_the_store_names_both_numbers(checkpoint, tmp_path, capsys):
    import numpy as np

    (tmp_path / "ref" / "layer_9").mkdir(parents=True)
    np.save(tmp_path / "ref" / "layer_9" / "head_4.npy", np.random.rand(40, 3, 5).astype(np.float32))
    store = ["train-sae", "--states", tmp_path / "ref", "--out", tmp_path / "s", "--steps", 3, "--n-features", 8,
             "--k", 2, "--no-progress"]
    cases = [(small(checkpoint, tmp_path / "o", "--layers", "0", "--batch-size", 128, "--buffer-size", 64),
              "argument --buffer-size: expected at least --batch-size 128, got 64"),
             ([*store, "--batch-size", 64, "--buffer-size", 16],
              "argument --buffer-size: expected at least --batch-size 64, got 16"),
             ([*store, "--batch-size", 64, "--buffer-size", 64],
              f"argument --batch-size: expected at most the 40 states stored for blocks.9.mixer.hook_state.h4 in "
              f"--states {tmp_path / 'ref'}, got 64")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run(*argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
