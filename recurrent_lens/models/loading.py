"""from_pretrained: a local directory or hub id → detect the format → build on ``meta`` → stream weights in.

Weights are copied shard by shard, tensor by tensor, straight into the model's preallocated
parameters (safetensors are read with ``readinto``, without a memory map), so peak memory stays near
one copy of the weights whatever the checkpoint's size. Every shard's header is validated as the
safetensors format requires (types, dtype x shape lengths, byte ranges that tile the file exactly)
before the first tensor is copied.
Supported files: ``model.safetensors``, sharded ``model.safetensors.index.json``, and the
``pytorch_model.bin`` (optionally sharded) of mamba_ssm checkpoints. Keys the model does not use
(vision towers, MTP heads) are skipped with a note. Which rows of every parameter were written is
tracked: a row written twice or never is an error, as are a malformed ``config.json`` or index; any
error is a :class:`CheckpointError` naming the file and the field or tensor, and leaves no model behind.
Without an explicit ``dtype`` the weights take the one ``config.json`` records, else fp32.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from recurrent_lens.config import ModelConfig, resolve_dtype
from recurrent_lens.models.registry import Architecture, architectures
from recurrent_lens.pretrained import PRETRAINED_DIR, list_pretrained, pretrained_path
from recurrent_lens.states.files import SafetensorsFormatError, read_safetensors_header

log = logging.getLogger(__name__)

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unknown format, missing, corrupt or mismatched weights."""


