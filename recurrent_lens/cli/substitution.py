"""``recurrent-lens substitution``: the substitution test of a saved SAE on a toy (its options are shared with
``demo``)."""

from __future__ import annotations

import argparse
import time

from recurrent_lens.analysis import substitution_test
from recurrent_lens.analysis.protocols import PRESET
from recurrent_lens.cli.args import (
    DEMO_TEXT_EVAL, add_model_args, add_options, add_protocol, add_saved_sae_args, positive_int, resolve_args,
)
from recurrent_lens.cli.common import (
    SKIP_POSITIONS, check_range, check_readout_offset, eval_tokens, load_sae_and_toy, save_csv, toy_site,
)

NAME = "substitution"
OPTIONS = ("replace", "scale", "random", "readout", "readout_offset", "kl", "max_firings_per_atom", "atom",
           "rank1_atoms")
"""The options of :class:`~recurrent_lens.analysis.SubstitutionOptions` on the command line (``seed`` is
``--seed``; ``skip_positions`` is fixed at the BOS)."""
OURS = {"atom": "rising"}
"""The toy protocol's choices under ``--protocol ours`` where they differ from the library's: the rising atom
(on a recall state the dominant atom is usually another pair's)."""
DEFAULTS = {"readout_offset": None}
"""Options whose default the command computes: the readout offset follows ``--positions``."""


def add_substitution_args(p: argparse.ArgumentParser, features: bool = False, text: bool = False) -> None:
    """``--eval-sequences``, the substitution test's options, ``--positions`` and (with ``features``) ``--features``,
    ``--protocol`` with its epilog."""
    p.add_argument("--eval-sequences", type=positive_int, default=None if text else 128,
                   help=f"held-out sequences for the test (default: {DEMO_TEXT_EVAL} windows of a --model's dataset, "
                        "128 toy sequences)" if text else "held-out toy sequences for the test (default: 128)")
    add_options(p, "substitution", OPTIONS, ours=OURS, defaults=DEFAULTS,
                helps={"readout_offset": "read at t + offset (default: task.recall_offset with --positions values, "
                                         "1 with all)"},
                without={} if features else {"atom": ("feature",)})
    p.add_argument("--positions", default=PRESET, choices=["values", "all"],
                   help="which firings to test: 'values' (default) = the writes at the queried values v_i, each "
                        "read where it is recalled (q_i, t + task.recall_offset); 'all' = every position")
    if features:
        p.add_argument("--features", type=int, nargs="+", default=None, metavar="I",
                       help="test only the firings of these atoms (the paper pools 8 exemplar features)")
    add_protocol(p, "substitution", paper={"positions": "all"})


def resolve(args: argparse.Namespace) -> None:
    """The options not given on the command line, from ``--protocol`` (``paper`` tests every position)."""
    resolve_args(args, "substitution", OURS)
    if args.positions is PRESET:
        args.positions = "values" if args.protocol == "ours" else "all"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="run the substitution test with a saved SAE",
                       description="Atom vs delete vs random substitution of the native update at every "
                                   "firing of a saved SAE on a toy model.")
    add_model_args(p)
    add_substitution_args(p, features=True)
    add_saved_sae_args(p, "per-firing")
    return p


def toy_protocol(args, task):
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


def run_on_toy(args, model, task, sae, progress: bool, atom: str | None = None):
    """The substitution test of ``args`` on the toy's held-out sequences (with ``atom`` instead of ``args.atom``
    for a silent contrast run)."""
    positions, offset = toy_protocol(args, task)
    t = time.perf_counter()
    result = substitution_test(model, sae, args.hook, args.head, eval_tokens(args, task), replace=args.replace,
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


def run(args, parser) -> int:
    toy_site(args)
    resolve(args)
    model, task, sae = load_sae_and_toy(args, parser)
    check_readout_offset(parser, toy_protocol(args, task)[1], task)
    if args.features is not None:
        check_range(parser, "--features", args.features, sae.cfg.n_features, "atom indices")
    result = run_on_toy(args, model, task, sae, not args.no_progress)
    print(result.report())
    save_csv(result, args.csv)
    return 0
