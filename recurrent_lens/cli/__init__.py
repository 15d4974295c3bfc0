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

One module per subcommand (``demo``, ``train_sae``, ``harvest``, ``substitution``, ``logit_shift``,
``erase``, ``partition``, ``reproduce``, ``dashboard``), each with ``add_parser`` and ``run``; the argument
groups they share and the analyses' options, generated from their options dataclasses, are in
:mod:`~recurrent_lens.cli.args`.

Example:
    >>> from recurrent_lens.cli import build_parser
    >>> build_parser().parse_args(["partition", "--sae", "sae/", "--tau", "0.1"]).tau
    0.1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from recurrent_lens.cli import (
    dashboard, demo, erase, harvest, logit_shift, partition, reproduce, substitution, train_sae,
)
from recurrent_lens.cli.common import run_failure
from recurrent_lens.integrity import NonFiniteError, ResumeMismatchError

COMMANDS = (demo, train_sae, harvest, substitution, logit_shift, erase, partition, reproduce, dashboard)
"""The subcommands' modules, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``recurrent-lens`` parser: one subparser per module of :data:`COMMANDS`, each knowing its ``run``."""
    parser = argparse.ArgumentParser(
        prog="recurrent-lens",
        description="Interpretability for recurrent LMs with matrix states: toy models, WriteSAEs, the substitution "
                    "test, the closed-form logit shift, atom erasure and the register/bundle partition.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command_parser = command.add_parser(sub)
        command_parser.set_defaults(command_parser=command_parser, run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recurrent-lens`` script.

    Returns the exit status: 0, or 1 for a run that failed after its work started; a usage error exits with
    status 2 before any work, naming the flag.

    Example:
        >>> main(["partition", "--sae", "/no/such/sae", "--no-progress"])
        Traceback (most recent call last):
        SystemExit: 2
    """
    args = build_parser().parse_args(argv)
    parser = args.command_parser
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.run(args, parser)
    except ResumeMismatchError as e:
        parser.error(f"argument --out: {e}")
    except NonFiniteError as e:  # a run that diverged: no traceback, a non-zero exit, the message
        return run_failure(parser, str(e))
