"""The argument groups several subcommands share, the argparse types that check numbers and devices, and the
options of an analysis generated from its options dataclass (:mod:`recurrent_lens.analysis.protocols`)."""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

from recurrent_lens import toy
from recurrent_lens.analysis.protocols import OPTIONS, PRESET, choices, preset, protocol_options, resolve
from recurrent_lens.data import SampleBy

DEMO_MODEL = "shakespeare-gdn"
"""What ``demo`` runs on without ``--arch`` or ``--model`` (the README's "Main job" says why)."""
DEMO_TEXT_STEPS = 600
"""``demo --model``'s default SAE steps (the toy demo's are ``toy.PROBE_SAE["n_steps"]``)."""
DEMO_TEXT_EVAL = 16
"""``demo --model``'s default held-out windows (the toy demo's: 128 toy sequences)."""


def _number(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], int | float]:
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


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive finite number", lambda v: v > 0 and math.isfinite(v))
non_negative_float = _number(float, "a non-negative finite number", lambda v: v >= 0 and math.isfinite(v))
nonzero_float = _number(float, "a nonzero finite number", lambda v: v != 0 and math.isfinite(v))
cosine = _number(float, "a number in [-1, 1]", lambda v: -1 <= v <= 1)

_CHECKED = {(int, "positive"): positive_int, (int, "non_negative"): non_negative_int,
            (float, "positive"): positive_float, (float, "nonzero"): nonzero_float, (float, "cosine"): cosine}
"""The argparse type of an option by its Python type and its ``check`` (see ``protocols.option``)."""


def device(text: str) -> str:
    """An argparse ``type``: a torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"CUDA is not available on this machine, got {text!r}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"expected a CUDA device index below {torch.cuda.device_count()} "
                                             f"(the GPUs of this machine), got {text!r}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"MPS is not available on this machine, got {text!r}")
    return text


def toy_name(text: str) -> str:
    """An argparse ``type``: a toy name, or its architecture's registry name, as the toy name."""
    try:
        return toy.spec(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("name: ")) from None