def resolve_path(name_or_path: str | Path) -> Path:
    """A local directory as is; else the model of that name shipped with the package (see
    :func:`~recurrent_lens.list_pretrained`), found without a network; else a hub id downloaded with
    huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"name_or_path: expected a directory or a hub id, got the file {path}")
    shipped = pretrained_path(str(name_or_path))
    if shipped is not None:
        return shipped
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin",
                                                                         "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:
        raise CheckpointError(f"name_or_path: {name_or_path!r} is neither a local directory, nor a model that "
                              f"ships with recurrent_lens ({', '.join(list_pretrained())}), nor a reachable "
                              f"hub id ({type(e).__name__}: {e})") from e


def detect_architecture(config: dict[str, Any]) -> Architecture:
    """The registered architecture that reads this ``config.json``."""
    model_type = config.get("model_type")
    known = architectures()
    for arch in known.values():
        if model_type is not None and model_type in arch.model_types:
            return arch
    for arch in known.values():
        if arch.detect is not None and arch.detect(config):
            return arch
    supported = sorted(t for a in known.values() for t in a.model_types)
    raise CheckpointError(f"config.json: unknown model_type {model_type!r}; supported: {supported} "
                          "(and mamba_ssm configs)")


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {file} is not valid JSON: {e}") from e


def read_config_json(path: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (anything else is a :class:`CheckpointError`)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    raw = _read_json(cfg_file, "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return raw


# Value types of the config.json fields the architectures' readers use (null stands for "absent"): the
# readers copy or convert values as they are, and bool("false") is True.
_JSON_INTS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "linear_num_value_heads", "linear_num_key_heads",
              "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_heads", "state_size",
              "n_groups", "expand", "conv_kernel", "conv_size", "d_model", "n_layer", "pad_vocab_size_multiple",
              "d_state", "d_conv", "headdim", "ngroups", "d_ssm", "d_intermediate", "decay_low_rank_dim",
              "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim", "num_kv_heads", "num_v_heads")
_JSON_NUMBERS = ("rms_norm_eps", "norm_eps", "layer_norm_epsilon", "rope_theta", "hidden_ratio",
                 "partial_rotary_factor", "expand_k", "expand_v", "clamp_min")
_JSON_BOOLS = ("tie_word_embeddings", "tie_embeddings", "fuse_norm", "norm_bias", "norm_first", "residual_in_fp32",
               "rms_norm", "use_bias", "use_conv_bias", "attn_output_gate", "D_has_hdim", "norm_before_gate",
               "rmsnorm", "bias", "conv_bias", "use_beta", "use_gate", "use_short_conv", "use_gk", "use_gv",
               "use_output_gate", "allow_neg_eigval", "elementwise_affine")


def _check_json_types(raw: dict[str, Any], cfg_file: Path) -> None:
    scopes = [("", raw)] + [(f"{k}.", raw[k]) for k in ("text_config", "ssm_cfg") if isinstance(raw.get(k), dict)]
    for scope, d in scopes:
        for names, expected, ok in (
                (_JSON_INTS, "an int", lambda v: type(v) is int),
                (_JSON_NUMBERS, "a number", lambda v: type(v) in (int, float)),
                (_JSON_BOOLS, "true or false", lambda v: type(v) is bool)):
            for name in names:
                value = d.get(name)
                if value is not None and not ok(value):
                    raise CheckpointError(f"{cfg_file}: field {scope}{name}: expected {expected}, got {value!r}")


# ModelConfig fields a config reader fills from config.json values, and what each must be.
_POSITIVE_INTS = ("d_model", "n_layers", "d_vocab", "n_heads", "n_key_heads", "d_k", "d_v", "chunk_size")
_NON_NEGATIVE_INTS = ("d_mlp", "conv_kernel", "n_attn_heads", "n_kv_heads", "d_head_attn", "rotary_dim")
_POSITIVE_FLOATS = ("norm_eps", "rope_theta")
_BOOLS = ("tie_embeddings", "residual_in_fp32", "attn_output_gate")


def _check_model_config(cfg: ModelConfig, cfg_file: Path) -> None:
    """Refuse values of the wrong type or sign: config readers copy config.json values through as they are."""
    def bad(name: str, expected: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{cfg_file}: the model's {name}: expected {expected}, "
                               f"got {value!r} ({type(value).__name__})")

    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value = getattr(cfg, name)
        low = 1 if name in _POSITIVE_INTS else 0
        if type(value) is not int or value < low:
            raise bad(name, "a positive int" if low else "a non-negative int", value)
    for name in _POSITIVE_FLOATS:
        value = getattr(cfg, name)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise bad(name, "a positive finite number", value)
    for name in _BOOLS:
        if type(getattr(cfg, name)) is not bool:
            raise bad(name, "true or false", getattr(cfg, name))


def config_from_json(raw: dict[str, Any], cfg_file: Path) -> tuple[Architecture, ModelConfig]:
    """The architecture and :class:`ModelConfig` a ``config.json`` dict describes; a missing or malformed
    field is a :class:`CheckpointError` naming ``cfg_file`` and the field."""
    _check_json_types(raw, cfg_file)
    arch = detect_architecture(raw)
    if arch.config_from_hf is None or arch.map_weight is None:
        raise CheckpointError(f"architecture {arch.name!r} cannot load checkpoints (no config/weight mapping)")
    try:
        cfg = arch.config_from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing required field {e.args[0]!r} "
                              f"(for model_type {raw.get('model_type')!r})") from e
    # config readers do arithmetic on the raw values: a string, a list or a zero fails inside them
    except (TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read it as a {arch.name} config ({type(e).__name__}: {e})") from e
    _check_model_config(cfg, cfg_file)
    return arch, cfg


def read_config(path: Path) -> tuple[Architecture, ModelConfig]:
    """The architecture and :class:`ModelConfig` of the checkpoint directory ``path``."""
    return config_from_json(read_config_json(path), path / "config.json")


_DTYPE_FIELDS = ("dtype", "torch_dtype")


def checkpoint_dtype(raw: dict[str, Any], cfg_file: Path) -> torch.dtype | None:
    """The weight dtype ``config.json`` records (``dtype`` in transformers 5, ``torch_dtype`` before, either
    at the top level or in a multimodal checkpoint's ``text_config``), or ``None`` when it records none.

    Example:
        >>> checkpoint_dtype({"model_type": "rwkv7", "torch_dtype": "bfloat16"}, Path("config.json"))
        torch.bfloat16
    """
    text = raw.get("text_config")
    for scope, d in (("", raw), ("text_config.", text if isinstance(text, dict) else {})):
        found = {f"{scope}{k}": d[k] for k in _DTYPE_FIELDS if d.get(k) is not None}
        if not found:
            continue
        dtypes = {}
        for field, value in found.items():
            try:
                if not isinstance(value, str):
                    raise ValueError(f"expected a dtype name, got {type(value).__name__}")
                dtypes[field] = resolve_dtype(value)
            except ValueError as e:
                raise CheckpointError(f"{cfg_file}: field {field!r} names an unknown weight dtype {value!r} "
                                      f"({e})") from e
        if len(set(dtypes.values())) > 1:
            raise CheckpointError(f"{cfg_file}: fields {' and '.join(found)} disagree: {found}")
        return next(iter(dtypes.values()))
    return None


def read_index(path: Path, index: str) -> dict[str, Path]:
    """The ``weight_map`` of the sharded index ``path / index``: checkpoint key -> shard file (which must exist)."""
    file = path / index
    raw = _read_json(file, "index")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if "weight_map" not in raw:
        raise CheckpointError(f"{file}: no 'weight_map' field (keys: {sorted(raw)})")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{file}: weight_map: expected a non-empty object of key -> shard file, "
                              f"got {weight_map!r}")
    bad = {k: v for k, v in weight_map.items() if not isinstance(v, str) or not v}
    if bad:
        raise CheckpointError(f"{file}: weight_map: expected shard file names, got {dict(list(bad.items())[:5])}")
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
        raise CheckpointError(f"{file}: weight_map lists shards that are missing from {path}: {missing}")
    return {key: path / f for key, f in weight_map.items()}


def weight_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files of checkpoint directory ``path`` (the shards of its index, or its single file) and
    the index's key -> shard map (``None`` without an index)."""
    for index in _WEIGHT_INDEXES:
        if (path / index).is_file():
            weight_map = read_index(path, index)
            return sorted(set(weight_map.values())), weight_map
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name], None
    raise CheckpointError(f"no weights in {path}: expected one of {list(_WEIGHT_INDEXES + _WEIGHT_FILES)}")


