"""``recurrent-lens demo``: a text model (or a toy) -> WriteSAE -> substitution test, with a table, plots and a
feature dashboard."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from recurrent_lens import toy
from recurrent_lens.analysis import substitution_test
from recurrent_lens.cli import substitution
from recurrent_lens.cli.args import (
    DEMO_MODEL, DEMO_TEXT_EVAL, DEMO_TEXT_STEPS, add_model_args, add_sae_args, add_sample_by_arg, positive_int,
)
from recurrent_lens.cli.common import (
    SKIP_POSITIONS, check_k, check_out, check_readout_offset, check_site, eval_tokens, load_checkpoint, refuse_given,
    token_source, toy_site, train_toy_sae, wandb_config,
)
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.pretrained import PRETRAINED_DIR, list_pretrained, pretrained_path
from recurrent_lens.sae import TrainConfig
from recurrent_lens.sae import train as train_sae

NAME = "demo"
DEMO_TEXT_SITE = ("blocks.1.mixer.hook_state", 0)
"""``demo --model``'s default cell: the one shakespeare-gdn's shipped SAE reads."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="text model (or toy) -> WriteSAE -> substitution test, with a table, plots and a "
                                  "dashboard",
                       description=f"Load a model (default: --model {DEMO_MODEL} on its Macbeth excerpt; --arch for a "
                                   "toy), train a WriteSAE on one head's state from hooks, run the single-write "
                                   "substitution test and save plots and a feature dashboard.")
    add_model_args(p, arch_default=None)
    add_sae_args(p, text=True)
    substitution.add_substitution_args(p, text=True)
    p.add_argument("--out", default=".", help="directory for plots and tables (default: the working directory)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a fast smoke run (seconds)")
    g = p.add_argument_group("a text model instead of a toy")
    g.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help=f"a checkpoint for from_pretrained (default: {DEMO_MODEL} unless --arch): the SAE trains on "
                        f"--dataset's windows after the first --eval-sequences (default {DEMO_TEXT_EVAL}), which the "
                        "test runs on")
    g.add_argument("--dataset", default=None, metavar="PATH",
                   help="text or token dataset as for train-sae (default for the shipped models: the Macbeth excerpt)")
    g.add_argument("--context-length", type=positive_int, default=256,
                   help="tokens per window of a text --dataset (default: 256)")
    add_sample_by_arg(g, default=None, help="default: document for the shipped excerpt, line otherwise")
    return p


def _site(args, parser) -> None:
    """A toy (``--arch``) or a text model (``--model``, by default the demo's), and the cell the SAE reads."""
    if args.arch is not None and args.model is not None:
        parser.error("argument --arch: a toy or --model, not both")
    if args.arch is not None:
        refuse_given(parser, args, ("dataset", "context_length", "sample_by"),
                     f"applies to a text model (--model); the toy --arch {args.arch} reads its own task's sequences")
    if args.arch is None and args.model is None:
        args.model = DEMO_MODEL
    if args.model is not None:  # the cell of shakespeare-gdn's shipped SAE
        args.hook = DEMO_TEXT_SITE[0] if args.hook is None else args.hook
        args.head = DEMO_TEXT_SITE[1] if args.head is None else args.head
    else:
        toy_site(args)


def run(args, parser) -> int:
    _site(args, parser)
    substitution.resolve(args)
    check_k(parser, args)
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
    check_out(parser, args.out)
    start = time.perf_counter()
    if text:
        model, held_out, train_tokens, strings = _text_data(args, parser)
        where = f"{args.model}, {args.hook} head {args.head}"
        print(f"{args.model}: {model}\n  {len(train_tokens)} windows of {train_tokens.shape[1]} tokens train the SAE, "
              f"the first {len(held_out)} of {args.dataset} are held out for the test "
              f"({time.perf_counter() - start:.1f}s)")
    else:
        model, task = toy.load(args.arch, progress=progress)
        check_site(parser, model, args.hook, args.head)
        check_readout_offset(parser, substitution.toy_protocol(args, task)[1], task)
        check_tokens, check_targets = task.make_batch(256, seed=args.seed + 20_000)
        with torch.no_grad():
            recall = toy.accuracy(model(check_tokens), check_targets)
        print(f"toy {args.arch}: {model}\n  recall accuracy {100 * recall:.1f}% ({time.perf_counter() - start:.1f}s)")
        held_out, strings = eval_tokens(args, task), task.token_strings()
        where = f"toy {args.arch}, {args.hook} head {args.head}"
    t = time.perf_counter()
    if text:
        sae, log = train_sae(model, args.hook, args.head, train_tokens, _text_config(args, progress))
    else:
        sae, log = train_toy_sae(args, model, task, progress)
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}, "
          f"dead {last.get('dead', 0)} ({time.perf_counter() - t:.1f}s)")

    def test(atom: str | None = None):  # None: args.atom, reported; else the silent contrast
        if text:
            return _text_substitution(args, model, sae, held_out, progress, atom)
        return substitution.run_on_toy(args, model, task, sae, progress if atom is None else False, atom)

    result = test()
    print(result.report())
    other = "dominant" if args.atom == "rising" else "rising"
    contrast = test(other)
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
    build_dashboard(model, sae, held_out, out_dir=os.path.join(args.out, "dashboard"),
                    substitution=result, token_strings=strings, progress=progress)
    print(f"feature dashboard: {os.path.join(os.path.abspath(args.out), 'dashboard', 'index.html')}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


def _text_data(args, parser):
    """``demo --model``: the model and ``--dataset``'s windows split into ``(eval, train)`` token tensors, and the
    token strings the dashboard shows (``None``: the model's tokenizer decodes them)."""
    if args.dataset is None:
        if pretrained_path(args.model) is None or os.path.exists(args.model):
            parser.error(f"argument --dataset: required with a --model that does not ship with the package "
                         f"({', '.join(list_pretrained())}), got --model {args.model!r}")
        args.dataset = str(PRETRAINED_DIR / "excerpts" / "macbeth.txt")
        # the excerpt is one play, read as the model was trained: verse lines run on, no end-of-text between
        args.sample_by = args.sample_by or "document"
    args.sample_by = args.sample_by or "line"
    args.text_field, args.split, args.dtype, args.device = "text", "train", None, None
    model = load_checkpoint(args, parser)
    check_site(parser, model, args.hook, args.head)
    tokens = torch.stack(list(token_source(args, parser, model)))
    if len(tokens) <= args.eval_sequences:
        parser.error(f"argument --eval-sequences: expected fewer than the {len(tokens)} windows of --dataset "
                     f"{args.dataset!r} (the rest train the SAE), got {args.eval_sequences}")
    return model, tokens[: args.eval_sequences], tokens[args.eval_sequences :], None


def _text_config(args, progress: bool) -> TrainConfig:
    """The demo's SAE schedule on text: every window read at 64 positions, so a few dozen windows of a short
    excerpt give enough distinct states for the step count."""
    return TrainConfig(n_steps=args.steps, batch_size=256, n_features=args.n_features, k=args.k, lr=args.lr,
                       lr_min=args.lr / 10, warmup_steps=min(50, args.steps // 10), architecture=args.sae_type,
                       positions_per_seq=64, skip_positions=SKIP_POSITIONS, model_batch_size=8, seed=args.seed,
                       progress=progress, log_every=max(1, args.steps // 5), **wandb_config(args))


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
