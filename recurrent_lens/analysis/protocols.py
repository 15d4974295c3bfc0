"""Every analysis's options, declared once: an options dataclass per analysis whose fields carry the type
(``Literal[...]`` for a choice), the default (the ``ours`` protocol's choice) and the help text. The
analysis function's keyword arguments, the protocol presets below, the settings record each result
carries and the ``recurrent-lens`` command's options are all built from it.

Protocol presets: every protocol-dependent option set to the paper's choice (``protocol="paper"``) or
to this library's (``protocol="ours"``, the defaults). Sources of the paper's choices: the paper (Young
2026, arXiv 2605.12770; sections and appendices as numbered there) and the files of its public
reference repository. Where the two disagree, the preset follows one of them, says which, and the other
stays an option. :func:`preset_table` lists every choice with its source; each analysis's docstring
shows it, in the options section :func:`documented` generates from the options dataclass and this table.

An option passed explicitly always wins over the preset; the settings record which ones did
(``settings.overrides``). :func:`resolve` is the one place that applies a protocol.

Example:
    >>> from recurrent_lens.analysis import SubstitutionOptions, preset, presets
    >>> preset("substitution", "paper")["replace"], preset("substitution", "ours")["replace"]
    ('write', 'update')
    >>> SubstitutionOptions().replace, presets("substitution")["paper"].scale
    ('update', 'match_norm')
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

PROTOCOLS = ("paper", "ours")
"""The protocol names every analysis accepts."""


class _Preset:
    """The default of every option of an analysis function: "whatever the protocol (or ``options``) chooses"."""

    _instance: _Preset | None = None

    def __new__(cls) -> _Preset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PRESET"

    def __reduce__(self) -> str:
        return "PRESET"


PRESET: Any = _Preset()
"""Default of the options of every analysis function: the value the chosen ``protocol`` sets."""

Replace = Literal["update", "write"]
Scale = Literal["coefficient", "match_norm"]
RandomControl = Literal["rank1", "sae_atom", "empirical"]
SubstitutionReadout = Literal["offset", "last"]
KLDirection = Literal["native_to_condition", "condition_to_native"]
AtomChoice = Literal["rising", "dominant", "feature"]
Fit = Literal["none", "cell", "context"]
Formula = Literal["closed_form", "table9"]
ShiftReadout = Literal["unembed", "final_norm"]
Statistic = Literal["median_cos_gmm", "mean_abs_cos_top50"]
MagnitudeRef = Literal["kv", "write", "update"]
Direction = Literal["out_proj", "jacobian", "given"]


def option(default: Any, help: str, *, check: str | None = None, metavar: str | None = None) -> Any:
    """A field of an options dataclass.

    Args:
        default: the value under ``protocol="ours"`` (the paper's, where it differs, is in the preset table).
        help: what the option does, as ``--help`` shows it; ``{default}`` stands for the default. The
            analysis's docstring shows it too (:func:`options_doc`), without ``(default: {default})`` and with
            each ``--flag-name`` as the keyword ``flag_name``.
        check: what a number must be, checked where a command line parses it: ``"positive"``,
            ``"non_negative"``, ``"nonzero"`` or ``"cosine"`` (in ``[-1, 1]``).
        metavar: the value's name in ``--help``.
    """
    return field(default=default, metadata={"help": help, "check": check, "metavar": metavar})


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (``None`` for any other type).

    Example:
        >>> choices(Replace), choices(int)
        (('update', 'write'), None)
    """
    return get_args(annotation) if get_origin(annotation) is Literal else None


@dataclass(frozen=True, eq=False)
class Options:
    """Base of the options dataclasses: refuses a value outside its ``Literal`` choices, naming the option."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            allowed = choices(hints[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{f.name}: expected one of {allowed}, got {value!r}")

    @classmethod
    def implied(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The explicitly given options, completed by what they imply (nothing, unless an analysis says so)."""
        return given


@dataclass(frozen=True, eq=False)
class SubstitutionOptions(Options):
    """Options of :func:`~recurrent_lens.analysis.substitution_test`."""

    replace: Replace = option("update", "what is replaced (default: {default})")
    scale: Scale = option("coefficient", "atom scale (default: {default})")
    random: RandomControl = option(
        "rank1", "random control: fresh rank-1 (default), a non-firing SAE atom, or an empirical resample of the "
                 "native updates' factors (the paper's Mamba-2 control)")
    readout: SubstitutionReadout = option(
        "offset", "where the KL is read: 'offset' (default) at t + --readout-offset, 'last' at the last position "
                  "of each sequence (the paper's 'final output distribution')")
    readout_offset: int | None = option(1, "read at t + offset (default: {default})", check="positive")
    kl: KLDirection = option("native_to_condition", "KL direction (default: {default})")
    max_firings_per_atom: int | None = option(30, "cap per substituted atom, or per feature with --features or "
                                                  "--atom feature (default: {default})", check="positive")
    skip_positions: int = option(0, "leading positions never tested, e.g. BOS (default: {default})",
                                 check="non_negative")
    atom: AtomChoice = option(
        "dominant", "which atom stands in for the write at t (default: {default}): 'rising' = the atom whose code "
                    "the write raised most, a(S_t) - a(S_t - update); 'dominant' = argmax a(S_t), the paper's choice "
                    "on Qwen3.5 (on the toys' recall states it is usually another pair's atom); 'feature' = the "
                    "firing feature's own atom")
    rank1_atoms: bool = option(False, "use each atom's best rank-1 approximation; with --sae-type flat_sae and "
                                      "--scale match_norm this is the paper's flat-SVD baseline")
    seed: int = option(0, "seed of the firing subsample and the random controls (default: {default})",
                       check="non_negative")

    @classmethod
    def implied(cls, given: dict[str, Any]) -> dict[str, Any]:
        """An explicit ``readout_offset`` asks for the offset readout, whatever the protocol's."""
        if "readout" not in given and given.get("readout_offset") is not None:
            return {**given, "readout": "offset"}
        return given


@dataclass(frozen=True, eq=False)
class LogitShiftOptions(Options):
    """Options of :func:`~recurrent_lens.analysis.logit_shift_prediction`."""

    eps: Sequence[float] = option((0.1, 0.3, 1.0, 3.0), "perturbation sizes eps (default: {default})",
                                    check="nonzero", metavar="EPS")
    n_atoms: int = option(10, "without --atoms, perturb the N atoms most often dominant (largest code) on the "
                              "sequences, or all that are ever dominant if fewer (default: {default})",
                          check="positive", metavar="N")
    fit: Fit = option("none", "what the per-cell R^2 compares: 'none' (default) the closed form as is, 'cell' one "
                              "slope per (atom, eps) cell, 'context' one G per (sequence, t0, atom) across the eps "
                              "values (the paper's App. A; needs two or more eps); every fit stays available on "
                              "the result")
    formula: Formula = option("closed_form", "'closed_form' (default, Eq. 1) or 'table9' (the paper's Table 9 "
                                             "variant: perturb by eps times the atom's own component of the state)")
    readout: ShiftReadout = option("unembed", "'unembed' (default): W_U directly, the paper's form; 'final_norm': "
                                              "also linearise the final norm at the native residual")
    readout_offset: int = option(1, "read the logits at t + offset after the edit at t0 (default: {default}; the "
                                    "toy's recall offset, 16, reads where a value written at t is recalled)",
                                 check="positive", metavar="OFFSET")
    positions_per_atom: int = option(50, "random (sequence, t0) pairs per atom (default: {default})", check="positive")
    skip_positions: int = option(0, "leading positions never perturbed, e.g. BOS (default: {default})",
                                 check="non_negative")
    seed: int = option(2026, "seed of the (sequence, t0) draws (default: {default}, the paper's audit seed)",
                       check="non_negative")


@dataclass(frozen=True, eq=False)
class InstallOptions(Options):
    """Options of :func:`~recurrent_lens.analysis.install`."""

    magnitude: float = option(3.0, "install magnitude m (default: {default})", check="positive")
    magnitude_ref: MagnitudeRef = option("update", "the norm m scales: 'kv', 'write' or 'update' (default: {default})")
    direction: Direction = option("jacobian", "the installed direction: 'out_proj', 'jacobian' (default) or "
                                              "'given' (a direction passed as a tensor)")


@dataclass(frozen=True, eq=False)
class GenerationInstallOptions(InstallOptions):
    """Options of :func:`~recurrent_lens.analysis.install_during_generation`."""

    max_new_tokens: int = option(20, "tokens generated greedily (default: {default})", check="positive")


@dataclass(frozen=True, eq=False)
class PartitionOptions(Options):
    """Options of :func:`~recurrent_lens.analysis.partition_atoms`."""

    statistic: Statistic = option(
        "median_cos_gmm", "atom score: 'median_cos_gmm' (default) the median cosine with the update over the "
                          "firings; 'mean_abs_cos_top50' the reference code's mean |cos| per factor over the top-50 "
                          "activations (geometric mean)")
    replace: Replace = option("update", "compare with the net update (default) or the write alone")
    max_firings_per_atom: int | None = option(200, "cosines per atom for 'median_cos_gmm', a seeded subsample "
                                                   "(default: {default})", check="positive")
    min_firings: int = option(1, "atoms with fewer firings count as dead (default: {default})", check="positive")
    tau: float = option(0.05, "cosine above which an atom is a register when one Gaussian is preferred "
                              "(default: {default})", check="cosine")
    skip_positions: int = option(0, "leading positions never read, e.g. BOS (default: {default})",
                                 check="non_negative")
    seed: int = option(0, "seed of the per-atom subsample of firings (default: {default})", check="non_negative")


@dataclass(frozen=True, eq=False)
class EraseOptions(Options):
    """Options of :func:`~recurrent_lens.analysis.erase_atom` (which follows App. I.4 as is: no protocol switch)."""

    max_positions: int = option(150, "erase at most this many firings, a seeded subsample; the controls use as "
                                     "many non-firing positions (default: {default})", check="positive")
    control_multipliers: Sequence[float] = option((1.0, 2.0, 4.0), "multipliers m of the additive controls "
                                                                     "(default: {default})",
                                                    check="positive", metavar="M")
    readout_offset: int = option(1, "read the logits at t + offset after the erasure at t (default: {default}; the "
                                    "toy's recall offset, 16, reads where a value written at t is recalled)",
                                 check="positive", metavar="OFFSET")
    skip_positions: int = option(0, "leading positions never edited, e.g. BOS (default: {default})",
                                 check="non_negative")
    seed: int = option(0, "seed of the subsamples of firing and control positions (default: {default})",
                       check="non_negative")


_OURS = "this library"
_CLEAN = "reference repository, scripts/clean_amplified_kl.py (docstring of the substitution kernel)"
_ALIGN = "reference repository, experiments/analysis/memory_alignment.py"

OPTIONS: dict[str, type[Options]] = {"substitution": SubstitutionOptions, "logit_shift": LogitShiftOptions,
                                     "install": GenerationInstallOptions, "partition": PartitionOptions, "erase": EraseOptions}
"""The options dataclass of each analysis, by the ``kind`` the presets use."""

# The protocol-dependent options of each analysis: the paper's value and where it is stated, and why this
# library's (the dataclass default) is what it is.
_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "substitution": {
        "paper": {
            "replace": ("write", "App. J pseudo-code (σ_t = ‖β_t k_t v_tᵀ‖_F) and " + _CLEAN
                        + " (S_t − β_t k_t v_tᵀ + ...): only the additive write βkvᵀ is removed"),
            "scale": ("match_norm", "App. J pseudo-code and " + _CLEAN + ": the atom rescaled to ‖β_t k_t v_tᵀ‖_F; "
                      "§2 'Replacement protocol' and the Table 2 caption say the firing coefficient instead "
                      "(scale='coefficient')"),
            "random": ("sae_atom", _CLEAN + ": 'matched-norm rank-1 from a non-firing atom'; App. J and Fig. 11 "
                       "say a random rank-1 matrix at matched norm instead (random='rank1')"),
            "readout": ("last", "§2 and §3: KL 'on the final output distribution'; nothing more is stated"),
            "readout_offset": (None, "unused: the readout is the last position"),
            "kl": ("native_to_condition", _CLEAN + ": records KL(p_native ‖ p_cond); §2 writes "
                   "KL(p_patched ‖ p_baseline) instead (kl='condition_to_native')"),
            "atom": ("dominant", "App. J 'Per-firing atom selection' and §2: i* = argmax_i a_i(S_t); " + _CLEAN
                     + " substitutes the firing feature's own atom v_i w_iᵀ instead (atom='feature')"),
            "max_firings_per_atom": (30, "App. F.2: the population test caps firings at 30 per atom (the reference "
                                     "script has no cap; App. F.1 uses 200 per feature)"),
        },
        "ours": {
            "replace": _OURS + ": the net update (write + erase, k̂δᵀ for delta rules), so that delete leaves the "
                       "decayed previous state",
            "scale": "§2 'Replacement protocol': the atom at its firing coefficient a_{i*}",
            "random": "§3.2 'Single-write replacement': a fresh random atom",
            "readout": _OURS + ": read at t + readout_offset in a cache continuation",
            "readout_offset": _OURS + ": the first token that reads the edited state",
            "kl": _CLEAN + ": KL(p_native ‖ p_cond)",
            "atom": "§2 and App. J: the dominant atom",
            "max_firings_per_atom": "App. F.2: 30 firings per atom",
        },
    },
    "logit_shift": {
        "paper": {
            "eps": ((0.1, 0.3, 1.0, 3.0), "App. A 'Population audit': ε ∈ {0.1, 0.3, 1.0, 3.0}; Table 9 lists "
                    "{0.25, 0.5, 0.75, 1.0} with its variant formula"),
            "n_atoms": (50, "App. A 'Population audit': 50 × 4 (atom, ε) cells"),
            "positions_per_atom": (500, "App. A 'Population audit': 500 prompts per cell"),
            "fit": ("context", "App. A 'Empirical G': one G per (prompt, feature, eval-token) triple, recovered by "
                    "least squares; §3.2 says 'no fitted parameters' (fit='none'); the reported median R² = 0.983 "
                    "is the fitted one"),
            "formula": ("closed_form", "Eq. 1 and App. A; Table 9 (Experiment C) states the variant "
                        "v_iᵀ S_t w_i · W_out vec(v_i w_iᵀ) (formula='table9')"),
            "readout": ("unembed", "Eq. 1: the logit through W_U[tok]"),
            "readout_offset": (1, "App. A leaves the horizon h open; the first read"),
        },
        "ours": {
            "eps": "App. A 'Population audit'",
            "n_atoms": _OURS + ": the 10 most often dominant atoms",
            "positions_per_atom": _OURS,
            "fit": "§3.2: 'no fitted parameters' (zero-parameter R²)",
            "formula": "Eq. 1",
            "readout": "Eq. 1",
            "readout_offset": _OURS + ": the first read of the edited state",
        },
    },
    "install": {
        "paper": {
            "magnitude": (3.0, "§4 'Generation edit' and App. I.6: m = 3.0"),
            "magnitude_ref": ("kv", "§4 'Generation edit' and App. I.6: m · ‖k_t v_tᵀ‖_F"),
            "direction": ("out_proj", "§4 and App. I.5/I.6: v*_T = W_O[head]ᵀ W_U[T] / ‖·‖, W_O[head] the head's "
                          "slice of out_proj"),
            "max_new_tokens": (20, "App. I.6: 20 tokens, greedy"),
        },
        "ours": {
            "magnitude": _OURS,
            "magnitude_ref": _OURS + ": m · ‖net update at t‖_F",
            "direction": _OURS + ": W_O^{(h)} is the output map's Jacobian (gated norm included), averaged over "
                         "the tokens",
            "max_new_tokens": "App. I.6",
        },
    },
    "partition": {
        "paper": {
            "statistic": ("median_cos_gmm", "§3.1 and Fig. 2a: a two-component Gaussian mixture on each atom's "
                          "median cosine to the native write; " + _ALIGN + " computes the mean |cos| per factor "
                          "over each feature's top-50 activations instead (statistic='mean_abs_cos_top50')"),
            "replace": ("update", _ALIGN + ": cosines against the write actually stored, k̂_t δ_tᵀ with "
                        "δ_t = β_t (v_t − S_{t−1}ᵀ k̂_t); the text's 'native write' could also be read as β k vᵀ "
                        "(replace='write')"),
            "max_firings_per_atom": (None, "§3.1: the median over the atom's firings (no cap stated)"),
            "tau": (0.05, "Fig. 12 and App. F.2: the register threshold cos = 0.05"),
        },
        "ours": {
            "statistic": "§3.1",
            "replace": _OURS,
            "max_firings_per_atom": _OURS + ": a seeded subsample of 200 firings per atom",
            "tau": "Fig. 12",
        },
    },
    "erase": {"paper": {}, "ours": {}},  # App. I.4 as is: nothing depends on the protocol
}