class SafetensorsFile:
    """A safetensors file read with plain ``readinto`` calls, tensor by tensor.

    Reading without a memory map keeps the file's pages out of the process (a mapped file counts
    towards resident memory while its pages are touched), and lets a tensor whose dtype and layout match
    its parameter be read straight into that parameter's storage. The whole header is validated on
    opening (see :func:`recurrent_lens.states.files.read_safetensors_header`), so a corrupt or truncated
    file is refused before anything is loaded.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data_start, self.entries = read_safetensors_header(path)
        except SafetensorsFormatError as e:
            raise CheckpointError(f"weights file {e}") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read_into(self, key: str, dst: Tensor) -> None:
        """Copy tensor ``key`` into ``dst`` (same shape), converting dtype and device as needed."""
        e = self.entries[key]
        if tuple(dst.shape) != e.shape:
            raise CheckpointError(f"weights file {self.path}: tensor {key!r} has shape {e.shape}, "
                                  f"the destination {tuple(dst.shape)}")
        direct = dst.dtype == e.dtype and dst.device.type == "cpu" and dst.is_contiguous()
        buf = dst if direct else torch.empty(e.shape, dtype=e.dtype)
        raw = buf.reshape(-1).view(torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + e.begin)
            if f.readinto(raw.numpy()) != raw.numel():
                raise CheckpointError(f"weights file {self.path} is truncated inside tensor {key!r}")
        if not direct:
            dst.copy_(buf)


class _TorchFile:
    """A ``pytorch_model.bin`` (mamba_ssm checkpoints), memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"weights file {path} is corrupt or truncated ({type(e).__name__}: {e})") from e
        if not isinstance(self.state, dict):
            raise CheckpointError(f"weights file {path}: expected a state dict, got {type(self.state).__name__}")
        bad = [k for k, v in self.state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"weights file {path}: expected tensors under string keys, got {bad[:5]}")
        self.entries = self.state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read_into(self, key: str, dst: Tensor) -> None:
        dst.copy_(self.state[key])


def open_weights(path: Path) -> SafetensorsFile | _TorchFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def _row_ranges(rows: Tensor) -> str:
    """``"0-2, 5"`` for the indices of the true entries of a boolean vector."""
    idx = rows.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _rows_mask(n: int, rows: slice) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    return mask


def _check_index(index: dict[str, Path], opened: list[SafetensorsFile | _TorchFile]) -> None:
    by_path = {w.path: w for w in opened}
    absent = [(key, f) for key, f in index.items() if key not in by_path[f].entries]
    if absent:
        key, f = absent[0]
        raise CheckpointError(f"the index places {len(absent)} keys in shards that do not hold them, "
                              f"e.g. {key!r} in {f}")