def int_list(text: str) -> list[int]:
    """``"1,9,17"`` -> ``[1, 9, 17]`` (non-negative integers)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser, arch_default: str | None = "gdn") -> None:
    """A toy (``--arch``), the cell it reads (``--hook``, ``--head``), ``--seed``, ``--no-progress``, ``--threads``."""
    default = "gdn" if arch_default else f"none: the demo runs on --model {DEMO_MODEL}"
    p.add_argument("--arch", default=arch_default, type=toy_name, metavar="{" + ",".join(toy.names()) + "}",
                   help=f"toy architecture, by toy name or registry name (gated_deltanet, delta_net; "
                        f"default: {default})")
    p.add_argument("--hook", default=None,
                   help="state hook the SAE reads (default: the toy's probe site, the head whose writes its "
                        "recall needs most: blocks.1.mixer.hook_state; blocks.0 for mamba2 and gla)")
    p.add_argument("--head", type=non_negative_int, default=None, help="head the SAE reads (default: the probe's, 0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for data and SAE (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default: 1; the toys are tiny, so more threads do not speed them up, and "
                        "one thread makes the numbers independent of the machine's core count)")


def add_sae_args(p: argparse.ArgumentParser, text: bool = False) -> None:
    """The SAE a command trains: preset, size, k, steps, learning rate, training sequences."""
    R = toy.PROBE_SAE
    p.add_argument("--sae-type", default=R["architecture"],
                   choices=["write_sae", "flat_sae", "matrix_sae", "bilinear_sae"],
                   help=f"SAE preset (default: {R['architecture']})")
    p.add_argument("--n-features", type=positive_int, default=R["n_features"],
                   help=f"dictionary size (default: {R['n_features']})")
    p.add_argument("--k", type=positive_int, default=R["k"], help=f"active features per state (default: {R['k']})")
    p.add_argument("--steps", type=positive_int, default=None if text else R["n_steps"],
                   help=f"SAE optimizer steps (default: {DEMO_TEXT_STEPS} with a --model, {R['n_steps']} on a toy)"
                   if text else f"SAE optimizer steps (default: {R['n_steps']})")
    p.add_argument("--lr", type=positive_float, default=R["lr"], help=f"SAE learning rate (default: {R['lr']:g})")
    p.add_argument("--train-sequences", type=positive_int, default=R["train_sequences"],
                   help=f"toy sequences the SAE's states come from (default: {R['train_sequences']})")


def add_saved_sae_args(p: argparse.ArgumentParser, table: str) -> None:
    p.add_argument("--sae", required=True,
                   help="directory of a saved SAE (cfg.json + sae_weights.safetensors), e.g. from train-sae")
    p.add_argument("--csv", default=None, help=f"write the {table} table to this CSV file")


def add_analysis_parser(sub, name: str, *, summary: str, description: str, table: str,
                        sequences: int) -> argparse.ArgumentParser:
    """A subcommand that analyses a saved SAE on held-out toy sequences: model, --sae, --csv, --eval-sequences."""
    p = sub.add_parser(name, help=summary, description=description)
    add_model_args(p)
    add_saved_sae_args(p, table)
    p.add_argument("--eval-sequences", type=positive_int, default=sequences,
                   help=f"held-out toy sequences the analysis runs on (default: {sequences})")
    return p


def add_dataset_args(g, *, context_help: str = "tokens per sequence for text") -> None:
    """``--text-field``, ``--split`` and ``--context-length`` of a text dataset."""
    g.add_argument("--text-field", default="text", help="text field of .jsonl / datasets rows (default: text)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--context-length", type=positive_int, default=None, help=context_help)
    add_sample_by_arg(g)


def add_sample_by_arg(g, default: str | None = "line", help: str = "") -> None:
    g.add_argument("--sample-by", default=default, choices=get_args(SampleBy),
                   help="what one document of a .txt --dataset is: a line, a paragraph (up to a blank line) or the "
                        f"whole file; each is followed by the end-of-text token ({help or 'default: line'})")


def add_dtype_arg(g, help: str = "model weight dtype") -> None:
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=help)


def add_real_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """Options that pick a checkpoint, a dataset and the cells (hook, head) to read."""
    g = p.add_argument_group("checkpoint and dataset")
    g.add_argument("--model", default=None, required=required, metavar="DIR_OR_HUB_ID",
                   help="checkpoint to load with HookedRecurrentModel.from_pretrained")
    g.add_argument("--dataset", default=None, required=required, metavar="PATH_OR_HUB_ID",
                   help=".txt (a document per line, see --sample-by), .jsonl, a saved datasets directory, a hub dataset id, or "
                        "pre-tokenized ids (.npy/.safetensors/.pt, [n_seq, ctx])")
    add_dataset_args(g, context_help="tokens per sequence for text (pre-tokenized data keeps its own)")
    g.add_argument("--layers", type=int_list, default=None, metavar="L1,L2",
                   help="shorthand for --hook blocks.{L}.mixer.hook_{KIND} for every layer listed")
    g.add_argument("--hook-kind", default="state", choices=["state", "write"],
                   help="with --layers: read S_t (state, default) or W_t (write)")
    g.add_argument("--heads", type=int_list, default=None, metavar="H1,H2",
                   help="heads to read in every hook (default: all heads)")
    add_dtype_arg(g, "model weight dtype (default: the checkpoint's)")
    g.add_argument("--device", type=device, default=None,
                   help="model and SAE device, e.g. cuda (default: cpu; under torchrun cuda means each rank's local GPU)")
    g.add_argument("--positions-per-seq", type=positive_int, default=16,
                   help="positions sampled per sequence (default: 16)")
    g.add_argument("--skip-positions", type=non_negative_int, default=1,
                   help="leading positions never sampled, e.g. BOS (default: 1)")
    g.add_argument("--model-batch-size", type=positive_int, default=8,
                   help="sequences per model forward (default: 8)")


# --- an analysis's options, generated from its options dataclass --------------------------------------------


def _show(value: Any) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def _listed(value: Any) -> Any:
    """Tuples as lists, as argparse gives ``nargs="+"`` values."""
    return list(value) if isinstance(value, tuple) else value


def _value_type(annotation: Any) -> tuple[Any, bool]:
    """``(type of one value, several values?)`` of an option's annotation: ``int | None`` -> ``(int, False)``,
    ``Sequence[float]`` -> ``(float, True)``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
        return _value_type(annotation)
    if origin is not None and issubclass(origin, Sequence):
        return get_args(annotation)[0], True
    return annotation, False


