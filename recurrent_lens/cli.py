"""The ``recurrent-lens`` command line: a demo on the toy models, SAE training and the substitution test.

::

    recurrent-lens demo [--arch gdn] [--out DIR] [--quick] [--positions values|all]
    recurrent-lens train-sae --arch gdn --out DIR [--hook blocks.1.mixer.hook_state --head 0 ...]
    recurrent-lens substitution --arch gdn --sae DIR [--replace update --scale coefficient ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

DEFAULT_HOOK = "blocks.1.mixer.hook_state"


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
_positive_float = _number(float, "a positive number", lambda v: v > 0)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from recurrent_lens.toy import names

    p.add_argument("--arch", default="gdn", choices=names(), help="toy architecture (default: gdn)")
    p.add_argument("--hook", default=DEFAULT_HOOK, help=f"state hook the SAE reads (default: {DEFAULT_HOOK})")
    p.add_argument("--head", type=_non_negative_int, default=0, help="head the SAE reads (default: 0)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed for data and SAE (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae-type", default="write_sae", choices=["write_sae", "flat_sae", "matrix_sae", "bilinear_sae"],
                   help="SAE preset (default: write_sae)")
    p.add_argument("--n-features", type=_positive_int, default=128, help="dictionary size (default: 128)")
    p.add_argument("--k", type=_positive_int, default=8, help="active features per state (default: 8)")
    p.add_argument("--steps", type=_positive_int, default=300, help="SAE optimizer steps (default: 300)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="SAE learning rate (default: 3e-3)")
    p.add_argument("--train-sequences", type=_positive_int, default=512,
                   help="toy sequences the SAE's states come from (default: 512)")


def _add_substitution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-sequences", type=_positive_int, default=128,
                   help="held-out toy sequences for the test (default: 128)")
    p.add_argument("--replace", default="update", choices=["update", "write"], help="what is replaced (default: update)")
    p.add_argument("--scale", default="coefficient", choices=["coefficient", "match_norm"], help="atom scale")
    p.add_argument("--random", default="rank1", choices=["rank1", "sae_atom"], help="random control")
    p.add_argument("--kl", default="native_to_condition", choices=["native_to_condition", "condition_to_native"],
                   help="KL direction")
    p.add_argument("--positions", default="values", choices=["values", "all"],
                   help="which firings to test: 'values' (default) = the writes at the queried values v_i, each "
                        "read where it is recalled (q_i, t + task.recall_offset); 'all' = every position")
    p.add_argument("--readout-offset", type=_positive_int, default=None,
                   help="read at t + offset (default: task.recall_offset with --positions values, 1 with all)")
    p.add_argument("--max-firings-per-atom", type=_positive_int, default=30, help="cap per atom (default: 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recurrent-lens",
        description="Interpretability for recurrent LMs with matrix states: toy models, WriteSAEs, the substitution test.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="toy model -> WriteSAE -> substitution test, with a table and plots",
                          description="Load (or train) a toy model, train a WriteSAE on one head's state from hooks, "
                                      "run the single-write substitution test and save plots.")
    _add_model_args(demo)
    _add_sae_args(demo)
    _add_substitution_args(demo)
    demo.add_argument("--out", default=".", help="directory for plots and tables (default: the working directory)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a fast smoke run (seconds)")

    train = sub.add_parser("train-sae", help="train an SAE on a toy model's state hook and save it",
                           description="Train an SAE on states streamed from a toy model's hooks; writes "
                                       "cfg.json + sae_weights.safetensors to --out.")
    _add_model_args(train)
    _add_sae_args(train)
    train.add_argument("--out", required=True, help="directory to write the SAE to")

    subst = sub.add_parser("substitution", help="run the substitution test with a saved SAE",
                           description="Atom vs delete vs random substitution of the native update at every "
                                       "firing of a saved SAE on a toy model.")
    _add_model_args(subst)
    _add_substitution_args(subst)
    subst.add_argument("--sae", required=True, help="directory of a saved SAE (cfg.json + sae_weights.safetensors)")
    subst.add_argument("--csv", default=None, help="write the per-firing table to this CSV file")
    return parser


def _check_site(parser: argparse.ArgumentParser, model, hook: str, head: int) -> None:
    from recurrent_lens.analysis._common import parse_site

    try:
        parse_site(model, hook, head)
    except ValueError as e:
        arg = "--head" if str(e).startswith("head") else "--hook"
        parser.error(f"argument {arg}: {e}")


def _train_sae(args, model, task, progress: bool):
    from recurrent_lens.sae import TrainConfig, train

    tokens, _ = task.make_batch(args.train_sequences, seed=args.seed)
    cfg = TrainConfig(n_steps=args.steps, batch_size=min(256, args.train_sequences * 8), n_features=args.n_features,
                      k=args.k, lr=args.lr, lr_min=args.lr / 10, warmup_steps=20, architecture=args.sae_type,
                      buffer_size=2048, positions_per_seq=16, model_batch_size=64, skip_positions=1, seed=args.seed,
                      progress=progress, log_every=max(1, args.steps // 5))
    sae, log = train(model, args.hook, args.head, tokens, cfg)
    return sae, log


def _substitution(args, model, task, sae, progress: bool):
    from recurrent_lens.analysis import substitution_test

    tokens, _ = task.make_batch(args.eval_sequences, seed=args.seed + 10_000)
    positions, offset = _protocol(args, task)
    return substitution_test(model, sae, args.hook, args.head, tokens, replace=args.replace, scale=args.scale,
                             random=args.random, readout_offset=offset, kl=args.kl,
                             max_firings_per_atom=args.max_firings_per_atom, skip_positions=1, positions=positions,
                             seed=args.seed, progress=progress)


def _protocol(args, task):
    """Where the substitution test writes and reads: ``(positions or None, readout_offset)``.

    The default protocol (``--positions values``) tests the write of each queried pair at its value
    ``v_i`` and reads where that value is recalled, at ``q_i = v_i + task.recall_offset`` — the first read
    that needs the written association (the analogue of the paper's first read of the edited state). With
    ``--positions all`` every firing is tested at ``t + --readout-offset`` (default 1), where the readout
    usually does not depend on the write and all conditions give KL ≈ 0.
    """
    if args.positions == "values":
        offset = task.recall_offset if args.readout_offset is None else args.readout_offset
        return task.value_positions, offset
    return None, 1 if args.readout_offset is None else args.readout_offset


def _plots(result, out: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result.to_pandas()
    floor = 1e-9
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.logspace(np.log10(floor), np.log10(max(rows[["kl_atom", "kl_delete", "kl_random"]].to_numpy().max(), 1e-6)), 40)
    for col, colour in (("kl_atom", "tab:blue"), ("kl_delete", "tab:orange"), ("kl_random", "tab:grey")):
        ax[0].hist(rows[col].clip(lower=floor), bins=bins, alpha=0.5, label=col[3:], color=colour)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("KL(native ‖ condition)")
    ax[0].set_ylabel("firings")
    ax[0].legend()
    ax[0].set_title("KL per condition")
    x, y = rows["kl_delete"].clip(lower=floor), rows["kl_atom"].clip(lower=floor)
    ax[1].scatter(x, y, s=6, alpha=0.5, c=np.where(rows["win"], "tab:blue", "tab:red"))
    lim = [floor, max(float(x.max()), float(y.max()))]
    ax[1].plot(lim, lim, "k--", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("KL delete")
    ax[1].set_ylabel("KL atom")
    ax[1].set_title(f"atom beats delete: {100 * result.win_rate:.1f}% (n={result.n})")
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, "substitution_kl.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def _demo(args, parser) -> int:
    import torch

    from recurrent_lens import toy

    progress = not args.no_progress
    if args.quick:
        args.train_sequences = min(args.train_sequences, 64)
        args.steps = min(args.steps, 40)
        args.n_features = min(args.n_features, 32)
        args.k = min(args.k, 4)
        args.eval_sequences = min(args.eval_sequences, 16)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    model, task = toy.load(args.arch, progress=progress)
    _check_site(parser, model, args.hook, args.head)
    eval_tokens, eval_targets = task.make_batch(256, seed=args.seed + 20_000)
    with torch.no_grad():
        recall = toy.accuracy(model(eval_tokens), eval_targets)
    print(f"toy {args.arch}: {model}\n  recall accuracy {100 * recall:.1f}% ({time.perf_counter() - start:.1f}s)")
    t = time.perf_counter()
    sae, log = _train_sae(args, model, task, progress)
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}, "
          f"dead {last.get('dead', 0)} ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    result = _substitution(args, model, task, sae, progress)
    positions, offset = _protocol(args, task)
    where = "every position" if positions is None else f"the value positions {positions.tolist()}"
    print(f"substitution test on {args.hook} head {args.head} ({time.perf_counter() - t:.1f}s): "
          f"firings at {where}, read at t + {offset}")
    print(result.report())
    print("paper (Qwen3.5-0.8B, L1/L9/L17 H4): atom beats delete 92.4% (n=4851)")
    result.to_pandas().to_csv(os.path.join(args.out, "substitution.csv"), index=False)
    sae.save_pretrained(os.path.join(args.out, "sae"))
    for path in _plots(result, args.out, f"toy {args.arch}, {args.hook} head {args.head}"):
        print(f"saved {path}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


def _train_cmd(args, parser) -> int:
    from recurrent_lens import toy

    progress = not args.no_progress
    model, task = toy.load(args.arch, progress=progress)
    _check_site(parser, model, args.hook, args.head)
    sae, log = _train_sae(args, model, task, progress)
    sae.cfg.metadata.update(toy=args.arch)
    sae.save_pretrained(args.out)
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}\nsaved {args.out}")
    return 0


def _substitution_cmd(args, parser) -> int:
    from recurrent_lens import toy
    from recurrent_lens.sae import load

    progress = not args.no_progress
    if not os.path.isdir(args.sae):
        parser.error(f"argument --sae: {args.sae!r} is not a directory")
    try:
        sae = load(args.sae)
    except (OSError, ValueError) as e:
        parser.error(f"argument --sae: cannot load an SAE from {args.sae!r} ({e})")
    model, task = toy.load(args.arch, progress=progress)
    _check_site(parser, model, args.hook, args.head)
    if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
        parser.error(f"argument --sae: the SAE reads {sae.cfg.d_k}x{sae.cfg.d_v} states, toy {args.arch} has "
                     f"{model.cfg.d_k}x{model.cfg.d_v}")
    result = _substitution(args, model, task, sae, progress)
    print(result.report())
    if args.csv:
        result.to_pandas().to_csv(args.csv, index=False)
        print(f"saved {args.csv}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recurrent-lens`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    command_parser = sub.choices[args.command]
    handler = {"demo": _demo, "train-sae": _train_cmd, "substitution": _substitution_cmd}[args.command]
    return handler(args, command_parser)


if __name__ == "__main__":
    sys.exit(main())
