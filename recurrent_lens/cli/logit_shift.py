"""``recurrent-lens logit-shift``: the closed-form vs the measured logit shift of adding a saved SAE's atom to a
toy's state."""

from __future__ import annotations

import argparse

from recurrent_lens.analysis import logit_shift_prediction
from recurrent_lens.cli.args import add_analysis_parser, add_options, add_protocol, resolve_args
from recurrent_lens.cli.common import (
    SKIP_POSITIONS, check_range, check_readout_offset, eval_tokens, load_sae_and_toy, save_csv, toy_site,
)

NAME = "logit-shift"
OPTIONS = ("eps", "n_atoms", "fit", "formula", "readout", "readout_offset", "positions_per_atom")
"""The options of :class:`~recurrent_lens.analysis.LogitShiftOptions` on the command line (``seed`` is
``--seed``, default 0; ``skip_positions`` is fixed at the BOS)."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_analysis_parser(
        sub, NAME, summary="closed-form vs measured logit shift of adding an atom to the state",
        description="Add eps * A_i to the head's state at random positions t0 and compare the measured shift of "
                    "one token's logit at t0 + offset with the closed form eps * <W_U[tok], W_O (G * A_i)^T q_t> "
                    "(tok: the token the atom's leading direction promotes); prints zero- and one-parameter R^2 "
                    "and the median R^2 per (atom, eps) cell.",
        table="per-(atom, eps, position)", sequences=64)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--atoms", type=int, nargs="+", default=None, metavar="I",
                       help="SAE atom indices to perturb (default: the --n-atoms atoms most often dominant)")
    add_options(which, "logit_shift", ["n_atoms"])
    add_options(p, "logit_shift", [name for name in OPTIONS if name != "n_atoms"])
    add_protocol(p, "logit_shift")
    return p


def report(result) -> str:
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


def run(args, parser) -> int:
    toy_site(args)
    resolve_args(args, "logit_shift")
    model, task, sae = load_sae_and_toy(args, parser)
    if args.atoms is not None:
        check_range(parser, "--atoms", args.atoms, sae.cfg.n_features, "atom indices")
    check_readout_offset(parser, args.readout_offset, task)
    result = logit_shift_prediction(model, sae, args.hook, args.head, eval_tokens(args, task), atoms=args.atoms,
                                    eps=args.eps, n_atoms=args.n_atoms, positions_per_atom=args.positions_per_atom,
                                    readout_offset=args.readout_offset, readout=args.readout,
                                    skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress,
                                    protocol=args.protocol, fit=args.fit, formula=args.formula)
    print(report(result))
    save_csv(result, args.csv)
    return 0