def _check_kind(kind: str) -> None:
    if kind not in _TABLE:
        raise ValueError(f"kind: expected one of {tuple(_TABLE)}, got {kind!r}")


def presets(kind: str) -> dict[str, Options]:
    """``{protocol: options}`` of one analysis: ``"ours"`` is its options dataclass's defaults, ``"paper"`` the
    same with the paper's choices.

    Example:
        >>> presets("partition")["paper"].max_firings_per_atom, presets("partition")["ours"].max_firings_per_atom
        (None, 200)
    """
    _check_kind(kind)
    ours = OPTIONS[kind]()
    return {"paper": replace(ours, **{k: v for k, (v, _) in _TABLE[kind]["paper"].items()}), "ours": ours}


def protocol_options(kind: str) -> tuple[str, ...]:
    """The options of ``kind`` whose default depends on the protocol, in the preset table's order.

    Example:
        >>> protocol_options("partition")
        ('statistic', 'replace', 'max_firings_per_atom', 'tau')
    """
    _check_kind(kind)
    return tuple(_TABLE[kind]["paper"])


def preset_table(kind: str, protocol: str) -> dict[str, tuple[Any, str]]:
    """``{option: (value, source)}`` of one analysis's protocol-dependent options under one protocol.

    Args:
        kind: ``"substitution"``, ``"logit_shift"``, ``"install"`` or ``"partition"``.
        protocol: ``"paper"`` or ``"ours"``.

    Example:
        >>> value, source = preset_table("install", "paper")["magnitude_ref"]
        >>> value, source.split(":")[0]
        ('kv', "§4 'Generation edit' and App. I.6")
    """
    _check_kind(kind)
    check_protocol(protocol)
    values = presets(kind)[protocol]
    sources = {k: s for k, (_, s) in _TABLE[kind]["paper"].items()} if protocol == "paper" else _TABLE[kind]["ours"]
    return {k: (getattr(values, k), sources[k]) for k in protocol_options(kind)}


