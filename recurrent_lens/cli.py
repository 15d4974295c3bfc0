"""The ``recurrent-lens`` command line: a demo on the toy models, SAE training and the analyses of a saved SAE.

::

    recurrent-lens demo [--model shakespeare-gdn [--dataset PATH] | --arch gdn] [--out DIR] [--quick]
    recurrent-lens train-sae --arch gdn --out DIR [--hook blocks.1.mixer.hook_state --head 0 ...]
    recurrent-lens train-sae --model DIR_OR_HUB_ID --dataset PATH --layers 1,9,17 --heads 4 --context-length 512
                             --steps N --out OUT [--dtype bfloat16 --device cuda]   (also under torchrun)
    recurrent-lens harvest --model DIR --dataset PATH --layers 1,9 --out STORE;  train-sae --states STORE --out OUT
    recurrent-lens substitution --arch gdn --sae DIR [--replace update --scale coefficient ...]
    recurrent-lens logit-shift --arch gdn --sae DIR [--eps 0.1 0.3 1 3] [--atoms I ... | --n-atoms N]
                               [--readout final_norm]
    recurrent-lens erase --arch gdn --sae DIR --atom I [--target TOKEN] [--control-multipliers 1 2 4]
    recurrent-lens partition --arch gdn --sae DIR [--replace update] [--tau 0.05]
    recurrent-lens reproduce [--arch gdn | --model DIR --dataset PATH --sae DIR --hook H --head N] [--protocol paper]
    recurrent-lens dashboard --model NAME|DIR --sae DIR|NAME [--dataset PATH] --out site/ [--features 0,5,9]
                             [--n-examples 20] [--context 24]

``demo``, ``substitution``, ``logit-shift``, ``partition`` and ``reproduce`` take ``--protocol ours|paper``:
every option not given on the command line takes that protocol's choice (``ours`` keeps the defaults
listed in ``--help``; ``paper`` the paper's, listed at the end of ``--help`` after ``--protocol paper sets``).

The analysis commands (``substitution``, ``logit-shift``, ``erase``, ``partition``) run on held-out toy
sequences (seed ``--seed + 10000``), so they all see the same data for one SAE, and take ``--csv`` for
the per-measurement table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recurrent_lens import HookedRecurrentModel, toy
from recurrent_lens.analysis import erase_atom, logit_shift_prediction, partition_atoms, preset, substitution_test
from recurrent_lens.analysis.reproduce import default_band, plot, reproduce
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.data import open_tokens
from recurrent_lens.integrity import NonFiniteError, ResumeMismatchError
from recurrent_lens.models.loading import CheckpointError
from recurrent_lens.pretrained import PRETRAINED_DIR, list_pretrained, list_pretrained_saes, pretrained_path
from recurrent_lens.sae import TrainConfig
from recurrent_lens.sae import train as train_sae
from recurrent_lens.sae.training import write_json
from recurrent_lens.sae import load as load_sae
from recurrent_lens.states.cells import parse_cell, parse_cells
from recurrent_lens.sae.multicell import CollectiveError, MultiCellTrainer, collective
from recurrent_lens.states.store import StateStore, harvest_to_store
from recurrent_lens.states.files import DirectoryLock, DirectoryLockedError, check_writable

# The analyses skip the BOS position, as SAE training and the substitution test do.
SKIP_POSITIONS = 1
DEMO_MODEL = "shakespeare-gdn"
"""What ``demo`` runs on without ``--arch`` or ``--model`` (the README's "Main job" says why)."""
DEMO_TEXT_STEPS = 600
"""``demo --model``'s default SAE steps (the toy demo's are ``toy.PROBE_SAE["n_steps"]``)."""
DEMO_TEXT_EVAL = 16
"""``demo --model``'s default held-out windows (the toy demo's: 128 toy sequences)."""
DEMO_TEXT_SITE = ("blocks.1.mixer.hook_state", 0)
"""``demo --model``'s default cell: the one shakespeare-gdn's shipped SAE reads."""
"""``demo --model``'s default held-out windows (the toy demo's: 128 toy sequences)."""


def _number(kind: type, what: str, ok) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` and refuses values failing ``ok`` with ``expected {what}``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive finite number", lambda v: v > 0 and math.isfinite(v))
_nonzero_float = _number(float, "a nonzero finite number", lambda v: v != 0 and math.isfinite(v))
_cosine = _number(float, "a number in [-1, 1]", lambda v: -1 <= v <= 1)


def _add_model_args(p: argparse.ArgumentParser, arch_default: str | None = "gdn") -> None:
    default = "gdn" if arch_default else f"none: the demo runs on --model {DEMO_MODEL}"
    p.add_argument("--arch", default=arch_default, type=_toy_name, metavar="{" + ",".join(toy.names()) + "}",
                   help=f"toy architecture, by toy name or registry name (gated_deltanet, delta_net; "
                        f"default: {default})")
    p.add_argument("--hook", default=None,
                   help="state hook the SAE reads (default: the toy's probe site, the head whose writes its "
                        "recall needs most: blocks.1.mixer.hook_state; blocks.0 for mamba2 and gla)")
    p.add_argument("--head", type=_non_negative_int, default=None, help="head the SAE reads (default: the probe's, 0)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed for data and SAE (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default: 1; the toys are tiny, so more threads do not speed them up, and "
                        "one thread makes the numbers independent of the machine's core count)")


def _device(text: str) -> str:
    """An argparse ``type``: a torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"CUDA is not available on this machine, got {text!r}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"expected a CUDA device index below {torch.cuda.device_count()} "
                                             f"(the GPUs of this machine), got {text!r}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"MPS is not available on this machine, got {text!r}")
    return text


def _toy_name(text: str) -> str:
    """An argparse ``type``: a toy name, or its architecture's registry name, as the toy name."""
    try:
        return toy.spec(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("name: ")) from None


def _add_sae_args(p: argparse.ArgumentParser, text: bool = False) -> None:
    R = toy.PROBE_SAE
    p.add_argument("--sae-type", default=R["architecture"],
                   choices=["write_sae", "flat_sae", "matrix_sae", "bilinear_sae"],
                   help=f"SAE preset (default: {R['architecture']})")
    p.add_argument("--n-features", type=_positive_int, default=R["n_features"],
                   help=f"dictionary size (default: {R['n_features']})")
    p.add_argument("--k", type=_positive_int, default=R["k"], help=f"active features per state (default: {R['k']})")
    p.add_argument("--steps", type=_positive_int, default=None if text else R["n_steps"],
                   help=f"SAE optimizer steps (default: {DEMO_TEXT_STEPS} with a --model, {R['n_steps']} on a toy)"
                   if text else f"SAE optimizer steps (default: {R['n_steps']})")
    p.add_argument("--lr", type=_positive_float, default=R["lr"], help=f"SAE learning rate (default: {R['lr']:g})")
    p.add_argument("--train-sequences", type=_positive_int, default=R["train_sequences"],
                   help=f"toy sequences the SAE's states come from (default: {R['train_sequences']})")


def _add_substitution_args(p: argparse.ArgumentParser, features: bool = False, text: bool = False) -> None:
    p.add_argument("--eval-sequences", type=_positive_int, default=None if text else 128,
                   help=f"held-out sequences for the test (default: {DEMO_TEXT_EVAL} windows of a --model's dataset, "
                        "128 toy sequences)" if text else "held-out toy sequences for the test (default: 128)")
    p.add_argument("--replace", default="update", choices=["update", "write"],
                   help="what is replaced (default: update)")
    p.add_argument("--scale", default="coefficient", choices=["coefficient", "match_norm"], help="atom scale")
    p.add_argument("--random", default="rank1", choices=["rank1", "sae_atom", "empirical"],
                   help="random control: fresh rank-1 (default), a non-firing SAE atom, or an empirical resample of "
                        "the native updates' factors (the paper's Mamba-2 control)")
    p.add_argument("--kl", default="native_to_condition", choices=["native_to_condition", "condition_to_native"],
                   help="KL direction")
    p.add_argument("--positions", default="values", choices=["values", "all"],
                   help="which firings to test: 'values' (default) = the writes at the queried values v_i, each "
                        "read where it is recalled (q_i, t + task.recall_offset); 'all' = every position")
    p.add_argument("--readout-offset", type=_positive_int, default=None,
                   help="read at t + offset (default: task.recall_offset with --positions values, 1 with all)")
    p.add_argument("--max-firings-per-atom", type=_positive_int, default=30, help="cap per atom (default: 30)")
    p.add_argument("--atom", default="rising", choices=["rising", "dominant"] + (["feature"] if features else []),
                   help="which atom stands in for the write at t: 'rising' (default) = the atom whose code the "
                        "write raised most, a(S_t) - a(S_t - update); 'dominant' = argmax a(S_t), the paper's choice "
                        "on Qwen3.5 (on the toys' recall states it is usually another pair's atom)"
                        + ("; 'feature' = the firing feature's own atom" if features else ""))
    if features:
        p.add_argument("--features", type=int, nargs="+", default=None, metavar="I",
                       help="test only the firings of these atoms (the paper pools 8 exemplar features)")
    p.add_argument("--rank1-atoms", action="store_true",
                   help="use each atom's best rank-1 approximation; with --sae-type flat_sae and --scale match_norm "
                        "this is the paper's flat-SVD baseline")


def _add_saved_sae_args(p: argparse.ArgumentParser, table: str) -> None:
    p.add_argument("--sae", required=True,
                   help="directory of a saved SAE (cfg.json + sae_weights.safetensors), e.g. from train-sae")
    p.add_argument("--csv", default=None, help=f"write the {table} table to this CSV file")


def _add_analysis_parser(sub, name: str, *, summary: str, description: str, table: str,
                         sequences: int) -> argparse.ArgumentParser:
    """A subcommand that analyses a saved SAE on held-out toy sequences: model, --sae, --csv, --eval-sequences."""
    p = sub.add_parser(name, help=summary, description=description)
    _add_model_args(p)
    _add_saved_sae_args(p, table)
    p.add_argument("--eval-sequences", type=_positive_int, default=sequences,
                   help=f"held-out toy sequences the analysis runs on (default: {sequences})")
    return p


def _add_readout_offset(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--readout-offset", type=_positive_int, default=1, metavar="OFFSET",
                   help=f"read the logits at t + offset after {what} (default: 1; the toy's recall offset, 16, "
                        f"reads where a value written at t is recalled)")


def _add_real_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """Options that pick a checkpoint, a dataset and the cells (hook, head) to read."""
    g = p.add_argument_group("checkpoint and dataset")
    g.add_argument("--model", default=None, required=required, metavar="DIR_OR_HUB_ID",
                   help="checkpoint to load with HookedRecurrentModel.from_pretrained")
    g.add_argument("--dataset", default=None, required=required, metavar="PATH_OR_HUB_ID",
                   help=".txt (a document per line), .jsonl, a saved datasets directory, a hub dataset id, or "
                        "pre-tokenized ids (.npy/.safetensors/.pt, [n_seq, ctx])")
    g.add_argument("--text-field", default="text", help="text field of .jsonl / datasets rows (default: text)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--context-length", type=_positive_int, default=None,
                   help="tokens per sequence for text (pre-tokenized data keeps its own)")
    g.add_argument("--layers", type=_int_list, default=None, metavar="L1,L2",
                   help="shorthand for --hook blocks.{L}.mixer.hook_{KIND} for every layer listed")
    g.add_argument("--hook-kind", default="state", choices=["state", "write"],
                   help="with --layers: read S_t (state, default) or W_t (write)")
    g.add_argument("--heads", type=_int_list, default=None, metavar="H1,H2",
                   help="heads to read in every hook (default: all heads)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model weight dtype (default: the checkpoint's)")
    g.add_argument("--device", type=_device, default=None,
                   help="model and SAE device, e.g. cuda (default: cpu; under torchrun cuda means each rank's local GPU)")
    g.add_argument("--positions-per-seq", type=_positive_int, default=16,
                   help="positions sampled per sequence (default: 16)")
    g.add_argument("--skip-positions", type=_non_negative_int, default=1,
                   help="leading positions never sampled, e.g. BOS (default: 1)")
    g.add_argument("--model-batch-size", type=_positive_int, default=8,
                   help="sequences per model forward (default: 8)")


def _int_list(text: str) -> list[int]:
    """``"1,9,17"`` -> ``[1, 9, 17]`` (non-negative integers)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recurrent-lens",
        description="Interpretability for recurrent LMs with matrix states: toy models, WriteSAEs, the substitution "
                    "test, the closed-form logit shift, atom erasure and the register/bundle partition.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="text model (or toy) -> WriteSAE -> substitution test, with a table, plots "
                                       "and a dashboard",
                          description=f"Load a model (default: --model {DEMO_MODEL} on its Macbeth excerpt; --arch for "
                                      "a toy), train a WriteSAE on one head's state from hooks, run the single-write "
                                      "substitution test and save plots and a feature dashboard.")
    _add_model_args(demo, arch_default=None)
    _add_sae_args(demo, text=True)
    _add_substitution_args(demo, text=True)
    _add_protocol_options(demo, "substitution")
    demo.add_argument("--out", default=".", help="directory for plots and tables (default: the working directory)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a fast smoke run (seconds)")
    g = demo.add_argument_group("a text model instead of a toy")
    g.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help=f"a checkpoint for from_pretrained (default: {DEMO_MODEL} unless --arch): the SAE trains on "
                        f"--dataset's windows after the first --eval-sequences (default {DEMO_TEXT_EVAL}), which the "
                        "test runs on")
    g.add_argument("--dataset", default=None, metavar="PATH",
                   help="text or token dataset as for train-sae (default for the shipped models: the Macbeth excerpt)")
    g.add_argument("--context-length", type=_positive_int, default=256,
                   help="tokens per window of a text --dataset (default: 256)")

    train = sub.add_parser(
        "train-sae", help="train SAEs on a checkpoint's (or a toy's) state hooks and save them",
        description="With --model and --dataset: one SAE per cell (hook, head) of a checkpoint, all cells fed by the "
                    "same model passes over a text or token dataset; writes OUT/{hook}.h{head}/ (an SAE directory "
                    "with train_log.json) per cell. With --states: the same from a state store written by "
                    "`recurrent-lens harvest`. With neither: one SAE on a toy model's hook, written to --out. Under "
                    "torchrun the SAEs train data-parallel (or --distribute-cells).")
    _add_model_args(train)
    _add_sae_args(train)
    train.add_argument("--out", required=True, help="output directory (checked writable before any work)")
    _add_real_model_args(train)
    train.add_argument("--states", default=None, metavar="DIR",
                       help="train from a state store (recurrent-lens harvest, or the reference layer_L/head_H.npy "
                            "layout) instead of running a model")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="states per SAE step, the global batch across ranks (default: 256 real, the toy recipe's "
                            "for toys)")
    train.add_argument("--buffer-size", type=_positive_int, default=4096,
                       help="states held per cell in the shuffling buffer (default: 4096)")
    train.add_argument("--val-sequences", type=_non_negative_int, default=0,
                       help="sequences held out (the first ones of --dataset) for validation metrics (default: 0)")
    train.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                       help="write a resumable checkpoint every this many steps (default: 0, only at the end)")
    train.add_argument("--wandb", default=None, metavar="PROJECT",
                       help="log training (mse, l0, dead, explained variance, validation) to this Weights & Biases "
                            "project (default: no logging)")
    train.add_argument("--wandb-run-name", default=None, metavar="NAME",
                       help="the Weights & Biases run's name (default: wandb picks one; needs --wandb)")
    train.add_argument("--distribute-cells", action="store_true",
                       help="under torchrun, each rank trains its own subset of the cells on all of the data "
                            "(default: data-parallel, every rank trains every cell on its share)")
    train.add_argument("--timeout", type=_positive_float, default=600, metavar="SECONDS",
                       help="under torchrun, how long a rank waits for its peers in the start-up rendezvous and in "
                            "every collective before the run ends with an error (default: 600)")

    harvest = sub.add_parser(
        "harvest", help="write sampled states of many cells of a checkpoint to a state store",
        description="Run a checkpoint over a dataset and write the states (or writes) of every cell at sampled "
                    "positions to sharded safetensors under --out with a JSON manifest; a killed run resumes where "
                    "it stopped. `recurrent-lens train-sae --states DIR` trains from it.")
    _add_real_model_args(harvest, required=True)
    harvest.add_argument("--hook", default=None, help="a state or write hook to read, e.g. blocks.9.mixer.hook_state")
    harvest.add_argument("--out", required=True, help="store directory (checked writable before any work)")
    harvest.add_argument("--sequences", type=_positive_int, default=None,
                         help="stop after this many sequences (default: the whole dataset)")
    harvest.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="dtype of the stored states (default: float32)")
    harvest.add_argument("--shard-size", type=_positive_int, default=2048,
                         help="states per shard file and cell; up to this many states per cell wait in memory "
                              "before a flush (default: 2048, 128 MiB per cell of 128x128 fp32 states)")
    harvest.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the sampled positions")
    harvest.add_argument("--no-progress", action="store_true", help="hide progress bars")
    harvest.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")

    subst = sub.add_parser("substitution", help="run the substitution test with a saved SAE",
                           description="Atom vs delete vs random substitution of the native update at every "
                                       "firing of a saved SAE on a toy model.")
    _add_model_args(subst)
    _add_substitution_args(subst, features=True)
    _add_saved_sae_args(subst, "per-firing")
    _add_protocol_options(subst, "substitution")

    shift = _add_analysis_parser(
        sub, "logit-shift", summary="closed-form vs measured logit shift of adding an atom to the state",
        description="Add eps * A_i to the head's state at random positions t0 and compare the measured shift of "
                    "one token's logit at t0 + offset with the closed form eps * <W_U[tok], W_O (G * A_i)^T q_t> "
                    "(tok: the token the atom's leading direction promotes); prints zero- and one-parameter R^2 "
                    "and the median R^2 per (atom, eps) cell.",
        table="per-(atom, eps, position)", sequences=64)
    shift.add_argument("--eps", type=_nonzero_float, nargs="+", default=[0.1, 0.3, 1.0, 3.0], metavar="EPS",
                       help="perturbation sizes eps (default: 0.1 0.3 1 3)")
    which = shift.add_mutually_exclusive_group()
    which.add_argument("--atoms", type=int, nargs="+", default=None, metavar="I",
                       help="SAE atom indices to perturb (default: the --n-atoms atoms most often dominant)")
    which.add_argument("--n-atoms", type=_positive_int, default=10, metavar="N",
                       help="without --atoms, perturb the N atoms most often dominant (largest code) on the sequences, "
                            "or all that are ever dominant if fewer (default: 10)")
    shift.add_argument("--positions-per-atom", type=_positive_int, default=50,
                       help="random (sequence, t0) pairs per atom (default: 50)")
    shift.add_argument("--readout", default="unembed", choices=["unembed", "final_norm"],
                       help="'unembed' (default): W_U directly, the paper's form; 'final_norm': also linearise the "
                            "final norm at the native residual")
    _add_readout_offset(shift, "the edit at t0")

    erase = _add_analysis_parser(
        sub, "erase", summary="erase one atom where it fires and track a target token",
        description="Subtract a_t * A_i from the head's state wherever atom I fires (code a_t > 0) and measure "
                    "the change of one target token's log-probability at t + offset; controls add m * a* * A_i at "
                    "as many non-firing positions (a*: the median firing coefficient).",
        table="per-position", sequences=64)
    erase.add_argument("--atom", type=int, required=True, metavar="I",
                       help="index of the SAE atom to erase, in [0, n_features)")
    erase.add_argument("--target", type=int, default=None, metavar="TOKEN",
                       help="token id to track (default: the token whose log-probability the erasure lowers most)")
    erase.add_argument("--max-positions", type=_positive_int, default=150,
                       help="erase at most this many firings, a seeded subsample (default: 150)")
    erase.add_argument("--control-multipliers", type=_positive_float, nargs="+", default=[1.0, 2.0, 4.0],
                       metavar="M",
                       help="multipliers m of the additive controls (default: 1 2 4)")
    _add_readout_offset(erase, "the erasure at t")

    part = _add_analysis_parser(
        sub, "partition", summary="split the SAE's alive atoms into registers and bundles",
        description="Median Frobenius cosine between each atom and the native update wherever it fires; 1- and "
                    "2-component Gaussian mixtures on the alive atoms' medians decide (delta BIC) whether the "
                    "high-cosine atoms (registers) form their own cluster apart from the bundles.",
        table="per-atom", sequences=128)
    part.add_argument("--replace", default="update", choices=["update", "write"],
                      help="compare with the net update (default) or the write alone")
    part.add_argument("--max-firings-per-atom", type=_positive_int, default=200,
                      help="cosines per atom, a seeded subsample (default: 200)")
    part.add_argument("--min-firings", type=_positive_int, default=1,
                      help="atoms with fewer firings count as dead (default: 1)")
    part.add_argument("--tau", type=_cosine, default=0.05,
                      help="cosine above which an atom is a register when one Gaussian is preferred (default: 0.05)")
    _add_protocol_options(shift, "logit_shift")
    _add_protocol_options(part, "partition")
    _add_reproduce_parser(sub)
    _add_dashboard_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _check_site(parser: argparse.ArgumentParser, model, hook: str, head: int) -> None:
    """Refuse, as parser errors, a ``--hook`` that is not a recurrent layer's ``hook_state`` and a ``--head``
    out of range."""
    try:
        parse_cell(model, hook, head, kinds=("state",))
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        parser.error(f"argument --head: {why}" if name == "head" else f"argument --hook: {e}")


def _train_sae(args, model, task, progress: bool):
    return toy.train_probe_sae(model, task, args.hook, args.head, architecture=args.sae_type,
                               n_features=args.n_features, k=args.k, n_steps=args.steps, lr=args.lr,
                               train_sequences=args.train_sequences, seed=args.seed, progress=progress,
                               **_wandb_config(args))


def _substitution(args, model, task, sae, progress: bool, atom: str | None = None):
    """The substitution test of ``args`` (with ``atom`` instead of ``args.atom`` for a silent contrast run)."""
    positions, offset = _protocol(args, task)
    t = time.perf_counter()
    result = substitution_test(model, sae, args.hook, args.head, _eval_tokens(args, task), replace=args.replace,
                               scale=args.scale, random=args.random, readout_offset=offset, kl=args.kl,
                               max_firings_per_atom=args.max_firings_per_atom, skip_positions=SKIP_POSITIONS,
                               positions=positions, atom=atom or args.atom, rank1_atoms=args.rank1_atoms,
                               seed=args.seed, progress=progress, protocol=args.protocol, readout=args.readout,
                               features=getattr(args, "features", None))
    if atom is None:
        where = "every position" if positions is None else f"the value positions {positions.tolist()}"
        read = "at the last position" if offset is None else f"at t + {offset}"
        print(f"substitution test on {args.hook} head {args.head} ({time.perf_counter() - t:.1f}s, protocol "
              f"{args.protocol}): firings at {where}, read {read}, {args.atom} atom")
    return result


def _protocol(args, task):
    """Where the substitution test writes and reads: ``(positions or None, readout_offset)``.

    The default protocol (``--positions values``) tests the write of each queried pair at its value
    ``v_i`` and reads where that value is recalled, at ``q_i = v_i + task.recall_offset`` — the first read
    that needs the written association (the analogue of the paper's first read of the edited state). With
    ``--positions all`` every firing is tested at ``t + --readout-offset`` (default 1), where the readout
    usually does not depend on the write and all conditions give KL ≈ 0.
    """
    if args.readout == "last":
        return (task.value_positions if args.positions == "values" else None), None
    if args.positions == "values":
        offset = task.recall_offset if args.readout_offset is None else args.readout_offset
        return task.value_positions, offset
    return None, 1 if args.readout_offset is None else args.readout_offset


def _plots(result, contrast, out: str, title: str) -> list[str]:
    """``substitution_kl.png``: the KL per condition, atom vs delete per firing, and the cosine of the
    substituted atom with the write for ``result`` and for ``contrast`` (the other atom choice)."""
    # only the demo plots: importing matplotlib would add ~0.2 s to every other command
    from matplotlib.figure import Figure

    rows = result.to_pandas()
    floor = 1e-9
    fig = Figure(figsize=(16, 4.2))
    ax = fig.subplots(1, 3)
    top = max(rows[["kl_atom", "kl_delete", "kl_random"]].to_numpy().max(), 1e-6)
    bins = np.logspace(np.log10(floor), np.log10(top), 40)
    for col, colour in (("kl_atom", "tab:blue"), ("kl_delete", "tab:orange"), ("kl_random", "tab:grey")):
        ax[0].hist(rows[col].clip(lower=floor), bins=bins, alpha=0.5, label=col[3:], color=colour)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("KL(native ‖ condition)")
    ax[0].set_ylabel("firings")
    ax[0].legend()
    ax[0].set_title("KL per condition")
    x, y = rows["kl_delete"].clip(lower=floor), rows["kl_atom"].clip(lower=floor)
    win = rows["win"].to_numpy(bool)
    ax[1].scatter(x[win], y[win], s=6, alpha=0.5, c="tab:blue", label="atom beats delete")
    ax[1].scatter(x[~win], y[~win], s=6, alpha=0.5, c="tab:red", label="delete beats atom")
    lim = [floor, max(float(x.max()), float(y.max()))]
    ax[1].plot(lim, lim, "k--", lw=0.8, label="equal KL")
    ax[1].legend(loc="upper left", fontsize=8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("KL delete")
    ax[1].set_ylabel("KL atom")
    ax[1].set_title(f"atom beats delete: {100 * result.win_rate:.1f}% (n={result.n})")
    cos_bins = np.linspace(-1, 1, 41)
    for res, colour in ((result, "tab:blue"), (contrast, "tab:grey")):
        ax[2].hist(res.to_pandas()["atom_cos"], bins=cos_bins, alpha=0.5, density=True, color=colour,
                   label=f"{res.settings['atom']} atom ({100 * res.win_rate:.1f}% win)")
    ax[2].set_xlabel("cos(substituted atom, native update)")
    ax[2].set_ylabel("density")
    ax[2].legend()
    ax[2].set_title("does the atom look like the write?")
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, "substitution_kl.png")
    fig.savefig(path, dpi=120)
    return [path]


def _check_k(parser: argparse.ArgumentParser, args) -> None:
    """Refuse ``--k`` above ``--n-features``: a top-k SAE would keep fewer features than its config says."""
    if args.k > args.n_features:
        parser.error(f"argument --k: expected at most --n-features={args.n_features}, got {args.k}")


def _demo(args, parser) -> int:
    _check_k(parser, args)
    progress = not args.no_progress
    text = args.model is not None
    if args.steps is None:
        args.steps = DEMO_TEXT_STEPS if text else toy.PROBE_SAE["n_steps"]
    if args.eval_sequences is None:
        args.eval_sequences = DEMO_TEXT_EVAL if text else 128
    if args.quick:
        args.train_sequences = min(args.train_sequences, 64)
        args.steps = min(args.steps, 40)
        args.n_features = min(args.n_features, 32)
        args.k = min(args.k, 4)
        args.eval_sequences = min(args.eval_sequences, 4 if text else 16)
    _check_out(parser, args.out)
    start = time.perf_counter()
    if text:
        model, eval_tokens, train_tokens, strings = _demo_text_data(args, parser)
        where = f"{args.model}, {args.hook} head {args.head}"
        print(f"{args.model}: {model}\n  {len(train_tokens)} windows of {train_tokens.shape[1]} tokens train the SAE, "
              f"the first {len(eval_tokens)} of {args.dataset} are held out for the test "
              f"({time.perf_counter() - start:.1f}s)")
    else:
        model, task = toy.load(args.arch, progress=progress)
        _check_site(parser, model, args.hook, args.head)
        _check_readout_offset(parser, _protocol(args, task)[1], task)
        check_tokens, check_targets = task.make_batch(256, seed=args.seed + 20_000)
        with torch.no_grad():
            recall = toy.accuracy(model(check_tokens), check_targets)
        print(f"toy {args.arch}: {model}\n  recall accuracy {100 * recall:.1f}% ({time.perf_counter() - start:.1f}s)")
        eval_tokens, strings = _eval_tokens(args, task), task.token_strings()
        where = f"toy {args.arch}, {args.hook} head {args.head}"
    t = time.perf_counter()
    if text:
        sae, log = train_sae(model, args.hook, args.head, train_tokens, _demo_text_config(args, progress))
    else:
        sae, log = _train_sae(args, model, task, progress)
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}, "
          f"dead {last.get('dead', 0)} ({time.perf_counter() - t:.1f}s)")

    def run(atom: str | None = None):  # None: args.atom, reported; else the silent contrast
        if text:
            return _text_substitution(args, model, sae, eval_tokens, progress, atom)
        return _substitution(args, model, task, sae, progress if atom is None else False, atom)

    result = run()
    print(result.report())
    other = "dominant" if args.atom == "rising" else "rising"
    contrast = run(other)
    print(f"with the {other} atom instead: atom beats delete {100 * contrast.win_rate:.1f}% (n={contrast.n}), "
          f"median KL atom {contrast.medians['atom']:.3g} / delete {contrast.medians['delete']:.3g} / "
          f"random {contrast.medians['random']:.3g}")
    print("paper (Qwen3.5-0.8B, L1/L9/L17 H4, dominant atom): atom beats delete 92.4% (n=4851)"
          + ("\n--quick: these numbers are a smoke test of the pipeline (tiny SAE, few steps), not results"
             if args.quick else ""))
    result.to_pandas().to_csv(os.path.join(args.out, "substitution.csv"), index=False)
    sae.save_pretrained(os.path.join(args.out, "sae"))
    for path in _plots(result, contrast, args.out, where):
        print(f"saved {path}")
    # The dashboard reads the held-out sequences the substitution test ran on, so each feature's win rate is
    # measured on the data its examples come from.
    build_dashboard(model, sae, eval_tokens, out_dir=os.path.join(args.out, "dashboard"),
                    substitution=result, token_strings=strings, progress=progress)
    print(f"feature dashboard: {os.path.join(os.path.abspath(args.out), 'dashboard', 'index.html')}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


def _demo_text_data(args, parser):
    """``demo --model``: the model and ``--dataset``'s windows split into ``(eval, train)`` token tensors, and the
    token strings the dashboard shows (``None``: the model's tokenizer decodes them)."""
    if args.dataset is None:
        if pretrained_path(args.model) is None or os.path.exists(args.model):
            parser.error(f"argument --dataset: required with a --model that does not ship with the package "
                         f"({', '.join(list_pretrained())}), got --model {args.model!r}")
        args.dataset = str(PRETRAINED_DIR / "excerpts" / "macbeth.txt")
    args.text_field, args.split, args.dtype, args.device = "text", "train", None, None
    model = _load_checkpoint(args, parser)
    _check_site(parser, model, args.hook, args.head)
    tokens = torch.stack(list(_token_source(args, parser, model)))
    if len(tokens) <= args.eval_sequences:
        parser.error(f"argument --eval-sequences: expected fewer than the {len(tokens)} windows of --dataset "
                     f"{args.dataset!r} (the rest train the SAE), got {args.eval_sequences}")
    return model, tokens[: args.eval_sequences], tokens[args.eval_sequences :], None


def _demo_text_config(args, progress: bool) -> TrainConfig:
    """The demo's SAE schedule on text: every window read at 64 positions, so a few dozen windows of a short
    excerpt give enough distinct states for the step count."""
    return TrainConfig(n_steps=args.steps, batch_size=256, n_features=args.n_features, k=args.k, lr=args.lr,
                       lr_min=args.lr / 10, warmup_steps=min(50, args.steps // 10), architecture=args.sae_type,
                       positions_per_seq=64, skip_positions=SKIP_POSITIONS, model_batch_size=8, seed=args.seed,
                       progress=progress, log_every=max(1, args.steps // 5), **_wandb_config(args))


def _text_substitution(args, model, sae, tokens, progress: bool, atom: str | None = None):
    """The substitution test of ``demo --model`` on ``tokens``: every firing, read at ``t + --readout-offset``
    (default 1: text has no recall position to read at) or at the last position (``--readout last``)."""
    offset = None if args.readout == "last" else (args.readout_offset or 1)
    t = time.perf_counter()
    result = substitution_test(model, sae, args.hook, args.head, tokens, replace=args.replace, scale=args.scale,
                               random=args.random, readout_offset=offset, kl=args.kl,
                               max_firings_per_atom=args.max_firings_per_atom, skip_positions=SKIP_POSITIONS,
                               atom=atom or args.atom, rank1_atoms=args.rank1_atoms, seed=args.seed,
                               progress=progress and atom is None, protocol=args.protocol, readout=args.readout)
    if atom is None:
        read = "at the last position" if offset is None else f"at t + {offset}"
        print(f"substitution test on {args.hook} head {args.head} ({time.perf_counter() - t:.1f}s, protocol "
              f"{args.protocol}): firings at every position of {len(tokens)} held-out windows, read {read}, "
              f"{args.atom} atom")
    return result


def _check_out(parser: argparse.ArgumentParser, path: str, flag: str = "--out") -> None:
    """Refuse an output directory that cannot be written, before any work starts."""
    try:
        check_writable(path, flag)
    except ValueError as e:
        parser.error(f"argument {e}")


def _init_distributed(args) -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun (``WORLD_SIZE`` > 1) the process group is initialised here,
    with NCCL on CUDA and gloo on CPU, and ``--device cuda`` becomes each rank's local GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = (args.device or "cpu").startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        # without a timeout a stopped peer leaves every other rank waiting in its next collective
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _load_checkpoint(args, parser):
    """The ``--model`` checkpoint, loaded with ``--dtype`` on ``--device``; load failures are parser errors."""
    try:
        model = HookedRecurrentModel.from_pretrained(args.model, dtype=args.dtype, device=args.device or "cpu")
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(f"argument --model: {e}")
    return model.eval()


def _hook_names(args) -> list[str]:
    """``--hook`` plus ``blocks.{L}.mixer.hook_{--hook-kind}`` for every ``--layers`` entry."""
    hooks = [args.hook] if args.hook else []
    return hooks + [f"blocks.{layer}.mixer.hook_{args.hook_kind}" for layer in args.layers or []]


def _cells(args, parser, model) -> list:
    """The cells named by ``--hook``/``--layers`` x ``--heads``, checked against the model."""
    hooks = _hook_names(args)
    if not hooks:
        parser.error("name the hooks to read: --hook blocks.L.mixer.hook_state (or hook_write) and/or --layers L1,L2")
    heads = args.heads if args.heads is not None else range(model.cfg.n_heads)
    try:
        return parse_cells(model, [(hook, head) for hook in hooks for head in heads])
    except ValueError as e:
        parser.error(f"argument {'--heads' if str(e).startswith('head') else '--hook/--layers'}: {e}")


def _token_source(args, parser, model, **shard):
    """``--dataset`` opened with the model's tokenizer at ``--context-length``, this process's share read once
    through (undecodable text, ids outside the vocabulary); errors are parser errors."""
    try:
        source = open_tokens(args.dataset, tokenizer=model.tokenizer, context_length=args.context_length,
                             text_field=args.text_field, split=args.split, **shard)
        ctx = len(next(iter(source)))  # a dataset shorter than one context fails here, not minutes later
        source.check(d_vocab=model.cfg.d_vocab)
    except (OSError, ValueError, TypeError) as e:
        parser.error(f"argument --dataset: {e}")
    except StopIteration:
        parser.error(f"argument --dataset: {args.dataset!r} gives no sequence to this process ({shard})")
    where = "--context-length" if args.context_length is not None else "the rows of --dataset"
    if "skip_positions" not in args:  # reproduce: it always skips the first SKIP_POSITIONS positions
        if SKIP_POSITIONS >= ctx:
            parser.error(f"argument --dataset: expected sequences longer than the {SKIP_POSITIONS} position(s) the "
                         f"analyses skip, got {ctx} ({where})")
    elif args.skip_positions >= ctx:
        parser.error(f"argument --skip-positions: expected fewer than the {ctx} positions of a sequence ({where}), "
                     f"got {args.skip_positions}")
    return source


def _train_config(args, **overrides):
    return TrainConfig(n_steps=args.steps, batch_size=args.batch_size or 256, lr=args.lr, lr_min=args.lr / 10,
                       architecture=args.sae_type, n_features=args.n_features, k=args.k,
                       positions_per_seq=args.positions_per_seq, skip_positions=args.skip_positions,
                       model_batch_size=args.model_batch_size, buffer_size=args.buffer_size,
                       checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.no_progress,
                       **_wandb_config(args), **overrides)


def _wandb_config(args) -> dict[str, Any]:
    """``TrainConfig`` fields for ``--wandb PROJECT`` / ``--wandb-run-name`` (none for other commands)."""
    project = getattr(args, "wandb", None)
    if project is None:
        return {}
    return dict(wandb=True, wandb_project=project, wandb_run_name=args.wandb_run_name)


def _train_real(args, parser) -> int:
    """``train-sae --model/--dataset`` or ``--states``: one SAE per cell, optionally under torchrun."""
    if args.states is not None and args.model is not None:
        parser.error("argument --states: train either from a state store or from --model/--dataset, not both")
    if args.model is not None and args.dataset is None:
        parser.error("argument --dataset: required with --model")
    _check_out(parser, args.out)
    try:
        rank, world = _init_distributed(args)
    except (RuntimeError, ValueError) as e:  # the rendezvous: a peer never arrived, a bad address or port
        return _distributed_failure(parser, args, f"joining the process group failed: {e}")
    try:
        code = _train_cells(args, parser, rank, world)
        if dist.is_initialized():
            # every rank tears down together: a rank leaving while its peer still works (rank 0 writing and
            # printing) aborted now and then at exit ("terminate called without an active exception")
            with collective("barrier at the end of training"):
                dist.barrier()
        return code
    except CollectiveError as e:
        return _distributed_failure(parser, args, str(e))
    except OSError as e:  # a full disk, say: checkpoints are whole files, and a rerun resumes from the last
        return _run_failure(parser, str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _distributed_failure(parser, args, message: str) -> int:
    """Report a failed rendezvous or collective with the ``--timeout`` in force; exit status 1."""
    return _run_failure(parser, f"{message}\n  (--timeout {args.timeout:g} s; the last checkpoint under {args.out}, "
                                f"if any, is intact: rerun the same command to resume from it)")


def _run_failure(parser, message: str) -> int:
    """Report a failure after work started (not a usage error): the message on stderr, exit status 1."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 1


def _train_cells(args, parser, rank: int, world: int) -> int:
    mode = None if world == 1 else ("cells" if args.distribute_cells else "data")
    try:
        cfg = _train_config(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.buffer_size < cfg.batch_size:
        parser.error(f"argument --buffer-size: expected at least --batch-size {cfg.batch_size}, got {cfg.buffer_size}")
    if args.states is not None:
        try:
            store = StateStore(args.states)
        except (OSError, ValueError) as e:
            parser.error(f"argument --states: {e}")
        hooks = _hook_names(args)
        cells = [c for c in store.cells if (not hooks or c.hook_name in hooks)
                 and (args.heads is None or c.head in args.heads)]
        if not cells:
            parser.error(f"arguments --hook/--layers/--heads: select none of the store's cells "
                         f"{[c.name for c in store.cells]}")
        for cell in cells:
            if store.count(cell) < cfg.batch_size:
                parser.error(f"argument --batch-size: expected at most the {store.count(cell)} states stored for "
                             f"{cell.name} in --states {args.states}, got {cfg.batch_size}")
        trainer = _locked(parser, lambda: MultiCellTrainer(None, cells, store, cfg, out_dir=args.out,
                                                           distributed=mode, device=args.device or "cpu"))
    else:
        model = _load_checkpoint(args, parser)
        cells = _cells(args, parser, model)
        share = {"rank": rank, "world_size": world} if mode == "data" else {}
        val = None
        if args.val_sequences:
            held_out = _token_source(args, parser, model, max_sequences=args.val_sequences)
            val = torch.stack(list(held_out))
            share["skip"] = -(-args.val_sequences // share.get("world_size", 1))
        source = _token_source(args, parser, model, **share)
        trainer = _locked(parser, lambda: MultiCellTrainer(model, cells, source, cfg, out_dir=args.out,
                                                           val_tokens=val, distributed=mode))
    if trainer.step:
        print(f"resuming {args.out} at step {trainer.step}")
    saes = trainer.train()
    if rank == 0 or mode == "cells":
        for cell, learner in trainer.learners.items():
            last = learner.log.train[-1] if learner.log.train else {}
            print(f"{cell.name}: {saes[cell]}\n  mse {last.get('mse', float('nan')):.4g}, explained variance "
                  f"{last.get('explained_variance', float('nan')):.3f}, dead {last.get('dead', 0)}")
        print(f"saved {len(trainer.cells)} SAE(s) under {args.out}")
    return 0


def _harvest_cmd(args, parser) -> int:
    _check_out(parser, args.out)
    model = _load_checkpoint(args, parser)
    cells = _cells(args, parser, model)
    source = _token_source(args, parser, model)
    try:
        store = _locked(parser, lambda: harvest_to_store(
            model, cells, source, args.out, positions_per_seq=args.positions_per_seq,
            skip_positions=args.skip_positions, batch_size=args.model_batch_size, shard_size=args.shard_size,
            dtype=args.store_dtype, seed=args.seed, max_sequences=args.sequences, progress=not args.no_progress,
            model_name=args.model))
    except OSError as e:  # a full disk, say: the store keeps what its manifest names, and a rerun resumes
        return _run_failure(parser, str(e))
    print(store)
    for cell in store.cells:
        print(f"  {cell.name}: {store.count(cell)} states")
    return 0


def _locked(parser: argparse.ArgumentParser, work: Callable[[], Any]) -> Any:
    """``work()``, with another run's lock on ``--out`` (raised before any work) reported as a parser error."""
    try:
        return work()
    except DirectoryLockedError as e:
        parser.error(f"argument --out: {str(e).partition(': ')[2]}")  # the message names the library's argument


def _train_cmd(args, parser) -> int:
    _check_k(parser, args)
    if args.wandb_run_name is not None and args.wandb is None:
        parser.error("argument --wandb-run-name: names a Weights & Biases run, which needs --wandb PROJECT")
    if args.model is not None or args.states is not None:
        return _train_real(args, parser)
    _check_out(parser, args.out)
    with _locked(parser, DirectoryLock(args.out, "--out").acquire):
        return _train_toy(args, parser)


def _train_toy(args, parser) -> int:
    progress = not args.no_progress
    model, task = toy.load(args.arch, progress=progress)
    _check_site(parser, model, args.hook, args.head)
    sae, log = _train_sae(args, model, task, progress)
    sae.cfg.metadata.update(toy=args.arch)
    sae.save_pretrained(args.out)
    write_json(os.path.join(args.out, "train_log.json"), asdict(log))
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}\nsaved {args.out}")
    return 0


def _load_sae_and_toy(args, parser: argparse.ArgumentParser):
    """``(model, task, sae)``: the toy ``--arch`` and the SAE saved at ``--sae``.

    Refuses, as parser errors, a ``--sae`` that is not a loadable SAE directory, a ``--hook``/``--head``
    the toy does not have, and an SAE whose state shape differs from the toy's.
    """
    if not os.path.isdir(args.sae):
        parser.error(f"argument --sae: {args.sae!r} is not a directory")
    if args.csv:
        _check_out(parser, os.path.dirname(os.path.abspath(args.csv)), "--csv")
    try:
        sae = load_sae(args.sae)
    except (OSError, ValueError) as e:
        parser.error(f"argument --sae: cannot load an SAE from {args.sae!r} ({e})")
    model, task = toy.load(args.arch, progress=not args.no_progress)
    _check_site(parser, model, args.hook, args.head)
    if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
        parser.error(f"argument --sae: the SAE reads {sae.cfg.d_k}x{sae.cfg.d_v} states, toy {args.arch} has "
                     f"{model.cfg.d_k}x{model.cfg.d_v}")
    _warn_mismatch(sae, args)
    return model, task, sae


def _warn_mismatch(sae, args) -> None:
    """Warn when the SAE records another toy, hook or head than the ones chosen (it still runs: shapes match)."""
    meta = sae.cfg.metadata
    recorded = {"toy": (meta.get("toy"), args.arch), "hook": (meta.get("hook_name"), args.hook),
                "head": (meta.get("head"), args.head)}
    for what, (was, now) in recorded.items():
        if was is not None and was != now:
            print(f"warning: the SAE in {args.sae} was trained on {what} {was!r}, this run uses {now!r}",
                  file=sys.stderr)


def _check_range(parser: argparse.ArgumentParser, flag: str, values: Sequence[int], n: int, what: str) -> None:
    """Refuse any of ``values`` outside ``[0, n)`` with a parser error naming ``flag``."""
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        parser.error(f"argument {flag}: expected {what} in [0, {n}), got {', '.join(map(str, bad))}")


def _check_readout_offset(parser: argparse.ArgumentParser, offset: int | None, task) -> None:
    """Refuse a ``--readout-offset`` that leaves no position to edit in the toy's sequences."""
    most = task.seq_len - 1 - SKIP_POSITIONS
    if offset is not None and offset > most:
        parser.error(f"argument --readout-offset: expected at most {most} (the toy's sequences have "
                     f"{task.seq_len} positions, the first is skipped), got {offset}")


def _eval_tokens(args, task):
    """The held-out toy sequences the analyses run on: ``--eval-sequences`` drawn with seed ``--seed + 10000``."""
    tokens, _ = task.make_batch(args.eval_sequences, seed=args.seed + 10_000)
    return tokens


def _save_csv(result, path: str | None) -> None:
    """Write the result's per-measurement table to ``path`` (``--csv``), if one was given."""
    if path:
        result.to_pandas().to_csv(path, index=False)
        print(f"saved {path}")


def _substitution_cmd(args, parser) -> int:
    model, task, sae = _load_sae_and_toy(args, parser)
    _check_readout_offset(parser, _protocol(args, task)[1], task)
    if args.features is not None:
        _check_range(parser, "--features", args.features, sae.cfg.n_features, "atom indices")
    result = _substitution(args, model, task, sae, not args.no_progress)
    print(result.report())
    _save_csv(result, args.csv)
    return 0


def _logit_shift_report(result) -> str:
    """The headline statistics of a :class:`~recurrent_lens.analysis.LogitShiftResult`, one per line."""
    s, st = result.summary(), result.settings
    return "\n".join([
        f"logit shift of S_t0 += eps * A_i on {st['hook_name']} head {st['head']}, read at t0 + "
        f"{st['readout_offset']} through {st['readout']}: {len(st['atoms'])} atoms x {len(st['eps'])} eps "
        f"(n={s['n']})",
        f"  R^2 zero-parameter  {s['r2_zero_param']:.4g}",
        f"  R^2 one-parameter   {s['r2_one_param']:.4g} (fitted scale {s['fit_scale']:.4g})",
        f"  median cell R^2     {s['median_cell_r2']:.4g} over {s['cells']} (atom, eps) cells, fit {s['fit']} "
        f"(IQR {s['cell_r2_iqr'][0]:.3g} to {s['cell_r2_iqr'][1]:.3g}; protocol {s['protocol']})",
        "  by fit              " + ", ".join(f"{k} {v:.4g}" for k, v in s["median_cell_r2_by_fit"].items()),
        "paper (Qwen3.5-0.8B L9 H4): median cell R^2 0.983 [IQR 0.977-0.990], G fitted per context",
    ])


def _logit_shift_cmd(args, parser) -> int:
    model, task, sae = _load_sae_and_toy(args, parser)
    if args.atoms is not None:
        _check_range(parser, "--atoms", args.atoms, sae.cfg.n_features, "atom indices")
    _check_readout_offset(parser, args.readout_offset, task)
    result = logit_shift_prediction(model, sae, args.hook, args.head, _eval_tokens(args, task), atoms=args.atoms,
                                    eps=args.eps, n_atoms=args.n_atoms, positions_per_atom=args.positions_per_atom,
                                    readout_offset=args.readout_offset, readout=args.readout,
                                    skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress,
                                    protocol=args.protocol, fit=args.fit, formula=args.formula)
    print(_logit_shift_report(result))
    _save_csv(result, args.csv)
    return 0


def _erase_report(result) -> str:
    """One line per condition of an erasure's :class:`~recurrent_lens.analysis.InterventionResult`."""
    s, st = result.summary(), result.settings
    lines = [f"erase atom {st['atom']} on {st['hook_name']} head {st['head']} where it fires, read at t + "
             f"{st['readout_offset']}: target token {result.target}",
             f"  controls add m * a* * A at non-firing positions, a* = {st['a_star']:.4g} (median firing coefficient)",
             f"  {'condition':<10} {'n':>5} {'median dlogp':>13} {'logit up':>9} {'Wilcoxon p':>11}"]
    for condition in result.rows["condition"].unique():
        c = s[condition]
        lines.append(f"  {condition:<10} {c['n']:>5} {c['median_delta_logprob']:>13.4g} "
                     f"{100 * c['frac_logit_up']:>8.1f}% {c['wilcoxon_p']:>11.3g}")
    return "\n".join(lines)


def _erase_cmd(args, parser) -> int:
    model, task, sae = _load_sae_and_toy(args, parser)
    _check_range(parser, "--atom", [args.atom], sae.cfg.n_features, "an atom index")
    if args.target is not None:
        _check_range(parser, "--target", [args.target], model.cfg.d_vocab, "a token id")
    _check_readout_offset(parser, args.readout_offset, task)
    try:
        result = erase_atom(model, sae, args.hook, args.head, _eval_tokens(args, task), args.atom,
                            max_positions=args.max_positions, control_multipliers=args.control_multipliers,
                            target=args.target, readout_offset=args.readout_offset,
                            skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        if not str(e).startswith("atom: "):
            raise
        parser.error(f"argument --atom: {str(e).removeprefix('atom: ')} ({args.eval_sequences} sequences, "
                     f"read at t + {args.readout_offset}); `recurrent-lens partition` lists the alive atoms")
    print(_erase_report(result))
    _save_csv(result, args.csv)
    return 0


def _partition_report(result) -> str:
    """Alive/dead atoms, registers/bundles and the mixture decision of a
    :class:`~recurrent_lens.analysis.PartitionResult`."""
    s, st = result.summary(), result.settings
    threshold = f"registers have a median cosine > tau = {st['tau']:g}"
    if math.isnan(s["delta_bic"]):
        rule = f"fewer than 4 alive atoms, no mixture fitted: {threshold}"
    elif s["delta_bic"] < 0:
        rule = "two Gaussians preferred: registers are the higher-mean component"
    else:
        rule = f"one Gaussian preferred: {threshold}"
    return "\n".join([
        f"partition on {st['hook_name']} head {st['head']} (protocol {st['protocol']}, {st['statistic']}): "
        f"each atom's alignment with the native {st['replace']} where it fires",
        f"  alive {s['alive']}, dead {s['dead']}",
        f"  registers {s['registers']}, bundles {s['bundles']} (register median cosine {s['register_median_cos']:.4g})",
        f"  delta BIC {s['delta_bic']:.4g} ({rule})",
    ])


def _partition_cmd(args, parser) -> int:
    model, task, sae = _load_sae_and_toy(args, parser)
    result = partition_atoms(model, sae, args.hook, args.head, _eval_tokens(args, task), replace=args.replace,
                             max_firings_per_atom=args.max_firings_per_atom, min_firings=args.min_firings,
                             tau=args.tau, skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress,
                             protocol=args.protocol, statistic=args.statistic)
    print(_partition_report(result))
    _save_csv(result, args.csv)
    return 0


# --- protocol presets (--protocol) and `reproduce` -----------------------------------------------------------

_UNSET = type("Unset", (), {"__repr__": lambda self: "<the protocol's choice>"})()
"""Default of every protocol-dependent option: replaced after parsing by the chosen protocol's value."""

_PROTOCOL_DESTS = {
    "substitution": ("replace", "scale", "random", "kl", "atom", "max_firings_per_atom", "positions", "readout"),
    "logit_shift": ("eps", "n_atoms", "positions_per_atom", "fit", "formula", "readout"),
    "partition": ("statistic", "replace", "max_firings_per_atom", "tau"),
}


def _show(value) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def _add_protocol_options(p: argparse.ArgumentParser, kind: str) -> None:
    """``--protocol`` and the options only the protocols add, on a subcommand running the ``kind`` analysis.

    The defaults of the protocol-dependent options become "unset" (the help's epilog lists the paper's
    values); :func:`_resolve_protocol_args` fills them in after parsing, so a value given on the command
    line always wins, whatever the protocol.
    """
    p.add_argument("--protocol", default="ours", choices=["ours", "paper"],
                   help="option presets: 'ours' (default, the defaults shown) or 'paper' (the paper's choices, "
                        "listed below); options given explicitly win")
    if kind == "substitution":
        p.add_argument("--readout", default="offset", choices=["offset", "last"],
                       help="where the KL is read: 'offset' (default) at t + --readout-offset, 'last' at the last "
                            "position of each sequence (the paper's 'final output distribution')")
    elif kind == "logit_shift":
        p.add_argument("--fit", default="none", choices=["none", "cell", "context"],
                       help="what the per-cell R^2 compares: 'none' (default) the closed form as is, 'cell' one slope "
                            "per (atom, eps) cell, 'context' one G per (sequence, t0, atom) across the eps values "
                            "(the paper's App. A)")
        p.add_argument("--formula", default="closed_form", choices=["closed_form", "table9"],
                       help="'closed_form' (default, Eq. 1) or 'table9' (the paper's Table 9 variant: perturb by eps "
                            "times the atom's own component of the state)")
    else:
        p.add_argument("--statistic", default="median_cos_gmm", choices=["median_cos_gmm", "mean_abs_cos_top50"],
                       help="atom score: 'median_cos_gmm' (default) the median cosine with the update over the "
                            "firings; 'mean_abs_cos_top50' the reference code's mean |cos| per factor over the top-50 "
                            "activations (geometric mean)")
    paper = {**preset(kind, "paper"), "positions": "all"}
    dests = _PROTOCOL_DESTS[kind]
    ours = {dest: p.get_default(dest) for dest in dests}
    p.set_defaults(**dict.fromkeys(dests, _UNSET),
                   _protocol_defaults={"ours": ours, "paper": {d: paper[d] for d in dests}})
    p.epilog = "--protocol paper sets " + ", ".join(f"--{d.replace('_', '-')} {_show(paper[d])}" for d in dests) + \
        "; options given explicitly win."


def _resolve_protocol_args(args) -> None:
    """Give every protocol-dependent option left unset the value of ``--protocol``."""
    table = getattr(args, "_protocol_defaults", None)
    if table is None:
        return
    readout_unset = getattr(args, "readout", None) is _UNSET
    for dest, value in table[args.protocol].items():
        if getattr(args, dest) is _UNSET:
            setattr(args, dest, list(value) if isinstance(value, tuple) else value)
    explicit_offset = "positions" in table["ours"] and args.readout_offset is not None
    if readout_unset and explicit_offset:
        args.readout = "offset"  # an explicit --readout-offset asks for the offset readout


def _add_reproduce_parser(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="the paper's table on a toy or a checkpoint, under --protocol paper (default) or ours",
        description="Run the substitution test, the population test, the closed-form logit shift, the install "
                    "dose-response and the partition with one protocol's settings on a toy (--arch, with its shipped "
                    "or cached SAE unless --sae) or on a checkpoint (--model, --dataset, --sae, --hook, --head); print "
                    "each number beside the paper's, write reproduce_{protocol}.csv and .png to --out.")
    _add_model_args(p)
    p.add_argument("--protocol", default="paper", choices=["paper", "ours"],
                   help="'paper' (default): every option as the paper ran it; 'ours': this library's defaults (on a "
                        "toy, the toy protocol: rising atom, value positions, read at the recall)")
    p.add_argument("--sae", default=None, help="SAE directory (default with a toy: toy.load_sae(--arch))")
    g = p.add_argument_group("checkpoint (instead of a toy)")
    g.add_argument("--model", default=None, metavar="DIR_OR_HUB_ID", help="checkpoint for from_pretrained")
    g.add_argument("--dataset", default=None, metavar="PATH_OR_HUB_ID", help="text or token dataset (as train-sae)")
    g.add_argument("--text-field", default="text", help="text field of .jsonl / datasets rows (default: text)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--context-length", type=_positive_int, default=None, help="tokens per sequence for text")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weight dtype")
    g.add_argument("--device", type=_device, default=None,
                   help="model and SAE device, e.g. cuda (default: cpu); the tables are built at the end")
    p.add_argument("--sequences", type=_positive_int, default=128,
                   help="evaluation sequences (default: 128; a toy's are held out, seed --seed + 10000; a "
                        "checkpoint's are the first of --dataset)")
    p.add_argument("--install-prompts", type=_positive_int, default=64,
                   help="install prompts, the first of the evaluation sequences cut to --prompt-length (default: 64)")
    p.add_argument("--prompt-length", type=_positive_int, default=None,
                   help="install prompt length (default: a toy's pairs up to SEP; half a checkpoint's sequence)")
    p.add_argument("--band", type=_non_negative_int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="native-rank band of the install targets, inclusive, 0 = top-1 (default: the paper's 100 1000; "
                        "the lower half of the ranks for vocabularies of at most 1000 tokens)")
    p.add_argument("--magnitudes", type=_positive_float, nargs="+", default=[1.5, 3.0, 6.0], metavar="M",
                   help="install magnitudes (default: the paper's 1.5 3 6)")
    p.add_argument("--population-atoms", type=_positive_int, default=155,
                   help="atoms of the population test, the most often firing (default: 155, App. F.2's pool size)")
    p.add_argument("--out", default=".", help="directory for the CSV and the plot (default: the working directory)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")


def _reproduce_cmd(args, parser) -> int:
    """``reproduce``: the paper's table under one protocol (see :mod:`recurrent_lens.analysis.reproduce`)."""
    _check_out(parser, args.out)
    progress = not args.no_progress
    if args.quick:
        args.sequences, args.install_prompts = min(args.sequences, 16), min(args.install_prompts, 8)
        args.population_atoms, args.magnitudes = min(args.population_atoms, 8), [3.0]
    if args.model is None:
        if args.dataset is not None:
            parser.error("argument --dataset: only with --model")
        model, task = toy.load(args.arch, progress=progress)
        tokens = task.make_batch(args.sequences, seed=args.seed + 10_000)[0]
        length = args.prompt_length or 2 + 2 * task.n_pairs
        toy_protocol = dict(atom="rising", positions=task.value_positions.tolist(), readout_offset=task.recall_offset)
        substitution = toy_protocol if args.protocol == "ours" else {}
        where = f"toy {args.arch}"
    else:
        if args.sae is None or args.dataset is None:
            parser.error("arguments --sae and --dataset: required with --model")
        if args.hook is None or args.head is None:
            parser.error("arguments --hook and --head: required with --model")
        model = _load_checkpoint(args, parser)
        tokens = torch.stack(list(_token_source(args, parser, model, max_sequences=args.sequences)))
        length = args.prompt_length or max(tokens.shape[1] // 2, 1)
        substitution, where = {}, args.model
    _check_site(parser, model, args.hook, args.head)
    if args.sae is None:
        sae = toy.load_sae(args.arch, progress=progress)
        sae_name = f"toy.load_sae({args.arch!r})"
    else:
        try:
            sae = load_sae(args.sae)
        except (OSError, ValueError) as e:
            parser.error(f"argument --sae: cannot load an SAE from {args.sae!r} ({e})")
        sae_name = args.sae
        if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
            parser.error(f"argument --sae: the SAE reads {sae.cfg.d_k}x{sae.cfg.d_v} states, the model has "
                         f"{model.cfg.d_k}x{model.cfg.d_v}")
    sae = sae.to(model.embed.weight.device)
    if length > tokens.shape[1]:
        parser.error(f"argument --prompt-length: expected at most the sequence length {tokens.shape[1]}, got {length}")
    band = tuple(args.band) if args.band is not None else default_band(model.cfg.d_vocab)
    if not band[0] <= band[1] < model.cfg.d_vocab:
        parser.error(f"argument --band: expected LO <= HI < d_vocab = {model.cfg.d_vocab}, got {band[0]} {band[1]}")
    why = "" if args.band is not None or band == (100, 1000) else (
        f" (the paper's 100-1000 needs more than 1000 tokens; the lower half of this {model.cfg.d_vocab}-token "
        f"vocabulary instead)")
    prompts = tokens[: args.install_prompts, :length]
    logit_shift = dict(n_atoms=4, positions_per_atom=20) if args.quick else {}
    print(f"reproduce, protocol {args.protocol}: {where}, {args.hook} head {args.head}, SAE {sae_name}\n"
          f"  {len(tokens)} sequences of {tokens.shape[1]} tokens; install prompts {len(prompts)} x {length} tokens, "
          f"targets ranked {band[0]}-{band[1]}{why}"
          + (f"\n  toy protocol: {', '.join(f'{k}={v}' for k, v in substitution.items())}" if substitution else ""))
    rep = reproduce(model, sae, args.hook, args.head, tokens, prompts, protocol=args.protocol, band=band,
                    magnitudes=args.magnitudes, substitution=substitution, logit_shift=logit_shift,
                    population_atoms=args.population_atoms, skip_positions=SKIP_POSITIONS, seed=args.seed,
                    progress=progress, device=args.device)
    print(rep.report())
    csv = os.path.join(args.out, f"reproduce_{args.protocol}.csv")
    rep.to_pandas().to_csv(csv, index=False)
    print(f"saved {csv}\nsaved {plot(rep, os.path.join(args.out, f'reproduce_{args.protocol}.png'))}")
    return 0


def _add_dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="feature dashboards of a saved SAE: a static site to open in a browser",
        description="Run a model over a dataset once and write, for every feature of an SAE (or --features), its "
                    "density, activation histogram, top activating contexts, quantile samples and the reading of "
                    "its atom, as a static site (OUT/index.html) that works from file:// without a network.")
    g = p.add_argument_group("model, SAE and data")
    g.add_argument("--model", required=True, metavar="NAME|DIR",
                   help="a toy name (" + ", ".join(toy.names()) + ") or a checkpoint for from_pretrained")
    g.add_argument("--sae", required=True, metavar="DIR|NAME",
                   help="an SAE directory, a shipped SAE (" + ", ".join(list_pretrained_saes())
                        + ") or a toy name for its shipped SAE")
    g.add_argument("--dataset", default=None, metavar="PATH_OR_HUB_ID",
                   help="text or token dataset as for train-sae (default for a toy: its task's held-out sequences)")
    g.add_argument("--text-field", default="text", help="text field of .jsonl / datasets rows (default: text)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--context-length", type=_positive_int, default=None, help="tokens per sequence for text")
    g.add_argument("--max-sequences", type=_positive_int, default=None,
                   help="stop after this many sequences (default: the whole dataset; a toy: 256)")
    g.add_argument("--hook", default=None, help="the SAE's hook, when its metadata does not name it")
    g.add_argument("--head", type=_non_negative_int, default=None, help="the SAE's head, when its metadata does not")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weight dtype")
    g.add_argument("--device", default=None, help="model and SAE device, e.g. cuda (default: cpu)")
    p.add_argument("--out", required=True, help="site directory (an earlier dashboard there is replaced)")
    p.add_argument("--features", type=_int_list, default=None, metavar="I,J", help="features to show (default: all)")
    p.add_argument("--n-examples", type=_positive_int, default=20, help="top contexts per feature (default: 20)")
    p.add_argument("--context", type=_non_negative_int, default=24, help="tokens shown each side (default: 24)")
    p.add_argument("--stride", type=_positive_int, default=1, help="read every STRIDE-th position (default: 1)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward (default: 8)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the toy data and the samples")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")


def _dashboard_cmd(args, parser) -> int:
    is_toy = args.model in toy.names() and not os.path.exists(args.model)
    _check_out(parser, os.path.dirname(os.path.abspath(args.out)))
    strings = None
    if is_toy:
        model, task = toy.load(args.model, progress=not args.no_progress)
        strings = task.token_strings()
        data = args.dataset
        if data is None:
            data, _ = task.make_batch(args.max_sequences or 256, seed=args.seed + 10_000)
    else:
        if args.dataset is None:
            parser.error("argument --dataset: required with a checkpoint --model")
        model = _load_checkpoint(args, parser)
        data = _token_source(args, parser, model)
    shipped = list_pretrained_saes()
    if os.path.isdir(args.sae) or args.sae in shipped:
        try:
            sae = load_sae(args.sae, device=args.device or "cpu")
        except (OSError, ValueError) as e:
            parser.error(f"argument --sae: cannot load an SAE from {args.sae!r} ({e})")
    elif args.sae in toy.names():
        sae = toy.load_sae(args.sae, progress=not args.no_progress)
    else:
        parser.error(f"argument --sae: expected an SAE directory, a shipped SAE ({', '.join(shipped)}) or a toy "
                     f"name ({', '.join(toy.names())}), got {args.sae!r}")
    if args.features is not None:
        _check_range(parser, "--features", args.features, sae.cfg.n_features, "feature indices")
    try:
        dash = build_dashboard(model, sae, data, out_dir=args.out, features=args.features,
                               n_examples=args.n_examples, context=args.context, stride=args.stride,
                               batch_size=args.batch_size, hook_name=args.hook, head=args.head,
                               token_strings=strings, context_length=args.context_length,
                               max_sequences=args.max_sequences, seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        # build_dashboard names its argument first; the command line has its own name for it
        flags = {"out_dir": "--out", "features": "--features", "head": "--head", "hook_name": "--hook", "sae": "--sae",
                 "data": "--dataset"}
        arg, _, rest = str(e).partition(": ")
        parser.error(f"argument {flags[arg]}: {rest}" if arg in flags else str(e))
    print(f"{dash}\nfeature dashboard: {os.path.join(os.path.abspath(args.out), 'index.html')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recurrent-lens`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = args.command_parser
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    real = args.command == "harvest" or (args.command == "train-sae" and (args.model or args.states))
    real = real or (args.command == "reproduce" and args.model is not None) or args.command == "dashboard"
    if args.command == "demo" and args.arch is not None and args.model is not None:
        command_parser.error("argument --arch: a toy or --model, not both")
    if args.command == "demo" and args.arch is None and args.model is None:
        args.model = DEMO_MODEL
    if args.command == "demo" and args.model is not None:  # the cell of shakespeare-gdn's shipped SAE
        args.hook = DEMO_TEXT_SITE[0] if args.hook is None else args.hook
        args.head = DEMO_TEXT_SITE[1] if args.head is None else args.head
    elif not real:  # the other subcommands work on a toy
        spec = toy.TOY_SPECS[args.arch]
        args.hook = spec.probe_hook if args.hook is None else args.hook
        args.head = spec.probe[1] if args.head is None else args.head
    _resolve_protocol_args(args)
    handler = {"demo": _demo, "train-sae": _train_cmd, "harvest": _harvest_cmd, "substitution": _substitution_cmd,
               "reproduce": _reproduce_cmd, "dashboard": _dashboard_cmd,
               "logit-shift": _logit_shift_cmd, "erase": _erase_cmd, "partition": _partition_cmd}[args.command]
    try:
        return handler(args, command_parser)
    except ResumeMismatchError as e:
        command_parser.error(f"argument --out: {e}")
    except NonFiniteError as e:  # a run that diverged: no traceback, a non-zero exit, the message
        return _run_failure(command_parser, str(e))


if __name__ == "__main__":
    sys.exit(main())
