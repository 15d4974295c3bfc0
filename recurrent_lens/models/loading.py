"""from_pretrained: a local directory or hub id → detect the format → build on ``meta`` → stream weights in.

Weights are copied shard by shard, tensor by tensor, straight into the model's preallocated
parameters (safetensors are read with ``readinto``, without a memory map), so peak memory stays near
one copy of the weights whatever the checkpoint's size. Every shard's header is checked against its
file size before the first tensor is copied.
Supported files: ``model.safetensors``, sharded ``model.safetensors.index.json``, and the
``pytorch_model.bin`` (optionally sharded) of mamba_ssm checkpoints. Keys the model does not use
(vision towers, MTP heads) are skipped with a note; a parameter the checkpoint leaves unset is an error,
and any error leaves no model behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recurrent_lens.config import ModelConfig, resolve_dtype
from recurrent_lens.models.registry import Architecture, architectures

log = logging.getLogger(__name__)

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unknown format, missing, corrupt or mismatched weights."""


def resolve_path(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub id downloaded with huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"name_or_path: expected a directory or a hub id, got the file {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin",
                                                                         "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:
        raise CheckpointError(f"name_or_path: {name_or_path!r} is neither a local directory nor a reachable "
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


def read_config(path: Path) -> tuple[Architecture, ModelConfig]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    arch = detect_architecture(raw)
    if arch.config_from_hf is None or arch.map_weight is None:
        raise CheckpointError(f"architecture {arch.name!r} cannot load checkpoints (no config/weight mapping)")
    return arch, arch.config_from_hf(raw)


def weight_files(path: Path) -> list[Path]:
    for index in _WEIGHT_INDEXES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text()).get("weight_map", {})
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing from {path}: {missing}")
            return files
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(f"no weights in {path}: expected one of {list(_WEIGHT_INDEXES + _WEIGHT_FILES)}")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A safetensors file read with plain ``readinto`` calls, tensor by tensor.

    Reading without a memory map keeps the file's pages out of the process (a mapped file counts
    towards resident memory while its pages are touched), and lets a tensor whose dtype and layout match
    its parameter be read straight into that parameter's storage. The header is validated against the
    file size on opening, so a truncated file is refused before anything is loaded.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"weights file {path} is corrupt or truncated ({e})") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"weights file {path} is truncated: its header needs {self.data_start + end} "
                                  f"bytes, the file has {size}")
        for key, e in header.items():
            if e.get("dtype") not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"weights file {path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read_into(self, key: str, dst: Tensor) -> None:
        """Copy tensor ``key`` into ``dst`` (same shape), converting dtype and device as needed."""
        e = self.entries[key]
        dtype = _SAFETENSORS_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        direct = dst.dtype == dtype and dst.device.type == "cpu" and dst.is_contiguous()
        buf = dst if direct else torch.empty(self.shape(key), dtype=dtype)
        raw = buf.reshape(-1).view(torch.uint8)
        if raw.numel() != end - begin:
            raise CheckpointError(f"weights file {self.path}: tensor {key!r} holds {end - begin} bytes, "
                                  f"its shape and dtype need {raw.numel()}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
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
        self.entries = self.state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read_into(self, key: str, dst: Tensor) -> None:
        dst.copy_(self.state[key])


def open_weights(path: Path) -> SafetensorsFile | _TorchFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def load_weights(model: torch.nn.Module, arch: Architecture, cfg: ModelConfig, files: list[Path],
                 progress: bool = True) -> list[str]:
    """Copy every checkpoint tensor into the parameter it maps to; return the skipped keys."""
    from tqdm.auto import tqdm

    # buffers too: a model built on ``meta`` has no values for them, so the checkpoint must provide them
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled = {name: 0 for name in params}
    skipped = []
    opened = [open_weights(f) for f in files]  # validates every shard before anything is copied
    bar = tqdm(opened, desc="loading shards", disable=not progress or len(files) < 2)
    with torch.no_grad():
        for weights in bar:
            for key in weights.entries:
                target = arch.map_weight(key, cfg)
                if target is None:
                    skipped.append(key)
                    continue
                if target.name not in params:
                    raise CheckpointError(f"checkpoint key {key!r} maps to {target.name!r}, which the model does not have")
                param = params[target.name]
                dst = param if target.rows is None else param[target.rows]
                if target.transform is None:
                    if weights.shape(key) != tuple(dst.shape):
                        raise CheckpointError(f"checkpoint key {key!r}: expected shape {tuple(dst.shape)} for "
                                              f"{target.name}, got {weights.shape(key)}")
                    weights.read_into(key, dst)
                else:
                    src = torch.empty(weights.shape(key), dtype=dst.dtype)
                    weights.read_into(key, src)
                    src = target.transform(src)
                    if tuple(src.shape) != tuple(dst.shape):
                        raise CheckpointError(f"checkpoint key {key!r}: expected shape {tuple(dst.shape)} for "
                                              f"{target.name} after conversion, got {tuple(src.shape)}")
                    dst.copy_(src)
                filled[target.name] += dst.shape[0] if dst.dim() else 1
    missing = [n for n, p in params.items() if filled[n] < (p.shape[0] if p.dim() else 1)]
    if missing:
        raise CheckpointError(f"checkpoint leaves {len(missing)} parameters or buffers unset: {missing[:20]}"
                              f"{' ...' if len(missing) > 20 else ''}")
    if skipped:
        log.info("skipped %d checkpoint keys the model does not use (e.g. %s)", len(skipped), skipped[:3])
    return skipped


def load_tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_pretrained(cls: type, name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, progress: bool = True) -> Any:
    """Build ``cls`` for the checkpoint at ``name_or_path`` and stream its weights in."""
    path = resolve_path(name_or_path)
    arch, cfg = read_config(path)
    torch_dtype = resolve_dtype(dtype) or torch.float32
    cfg.dtype = str(torch_dtype).removeprefix("torch.")
    cfg.device = str(device or "cpu")
    cfg.source = str(name_or_path)
    files = weight_files(path)
    with torch.device("meta"):
        model = cls(cfg, tokenizer=None)
    model = model.to(dtype=torch_dtype).to_empty(device=cfg.device)
    load_weights(model, arch, cfg, files, progress=progress)
    model.tokenizer = load_tokenizer(path)
    return model.eval()