def preset(kind: str, protocol: str) -> dict[str, Any]:
    """``{option: value}`` of one analysis under one protocol (see :func:`preset_table` for sources).

    Example:
        >>> preset("partition", "paper")["statistic"]
        'median_cos_gmm'
    """
    return {k: v for k, (v, _) in preset_table(kind, protocol).items()}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


def check_options(name: str, value: Any, cls: type[Options]) -> None:
    """Refuses ``value`` unless it is ``None`` or a ``cls``, with an error naming the argument ``name``.

    Example:
        >>> check_options("options", {"tau": 0.1}, PartitionOptions)
        Traceback (most recent call last):
        ...
        ValueError: options: expected a PartitionOptions or None, got dict
    """
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name}: expected a {cls.__name__} or None, got {type(value).__name__}")


def resolve(kind: str, protocol: str, given: dict[str, Any], options: Options | None = None,
            cls: type[Options] | None = None) -> tuple[Options, tuple[str, ...]]:
    """The options of ``kind`` under ``protocol``, with every explicitly given value winning.

    Args:
        kind: the analysis (a key of :data:`OPTIONS`).
        protocol: ``"paper"`` or ``"ours"``.
        given: option -> argument; :data:`PRESET` where not passed.
        options: an instance of ``cls`` that replaces the protocol's preset as the base.
        cls: the options the function takes (default: ``OPTIONS[kind]``); a base class of it for a function
            that takes fewer (:func:`~recurrent_lens.analysis.install` takes :class:`InstallOptions`).

    Returns:
        ``(options, overrides)``: ``overrides`` names the protocol-dependent options whose final value differs
        from the protocol's preset.

    Example:
        >>> opts, overrides = resolve("partition", "paper", {"tau": 0.1, "replace": PRESET})
        >>> opts.tau, opts.max_firings_per_atom, overrides
        (0.1, None, ('tau',))
    """
    check_protocol(protocol)
    cls = OPTIONS[kind] if cls is None else cls
    names = [f.name for f in fields(cls)]
    preset_values = presets(kind)[protocol]
    base = cls(**{name: getattr(preset_values, name) for name in names})
    check_options("options", options, cls)
    explicit = cls.implied({k: v for k, v in given.items() if v is not PRESET})
    values = replace(options if options is not None else base, **explicit)
    overrides = tuple(k for k in protocol_options(kind)
                      if k in names and _norm(getattr(values, k)) != _norm(getattr(base, k)))
    return values, overrides


