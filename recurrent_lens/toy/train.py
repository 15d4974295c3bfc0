"""Training the toy models: a fixed recipe per architecture, deterministic for a given seed.

Every toy is a 2-layer model (``d_model`` 64, 2 heads with 16×16 states) trained on
:class:`~recurrent_lens.toy.task.ToyTask` with AdamW (lr 1e-2; RWKV-7 3e-3), 300 steps (Gated DeltaNet
500, Mamba-2 1000, RWKV-7 500), linear warm-up over 50 steps, cosine decay, batch 64, gradient clipping
at 1, and the loss ``next-token CE over every position + CE on the recall targets``. The next-token term keeps the predictions at non-recall positions meaningful (the
substitution test reads them); the recall term makes recall learn fast.

The task queries the pairs in the order they were written (``ToyTask(query_order="pairs")``, the
default): the write of pair ``i`` at ``v_i`` is read back exactly ``task.recall_offset = 2·n_pairs`` tokens
later at ``q_i``, so the substitution test has a known readout that depends on each tested write.

Decays are initialised slow (half-lives of tens of tokens) so that a pair written at the start is still
in the state when it is queried; everything else keeps the architecture's own initialisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.base import HookedRecurrentModel
from recurrent_lens.sae import TrainConfig
from recurrent_lens.sae import train as train_sae
from recurrent_lens.toy.task import ToyTask, accuracy

RECIPE_VERSION = 1
"""Bump when the recipe changes so that cached weights are retrained."""


def _slow_a_log(model: HookedRecurrentModel) -> None:
    """Gated DeltaNet / Mamba-2: small ``A`` so the per-token decay stays close to 1."""
    for layer in model.cfg.recurrent_layers:
        mixer = model.blocks[layer].mixer
        mixer.A_log.uniform_(-4.0, -2.0)


def _slow_gdn(model: HookedRecurrentModel) -> None:
    _slow_a_log(model)
    for layer in model.cfg.recurrent_layers:
        model.blocks[layer].mixer.dt_bias.zero_()


def _slow_gla(model: HookedRecurrentModel) -> None:
    """GLA: a positive bias on the gate's last layer puts ``logsigmoid(·)/16`` near 0."""
    for layer in model.cfg.recurrent_layers:
        model.blocks[layer].mixer.gk_proj[-1].bias.fill_(3.0)


def _slow_rwkv7(model: HookedRecurrentModel) -> None:
    """RWKV-7: a negative bias on the decay LoRA puts ``w = -e^{-1/2} σ(·)`` near 0."""
    for layer in model.cfg.recurrent_layers:
        model.blocks[layer].mixer.w_lora.up.bias.fill_(-4.0)


