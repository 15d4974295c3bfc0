"""``recurrent-lens reproduce``: the paper's table on a toy or a checkpoint under one protocol (see
:mod:`recurrent_lens.analysis.reproduce`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from recurrent_lens import toy
from recurrent_lens.analysis.protocols import SubstitutionOptions, presets
from recurrent_lens.analysis.reproduce import default_band, plot, reproduce
from recurrent_lens.cli import substitution as substitution_command
from recurrent_lens.cli.args import (
    add_dataset_args, add_dtype_arg, add_model_args, device, non_negative_int, positive_float, positive_int,
)
from recurrent_lens.cli.common import (
    SKIP_POSITIONS, check_out, check_site, load_checkpoint, load_saved_sae, token_source, toy_site,
)

NAME = "reproduce"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="the paper's table on a toy or a checkpoint, under --protocol paper (default) or ours",
        description="Run the substitution test, the population test, the closed-form logit shift, the install "
                    "dose-response and the partition with one protocol's settings on a toy (--arch, with its shipped "
                    "or cached SAE unless --sae) or on a checkpoint (--model, --dataset, --sae, --hook, --head); print "
                    "each number beside the paper's, write reproduce_{protocol}.csv and .png to --out.")
    add_model_args(p)
    p.add_argument("--protocol", default="paper", choices=["paper", "ours"],
                   help="'paper' (default): every option as the paper ran it; 'ours': this library's defaults (on a "
                        "toy, the toy protocol: rising atom, value positions, read at the recall)")
    p.add_argument("--sae", default=None, help="SAE directory (default with a toy: toy.load_sae(--arch))")
    g = p.add_argument_group("checkpoint (instead of a toy)")
    g.add_argument("--model", default=None, metavar="DIR_OR_HUB_ID", help="checkpoint for from_pretrained")
    g.add_argument("--dataset", default=None, metavar="PATH_OR_HUB_ID", help="text or token dataset (as train-sae)")
    add_dataset_args(g)
    add_dtype_arg(g)
    g.add_argument("--device", type=device, default=None,
                   help="model and SAE device, e.g. cuda (default: cpu); the tables are built at the end")
    p.add_argument("--sequences", type=positive_int, default=128,
                   help="evaluation sequences (default: 128; a toy's are held out, seed --seed + 10000; a "
                        "checkpoint's are the first of --dataset)")
    p.add_argument("--install-prompts", type=positive_int, default=64,
                   help="install prompts, the first of the evaluation sequences cut to --prompt-length (default: 64)")
    p.add_argument("--prompt-length", type=positive_int, default=None,
                   help="install prompt length (default: a toy's pairs up to SEP; half a checkpoint's sequence)")
    p.add_argument("--band", type=non_negative_int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="native-rank band of the install targets, inclusive, 0 = top-1 (default: the paper's 100 1000; "
                        "the lower half of the ranks for vocabularies of at most 1000 tokens)")
    p.add_argument("--magnitudes", type=positive_float, nargs="+", default=[1.5, 3.0, 6.0], metavar="M",
                   help="install magnitudes (default: the paper's 1.5 3 6)")
    p.add_argument("--population-atoms", type=positive_int, default=155,
                   help="atoms of the population test, the most often firing (default: 155, App. F.2's pool size)")
    p.add_argument("--out", default=".", help="directory for the CSV and the plot (default: the working directory)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    return p


def run(args, parser) -> int:
    """``reproduce``: the paper's table under one protocol."""
    if args.model is None:
        toy_site(args)
    check_out(parser, args.out)
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
        toy_protocol = (dict(substitution_command.OURS, positions=task.value_positions.tolist(),
                             readout_offset=task.recall_offset) if args.protocol == "ours" else {})
        where = f"toy {args.arch}"
    else:
        if args.sae is None or args.dataset is None:
            parser.error("arguments --sae and --dataset: required with --model")
        if args.hook is None or args.head is None:
            parser.error("arguments --hook and --head: required with --model")
        model = load_checkpoint(args, parser)
        tokens = torch.stack(list(token_source(args, parser, model, max_sequences=args.sequences)))
        length = args.prompt_length or max(tokens.shape[1] // 2, 1)
        toy_protocol, where = {}, args.model
    check_site(parser, model, args.hook, args.head)
    if args.sae is None:
        sae = toy.load_sae(args.arch, progress=progress)
        sae_name = f"toy.load_sae({args.arch!r})"
    else:
        sae = load_saved_sae(parser, args.sae)
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
    substitution = (SubstitutionOptions(**{k: v for k, v in toy_protocol.items() if k != "positions"})
                    if toy_protocol else None)
    logit_shift = (replace(presets("logit_shift")[args.protocol], n_atoms=4, positions_per_atom=20) if args.quick
                   else None)
    print(f"reproduce, protocol {args.protocol}: {where}, {args.hook} head {args.head}, SAE {sae_name}\n"
          f"  {len(tokens)} sequences of {tokens.shape[1]} tokens; install prompts {len(prompts)} x {length} tokens, "
          f"targets ranked {band[0]}-{band[1]}{why}"
          + (f"\n  toy protocol: {', '.join(f'{k}={v}' for k, v in toy_protocol.items())}" if toy_protocol else ""))
    rep = reproduce(model, sae, args.hook, args.head, tokens, prompts, protocol=args.protocol, band=band,
                    magnitudes=args.magnitudes, substitution=substitution,
                    substitution_positions=toy_protocol.get("positions"), logit_shift=logit_shift,
                    population_atoms=args.population_atoms, skip_positions=SKIP_POSITIONS, seed=args.seed,
                    progress=progress, device=args.device)
    print(rep.report())
    csv = os.path.join(args.out, f"reproduce_{args.protocol}.csv")
    rep.to_pandas().to_csv(csv, index=False)
    print(f"saved {csv}\nsaved {plot(rep, os.path.join(args.out, f'reproduce_{args.protocol}.png'))}")
    return 0
