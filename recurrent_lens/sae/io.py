"""Saving and loading SAEs.

Native format: a directory with ``cfg.json`` (``SAEConfig.to_dict()`` plus ``"architecture"``) and
``sae_weights.safetensors`` (our state dict with our own keys, including the ``mean`` and
``steps_since_active`` buffers). SAELens uses the same two file names with different contents;
``save_sae(..., format="saelens")`` writes SAELens's format and :func:`load` reads it back (see
:mod:`recurrent_lens.sae.saelens`). Files are written to a temporary name and renamed, so a crash
never leaves a half-written file under the final name.

Reference format: :func:`from_reference_checkpoint` imports the reference WriteSAE ``best.pt`` /
``final.pt`` (a plain dict with ``model_state_dict`` and ``config``, the SAE's state dict and its
constructor settings) into the matching preset, with ``mean = 0``.
"""

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

import torch
from safetensors.torch import save_file

from recurrent_lens.pretrained import list_pretrained_saes, pretrained_sae_path
from recurrent_lens.sae.base import SAE, SAE_REGISTRY, SAEConfig
from recurrent_lens.sae.presets import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE
from recurrent_lens.sae.saelens import is_saelens_config, load_saelens, save_saelens
from recurrent_lens.states.files import SafetensorsFormatError, atomic_write, read_safetensors, require_finite

__all__ = ["save_sae", "load", "check_cfg_dict", "from_reference_checkpoint", "CFG_NAME", "WEIGHTS_NAME"]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"


def save_sae(sae: SAE, path: str, format: str = "native") -> None:
    """Write ``sae`` to directory ``path`` (created if needed), ``format="native"`` or ``"saelens"``.

    Example:
        >>> import tempfile, os
        >>> from recurrent_lens.sae import WriteSAE
        >>> from recurrent_lens.sae.io import save_sae
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_sae(WriteSAE(4, 3, 8), d)
        ...     sorted(os.listdir(d))
        ['cfg.json', 'sae_weights.safetensors']
    """
    if format == "saelens":
        return save_saelens(sae, path)
    if format != "native":
        raise ValueError(f"format: expected 'native' or 'saelens', got {format!r}")
    os.makedirs(path, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))

    def write_cfg(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(sae.config_dict(), f, indent=2, sort_keys=True)

    atomic_write(os.path.join(path, CFG_NAME), write_cfg)


def _load_into(sae: SAE, tensors: dict[str, torch.Tensor], source: str) -> SAE:
    """Copy ``tensors`` into ``sae`` after checking names, shapes and values (finite; a JumpReLU
    ``log_threshold`` may be ``-inf``, a threshold of 0); nothing is copied on error."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name}: expected {tuple(expected[name].shape)}, got {tuple(t.shape)}"
        for name, t in tensors.items()
        if name in expected and t.shape != expected[name].shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if wrong:
            problems.append("shape mismatch " + "; ".join(wrong))
        raise ValueError(f"{source} does not match {sae!r}: " + ", ".join(problems))
    require_finite(tensors, source, minus_inf_ok=("log_threshold",))
    sae.load_state_dict({name: t.to(expected[name].dtype) for name, t in tensors.items()})
    return sae


def load(path: str, device: str | torch.device = "cpu", *, d_k: int | None = None, d_v: int | None = None) -> SAE:
    """Load an SAE directory written by ``save_pretrained``; the class comes from ``architecture``.

    ``path`` may also name an SAE that ships with the package (see
    :func:`~recurrent_lens.pretrained.list_pretrained_saes`), loaded offline when no such directory exists.

    A SAELens directory (its ``cfg.json`` has ``d_sae``) loads as a :class:`FlatSAE` on
    ``[d_k, d_v]`` states; ``d_k``/``d_v`` are needed when the directory does not record them
    (see :func:`recurrent_lens.sae.saelens.load_saelens`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a truncated or
    mismatched one, before any weight is copied; ``cfg.json`` is validated (:func:`check_cfg_dict`)
    before the SAE is built.

    Example:
        >>> import tempfile
        >>> from recurrent_lens.sae import MatrixSAE, load
        >>> with tempfile.TemporaryDirectory() as d:
        ...     MatrixSAE(4, 3, 8, rank=2).save_pretrained(d)
        ...     load(d)
        MatrixSAE(d_k=4, d_v=3, n_features=8, encoder=linear, decoder=rank-2, sparsity=topk(k=8))
    """
    shipped = None if os.path.isdir(path) else pretrained_sae_path(str(path))
    if shipped is not None:
        path = str(shipped)
    cfg_path, weights_path = os.path.join(path, CFG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            names = "" if os.path.isdir(path) else f" (SAEs that ship with recurrent_lens: {list_pretrained_saes()})"
            raise FileNotFoundError(f"no {os.path.basename(p)} in SAE directory {path!r}{names}")
    try:
        with open(cfg_path) as f:
            cfg_dict = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON (truncated?): {e}") from e
    if isinstance(cfg_dict, dict) and is_saelens_config(cfg_dict):
        return load_saelens(path, d_k=d_k, d_v=d_v, device=device, cfg_dict=cfg_dict)
    for name, given in (("d_k", d_k), ("d_v", d_v)):
        if given is not None and given != cfg_dict.get(name):
            raise ValueError(f"{name}: {cfg_path} has {name}={cfg_dict.get(name)!r}, got {name}={given!r}")
    check_cfg_dict(cfg_dict, cfg_path)
    architecture = cfg_dict.get("architecture", SAE.architecture)
    try:
        sae = SAE_REGISTRY[architecture](cfg=SAEConfig.from_dict(cfg_dict))
    except (ValueError, TypeError) as e:  # values SAEConfig or the preset refuses (encoder name, preset rank...)
        raise ValueError(f"{cfg_path}: {e}") from e
    try:
        tensors = read_safetensors(weights_path)
    except (SafetensorsFormatError, OSError) as e:
        raise ValueError(f"cannot read {weights_path} (truncated or corrupt?): {e}") from e
    return _load_into(sae, tensors, weights_path).to(device)


SAE_DTYPES = ("float32", "float64", "float16", "bfloat16")
"""The ``dtype`` values an SAE config may name."""


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a JSON value has the type a :class:`SAEConfig` field is annotated with."""
    if annotation is Any:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    if origin is bool or origin is int:  # JSON true is not a count, nor 1 a flag
        return type(value) is origin
    if origin is float:
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, origin)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string",
            dict: "an object", types.NoneType: "null"}.get(origin, str(annotation))


