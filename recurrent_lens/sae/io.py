"""Saving and loading SAEs.

Native format: a directory with ``cfg.json`` (``SAEConfig.to_dict()`` plus ``"architecture"``) and
``sae_weights.safetensors`` (our state dict with our own keys, including the ``mean`` and
``steps_since_active`` buffers). SAELens uses the same two file names with different contents;
``save_sae(..., format="saelens")`` writes SAELens's format and :func:`load` reads it back (see
:mod:`recurrent_lens.sae.saelens`). Files are written to a temporary name and renamed, so a crash
never leaves a half-written file under the final name.

Reference format: :func:`from_reference_checkpoint` imports the reference WriteSAE ``best.pt`` /
``final.pt`` (a plain dict with ``model_state_dict`` and ``config``; specs/WRITESAE.md §1.3,
§2.3) into the matching preset, with ``mean = 0``.
"""

import json
import os
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recurrent_lens.sae.base import SAE, SAE_REGISTRY, SAEConfig
from recurrent_lens.sae.presets import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE
from recurrent_lens.sae.saelens import is_saelens_config, load_saelens, save_saelens

__all__ = ["save_sae", "load", "from_reference_checkpoint", "CFG_NAME", "WEIGHTS_NAME"]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"


def atomic_write(path: str, write: Any) -> None:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file beside it and renaming it into place,
    so that a crash never leaves a partial file (the temporary file is removed on any error)."""
    directory = os.path.dirname(path) or "."
    # The temporary file keeps the target's extension: torch.save names its archive after the file's stem.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; saved weights are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    """Copy ``tensors`` into ``sae`` after checking names and shapes; nothing is copied on error."""
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
    sae.load_state_dict({name: t.to(expected[name].dtype) for name, t in tensors.items()})
    return sae


def load(path: str, device: str | torch.device = "cpu", *, d_k: int | None = None, d_v: int | None = None) -> SAE:
    """Load an SAE directory written by ``save_pretrained``; the class comes from ``architecture``.

    A SAELens directory (its ``cfg.json`` has ``d_sae``) loads as a :class:`FlatSAE` on
    ``[d_k, d_v]`` states; ``d_k``/``d_v`` are needed when the directory does not record them
    (see :func:`recurrent_lens.sae.saelens.load_saelens`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a truncated or
    mismatched one, before any weight is copied.

    Example:
        >>> import tempfile
        >>> from recurrent_lens.sae import MatrixSAE, load
        >>> with tempfile.TemporaryDirectory() as d:
        ...     MatrixSAE(4, 3, 8, rank=2).save_pretrained(d)
        ...     load(d)
        MatrixSAE(d_k=4, d_v=3, n_features=8, encoder=linear, decoder=rank-2, sparsity=topk(k=32))
    """
    cfg_path, weights_path = os.path.join(path, CFG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no {os.path.basename(p)} in SAE directory {path!r}")
    try:
        with open(cfg_path) as f:
            cfg_dict = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON (truncated?): {e}") from e
    if is_saelens_config(cfg_dict):
        return load_saelens(path, d_k=d_k, d_v=d_v, device=device, cfg_dict=cfg_dict)
    for name, given in (("d_k", d_k), ("d_v", d_v)):
        if given is not None and given != cfg_dict.get(name):
            raise ValueError(f"{name}: {cfg_path} has {name}={cfg_dict.get(name)!r}, got {name}={given!r}")
    architecture = cfg_dict.get("architecture", SAE.architecture)
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"{cfg_path}: unknown architecture {architecture!r}; known: {sorted(SAE_REGISTRY)}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {weights_path} (truncated or corrupt?): {e}") from e
    sae = SAE_REGISTRY[architecture](cfg=SAEConfig.from_dict(cfg_dict))
    return _load_into(sae, tensors, weights_path).to(device)


_REFERENCE_TYPES = ("flat", "rank1", "bilinear", "bilinear_tied", "bilinear_flat", "gated", "jumprelu")


def _infer_sae_type(sd: dict[str, torch.Tensor]) -> str:
    # The reference builder's key-based rules, in its order (specs/WRITESAE.md §1.3).
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several types for truncated zips and refused pickles
        if not allow_pickle:
            raise ValueError(
                f"cannot read {path} as a reference state-dict checkpoint ({type(e).__name__}: {e}); "
                "if it is a pickled HF pack and you trust it, pass allow_pickle=True"
            ) from e
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ValueError(f"cannot read {path} ({type(e2).__name__}: {e2})") from e2
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "model_state_dict" in ckpt:
        sd = dict(ckpt["model_state_dict"])
    elif "sae" in ckpt and allow_pickle:
        sd = _adapt_pickled_module(ckpt["sae"])
    else:
        raise ValueError(f"{path}: no 'model_state_dict' (keys: {sorted(ckpt)})")
    config = dict(ckpt.get("config") or {})
    return _build_from_reference(sd, config, ckpt, path).to(device)


def _adapt_pickled_module(module: Any) -> dict[str, torch.Tensor]:
    sd = dict(module.state_dict())
    decoder = getattr(module, "decoder", None)
    if decoder is not None and hasattr(decoder, "v") and hasattr(decoder, "w"):
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
        sd["V_dec"], sd["W_dec"] = decoder.v.detach(), decoder.w.detach()
    return sd


def _build_from_reference(sd: dict[str, torch.Tensor], config: dict[str, Any], ckpt: dict[str, Any], path: str) -> SAE:
    sae_type = config.get("sae_type") or _infer_sae_type(sd)
    if sae_type not in _REFERENCE_TYPES:
        raise ValueError(f"{path}: unknown sae_type {sae_type!r}; expected one of {_REFERENCE_TYPES}")
    for name in ("V_enc", "W_enc", "V_dec", "W_dec", "V", "W"):
        if name in sd and sd[name].dim() == 2:
            sd[name] = sd[name].unsqueeze(1)
    factor = next((sd[n] for n in ("V_dec", "V", "V_enc") if n in sd), None)
    value_factor = next((sd[n] for n in ("W_dec", "W", "W_enc") if n in sd), None)
    d_k = config.get("d_k") or (factor.shape[-1] if factor is not None else None)
    d_v = config.get("d_v") or (value_factor.shape[-1] if value_factor is not None else None)
    if d_k is None or d_v is None:
        raise ValueError(f"{path}: config lacks d_k/d_v and the weights do not determine them")
    rank = factor.shape[1] if factor is not None else int(config.get("rank") or 1)
    if "n_features" in config:
        n_features = int(config["n_features"])
    else:
        n_features = next(iter(t.shape[0] for n, t in sd.items() if n in ("b_enc", "b_gate", "encoder.bias")))
    kwargs: dict[str, Any] = {"k": int(config.get("k", 32))}
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

    ours: dict[str, torch.Tensor] = {}
    if sae_type == "flat":
        sae: SAE = FlatSAE(*dims, **kwargs)
    elif sae_type == "rank1":
        sae = MatrixSAE(*dims, rank=rank, **kwargs)
        ours.update(V_dec=sd.pop("V"), W_dec=sd.pop("W"))
    elif sae_type == "bilinear_flat":
        sae = BilinearSAE(*dims, decoder="flat", rank=rank, **kwargs)
    elif sae_type == "bilinear_tied":
        sae = BilinearSAE(*dims, rank=rank, tied=True, **kwargs)
    elif rank == 1:
        sae = WriteSAE(*dims, **kwargs)
    else:
        sae = BilinearSAE(*dims, rank=rank, **kwargs)

    if "encoder.weight" in sd:
        ours["E_enc"] = sd.pop("encoder.weight").reshape(n_features, dims[0], dims[1])
        ours["b_enc"] = sd.pop("encoder.bias")
    if "decoder.weight" in sd:
        # The reference's nn.Linear decoder stores atoms as columns of a [d_in, n_f] matrix.
        ours["D_dec"] = sd.pop("decoder.weight").T.reshape(n_features, dims[0], dims[1])
        ours["b_dec"] = sd.pop("decoder.bias").reshape(dims[0], dims[1])
    if "bias" in sd:
        ours["b_dec"] = sd.pop("bias").reshape(dims[0], dims[1])
    ours.update(sd)
    ours.setdefault("mean", torch.zeros(dims[0], dims[1]))
    ours.setdefault("steps_since_active", torch.zeros(n_features, dtype=torch.int64))
    return _load_into(sae, ours, path)


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None