@dataclass(frozen=True)
class ToySpec:
    """One toy model: its architecture, config, initialisation tweak and training recipe."""

    name: str
    config: dict[str, Any]
    init: Callable[[HookedRecurrentModel], None] | None = None
    task: ToyTask = field(default_factory=lambda: ToyTask(n_keys=16, n_values=16, n_pairs=8, n_queries=8))
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-2
    warmup: int = 50
    seed: int = 0
    probe: tuple[int, int] = (1, 0)
    """``(layer, head)`` whose write at a value position the recall needs most (the median KL of deleting
    it, read where the value is recalled): the default site of the demo, the CLI and the tutorials. Not
    part of the recipe (it does not change the weights)."""

    @property
    def probe_hook(self) -> str:
        return f"blocks.{self.probe[0]}.mixer.hook_state"

    def model_config(self) -> ModelConfig:
        return ModelConfig(d_vocab=self.task.d_vocab, **self.config)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained weights (config, task, recipe)."""
        payload = {"recipe": RECIPE_VERSION, "config": self.config, "task": asdict(self.task),
                   "init": getattr(self.init, "__name__", None), "steps": self.steps,
                   "batch_size": self.batch_size, "lr": self.lr, "warmup": self.warmup, "seed": self.seed}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_BASE = dict(d_model=64, n_layers=2, n_heads=2, d_k=16, d_v=16, d_mlp=128, chunk_size=16)

TOY_SPECS: dict[str, ToySpec] = {
    "gdn": ToySpec("gdn", {**_BASE, "architecture": "gated_deltanet", "options": {"layout": "fla"}}, _slow_gdn,
                   steps=500),
    "mamba2": ToySpec("mamba2", {**_BASE, "architecture": "mamba2", "d_mlp": 0, "n_key_heads": 1,
                                 "residual_in_fp32": True}, _slow_a_log, steps=1000, probe=(0, 0)),
    "rwkv7": ToySpec("rwkv7", {**_BASE, "architecture": "rwkv7", "mlp": "relu2", "norm": "layer",
                               "norm_eps": 1e-5}, _slow_rwkv7, steps=500, lr=3e-3),
    "deltanet": ToySpec("deltanet", {**_BASE, "architecture": "delta_net"}),
    "gla": ToySpec("gla", {**_BASE, "architecture": "gla", "options": {"use_short_conv": True}}, _slow_gla,
                   probe=(0, 0)),
}
"""The toy zoo, by the name :func:`recurrent_lens.toy.load` takes."""


@dataclass
class TrainInfo:
    """What a training run reports: recall accuracy on a fixed held-out batch and wall time."""

    name: str
    recall: float
    seconds: float
    steps: int
    fingerprint: str


PROBE_SAE: dict[str, Any] = dict(architecture="write_sae", n_features=2048, k=16, n_steps=3000, lr=3e-3,
                                 train_sequences=4096, seed=0)
"""The recipe of the probe-site SAEs: the defaults of ``recurrent-lens demo --arch`` / ``train-sae`` and what
:func:`recurrent_lens.toy.load_sae` returns. 2048 features leave room for one atom per association
(16 keys × 16 values) and the other writes; with 128 features the substitution test fails."""


def probe_sae_fingerprint(spec: ToySpec) -> str:
    """Hash of what determines a probe-site SAE: the toy's weights, the probe site and :data:`PROBE_SAE`."""
    payload = {"toy": spec.fingerprint(), "probe": list(spec.probe), "sae": PROBE_SAE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_probe_sae(model: HookedRecurrentModel, task: ToyTask, hook_name: str, head: int, *,
                    architecture: str, n_features: int, k: int, n_steps: int, lr: float, train_sequences: int,
                    seed: int, progress: bool = True, **train_config: Any):
    """Train an SAE on one head of a toy's state hook with the demo's schedule (see :data:`PROBE_SAE`).

    ``train_config`` sets further :class:`~recurrent_lens.sae.TrainConfig` fields or replaces the recipe's
    (``wandb=True``, ``batch_size=64``, ``val_sequences=32``, ...).
    Returns ``(sae, log)`` as :func:`recurrent_lens.sae.train` does. States come from
    ``task.make_batch(train_sequences, seed=seed)``, 16 random positions per sequence after BOS.

    Example (a few steps of a tiny SAE; the demo uses ``**PROBE_SAE``):
        >>> from recurrent_lens import toy
        >>> model, task = toy.load("gdn", progress=False)
        >>> sae, log = toy.train_probe_sae(model, task, "blocks.1.mixer.hook_state", 0, architecture="write_sae",
        ...                                n_features=16, k=2, n_steps=2, lr=1e-3, train_sequences=8, seed=0,
        ...                                progress=False)
        >>> sae.cfg.n_features, sae.cfg.metadata["hook_name"]
        (16, 'blocks.1.mixer.hook_state')
    """
    tokens, _ = task.make_batch(train_sequences, seed=seed)
    recipe = dict(n_steps=n_steps, batch_size=min(256, train_sequences * 8), n_features=n_features, k=k, lr=lr,
                  lr_min=lr / 10, warmup_steps=20, architecture=architecture, buffer_size=4096, positions_per_seq=16,
                  model_batch_size=64, skip_positions=1, seed=seed, progress=progress, log_every=max(1, n_steps // 5))
    cfg = TrainConfig(**{**recipe, **train_config})
    return train_sae(model, hook_name, head, tokens, cfg)


def evaluate(model: HookedRecurrentModel, task: ToyTask, n: int = 512, seed: int = 12345) -> float:
    """Recall accuracy on ``n`` held-out sequences drawn with ``seed``."""
    tokens, targets = task.make_batch(n, seed=seed)
    with torch.no_grad():
        return accuracy(model(tokens), targets)


def train_toy(spec: ToySpec, *, progress: bool = True, steps: int | None = None) -> tuple[HookedRecurrentModel, TrainInfo]:
    """Train one toy model from scratch (deterministic given ``spec.seed``); returns it in eval mode.

    Args:
        spec: the model and recipe (see :data:`TOY_SPECS`).
        progress: show a tqdm bar.
        steps: override ``spec.steps`` (short runs for tests).
    """
    steps = spec.steps if steps is None else steps
    start = time.perf_counter()
    model = HookedRecurrentModel.from_config(spec.model_config(), seed=spec.seed)
    with torch.no_grad():
        if spec.init is not None:
            spec.init(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(spec.seed)
    warm = min(spec.warmup, max(1, steps // 4))
    bar = tqdm(range(steps), disable=not progress, desc=f"toy {spec.name}")
    for step in bar:
        tokens, targets = spec.task.make_batch(spec.batch_size, generator=data)
        logits = model(tokens)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        mask = targets >= 0
        recall = F.cross_entropy(logits[mask], targets[mask])
        lr = spec.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        (lm + recall).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(lm=f"{lm.item():.3f}", recall_loss=f"{recall.item():.3f}")
    bar.close()
    model.eval()
    info = TrainInfo(spec.name, evaluate(model, spec.task), time.perf_counter() - start, steps, spec.fingerprint())
    return model, info