def check_cfg_dict(cfg_dict: Any, source: str) -> None:
    """Validate the content of an SAE's ``cfg.json`` (read from ``source``) before anything is built.

    It must be a JSON object holding ``d_k``, ``d_v`` and ``n_features``, only :class:`SAEConfig` fields
    plus ``architecture`` (a registered one), each of its field's type (``k`` an int, not ``"32"``),
    with positive sizes and a known ``dtype``. Raises ``ValueError`` naming ``source`` and the field.

    Example:
        >>> check_cfg_dict({"d_k": 4, "d_v": 3, "n_features": "8"}, "cfg.json")
        Traceback (most recent call last):
        ...
        ValueError: cfg.json: field 'n_features': expected an int, got '8' (str)
    """
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(cfg_dict).__name__}")
    fields = SAEConfig.flat_fields()
    unknown = sorted(set(cfg_dict) - set(fields) - {"architecture"})
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}; known: {sorted(fields) + ['architecture']}")
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in cfg_dict]
    if missing:
        raise ValueError(f"{source}: missing required fields {missing}")
    architecture = cfg_dict.get("architecture", SAE.architecture)
    if not isinstance(architecture, str) or architecture not in SAE_REGISTRY:
        raise ValueError(f"{source}: unknown architecture {architecture!r}; known: {sorted(SAE_REGISTRY)}")
    for name, value in cfg_dict.items():
        if name != "architecture" and not _accepts(fields[name].type, value):
            raise ValueError(f"{source}: field {name!r}: expected {_type_name(fields[name].type)}, "
                             f"got {value!r} ({type(value).__name__})")
    for name, value in cfg_dict.items():
        low = fields[name].metadata.get("minimum") if name != "architecture" else None
        if low is not None and value is not None and value < low:
            raise ValueError(f"{source}: field {name!r}: expected {'a positive' if low else 'a non-negative'} int, "
                             f"got {value}")
    for name in ("rank", "decoder"):  # an int here is a rank
        if type(cfg_dict.get(name)) is int and cfg_dict[name] < 1:
            raise ValueError(f"{source}: field {name!r}: expected a rank >= 1, got {cfg_dict[name]}")
    if cfg_dict.get("dtype", "float32") not in SAE_DTYPES:
        raise ValueError(f"{source}: field 'dtype': expected one of {list(SAE_DTYPES)}, got {cfg_dict['dtype']!r}")


