"""Protocol presets: every option of an analysis set to the paper's choice (``protocol="paper"``) or to
this library's (``protocol="ours"``, the defaults), and the frozen settings record each result carries.

Sources of the paper's choices: the paper (Young 2026, arXiv 2605.12770; sections and appendices as
numbered there) and the files of its public reference repository. Where the two disagree, the preset
follows one of them, says which, and the other stays an option. :func:`preset_table` lists every choice
with its source; each analysis's docstring repeats it.

An option passed explicitly always wins over the preset; the settings record which ones did
(``settings.overrides``).

Example:
    >>> from recurrent_lens.analysis import preset
    >>> preset("substitution", "paper")["replace"], preset("substitution", "ours")["replace"]
    ('write', 'update')
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

PROTOCOLS = ("paper", "ours")
"""The protocol names every analysis accepts."""


class _Preset:
    """The default of every protocol-dependent option: "whatever the protocol chooses"."""

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
"""Default of the protocol-dependent options: the value the chosen ``protocol`` sets."""

_OURS = "this library"
_CLEAN = "reference repository, scripts/clean_amplified_kl.py (docstring of the substitution kernel)"
_ALIGN = "reference repository, experiments/analysis/memory_alignment.py"

# option -> (value, source); "paper" values cite where the paper (or its code) states them.
_TABLE: dict[str, dict[str, dict[str, tuple[Any, str]]]] = {
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
            "max_firings_per_atom": (30, "App. F.2: the population test caps firings at 30 per atom"),
        },
        "ours": {
            "replace": ("update", _OURS + ": the net update (write + erase, k̂δᵀ for delta rules), so that delete "
                        "leaves the decayed previous state"),
            "scale": ("coefficient", "§2 'Replacement protocol': the atom at its firing coefficient a_{i*}"),
            "random": ("rank1", "§3.2 'Single-write replacement': a fresh random atom"),
            "readout": ("offset", _OURS + ": read at t + readout_offset in a cache continuation"),
            "readout_offset": (1, _OURS + ": the first token that reads the edited state"),
            "kl": ("native_to_condition", _CLEAN + ": KL(p_native ‖ p_cond)"),
            "atom": ("dominant", "§2 and App. J: the dominant atom"),
            "max_firings_per_atom": (30, "App. F.2: 30 firings per atom"),
        },
    },
    "logit_shift": {
        "paper": {
            "eps": ((0.1, 0.3, 1.0, 3.0), "App. A 'Population audit': ε ∈ {0.1, 0.3, 1.0, 3.0}; Table 9 lists "
                    "{0.25, 0.5, 0.75, 1.0} with its variant formula"),
            "n_atoms": (50, "App. A 'Population audit': 50 × 4 (atom, ε) cells"),
            "positions_per_atom": (500, "App. A 'Population audit': 500 prompts per cell"),
            "fit": ("context", "App. A 'Empirical G': one G per (prompt, feature, eval-token) triple, recovered by "
                    "least squares; §3.2 says 'no fitted parameters' (fit='none')"),
            "formula": ("closed_form", "Eq. 1 and App. A; Table 9 (Experiment C) states the variant "
                        "v_iᵀ S_t w_i · W_out vec(v_i w_iᵀ) (formula='table9')"),
            "readout": ("unembed", "Eq. 1: the logit through W_U[tok]"),
            "readout_offset": (1, "App. A leaves the horizon h open; the first read"),
        },
        "ours": {
            "eps": ((0.1, 0.3, 1.0, 3.0), "App. A 'Population audit'"),
            "n_atoms": (10, _OURS + ": the 10 most often dominant atoms"),
            "positions_per_atom": (50, _OURS),
            "fit": ("none", "§3.2: 'no fitted parameters' (zero-parameter R²)"),
            "formula": ("closed_form", "Eq. 1"),
            "readout": ("unembed", "Eq. 1"),
            "readout_offset": (1, _OURS + ": the first read of the edited state"),
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
            "magnitude": (3.0, _OURS),
            "magnitude_ref": ("update", _OURS + ": m · ‖net update at t‖_F"),
            "direction": ("jacobian", _OURS + ": W_O^{(h)} is the output map's Jacobian (gated norm included), "
                          "averaged over the tokens"),
            "max_new_tokens": (20, "App. I.6"),
        },
    },
    "partition": {
        "paper": {
            "statistic": ("median_cos_gmm", "§3.1 and Fig. 2a: a two-component Gaussian mixture on each atom's "
                          "median cosine to the native write; " + _ALIGN + " computes the mean |cos| per factor "
                          "over each feature's top-50 activations instead (statistic='mean_abs_cos_top50')"),
            "replace": ("update", _ALIGN + ": cosines against the write actually stored, k̂_t δ_tᵀ"),
            "max_firings_per_atom": (None, "§3.1: the median over the atom's firings (no cap stated)"),
            "tau": (0.05, "Fig. 12 and App. F.2: the register threshold cos = 0.05"),
        },
        "ours": {
            "statistic": ("median_cos_gmm", "§3.1"),
            "replace": ("update", _OURS),
            "max_firings_per_atom": (200, _OURS + ": a seeded subsample of 200 firings per atom"),
            "tau": (0.05, "Fig. 12"),
        },
    },
}


def preset_table(kind: str, protocol: str) -> dict[str, tuple[Any, str]]:
    """``{option: (value, source)}`` of one analysis under one protocol.

    Args:
        kind: ``"substitution"``, ``"logit_shift"``, ``"install"`` or ``"partition"``.
        protocol: ``"paper"`` or ``"ours"``.

    Example:
        >>> value, source = preset_table("install", "paper")["magnitude_ref"]
        >>> value, source.split(":")[0]
        ('kv', "§4 'Generation edit' and App. I.6")
    """
    if kind not in _TABLE:
        raise ValueError(f"kind: expected one of {tuple(_TABLE)}, got {kind!r}")
    check_protocol(protocol)
    return dict(_TABLE[kind][protocol])


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


def resolve(kind: str, protocol: str, given: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The options of ``kind`` under ``protocol``, with every explicitly given value winning.

    ``given`` maps each protocol-dependent option to its argument (:data:`PRESET` where not passed).
    Returns ``(values, overrides)``: ``overrides`` names the options whose explicit value differs from
    the preset's.
    """
    table = preset(kind, protocol)
    values, overrides = {}, []
    for name, default in table.items():
        value = given.get(name, PRESET)
        if value is PRESET:
            values[name] = default
        else:
            values[name] = value
            if _norm(value) != _norm(default):
                overrides.append(name)
    return values, tuple(overrides)


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
class SubstitutionSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.substitution_test`."""

    protocol: str
    hook_name: str
    head: int
    replace: str
    scale: str
    random: str
    readout: str
    readout_offset: int | None
    kl: str
    max_firings_per_atom: int | None
    skip_positions: int
    positions: list[int] | None
    atom: str
    features: list[int] | None
    rank1_atoms: bool
    seed: int
    overrides: tuple[str, ...] = ()
    min_kl_delete: float | None = None


@dataclass(frozen=True, eq=False)
class LogitShiftSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.logit_shift_prediction`."""

    protocol: str
    hook_name: str
    head: int
    atoms: list[int]
    eps: list[float]
    n_atoms: int
    fit: str
    formula: str
    readout: str
    readout_offset: int
    positions_per_atom: int
    skip_positions: int
    seed: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class InstallSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.install` (one position at a time, read later)."""

    protocol: str
    hook_name: str
    head: int
    magnitude: float
    magnitude_ref: str
    direction: str
    readout_offset: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class GenerationInstallSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.install_during_generation`."""

    protocol: str
    hook_name: str
    head: int
    positions: list[int]
    magnitude: float
    magnitude_ref: str
    direction: str
    max_new_tokens: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class PartitionSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.partition_atoms`."""

    protocol: str
    hook_name: str
    head: int
    statistic: str
    replace: str
    max_firings_per_atom: int | None
    min_firings: int
    tau: float
    skip_positions: int
    seed: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class EraseSettings(Settings):
    """Options of :func:`~recurrent_lens.analysis.erase_atom` (which follows App. I.4 as is: no protocol switch)."""

    hook_name: str
    head: int
    atom: int
    max_positions: int
    control_multipliers: list[float]
    readout_offset: int
    skip_positions: int
    seed: int
    a_star: float = float("nan")


__all__ = ["PROTOCOLS", "PRESET", "preset", "preset_table", "resolve", "check_protocol", "Settings",
           "SubstitutionSettings", "LogitShiftSettings", "InstallSettings", "GenerationInstallSettings",
           "PartitionSettings", "EraseSettings"]
