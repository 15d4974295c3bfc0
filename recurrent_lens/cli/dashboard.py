"""``recurrent-lens dashboard``: feature dashboards of a saved SAE, a static site to open in a browser."""

from __future__ import annotations

import argparse
import os

from recurrent_lens import toy
from recurrent_lens.cli.args import add_dataset_args, add_dtype_arg, int_list, non_negative_int, positive_int
from recurrent_lens.cli.common import check_out, check_range, load_checkpoint, load_saved_sae, token_source
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.pretrained import list_pretrained_saes

NAME = "dashboard"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="feature dashboards of a saved SAE: a static site to open in a browser",
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
    add_dataset_args(g)
    g.add_argument("--max-sequences", type=positive_int, default=None,
                   help="stop after this many sequences (default: the whole dataset; a toy: 256)")
    g.add_argument("--hook", default=None, help="the SAE's hook, when its metadata does not name it")
    g.add_argument("--head", type=non_negative_int, default=None, help="the SAE's head, when its metadata does not")
    add_dtype_arg(g)
    g.add_argument("--device", default=None, help="model and SAE device, e.g. cuda (default: cpu)")
    p.add_argument("--out", required=True, help="site directory (an earlier dashboard there is replaced)")
    p.add_argument("--features", type=int_list, default=None, metavar="I,J", help="features to show (default: all)")
    p.add_argument("--n-examples", type=positive_int, default=20, help="top contexts per feature (default: 20)")
    p.add_argument("--n-writers", type=non_negative_int, default=5,
                   help="top writers shown per top context (default: 5; 0 leaves the column out)")
    p.add_argument("--context", type=non_negative_int, default=24, help="tokens shown each side (default: 24)")
    p.add_argument("--stride", type=positive_int, default=1, help="read every STRIDE-th position (default: 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward (default: 8)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the toy data and the samples")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return p


def run(args, parser) -> int:
    is_toy = args.model in toy.names() and not os.path.exists(args.model)
    check_out(parser, os.path.dirname(os.path.abspath(args.out)))
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
        model = load_checkpoint(args, parser)
        data = token_source(args, parser, model)
    shipped = list_pretrained_saes()
    if os.path.isdir(args.sae) or args.sae in shipped:
        sae = load_saved_sae(parser, args.sae, device=args.device or "cpu")
    elif args.sae in toy.names():
        sae = toy.load_sae(args.sae, progress=not args.no_progress)
    else:
        parser.error(f"argument --sae: expected an SAE directory, a shipped SAE ({', '.join(shipped)}) or a toy "
                     f"name ({', '.join(toy.names())}), got {args.sae!r}")
    if args.features is not None:
        check_range(parser, "--features", args.features, sae.cfg.n_features, "feature indices")
    try:
        dash = build_dashboard(model, sae, data, out_dir=args.out, features=args.features,
                               n_examples=args.n_examples, context=args.context, stride=args.stride,
                               batch_size=args.batch_size, hook_name=args.hook, head=args.head,
                               token_strings=strings, context_length=args.context_length,
                               max_sequences=args.max_sequences, seed=args.seed, n_writers=args.n_writers,
                               progress=not args.no_progress)
    except ValueError as e:
        # build_dashboard names its argument first; the command line has its own name for it
        flags = {"out_dir": "--out", "features": "--features", "head": "--head", "hook_name": "--hook", "sae": "--sae",
                 "data": "--dataset"}
        arg, _, rest = str(e).partition(": ")
        parser.error(f"argument {flags[arg]}: {rest}" if arg in flags else str(e))
    print(f"{dash}\nfeature dashboard: {os.path.join(os.path.abspath(args.out), 'index.html')}")
    return 0