def add_options(p, kind: str, names: Sequence[str], *, ours: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None,
                without: dict[str, Sequence[str]] | None = None) -> None:
    """Add ``--name`` for each of ``names``, options of analysis ``kind``, as its options dataclass declares them:
    choices from a ``Literal``, the type and check of a number, the help (its ``{default}`` filled in).

    A protocol-dependent option's default is :data:`~recurrent_lens.analysis.protocols.PRESET`, which
    :func:`resolve_args` replaces with ``--protocol``'s value after parsing; every other option's is the
    dataclass's. ``ours`` are this command's choices under ``--protocol ours`` where they differ from the
    library's; ``defaults`` fixed defaults that replace the protocol's (the command computes the value);
    ``helps`` and ``without`` (choices left out) adapt an option to the command.
    """
    cls, ours, defaults = OPTIONS[kind], ours or {}, defaults or {}
    hints = get_type_hints(cls)
    declared = {f.name: f for f in fields(cls)}
    by_protocol = protocol_options(kind)
    for name in names:
        f, annotation = declared[name], hints[name]
        default = defaults[name] if name in defaults else (PRESET if name in by_protocol else _listed(f.default))
        shown = ours.get(name, defaults.get(name, f.default))
        kw: dict[str, Any] = {"default": default,
                              "help": (helps or {}).get(name, f.metadata["help"]).format(default=_show(shown))}
        allowed = choices(annotation)
        if allowed is not None:
            kw["choices"] = [c for c in allowed if c not in (without or {}).get(name, ())]
        elif annotation is bool:
            kw["action"] = "store_true"
        else:
            value_type, several = _value_type(annotation)
            kw["type"] = _CHECKED.get((value_type, f.metadata["check"]), value_type)
            kw.update({"nargs": "+"} if several else {}, **({"metavar": f.metadata["metavar"]}
                                                            if f.metadata["metavar"] else {}))
        p.add_argument("--" + name.replace("_", "-"), **kw)


def add_protocol(p: argparse.ArgumentParser, kind: str, paper: dict[str, Any] | None = None) -> None:
    """``--protocol ours|paper`` and an epilog listing what ``--protocol paper`` sets: every option whose default
    is the protocol's (see :func:`add_options`), plus ``paper``, the command's own protocol-dependent options."""
    p.add_argument("--protocol", default="ours", choices=["ours", "paper"],
                   help="option presets: 'ours' (default, the defaults shown) or 'paper' (the paper's choices, "
                        "listed below); options given explicitly win")
    values = {**preset(kind, "paper"), **(paper or {})}
    unset = [a.dest for a in p._actions if a.default is PRESET]
    p.epilog = ("--protocol paper sets " + ", ".join(f"--{d.replace('_', '-')} {_show(values[d])}" for d in unset)
                + "; options given explicitly win.")


def resolve_args(args: argparse.Namespace, kind: str, ours: dict[str, Any] | None = None) -> None:
    """Give every option of ``kind`` not given on the command line the value of ``--protocol``, as the analysis
    itself resolves it (``ours``: the command's choices under ``--protocol ours``)."""
    given = {name: getattr(args, name) for name in (f.name for f in fields(OPTIONS[kind])) if name in args}
    unset = [name for name, value in given.items() if value is PRESET]
    if args.protocol == "ours":
        given.update({name: value for name, value in (ours or {}).items() if name in unset})
    options, _ = resolve(kind, args.protocol, given)
    for name in unset:
        setattr(args, name, _listed(getattr(options, name)))