_REFERENCE_TYPES = ("flat", "rank1", "bilinear", "bilinear_tied", "bilinear_flat", "gated", "jumprelu")


def _infer_sae_type(sd: dict[str, torch.Tensor]) -> str:
    # The reference builder's rules for telling the SAE type from the state dict's keys, in its order.
    if "log_threshold" in sd:
        return "jumprelu"
    if "b_gate" in sd and "r_mag" in sd:
        return "gated"
    if "V_enc" in sd and "decoder.weight" in sd and "V_dec" not in sd:
        return "bilinear_flat"
    if "V_dec" in sd and "V_enc" not in sd:
        return "bilinear_tied"
    if "V_dec" in sd:
        return "bilinear"
    if "V" in sd and "W" in sd:
        return "rank1"
    return "flat"


def from_reference_checkpoint(path: str, *, allow_pickle: bool = False, device: str | torch.device = "cpu") -> SAE:
    """Import a reference WriteSAE checkpoint (``best.pt``/``final.pt``) as the matching preset.

    ``sae_type`` (config, else inferred from the keys) maps to: ``bilinear`` -> :class:`WriteSAE`
    (rank 1) or :class:`BilinearSAE`; ``bilinear_tied`` -> ``BilinearSAE(tied=True)``;
    ``bilinear_flat`` -> ``BilinearSAE(decoder="flat")``; ``rank1`` -> :class:`MatrixSAE`;
    ``flat`` -> :class:`FlatSAE`; ``gated`` / ``jumprelu`` -> the bilinear preset with that
    sparsity; ``use_batchtopk`` selects BatchTopK. Legacy 2-D factors ``(n_f, d)`` become
    ``(n_f, 1, d)``. ``k_aux`` and ``dead_threshold`` take their defaults (the reference never
    saves them) and the mean is zero (the reference does not centre).

    The file is read with ``weights_only=True``. ``allow_pickle=True`` also accepts the HF packs
    that pickle a whole module under ``"sae"`` (unsafe: it runs code from the file); their
    ``decoder.v`` / ``decoder.w`` are read as the rank-1 key/value factors (an unverified mapping).
    The error suggests it only for a zip checkpoint whose pickle names classes that safe loading
    refuses (listed without running it); a truncated or corrupt file is reported as such. Every
    tensor the import reshapes must have the reference's exact shape first.

    Example:
        >>> import tempfile, os, torch
        >>> from recurrent_lens.sae import from_reference_checkpoint
        >>> sd = {"V_enc": torch.randn(8, 1, 4), "W_enc": torch.randn(8, 1, 3), "V_dec": torch.randn(8, 1, 4),
        ...       "W_dec": torch.randn(8, 1, 3), "b_enc": torch.zeros(8), "bias": torch.zeros(4, 3),
        ...       "steps_since_active": torch.zeros(8, dtype=torch.long)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"model_state_dict": sd, "config": {"sae_type": "bilinear", "d_k": 4, "d_v": 3,
        ...                 "n_features": 8, "k": 2, "rank": 1}}, os.path.join(d, "best.pt"))
        ...     from_reference_checkpoint(os.path.join(d, "best.pt"))
        WriteSAE(d_k=4, d_v=3, n_features=8, encoder=bilinear, decoder=rank-1, sparsity=topk(k=2))
    """
    ckpt = _read_reference_file(path, allow_pickle)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "model_state_dict" in ckpt:
        sd = ckpt["model_state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: model_state_dict: expected a dict of tensors, got {type(sd).__name__}")
        sd = dict(sd)
    elif "sae" in ckpt and allow_pickle:
        sd = _adapt_pickled_module(ckpt["sae"])
    else:
        raise ValueError(f"{path}: no 'model_state_dict' (keys: {sorted(map(str, ckpt))})")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{path}: model_state_dict: expected tensors under string keys, got other values for {bad}")
    config = ckpt.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config: expected a dict, got {type(config).__name__}")
    return _build_from_reference(sd, dict(config), ckpt, path).to(device)


