"""Toy models: tiny recurrent LMs of every architecture trained on multi-query associative recall.

``load(name)`` returns a trained :class:`~recurrent_lens.HookedRecurrentModel` (eval mode) and its
:class:`ToyTask`. ``load_sae(name)`` returns the WriteSAE that ``recurrent-lens demo --arch NAME`` trains on the toy's
probe site (``TOY_SPECS[name].probe``, the head whose writes its recall needs). Names: ``"gdn"`` (Gated
DeltaNet), ``"mamba2"``, ``"rwkv7"``, ``"deltanet"``, ``"gla"``.

Where the weights come from, in order:

1. the package's embedded weights (``recurrent_lens/toy/weights/{name}.safetensors``, < 1 MB each,
   written by :func:`build_embedded` / ``python -m recurrent_lens.toy``), used when their recorded
   recipe fingerprint matches the current recipe;
2. the user cache ``$RECURRENT_LENS_CACHE/toy/`` (default ``$XDG_CACHE_HOME/recurrent_lens/toy/``,
   i.e. ``~/.cache/recurrent_lens/toy/``), keyed by the fingerprint;
3. otherwise the model is trained (seconds to half a minute on 2 CPU cores, with a progress bar) and
   written to the cache atomically (temporary file + rename).

Example:
    >>> from recurrent_lens import toy
    >>> model, task = toy.load("gdn", progress=False)
    >>> tokens, targets = task.make_batch(64, seed=1)
    >>> toy.accuracy(model(tokens), targets) > 0.95
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from safetensors.torch import save_file

from recurrent_lens.models.base import HookedRecurrentModel
from recurrent_lens.states.files import atomic_write, read_safetensors, read_safetensors_metadata
from recurrent_lens.sae.io import load as load_sae_dir
from recurrent_lens.toy.task import BOS, SEP, ToyTask, accuracy
from recurrent_lens.toy.train import (
    PROBE_SAE, TOY_SPECS, ToySpec, TrainInfo, probe_sae_fingerprint, train_probe_sae, train_toy,
)

__all__ = ["load", "load_sae", "names", "spec", "Toy", "ToyTask", "accuracy", "cache_dir", "TOY_SPECS", "PROBE_SAE",
           "train_toy", "train_probe_sae", "build_embedded", "build_embedded_sae", "embedded_info", "BOS", "SEP"]

EMBEDDED_DIR = Path(__file__).parent / "weights"


class Toy(NamedTuple):
    """What :func:`load` returns: unpack as ``model, task = toy.load("gdn")``."""

    model: HookedRecurrentModel
    task: ToyTask


def names() -> list[str]:
    """The names :func:`load` accepts."""
    return list(TOY_SPECS)


def cache_dir() -> Path:
    """Where trained toys are cached: ``$RECURRENT_LENS_CACHE/toy`` if set, else
    ``$XDG_CACHE_HOME/recurrent_lens/toy`` (``~/.cache/recurrent_lens/toy``)."""
    root = os.environ.get("RECURRENT_LENS_CACHE")
    if root:
        return Path(root).expanduser() / "toy"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "recurrent_lens" / "toy"


def _spec(name: str) -> ToySpec:
    """The toy named ``name``: a toy name, or the registry name of its architecture (``gated_deltanet``)."""
    for spec in TOY_SPECS.values():
        if name in (spec.name, spec.model_config().architecture):
            return spec
    raise ValueError(f"name: expected one of {names()} (or their architectures' registry names "
                     f"{[s.model_config().architecture for s in TOY_SPECS.values()]}), got {name!r}")


def spec(name: str) -> ToySpec:
    """The :class:`ToySpec` of a toy, by toy name or by its architecture's registry name.

    Example:
        >>> spec("gated_deltanet").name, spec("deltanet").probe
        ('gdn', (1, 0))
    """
    return _spec(name)


def _save(model: HookedRecurrentModel, info: TrainInfo, path: Path) -> None:
    """Write weights plus the training record, atomically (a crash never leaves a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"fingerprint": info.fingerprint, "recall": f"{info.recall:.6f}", "seconds": f"{info.seconds:.2f}",
            "steps": str(info.steps), "name": info.name}
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read(path: Path, spec: ToySpec) -> HookedRecurrentModel | None:
    """The model stored at ``path`` if it exists and was trained with ``spec``'s exact recipe."""
    if not path.is_file():
        return None
    try:
        meta = read_safetensors_metadata(path)
        if meta.get("fingerprint") != spec.fingerprint():
            return None
        state = read_safetensors(path)
    except Exception:
        # A corrupt or foreign file is retrained over rather than trusted.
        return None
    model = HookedRecurrentModel(spec.model_config())
    model.load_state_dict(state)
    return model.eval()


