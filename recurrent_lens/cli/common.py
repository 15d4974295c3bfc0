"""What several subcommands do after parsing: load a checkpoint, a dataset or a saved SAE, check a site, an
output directory or an index, and report a failure; every refusal is a parser error naming the flag."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recurrent_lens import HookedRecurrentModel, toy
from recurrent_lens.data import open_tokens
from recurrent_lens.models.loading import CheckpointError
from recurrent_lens.sae import load as load_sae
from recurrent_lens.states.cells import parse_cell, parse_cells
from recurrent_lens.states.files import DirectoryLockedError, check_writable

SKIP_POSITIONS = 1
"""The analyses skip the BOS position, as SAE training and the substitution test do."""


def toy_site(args: argparse.Namespace) -> None:
    """``--hook``/``--head`` not given: the toy ``--arch``'s probe site."""
    spec = toy.TOY_SPECS[args.arch]
    args.hook = spec.probe_hook if args.hook is None else args.hook
    args.head = spec.probe[1] if args.head is None else args.head


def check_site(parser: argparse.ArgumentParser, model, hook: str, head: int) -> None:
    """Refuse, as parser errors, a ``--hook`` that is not a recurrent layer's ``hook_state`` and a ``--head``
    out of range."""
    try:
        parse_cell(model, hook, head, kinds=("state",))
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        parser.error(f"argument --head: {why}" if name == "head" else f"argument --hook: {e}")


def check_k(parser: argparse.ArgumentParser, args) -> None:
    """Refuse ``--k`` above ``--n-features``: a top-k SAE would keep fewer features than its config says."""
    if args.k > args.n_features:
        parser.error(f"argument --k: expected at most --n-features={args.n_features}, got {args.k}")


def refuse_given(parser: argparse.ArgumentParser, args, names: Sequence[str], why: str) -> None:
    """Refuse, as a parser error naming the flag and saying ``why``, any of the options ``names`` given a value
    other than its default: options a mode of the command has no use for are refused, never ignored."""
    for name in names:
        if getattr(args, name) != parser.get_default(name):
            parser.error(f"argument --{name.replace('_', '-')}: {why}")


def check_out(parser: argparse.ArgumentParser, path: str, flag: str = "--out") -> None:
    """Refuse an output directory that cannot be written, before any work starts."""
    try:
        check_writable(path, flag)
    except ValueError as e:
        parser.error(f"argument {e}")


def check_range(parser: argparse.ArgumentParser, flag: str, values: Sequence[int], n: int, what: str) -> None:
    """Refuse any of ``values`` outside ``[0, n)`` with a parser error naming ``flag``."""
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        parser.error(f"argument {flag}: expected {what} in [0, {n}), got {', '.join(map(str, bad))}")


def check_readout_offset(parser: argparse.ArgumentParser, offset: int | None, task) -> None:
    """Refuse a ``--readout-offset`` that leaves no position to edit in the toy's sequences."""
    most = task.seq_len - 1 - SKIP_POSITIONS
    if offset is not None and offset > most:
        parser.error(f"argument --readout-offset: expected at most {most} (the toy's sequences have "
                     f"{task.seq_len} positions, the first is skipped), got {offset}")


def load_checkpoint(args, parser):
    """The ``--model`` checkpoint, loaded with ``--dtype`` on ``--device``; load failures are parser errors."""
    try:
        model = HookedRecurrentModel.from_pretrained(args.model, dtype=args.dtype, device=args.device or "cpu")
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(f"argument --model: {e}")
    return model.eval()


def load_saved_sae(parser: argparse.ArgumentParser, path: str, **kwargs):
    """The SAE saved at ``--sae``; a directory that does not hold one is a parser error."""
    try:
        return load_sae(path, **kwargs)
    except (OSError, ValueError) as e:
        parser.error(f"argument --sae: cannot load an SAE from {path!r} ({e})")


def hook_names(args) -> list[str]:
    """``--hook`` plus ``blocks.{L}.mixer.hook_{--hook-kind}`` for every ``--layers`` entry."""
    hooks = [args.hook] if args.hook else []
    return hooks + [f"blocks.{layer}.mixer.hook_{args.hook_kind}" for layer in args.layers or []]


