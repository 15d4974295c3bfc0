"""``recurrent-lens erase``: erase one atom of a saved SAE where it fires on a toy and track a target token."""

from __future__ import annotations

import argparse

from recurrent_lens.analysis import erase_atom
from recurrent_lens.cli.args import add_analysis_parser, add_options
from recurrent_lens.cli.common import (
    SKIP_POSITIONS, check_range, check_readout_offset, eval_tokens, load_sae_and_toy, save_csv, toy_site,
)

NAME = "erase"
OPTIONS = ("max_positions", "control_multipliers", "readout_offset")
"""The options of :class:`~recurrent_lens.analysis.EraseOptions` on the command line (``seed`` is ``--seed``;
``skip_positions`` is fixed at the BOS)."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_analysis_parser(
        sub, NAME, summary="erase one atom where it fires and track a target token",
        description="Subtract a_t * A_i from the head's state wherever atom I fires (code a_t > 0) and measure "
                    "the change of one target token's log-probability at t + offset; controls add m * a* * A_i at "
                    "as many non-firing positions (a*: the median firing coefficient).",
        table="per-position", sequences=64)
    p.add_argument("--atom", type=int, required=True, metavar="I",
                   help="index of the SAE atom to erase, in [0, n_features)")
    p.add_argument("--target", type=int, default=None, metavar="TOKEN",
                   help="token id to track (default: the token whose log-probability the erasure lowers most)")
    add_options(p, "erase", OPTIONS)
    return p


def report(result) -> str:
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


def run(args, parser) -> int:
    toy_site(args)
    model, task, sae = load_sae_and_toy(args, parser)
    check_range(parser, "--atom", [args.atom], sae.cfg.n_features, "an atom index")
    if args.target is not None:
        check_range(parser, "--target", [args.target], model.cfg.d_vocab, "a token id")
    check_readout_offset(parser, args.readout_offset, task)
    try:
        result = erase_atom(model, sae, args.hook, args.head, eval_tokens(args, task), args.atom,
                            max_positions=args.max_positions, control_multipliers=args.control_multipliers,
                            target=args.target, readout_offset=args.readout_offset,
                            skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        if not str(e).startswith("atom: "):
            raise
        parser.error(f"argument --atom: {str(e).removeprefix('atom: ')} ({args.eval_sequences} sequences, "
                     f"read at t + {args.readout_offset}); `recurrent-lens partition` lists the alive atoms")
    print(report(result))
    save_csv(result, args.csv)
    return 0