_Function = TypeVar("_Function", bound=Callable[..., Any])
_CHECKS = {"positive": "> 0", "non_negative": ">= 0", "nonzero": "each nonzero", "cosine": "in [-1, 1]"}
_SECTION = re.compile(r"^( +)(Returns|Raises|Example)\b", re.MULTILINE)


def _doc_help(help: str, default: Any) -> str:
    """A field's help as a docstring shows it: without the ``(default: ...)`` that the entry shows anyway, and
    with the command line's ``--flag-name`` as the keyword ``flag_name``."""
    text = re.sub(r"default: \{default\}[;,] ", "", re.sub(r" \(default: \{default\}\)", "", help))
    text = text.format(default=default)
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: f"``{m[1].replace('-', '_')}``", text)


def options_doc(kind: str, cls: type[Options] | None = None) -> str:
    """The options section of an analysis's docstring, generated from its options dataclass ``cls`` (default:
    ``OPTIONS[kind]``) and the preset table: each field's type (a ``Literal``'s choices), default, value
    under ``protocol="paper"`` with its source, and help.

    Example:
        >>> entries = [line for line in options_doc("partition").splitlines() if line.startswith("    tau")]
        >>> print(entries[0][:82])
            tau (float, in [-1, 1]): *(protocol)* cosine above which an atom is a register
    """
    _check_kind(kind)
    cls = OPTIONS[kind] if cls is None else cls
    hints = get_type_hints(cls)
    by_protocol = [k for k in protocol_options(kind) if k in {f.name for f in fields(cls)}]
    name = f":class:`~recurrent_lens.analysis.{cls.__name__}`"
    if by_protocol:
        intro = (f"Keyword arguments, declared by {name}; ``options=`` passes them all at once and replaces "
                 f"the protocol's preset. A keyword passed explicitly wins over both. An option marked "
                 f"*(protocol)* defaults to the choice of ``protocol`` (``\"ours\"``, the default, or "
                 f"``\"paper\"``); ``result.settings.overrides`` lists those whose value differs from the preset.")
    else:
        intro = (f"Keyword arguments, declared by {name}; ``options=`` passes them all at once, and a keyword "
                 f"passed explicitly wins over it.")
    lines = ["Options:", *_wrap(intro, 4)]
    if cls.implied.__func__ is not Options.implied.__func__:
        lines += _wrap(cls.implied.__doc__, 4)
    paper, ours = preset_table(kind, "paper"), preset_table(kind, "ours")
    for f in fields(cls):
        allowed = choices(hints[f.name])
        kind_of = " | ".join(map(repr, allowed)) if allowed is not None else f.type
        check = _CHECKS.get(f.metadata["check"])
        entry = f"{f.name} ({kind_of}{', ' + check if check else ''}): "
        if f.name in by_protocol:
            entry += (f"*(protocol)* {_doc_help(f.metadata['help'], f.default)}. Ours ``{f.name}={f.default!r}`` "
                      f"({ours[f.name][1]}); paper ``{f.name}={paper[f.name][0]!r}`` ({paper[f.name][1]}).")
        else:
            entry += f"{_doc_help(f.metadata['help'], f.default)}. Default ``{f.name}={f.default!r}``."
        lines += _wrap(entry, 8)
    return "\n".join(lines)