def selected_cells(args, parser, model) -> list:
    """The cells named by ``--hook``/``--layers`` x ``--heads``, checked against the model."""
    hooks = hook_names(args)
    if not hooks:
        parser.error("name the hooks to read: --hook blocks.L.mixer.hook_state (or hook_write) and/or --layers L1,L2")
    heads = args.heads if args.heads is not None else range(model.cfg.n_heads)
    try:
        return parse_cells(model, [(hook, head) for hook in hooks for head in heads])
    except ValueError as e:
        parser.error(f"argument {'--heads' if str(e).startswith('head') else '--hook/--layers'}: {e}")


def token_source(args, parser, model, **shard):
    """``--dataset`` opened with the model's tokenizer at ``--context-length``, this process's share read once
    through (undecodable text, ids outside the vocabulary); errors are parser errors."""
    try:
        source = open_tokens(args.dataset, tokenizer=model.tokenizer, context_length=args.context_length,
                             text_field=args.text_field, split=args.split, sample_by=args.sample_by, **shard)
        ctx = len(next(iter(source)))  # a dataset shorter than one context fails here, not minutes later
        source.check(d_vocab=model.cfg.d_vocab)
    except (OSError, ValueError, TypeError) as e:
        parser.error(f"argument {'--sample-by' if str(e).startswith('sample_by') else '--dataset'}: {e}")
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


def locked(parser: argparse.ArgumentParser, work: Callable[[], Any]) -> Any:
    """``work()``, with another run's lock on ``--out`` (raised before any work) reported as a parser error."""
    try:
        return work()
    except DirectoryLockedError as e:
        parser.error(f"argument --out: {str(e).partition(': ')[2]}")  # the message names the library's argument


def run_failure(parser, message: str) -> int:
    """Report a failure after work started (not a usage error): the message on stderr, exit status 1."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 1


def wandb_config(args) -> dict[str, Any]:
    """``TrainConfig`` fields for ``--wandb PROJECT`` / ``--wandb-run-name`` (none for other commands)."""
    project = getattr(args, "wandb", None)
    if project is None:
        return {}
    return dict(wandb=True, wandb_project=project, wandb_run_name=args.wandb_run_name)


def train_toy_sae(args, model, task, progress: bool, **train_config):
    """The SAE of ``--sae-type`` ... ``--train-sequences`` trained on the toy's probe recipe at ``--hook``/``--head``
    (``train_config``: further recipe fields a command sets)."""
    return toy.train_probe_sae(model, task, args.hook, args.head, architecture=args.sae_type,
                               n_features=args.n_features, k=args.k, n_steps=args.steps, lr=args.lr,
                               train_sequences=args.train_sequences, seed=args.seed, progress=progress,
                               **wandb_config(args), **train_config)


def load_sae_and_toy(args, parser: argparse.ArgumentParser):
    """``(model, task, sae)``: the toy ``--arch`` and the SAE saved at ``--sae``.

    Refuses, as parser errors, a ``--sae`` that is not a loadable SAE directory, a ``--hook``/``--head``
    the toy does not have, and an SAE whose state shape differs from the toy's.
    """
    if not os.path.isdir(args.sae):
        parser.error(f"argument --sae: {args.sae!r} is not a directory")
    if args.csv:
        check_out(parser, os.path.dirname(os.path.abspath(args.csv)), "--csv")
    sae = load_saved_sae(parser, args.sae)
    model, task = toy.load(args.arch, progress=not args.no_progress)
    check_site(parser, model, args.hook, args.head)
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


def eval_tokens(args, task):
    """The held-out toy sequences the analyses run on: ``--eval-sequences`` drawn with seed ``--seed + 10000``."""
    tokens, _ = task.make_batch(args.eval_sequences, seed=args.seed + 10_000)
    return tokens


def save_csv(result, path: str | None) -> None:
    """Write the result's per-measurement table to ``path`` (``--csv``), if one was given."""
    if path:
        result.to_pandas().to_csv(path, index=False)
        print(f"saved {path}")
