"""Weights & Biases logging (``open_run``, ``log_row``) and ``train-sae --wandb``: both trainers log to a stand-in
``wandb`` module (no network), and every training path writes ``train_log.json``."""

import json
import sys
import types

import pytest
from tests.support.cli import QUICK_SAE, checkpoint, small  # noqa: F401  (checkpoint is a fixture)

from recurrent_lens.cli import main


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.rows: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, row, step):
        self.rows.append((step, dict(row)))

    def finish(self):
        self.finished = True


@pytest.fixture
def wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_toy_train_sae_logs_the_progress_bar_and_explained_variance(wandb, tmp_path):
    out = tmp_path / "sae"
    assert main(["train-sae", "--arch", "gdn", "--out", str(out), *QUICK_SAE, "--wandb", "proj",
                 "--wandb-run-name", "toy-run"]) == 0
    (run,) = wandb.runs
    assert run.init["project"] == "proj" and run.init["name"] == "toy-run" and run.finished
    assert run.init["config"]["n_features"] == 16
    steps = [step for step, _ in run.rows]
    assert steps == sorted(steps) and steps[-1] == 5
    cell = "blocks.1.mixer.hook_state.h0"  # one log format: every row is named by its cell, one cell or many
    assert {f"{cell}/{key}" for key in ("mse", "l0", "dead", "explained_variance")} <= set(run.rows[-1][1])
    log = json.loads((out / "train_log.json").read_text())
    assert log["train"][-1]["step"] == 5
    assert run.rows[-1][1][f"{cell}/explained_variance"] == pytest.approx(log["train"][-1]["explained_variance"])


def test_multicell_train_sae_logs_each_cell(wandb, checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main([str(a) for a in small(checkpoint, out, "--layers", "0", "--heads", "0,3", "--val-sequences", 4,
                                       "--wandb", "proj")]) == 0
    (run,) = wandb.runs
    assert run.init["project"] == "proj" and run.init["name"] is None and run.finished
    keys = set().union(*(row for _, row in run.rows))
    for cell in ("blocks.0.mixer.hook_state.h0", "blocks.0.mixer.hook_state.h3"):
        assert {f"{cell}/mse", f"{cell}/l0", f"{cell}/dead", f"{cell}/explained_variance",
                f"{cell}/val_explained_variance"} <= keys
        assert (out / cell / "train_log.json").exists()


def test_no_wandb_without_the_flag_and_a_run_name_needs_a_project(wandb, tmp_path, capsys):
    assert main(["train-sae", "--arch", "gdn", "--out", str(tmp_path / "a"), *QUICK_SAE]) == 0
    assert wandb.runs == [] and (tmp_path / "a" / "train_log.json").exists()
    with pytest.raises(SystemExit):
        main(["train-sae", "--arch", "gdn", "--out", str(tmp_path / "b"), *QUICK_SAE, "--wandb-run-name", "x"])
    assert "--wandb-run-name: names a Weights & Biases run, which needs --wandb PROJECT" in capsys.readouterr().err


def test_open_run_and_log_row(wandb):
    from recurrent_lens.sae.wandb_log import log_row, open_run

    off = types.SimpleNamespace(wandb=False, wandb_project="p", wandb_run_name=None)
    assert open_run(off, {"lr": 1.0}) is None and wandb.runs == []
    run = open_run(types.SimpleNamespace(wandb=True, wandb_project="p", wandb_run_name="r"), {"lr": 1.0})
    assert run.init == {"project": "p", "name": "r", "config": {"lr": 1.0}}
    row = {"step": 7, "mse": 0.5, "dead": 3, "diverged": False, "cell": "h0", "nmse": float("nan")}
    log_row(run, row, step=7)
    log_row(run, row, step=8, prefix="blocks.0.mixer.hook_state.h0")
    log_row(None, row, step=9)  # no run: nothing logged, nothing raised
    assert run.rows[0] == (7, {"mse": 0.5, "dead": 3, "nmse": row["nmse"]})
    assert run.rows[1] == (8, {"blocks.0.mixer.hook_state.h0/mse": 0.5, "blocks.0.mixer.hook_state.h0/dead": 3,
                               "blocks.0.mixer.hook_state.h0/nmse": row["nmse"]})
    assert len(run.rows) == 2