def load(name: str, *, retrain: bool = False, progress: bool = True) -> Toy:
    """A trained toy model (eval mode) and its task.

    Args:
        name: ``"gdn"``, ``"mamba2"``, ``"rwkv7"``, ``"deltanet"`` or ``"gla"``.
        retrain: ignore embedded and cached weights, train afresh and overwrite the cache.
        progress: show a progress bar while training.
    """
    spec = _spec(name)
    name = spec.name
    if not retrain:
        for path in (EMBEDDED_DIR / f"{name}.safetensors", cache_dir() / f"{name}-{spec.fingerprint()}.safetensors"):
            model = _read(path, spec)
            if model is not None:
                return Toy(model, spec.task)
    model, info = train_toy(spec, progress=progress)
    _save(model, info, cache_dir() / f"{name}-{spec.fingerprint()}.safetensors")
    return Toy(model, spec.task)


def _read_sae(path: Path, key: str):
    """The SAE saved in directory ``path`` if it exists and was trained with the recipe ``key``."""
    try:
        sae = load_sae_dir(str(path))
    except (OSError, ValueError):
        # Missing, or corrupt/truncated: retrained over rather than trusted.
        return None
    return sae if sae.cfg.metadata.get("recipe") == key else None


def _train_sae(name: str, progress: bool):
    spec = _spec(name)
    name = spec.name
    model, task = load(name, progress=progress)
    sae, _ = train_probe_sae(model, task, spec.probe_hook, spec.probe[1], progress=progress, **PROBE_SAE)
    sae.cfg.metadata.update(toy=name, recipe=probe_sae_fingerprint(spec))
    return sae


def load_sae(name: str, *, retrain: bool = False, progress: bool = True):
    """The WriteSAE of a toy's probe site (``TOY_SPECS[name].probe``), trained with :data:`PROBE_SAE`.

    The demo's SAE, ready to use: the toy GDN's ships with the package; the others are trained on first
    use (a few minutes on 2 CPU cores, with a progress bar) and cached next to the toy weights. An
    SAE is reused only if its recorded recipe matches the current toy weights and :data:`PROBE_SAE`.

    Args:
        name: a toy name (see :func:`names`).
        retrain: ignore embedded and cached SAEs, train afresh and overwrite the cache.
        progress: show progress bars while training.

    Example:
        >>> from recurrent_lens import toy
        >>> sae = toy.load_sae("gdn", progress=False)
        >>> sae.cfg.n_features, sae.cfg.metadata["hook_name"], sae.cfg.metadata["head"]
        (2048, 'blocks.1.mixer.hook_state', 0)
    """
    spec = _spec(name)
    name = spec.name
    key = probe_sae_fingerprint(spec)
    cached = cache_dir() / f"{name}-sae-{key}"
    if not retrain:
        for path in (EMBEDDED_DIR / f"{name}_sae", cached):
            sae = _read_sae(path, key)
            if sae is not None:
                return sae
    sae = _train_sae(name, progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    sae.save_pretrained(str(cached))
    return sae


def build_embedded_sae(name: str = "gdn", *, progress: bool = True) -> Path:
    """Train a toy's probe-site SAE and write it into the package (``weights/{name}_sae``); returns the path."""
    path = EMBEDDED_DIR / f"{name}_sae"
    _train_sae(name, progress).save_pretrained(str(path))
    return path


def build_embedded(names_: list[str] | None = None, *, progress: bool = True) -> dict[str, TrainInfo]:
    """Train the toys and write them into the package (``recurrent_lens/toy/weights``).

    Run after a recipe or architecture change; prints nothing, returns each model's :class:`TrainInfo`.
    """
    infos = {}
    for name in names_ or names():
        model, info = train_toy(_spec(name), progress=progress)
        _save(model, info, EMBEDDED_DIR / f"{name}.safetensors")
        infos[name] = info
    return infos


def embedded_info(name: str) -> dict[str, str]:
    """The training record (recall, seconds, steps, fingerprint) stored with the embedded weights."""
    return read_safetensors_metadata(EMBEDDED_DIR / f"{_spec(name).name}.safetensors")


def _main() -> None:
    """``python -m recurrent_lens.toy``: retrain every toy and the GDN's probe SAE into the package; prints
    recall and time."""
    infos = build_embedded()
    build_embedded_sae("gdn")
    print(json.dumps({n: {"recall": i.recall, "seconds": round(i.seconds, 1)} for n, i in infos.items()}, indent=1))
