"""``recurrent-lens partition``: split a saved SAE's alive atoms into registers and bundles on a toy."""

from __future__ import annotations

import argparse
import math

from recurrent_lens.analysis import partition_atoms
from recurrent_lens.cli.args import add_analysis_parser, add_options, add_protocol, resolve_args
from recurrent_lens.cli.common import SKIP_POSITIONS, eval_tokens, load_sae_and_toy, save_csv, toy_site

NAME = "partition"
OPTIONS = ("statistic", "replace", "max_firings_per_atom", "min_firings", "tau")
"""The options of :class:`~recurrent_lens.analysis.PartitionOptions` on the command line (``seed`` is ``--seed``;
``skip_positions`` is fixed at the BOS)."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_analysis_parser(
        sub, NAME, summary="split the SAE's alive atoms into registers and bundles",
        description="Median Frobenius cosine between each atom and the native update wherever it fires; 1- and "
                    "2-component Gaussian mixtures on the alive atoms' medians decide (delta BIC) whether the "
                    "high-cosine atoms (registers) form their own cluster apart from the bundles.",
        table="per-atom", sequences=128)
    add_options(p, "partition", OPTIONS)
    add_protocol(p, "partition")
    return p


def report(result) -> str:
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


def run(args, parser) -> int:
    toy_site(args)
    resolve_args(args, "partition")
    model, task, sae = load_sae_and_toy(args, parser)
    result = partition_atoms(model, sae, args.hook, args.head, eval_tokens(args, task), replace=args.replace,
                             max_firings_per_atom=args.max_firings_per_atom, min_firings=args.min_firings,
                             tau=args.tau, skip_positions=SKIP_POSITIONS, seed=args.seed, progress=not args.no_progress,
                             protocol=args.protocol, statistic=args.statistic)
    print(report(result))
    save_csv(result, args.csv)
    return 0
