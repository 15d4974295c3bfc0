"""The analyses' command-line options are generated from their options dataclasses: every field is an option with
the same choices and default (under either protocol), and every analysis function takes every field."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import get_type_hints

import pytest

from recurrent_lens import analysis
from recurrent_lens.analysis.protocols import OPTIONS, PRESET, choices, presets
from recurrent_lens.cli import build_parser, erase, logit_shift, partition, substitution
from recurrent_lens.cli.args import resolve_args

FIXED = {"seed", "skip_positions"}
"""Fields every analysis command fixes: ``--seed`` is the command's one seed, the BOS position is always skipped."""

COMMANDS = [  # (command, its module, the analysis, extra arguments, resolve)
    ("substitution", substitution, "substitution", ["--sae", "x"], substitution.resolve),
    ("demo", substitution, "substitution", [], substitution.resolve),
    ("logit-shift", logit_shift, "logit_shift", ["--sae", "x"], lambda a: resolve_args(a, "logit_shift")),
    ("partition", partition, "partition", ["--sae", "x"], lambda a: resolve_args(a, "partition")),
    ("erase", erase, "erase", ["--sae", "x", "--atom", "0"], None),
]


def _subparser(command: str):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return parser, sub.choices[command]


def _cli_value(module, name: str, protocol: str, declared):
    """What the command's option resolves to: the analysis's preset, unless the command declares its own."""
    if name in getattr(module, "DEFAULTS", {}):
        return module.DEFAULTS[name]
    if protocol == "ours" and name in getattr(module, "OURS", {}):
        return module.OURS[name]
    value = getattr(declared, name)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("command, module, kind, extra, resolve", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_field_is_an_option_with_its_choices_and_default(command, module, kind, extra, resolve):
    cls = OPTIONS[kind]
    hints = get_type_hints(cls)
    assert set(module.OPTIONS) == {f.name for f in fields(cls)} - FIXED
    parser, sub = _subparser(command)
    actions = {a.dest: a for a in sub._actions}
    assert "seed" in actions and "skip_positions" not in actions
    for name in module.OPTIONS:
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.help and "{default}" not in action.help
        allowed = choices(hints[name])
        if allowed is not None:
            left_out = {"feature"} if command == "demo" and name == "atom" else set()
            assert action.choices == [c for c in allowed if c not in left_out], name
    for protocol in ("ours", "paper") if resolve else ("ours",):
        argv = [command, *extra] + (["--protocol", protocol] if resolve else [])
        args = parser.parse_args(argv)
        if resolve:
            resolve(args)
        for name in module.OPTIONS:
            assert getattr(args, name) == _cli_value(module, name, protocol, presets(kind)[protocol]), (protocol, name)


def test_the_protocol_epilog_lists_every_protocol_option():
    _, sub = _subparser("partition")
    assert sub.epilog == ("--protocol paper sets --statistic median_cos_gmm, --replace update, "
                          "--max-firings-per-atom None, --tau 0.05; options given explicitly win.")


FUNCTIONS = [(analysis.substitution_test, analysis.SubstitutionOptions),
             (analysis.logit_shift_prediction, analysis.LogitShiftOptions),
             (analysis.partition_atoms, analysis.PartitionOptions), (analysis.erase_atom, analysis.EraseOptions),
             (analysis.install, analysis.InstallOptions),
             (analysis.install_during_generation, analysis.GenerationInstallOptions)]


@pytest.mark.parametrize("function, cls", FUNCTIONS, ids=[f.__name__ for f, _ in FUNCTIONS])
def test_function_signatures_agree_with_the_dataclass(function, cls):
    parameters = inspect.signature(function).parameters
    for f in fields(cls):
        assert parameters[f.name].default is PRESET, f.name
        if f.name != "direction":  # the install functions also take a direction as a tensor
            assert parameters[f.name].annotation == f.type, f.name
    assert parameters["options"].annotation == f"{cls.__name__} | None"
    assert parameters["options"].default is None


def test_cli_protocol_defaults_and_explicit_flags():
    resolvers = {"substitution": substitution.resolve, "logit-shift": lambda a: resolve_args(a, "logit_shift"),
                 "partition": lambda a: resolve_args(a, "partition")}
    parser = build_parser()
    for argv, expected in (
        (["substitution", "--sae", "x"], dict(replace="update", atom="rising", positions="values", readout="offset")),
        (["substitution", "--sae", "x", "--protocol", "paper"],
         dict(replace="write", scale="match_norm", random="sae_atom", atom="dominant", positions="all",
              readout="last")),
        (["substitution", "--sae", "x", "--protocol", "paper", "--replace", "update", "--readout-offset", "16"],
         dict(replace="update", readout="offset", readout_offset=16)),
        (["logit-shift", "--sae", "x", "--protocol", "paper"],
         dict(n_atoms=50, positions_per_atom=500, fit="context", eps=[0.1, 0.3, 1.0, 3.0])),
        (["logit-shift", "--sae", "x"], dict(n_atoms=10, positions_per_atom=50, fit="none")),
        (["partition", "--sae", "x", "--protocol", "paper"], dict(max_firings_per_atom=None, tau=0.05)),
        (["partition", "--sae", "x", "--protocol", "paper", "--tau", "0.1"], dict(tau=0.1)),
    ):
        args = parser.parse_args(argv)
        resolvers[argv[0]](args)
        for k, v in expected.items():
            assert getattr(args, k) == v, (argv, k)