def _wrap(text: str, hanging: int) -> list[str]:
    """``text`` in lines of at most 112 characters, indented by 4 and then by ``hanging``, never breaking inside
    an inline literal (so that it can be searched for as written)."""
    kept = re.sub(r"``.*?``", lambda m: m[0].replace(" ", "\0"), text)
    lines = textwrap.wrap(kept, 112, initial_indent=" " * 4, subsequent_indent=" " * hanging,
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def documented(kind: str, cls: type[Options] | None = None) -> Callable[[_Function], _Function]:
    """Decorator: puts :func:`options_doc` into the function's docstring, before its Returns, Raises or Example
    section (at its end if it has none), so that an analysis documents its options where they are declared.

    Example:
        >>> @documented("erase")
        ... def f():
        ...     \"\"\"Erase.
        ...
        ...     Example:
        ...         >>> f()
        ...     \"\"\"
        >>> print(f.__doc__.splitlines()[2])
            Options:
    """
    def decorate(function: _Function) -> _Function:
        doc = function.__doc__ or ""
        where = _SECTION.search(doc)
        indent = where[1] if where else " " * 4
        section = textwrap.indent(options_doc(kind, cls), indent) + "\n\n"
        function.__doc__ = (doc[: where.start()] + section + doc[where.start():] if where
                            else doc.rstrip() + "\n\n" + section)
        return function
    return decorate


def _norm(value: Any) -> Any:
    """Lists and tuples compare by their items (``eps=[0.1, 1]`` is the preset ``(0.1, 1)``)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True, eq=False)
class Settings(Mapping):
    """A frozen record of the options an analysis ran with; also a read-only mapping.

    ``settings["tau"]``, ``dict(settings)``, ``{**settings}`` and ``settings == {...}`` work as on the
    plain dicts earlier versions returned; ``dataclasses.replace(settings, ...)`` makes a changed copy.
    """

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(fields(self))

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))


@dataclass(frozen=True, eq=False)
class _Site(Settings):
    """Where an analysis with a protocol ran: the protocol and the cell."""

    protocol: str
    hook_name: str
    head: int


@dataclass(frozen=True, eq=False)
class SubstitutionSettings(SubstitutionOptions, _Site):
    """The record of a :func:`~recurrent_lens.analysis.substitution_test` run: its options and what it ran on."""

    positions: list[int] | None = None
    features: list[int] | None = None
    overrides: tuple[str, ...] = ()
    min_kl_delete: float | None = None


@dataclass(frozen=True, eq=False)
class _ShiftSite(_Site):
    atoms: list[int]


@dataclass(frozen=True, eq=False)
class LogitShiftSettings(LogitShiftOptions, _ShiftSite):
    """The record of a :func:`~recurrent_lens.analysis.logit_shift_prediction` run (``atoms``: those perturbed)."""

    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class InstallSettings(InstallOptions, _Site):
    """The record of an :func:`~recurrent_lens.analysis.install` run (one position at a time, read later)."""

    readout_offset: int = 1
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _GenerationSite(_Site):
    positions: list[int]


@dataclass(frozen=True, eq=False)
class GenerationInstallSettings(GenerationInstallOptions, _GenerationSite):
    """The record of an :func:`~recurrent_lens.analysis.install_during_generation` run (``positions``: the
    install positions)."""

    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class PartitionSettings(PartitionOptions, _Site):
    """The record of a :func:`~recurrent_lens.analysis.partition_atoms` run."""

    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _EraseSite(Settings):
    hook_name: str
    head: int
    atom: int


@dataclass(frozen=True, eq=False)
class EraseSettings(EraseOptions, _EraseSite):
    """The record of an :func:`~recurrent_lens.analysis.erase_atom` run: the cell, the erased atom, its options and
    ``a_star``, the median firing coefficient."""

    a_star: float = float("nan")


__all__ = ["PROTOCOLS", "PRESET", "OPTIONS", "option", "choices", "preset", "preset_table", "presets",
           "protocol_options", "resolve", "check_protocol", "check_options", "options_doc", "documented", "Options",
           "SubstitutionOptions", "LogitShiftOptions", "InstallOptions", "GenerationInstallOptions",
           "PartitionOptions", "EraseOptions", "Settings", "SubstitutionSettings", "LogitShiftSettings",
           "InstallSettings", "GenerationInstallSettings", "PartitionSettings", "EraseSettings"]