def load_weights(model: torch.nn.Module, arch: Architecture, cfg: ModelConfig, files: list[Path],
                 progress: bool = True, index: dict[str, Path] | None = None) -> list[str]:
    """Copy every checkpoint tensor into the parameter it maps to; return the skipped keys.

    Which rows of each parameter (or buffer) have been written is tracked exactly: a row written twice
    (the same key in two shards, or two keys mapping onto the same rows) and a row never written are both
    a :class:`CheckpointError`. With ``index`` (key -> shard, from a sharded checkpoint's index), every
    key it lists must be in its shard.
    """
    # buffers too: a model built on ``meta`` has no values for them, so the checkpoint must provide them
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    # a scalar counts as one row
    written = {name: torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.bool) for name, p in params.items()}
    writers: dict[str, list[tuple[slice, str, Path]]] = {name: [] for name in params}
    skipped = []
    opened = [open_weights(f) for f in files]  # validates every shard before anything is copied
    if index is not None:
        _check_index(index, opened)
    bar = tqdm(opened, desc="loading shards", disable=not progress or len(files) < 2)
    with torch.no_grad():
        for weights in bar:
            for key in weights.entries:
                target = arch.map_weight(key, cfg)
                if target is None:
                    skipped.append(key)
                    continue
                if target.name not in params:
                    raise CheckpointError(f"checkpoint key {key!r} maps to {target.name!r}, which the model "
                                          "does not have")
                param = params[target.name]
                rows = slice(None) if target.rows is None else target.rows
                mask = written[target.name][rows]
                if mask.any():
                    overlap = _rows_mask(len(written[target.name]), rows) & written[target.name]
                    first = next((k, f) for r, k, f in writers[target.name]
                                 if (_rows_mask(len(overlap), r) & overlap).any())
                    raise CheckpointError(f"rows {_row_ranges(overlap)} of {target.name} are written twice: by key "
                                          f"{first[0]!r} in {first[1]} and by key {key!r} in {weights.path}")
                dst = param if target.rows is None else param[target.rows]
                if target.transform is None:
                    if weights.shape(key) != tuple(dst.shape):
                        raise CheckpointError(f"checkpoint key {key!r}: expected shape {tuple(dst.shape)} for "
                                              f"{target.name}, got {weights.shape(key)}")
                    weights.read_into(key, dst)
                else:
                    src = torch.empty(weights.shape(key), dtype=dst.dtype)
                    weights.read_into(key, src)
                    try:
                        src = target.transform(src)
                    except RuntimeError as e:
                        raise CheckpointError(f"checkpoint key {key!r}: cannot convert its shape {weights.shape(key)} "
                                              f"to {tuple(dst.shape)} for {target.name} ({e})") from e
                    if tuple(src.shape) != tuple(dst.shape):
                        raise CheckpointError(f"checkpoint key {key!r}: expected shape {tuple(dst.shape)} for "
                                              f"{target.name} after conversion, got {tuple(src.shape)}")
                    dst.copy_(src)
                written[target.name][rows] = True
                writers[target.name].append((rows, key, weights.path))
    unset = []
    for name, mask in written.items():
        if not mask.all():
            unset.append(name if not mask.any() else f"{name} (rows {_row_ranges(~mask)} of {len(mask)})")
    if unset:
        raise CheckpointError(f"checkpoint leaves {len(unset)} parameters or buffers unset: {unset[:20]}"
                              f"{' ...' if len(unset) > 20 else ''}")
    if skipped:
        log.info("skipped %d checkpoint keys the model does not use (e.g. %s)", len(skipped), skipped[:3])
    return skipped


def load_tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def load_pretrained(cls: type, name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, progress: bool = True) -> Any:
    """Build ``cls`` for the checkpoint at ``name_or_path`` and stream its weights in.

    Without ``dtype`` the weights take the dtype ``config.json`` records (``dtype``, or ``torch_dtype``
    in older transformers configs), else fp32; the models shipped with the package are stored in fp16 to
    keep it small and load in fp32.
    """
    path = resolve_path(name_or_path)
    raw = read_config_json(path)
    arch, cfg = config_from_json(raw, path / "config.json")
    shipped = path.parent == PRETRAINED_DIR
    recorded = None if shipped else checkpoint_dtype(raw, path / "config.json")
    torch_dtype = resolve_dtype(dtype) or recorded or torch.float32
    cfg.dtype = str(torch_dtype).removeprefix("torch.")
    cfg.device = str(device or "cpu")
    cfg.source = str(name_or_path)
    files, index = weight_files(path)
    with torch.device("meta"):
        model = cls(cfg, tokenizer=None)
    model = model.to(dtype=torch_dtype).to_empty(device=cfg.device)
    load_weights(model, arch, cfg, files, progress=progress, index=index)
    model.tokenizer = load_tokenizer(path)
    # what a resumed harvest or training run compares to be sure it continues on the same weights
    model.checkpoint_files = [str(f.resolve()) for f in files]
    return model.eval()
