"""from_pretrained: a local directory or hub id → detect the format → build on ``meta`` → stream weights in.

Weights are copied shard by shard, tensor by tensor, straight into the model's preallocated
parameters, so peak memory stays near one copy of the weights whatever the checkpoint's size.
Supported files: ``model.safetensors``, sharded ``model.safetensors.index.json``, and the
``pytorch_model.bin`` (optionally sharded) of mamba_ssm checkpoints. Keys the model does not use
(vision towers, MTP heads) are skipped with a note; a parameter the checkpoint leaves unset is an error,
and any error leaves no model behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
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


def iter_tensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, tensor)`` one tensor at a time (safetensors is memory-mapped; .bin uses mmap)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"weights file {file} is corrupt or truncated ({type(e).__name__}: {e})") from e


def load_weights(model: torch.nn.Module, arch: Architecture, cfg: ModelConfig, files: list[Path],
                 progress: bool = True) -> list[str]:
    """Copy every checkpoint tensor into the parameter it maps to; return the skipped keys."""
    from tqdm.auto import tqdm

    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}
    skipped = []
    bar = tqdm(files, desc="loading shards", disable=not progress or len(files) < 2)
    with torch.no_grad():
        for file in bar:
            for key, tensor in iter_tensors(file):
                target = arch.map_weight(key, cfg)
                if target is None:
                    skipped.append(key)
                    continue
                if target.name not in params:
                    raise CheckpointError(f"checkpoint key {key!r} maps to {target.name!r}, which the model does not have")
                param = params[target.name]
                dst = param if target.rows is None else param[target.rows]
                src = tensor if target.transform is None else target.transform(tensor)
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(f"checkpoint key {key!r}: expected shape {tuple(dst.shape)} for "
                                          f"{target.name}, got {tuple(src.shape)}")
                dst.copy_(src)
                filled[target.name] += dst.shape[0] if dst.dim() else 1
    missing = [n for n, p in params.items() if filled[n] < (p.shape[0] if p.dim() else 1)]
    if missing:
        raise CheckpointError(f"checkpoint leaves {len(missing)} parameters unset: {missing[:20]}"
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