def _refused_globals(path: str) -> list[str]:
    """The classes and functions a zip checkpoint's pickle needs beyond what ``weights_only`` loading allows
    (read without running the pickle); empty when the file cannot be read as a zip checkpoint at all."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a truncated or non-zip file: the caller reports the original error
        return []


def _read_reference_file(path: str, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several types for truncated zips and refused pickles
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        if not allow_pickle:
            refused = _refused_globals(path)
            if refused:
                raise ValueError(
                    f"cannot read {path} as a reference state-dict checkpoint: it pickles objects that safe "
                    f"(weights_only) loading refuses, e.g. {refused[:3]}; if it is a pickled HF pack and you "
                    "trust it, pass allow_pickle=True"
                ) from e
            raise ValueError(f"cannot read {path}: not a readable torch checkpoint (truncated or corrupt?) "
                             f"({reason})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e2:
        raise ValueError(f"cannot read {path} ({type(e2).__name__}: {e2})") from e2


def _adapt_pickled_module(module: Any) -> dict[str, torch.Tensor]:
    sd = dict(module.state_dict())
    decoder = getattr(module, "decoder", None)
    if decoder is not None and hasattr(decoder, "v") and hasattr(decoder, "w"):
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
        sd["V_dec"], sd["W_dec"] = decoder.v.detach(), decoder.w.detach()
    return sd


def _config_int(config: dict[str, Any], key: str, path: str, default: int | None = None) -> int | None:
    value = config.get(key, default)
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{path}: config[{key!r}]: expected a positive int, got {value!r}")
    return value


def _take(sd: dict[str, torch.Tensor], name: str, shapes: list[tuple[int, ...]], path: str) -> torch.Tensor:
    """Pop ``sd[name]``, which must have one of ``shapes`` (reshaping a tensor of another layout with the same
    number of elements would scramble it)."""
    t = sd.pop(name)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{path}: {name}: expected shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    return t


def _build_from_reference(sd: dict[str, torch.Tensor], config: dict[str, Any], ckpt: dict[str, Any], path: str) -> SAE:
    sae_type = config.get("sae_type") or _infer_sae_type(sd)
    if sae_type not in _REFERENCE_TYPES:
        raise ValueError(f"{path}: unknown sae_type {sae_type!r}; expected one of {_REFERENCE_TYPES}")
    if "use_batchtopk" in config and type(config["use_batchtopk"]) is not bool:
        raise ValueError(f"{path}: config['use_batchtopk']: expected True or False, got {config['use_batchtopk']!r}")
    if "bandwidth" in config and (type(config["bandwidth"]) not in (int, float) or not config["bandwidth"] > 0):
        raise ValueError(f"{path}: config['bandwidth']: expected a positive number, got {config['bandwidth']!r}")
    for name in ("V_enc", "W_enc", "V_dec", "W_dec", "V", "W"):
        if name in sd and sd[name].dim() == 2:
            sd[name] = sd[name].unsqueeze(1)
        if name in sd and sd[name].dim() != 3:
            raise ValueError(f"{path}: {name}: expected a factor of shape (n_features, rank, d) or (n_features, d), "
                             f"got {tuple(sd[name].shape)}")
    factor = next((sd[n] for n in ("V_dec", "V", "V_enc") if n in sd), None)
    value_factor = next((sd[n] for n in ("W_dec", "W", "W_enc") if n in sd), None)
    d_k = _config_int(config, "d_k", path) or (factor.shape[-1] if factor is not None else None)
    d_v = _config_int(config, "d_v", path) or (value_factor.shape[-1] if value_factor is not None else None)
    if d_k is None or d_v is None:
        raise ValueError(f"{path}: config lacks d_k/d_v and the weights do not determine them")
    rank = _config_int(config, "rank", path, 1)
    if factor is not None:
        if "rank" in config and rank != factor.shape[1]:
            raise ValueError(f"{path}: config['rank'] is {rank}, the factors have rank {factor.shape[1]}")
        rank = factor.shape[1]
    n_features = _config_int(config, "n_features", path)
    if n_features is None:
        sizes = [sd[n].shape[0] for n in ("b_enc", "b_gate", "encoder.bias") if n in sd and sd[n].dim() == 1]
        if not sizes:
            raise ValueError(f"{path}: config lacks n_features and the state dict has no 1-D b_enc, b_gate or "
                             "encoder.bias to read it from")
        n_features = sizes[0]
    kwargs: dict[str, Any] = {"k": _config_int(config, "k", path)}
    if config.get("use_batchtopk"):
        kwargs["sparsity"] = "batchtopk"
    if sae_type in ("gated", "jumprelu"):
        kwargs["sparsity"] = sae_type
    if sae_type == "jumprelu" and "bandwidth" in config:
        kwargs["jumprelu_bandwidth"] = float(config["bandwidth"])
    metadata = {key: config[key] for key in ("layer", "head", "seed", "code_sha") if key in config}
    metadata.update({"source": "reference", "sae_type": sae_type})
    metadata.update({key: ckpt[key] for key in ("epoch", "step", "val_mse") if key in ckpt and _jsonable(ckpt[key])})
    kwargs["metadata"] = metadata
    dims = (int(d_k), int(d_v), n_features)
    d_in = dims[0] * dims[1]

    ours: dict[str, torch.Tensor] = {}
    if sae_type == "flat":
        sae: SAE = FlatSAE(*dims, **kwargs)
    elif sae_type == "rank1":
        sae = MatrixSAE(*dims, rank=rank, **kwargs)
        for ref_name, name in (("V", "V_dec"), ("W", "W_dec")):
            if ref_name not in sd:
                raise ValueError(f"{path}: sae_type 'rank1' needs {ref_name!r}; the state dict has {sorted(sd)}")
            ours[name] = sd.pop(ref_name)
    elif sae_type == "bilinear_flat":
        sae = BilinearSAE(*dims, decoder="flat", rank=rank, **kwargs)
    elif sae_type == "bilinear_tied":
        sae = BilinearSAE(*dims, rank=rank, tied=True, **kwargs)
    elif rank == 1:
        sae = WriteSAE(*dims, **kwargs)
    else:
        sae = BilinearSAE(*dims, rank=rank, **kwargs)

    if "encoder.weight" in sd:
        ours["E_enc"] = _take(sd, "encoder.weight", [(n_features, d_in)], path).reshape(n_features, *dims[:2])
        if "encoder.bias" in sd:
            ours["b_enc"] = sd.pop("encoder.bias")
    if "decoder.weight" in sd:
        # The reference's nn.Linear decoder stores atoms as columns of a [d_in, n_f] matrix.
        ours["D_dec"] = _take(sd, "decoder.weight", [(d_in, n_features)], path).T.reshape(n_features, *dims[:2])
        if "decoder.bias" in sd:
            ours["b_dec"] = _take(sd, "decoder.bias", [(d_in,)], path).reshape(dims[:2])
    if "bias" in sd:
        if "b_dec" in ours:
            raise ValueError(f"{path}: both 'bias' and 'decoder.bias' give the decoder bias")
        ours["b_dec"] = _take(sd, "bias", [dims[:2], (d_in,)], path).reshape(dims[:2])
    ours.update(sd)
    ours.setdefault("mean", torch.zeros(dims[0], dims[1]))
    ours.setdefault("steps_since_active", torch.zeros(n_features, dtype=torch.int64))
    return _load_into(sae, ours, path)


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None
