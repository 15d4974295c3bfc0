"""Training SAEs on states streamed from a model's hooks.

For each sequence ``positions_per_seq`` positions are drawn at random (not only the last one), the chosen
head's ``d_k x d_v`` matrices at those positions are computed with ``model.harvest`` (boundary states of the
chunked scan plus one replayed chunk per position: the full ``[batch, pos, head, d_k, d_v]`` tensor is
never formed; any other ``HookedRootModule`` falls back to ``run_with_cache``), they go into a shuffling
buffer, and the SAE trains on batches drawn from it. Many cells from one model pass, streamed text and
torchrun: :mod:`recurrent_lens.sae.multicell`.

Recipe (the reference's): Adam (default betas); lr linear warm-up from 0 over
``min(warmup_steps, n_steps // 4)`` steps, then cosine to ``lr_min``; per step: encode and decode
(:meth:`~recurrent_lens.sae.SAE.autoencode`), update the dead-feature counters from the codes
(:func:`update_dead_counters`), the losses for the updated counters, backward, set lr, Adam step,
decoder normalisation when ``step % 100 == 0``,
dead-feature resampling with Adam-moment zeroing when ``step > 0`` and
``step % min(resample_every, n_steps // 4) == 0``. No value is copied to the host except at
logging, validation and checkpoint steps and once per buffer refill (the finiteness of the new states).

Divergence: every step records, on the device, whether the batch of states, the loss, the gradients and
the weights were finite. At every log step, before every checkpoint and at the end, the first non-finite
value seen raises :class:`~recurrent_lens.integrity.NonFiniteError` naming the step, the tensor and, for
states, the batch row and the sequence and position it was harvested from. Nothing computed from it is
written: the last checkpoint stays the one before it, and no SAE or ``train_log.json`` is saved. A finite
but huge state (``1e30``) overflows the loss, and is caught as a non-finite loss.

Checkpoints (``checkpoint_dir/checkpoint.pt``) hold the SAE, the optimizer, the step, every random
generator, the data order, the shuffling buffer and the running sums of the log row in progress, so a
resumed run continues bit for bit like an uninterrupted one, ``train_log.json`` included. They also record
the model's weights and the tokens (see :mod:`recurrent_lens.integrity`), which
:meth:`SAETrainer.from_checkpoint` checks; a checkpoint without them is refused.
"""

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import nn
from tqdm.auto import tqdm

from recurrent_lens.integrity import (
    NonFiniteError, check_same, first_nonfinite, refuse_unchecked, tensor_digest, weights_fingerprint,
)
from recurrent_lens.sae import wandb_log
from recurrent_lens.sae.base import SAE, SAEPass
from recurrent_lens.sae.config import SAEConfig
from recurrent_lens.sae.registry import SAE_REGISTRY
from recurrent_lens.states.cells import Cell, check_head, parse_cell
from recurrent_lens.states.files import DirectoryLock, atomic_write, check_writable, remove_stale_temporaries

__all__ = ["TrainConfig", "TrainLog", "SAETrainer", "Learner", "train", "evaluate", "update_dead_counters"]

CHECKPOINT_NAME = "checkpoint.pt"
_WATCHED = ("training states", "loss", "gradients", "weights")


@dataclass
class TrainConfig:
    """Settings of one SAE training run.

    Example:
        >>> cfg = TrainConfig(n_steps=200, batch_size=64, n_features=256, k=8)
        >>> cfg.effective_warmup, cfg.effective_resample_every
        (50, 50)
    """

    n_steps: int = 1000
    """Optimizer steps in the whole run (the schedule's ``total_steps``)."""
    batch_size: int = 256
    """States per SAE step."""
    lr: float = 3e-4
    lr_min: float = 3e-5
    warmup_steps: int = 50
    normalize_every: int = 100
    resample_every: int = 250
    """0 disables resampling."""
    architecture: str = "write_sae"
    """Preset used when ``train`` builds the SAE: ``write_sae``, ``flat_sae``, ``matrix_sae``, ``bilinear_sae``, ``sae``."""
    n_features: int = 2048
    k: int = 32
    center: bool = True
    """Fit the dataset mean from the first buffer fill and centre with it (for a new SAE, or a given one whose
    ``center`` is set and whose mean is still zero)."""
    sae_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further :class:`SAEConfig` fields for a new SAE (``sparsity``, ``rank``, ...)."""
    positions_per_seq: int = 16
    """Random positions taken from each sequence (without replacement)."""
    skip_positions: int = 0
    """Positions at the start of every sequence that are never sampled (e.g. a BOS token)."""
    model_batch_size: int = 8
    """Sequences per model forward when filling the buffer."""
    buffer_size: int = 4096
    """States held in the shuffling buffer; it is refilled when half empty."""
    val_sequences: int = 0
    """Sequences held out (the last ones) for validation; 0 disables validation."""
    val_every: int = 100
    log_every: int = 50
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    """Write ``checkpoint.pt`` every this many steps (0: only at the end / when stopped early)."""
    progress: bool = True
    wandb: bool = False
    """Log to Weights & Biases (see :mod:`recurrent_lens.sae.wandb_log`)."""
    wandb_project: str = "recurrent_lens"
    wandb_run_name: str | None = None
    """The wandb run's name (``None``: wandb picks one)."""

    @property
    def effective_warmup(self) -> int:
        return min(self.warmup_steps, self.n_steps // 4)

    @property
    def effective_resample_every(self) -> int:
        return min(self.resample_every, self.n_steps // 4) if self.resample_every > 0 else 0

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: linear from 0, then cosine down to ``lr_min``."""
        warm = self.effective_warmup
        if step < warm:
            return self.lr * step / warm
        span = max(1, self.n_steps - warm)
        progress = min(1.0, (step - warm) / span)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * progress))


@dataclass
class TrainLog:
    """Training history: ``train`` rows every ``log_every`` steps, ``val`` rows every ``val_every``."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    resampled: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def update_dead_counters(sae: SAE, p: SAEPass) -> None:
    """Dead-feature bookkeeping for one training step: ``sae.steps_since_active`` restarts at 0 for every
    feature that fired in the pass ``p`` and grows by 1 for every other.

    Example:
        >>> import torch
        >>> from recurrent_lens.sae import WriteSAE
        >>> from recurrent_lens.sae.training import update_dead_counters
        >>> sae = WriteSAE(4, 3, 8, k=1)
        >>> p = sae.autoencode(torch.randn(2, 4, 3))
        >>> update_dead_counters(sae, p)
        >>> fired = (p.acts > 0).any(0)
        >>> torch.equal(sae.steps_since_active, (~fired).long())
        True
    """
    fired = (p.code.acts > 0).any(0)
    sae.steps_since_active.add_(1).masked_fill_(fired, 0)


class Learner:
    """One SAE's optimisation: Adam, the learning-rate schedule, decoder normalisation, the dead-feature
    counters and resampling, and the running training log. Shared by :class:`SAETrainer` and the
    many-cell trainer.

    ``sync`` (optional) makes the update data-parallel: ``sync.gradients(params)`` averages gradients
    across processes after the backward pass, ``sync.counters(sae)`` makes the dead-feature counters
    identical everywhere, ``sync.gather(x)`` gives every process the global batch to resample from, and
    ``sync.parameters(sae)`` copies one process's SAE to all after resampling.
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, generator: torch.Generator, sync: Any = None,
                 label: str = "") -> None:
        self.sae, self.cfg, self.gen, self.sync, self.label = sae, cfg, generator, sync, label
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        self.step = 0
        self.log = TrainLog()
        self._sums: dict[str, torch.Tensor] = {}
        self._n_summed = 0
        self.states_note: str | None = None
        """Where the first non-finite training state came from, if the data feed saw one (for the error)."""
        # [step, which of _WATCHED, batch row] of the first non-finite value (-1: none yet), kept on the SAE's
        # device so that watching every step costs no host synchronisation; read by check_finite
        self._first_bad: torch.Tensor | None = None
        self._device_step: torch.Tensor | None = None

    def clear_moments(self, idx: torch.Tensor) -> None:
        """Zero Adam's moments of the features ``idx`` (after they were resampled)."""
        for p in self.sae.feature_parameters().values():
            state = self.optimizer.state.get(p)
            if state:
                state["exp_avg"][idx] = 0
                state["exp_avg_sq"][idx] = 0

    def update(self, x: torch.Tensor) -> dict[str, Any] | None:
        """One optimizer step on the batch ``x``; returns the training-log row written at this step, if any
        (every ``log_every`` steps and at ``n_steps``; not where a run is merely paused, so that a resumed
        run logs exactly the rows of an uninterrupted one)."""
        cfg, sae, step = self.cfg, self.sae, self.step
        bad_rows = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        passed = sae.autoencode(x)
        # As in the reference, the auxiliary loss already sees the counters this batch updated; data-parallel,
        # those are the whole global batch's, so every rank's auxiliary loss uses the same dead features.
        update_dead_counters(sae, passed)
        if self.sync is not None:
            self.sync.counters(sae)
        out = sae.losses(passed)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.sync is not None:
            self.sync.gradients([param for param in sae.parameters() if param.grad is not None])
        grads_ok = torch.stack([torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None]).all()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        self.optimizer.step()
        try:
            if step % cfg.normalize_every == 0:
                sae.normalize_decoder()
            resample_every = cfg.effective_resample_every
            if resample_every and step > 0 and step % resample_every == 0:
                idx = sae.resample_dead_features(x if self.sync is None else self.sync.gather(x), generator=self.gen)
                if self.sync is not None:
                    self.sync.parameters(sae)
                self.clear_moments(idx)
                self.log.resampled.append({"step": step, "n": len(idx)})
        except Exception as e:  # resampling's SVD cannot take a NaN: it may be the first to notice one
            self.check_finite()
            bad = first_nonfinite(x.detach())
            if bad is not None or not all(bool(torch.isfinite(t).all()) for t in self._float_tensors()):
                raise NonFiniteError(f"{self._divergence(step, 3 if bad is None else 0, bad or 0)} "
                                     f"({type(e).__name__})") from e
            raise
        weights_ok = torch.stack([torch.isfinite(t).all() for t in self._float_tensors()]).all()
        self._watch(torch.stack([~bad_rows.any(), torch.isfinite(out.loss.detach()), grads_ok, weights_ok]), bad_rows)
        with torch.no_grad():
            metrics = {"loss": out.loss.detach(), "mse": out.mse.detach(), "aux_loss": out.aux_loss.detach(),
                       "l0": (out.acts > 0).sum(-1).float().mean(), "dead": out.n_dead,
                       "mean_sq": x.pow(2).mean(), "var": x.var(unbiased=False)}
            for key, value in metrics.items():
                self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._n_summed += 1
        self.step += 1
        if not (self.step % cfg.log_every == 0 or self.step == cfg.n_steps):
            return None
        self.check_finite()
        row = {key: float(v) / self._n_summed for key, v in self._sums.items()}
        row["dead"] = int(out.n_dead)
        row["nmse"] = row["mse"] / row.pop("mean_sq")
        row["explained_variance"] = 1 - row["mse"] / row.pop("var")
        row.update(step=self.step, lr=cfg.lr_at(step))
        self.log.train.append(row)
        self._sums, self._n_summed = {}, 0
        return row

    def _float_tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.sae.parameters(), *self.sae.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def _watch(self, ok: torch.Tensor, bad_rows: torch.Tensor) -> None:
        """Record the step, kind and batch row of the first non-finite value, without leaving the device."""
        if self._first_bad is None:
            self._first_bad = torch.full((3,), -1, dtype=torch.long, device=ok.device)
            self._device_step = torch.tensor(self.step, device=ok.device)
        new = torch.stack([self._device_step, (~ok).long().argmax(), bad_rows.long().argmax()])
        self._first_bad = torch.where((self._first_bad[0] < 0) & ~ok.all(), new, self._first_bad)
        self._device_step += 1

    def check_finite(self) -> None:
        """Raise :class:`~recurrent_lens.integrity.NonFiniteError` if a batch of states, a loss, the gradients
        or the weights held a NaN or an infinity at any step so far, naming the first (trainers call this
        before writing anything, so no checkpoint, SAE or log is computed from one)."""
        if self._first_bad is None:
            return
        step, kind, row = self._first_bad.tolist()
        if step >= 0:
            raise NonFiniteError(self._divergence(step, kind, row))

    def _divergence(self, step: int, kind: int, row: int) -> str:
        where = f" (row {row} of the batch)" if kind == 0 else ""
        note = f"; {self.states_note}" if self.states_note else ""
        return (f"{self.label + ': ' if self.label else ''}training diverged: non-finite {_WATCHED[kind]} at step "
                f"{step}{where}{note}")

    def state_dict(self) -> dict[str, Any]:
        return {"sae_config": self.sae.config_dict(), "sae_state": self.sae.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "generator": self.gen.get_state(),
                "log": asdict(self.log), "log_sums": dict(self._sums), "log_n_summed": self._n_summed}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = payload["step"]
        self.gen.set_state(payload["generator"])
        self.log = TrainLog(**payload["log"])
        device = self.sae.mean.device
        self._sums = {k: v.to(device) for k, v in payload["log_sums"].items()}
        self._n_summed = payload["log_n_summed"]


def build_sae(cfg: TrainConfig, d_k: int, d_v: int, seed: int | None = None) -> SAE:
    """A new ``cfg.architecture`` SAE for ``d_k × d_v`` states, initialised from ``seed`` (default ``cfg.seed``)."""
    if cfg.architecture not in SAE_REGISTRY:
        raise ValueError(f"architecture: expected one of {sorted(SAE_REGISTRY)}, got {cfg.architecture!r}")
    torch.manual_seed(cfg.seed if seed is None else seed)
    return SAE_REGISTRY[cfg.architecture](d_k, d_v, cfg.n_features, k=cfg.k, center=cfg.center, **cfg.sae_kwargs)


def sae_from_payload(payload: dict[str, Any]) -> SAE:
    """The SAE stored in a training checkpoint's payload."""
    sae_cfg = payload["sae_config"]
    sae = SAE_REGISTRY[sae_cfg["architecture"]](cfg=SAEConfig.from_dict(sae_cfg))
    sae.load_state_dict(payload["sae_state"])
    return sae


class _StateStream:
    """Random-position states of one head, shuffled through a buffer. Fully described by its state."""

    def __init__(self, model: nn.Module, hook_name: str, head: int, tokens: torch.Tensor, cfg: TrainConfig,
                 generator: torch.Generator) -> None:
        self.model, self.hook_name, self.head, self.tokens, self.cfg = model, hook_name, head, tokens, cfg
        self.gen = generator
        self.order = torch.randperm(len(tokens), generator=generator)
        self.cursor = 0
        self.epoch = 0
        self.buffer: torch.Tensor | None = None
        self.fill = 0
        self.nonfinite: str | None = None  # where the first non-finite state came from, once one was seen

    @torch.no_grad()
    def states_of(self, toks: torch.Tensor) -> torch.Tensor:
        """``[n_seq * positions_per_seq, d_k, d_v]`` states at random positions of ``toks``.

        A :class:`~recurrent_lens.HookedRecurrentModel` computes only those states (``harvest``); any
        other ``HookedRootModule`` is run with ``run_with_cache`` and sliced.
        """
        return self._sample(toks)[0]

    def _sample(self, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`states_of` and the positions ``[n_seq, positions_per_seq]`` they were taken at."""
        b, T = toks.shape
        usable = T - self.cfg.skip_positions
        if usable < 1:
            raise ValueError(f"sequences of length {T} leave no position after skip_positions={self.cfg.skip_positions}")
        p = min(self.cfg.positions_per_seq, usable)
        pos = torch.rand(b, usable, generator=self.gen).argsort(-1)[:, :p] + self.cfg.skip_positions
        if hasattr(self.model, "harvest"):
            S = self.model.harvest(toks, pos, [(self.hook_name, self.head)])[self.hook_name, self.head]
        else:
            _, cache = self.model.run_with_cache(toks, names_filter=self.hook_name)
            S = cache[self.hook_name][:, :, self.head][torch.arange(b)[:, None], pos]
        return S.reshape(-1, *S.shape[-2:]).float(), pos

    def _next_sequences(self) -> torch.Tensor:
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.tokens), generator=self.gen)
            self.cursor, self.epoch = 0, self.epoch + 1
        idx = self.order[self.cursor : self.cursor + self.cfg.model_batch_size]
        self.cursor += len(idx)
        return idx

    @torch.no_grad()
    def _refill(self) -> None:
        parts = [self.buffer[: self.fill]] if self.buffer is not None else []
        have = self.fill
        while have < self.cfg.buffer_size:
            idx = self._next_sequences()
            states, pos = self._sample(self.tokens[idx])
            row = first_nonfinite(states) if self.nonfinite is None else None
            if row is not None:
                per = pos.shape[1]
                self.nonfinite = (f"the first non-finite state harvested: sequence {int(idx[row // per])} of the "
                                  f"training tokens, position {int(pos[row // per, row % per])}")
            parts.append(states)
            have += len(states)
        merged = torch.cat(parts)
        self.buffer = merged[torch.randperm(len(merged), generator=self.gen)]
        self.fill = len(self.buffer)

    def next_batch(self) -> torch.Tensor:
        if self.buffer is None or self.fill < max(self.cfg.batch_size, self.cfg.buffer_size // 2):
            self._refill()
        batch = self.buffer[self.fill - self.cfg.batch_size : self.fill]
        self.fill -= self.cfg.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else self.buffer[: self.fill].clone()
        return {"order": self.order, "cursor": self.cursor, "epoch": self.epoch, "buffer": buffer}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.order, self.cursor, self.epoch = d["order"], d["cursor"], d["epoch"]
        self.buffer = d["buffer"]
        self.fill = 0 if self.buffer is None else len(self.buffer)


# How a run reports itself, not what it computes: a resumed run may change them
REPORTING_FIELDS = frozenset({"progress", "wandb", "wandb_project", "wandb_run_name"})


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse settings that would fail (or silently misbehave) minutes into a run."""
    for name in ("n_steps", "batch_size", "n_features", "k", "positions_per_seq", "model_batch_size",
                 "buffer_size", "log_every", "val_every", "normalize_every"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TrainConfig.{name}: expected a positive int, got {value!r}")
    for name in ("skip_positions", "val_sequences", "checkpoint_every", "resample_every", "warmup_steps"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"TrainConfig.{name}: expected a non-negative int, got {value!r}")
    for name in ("lr", "lr_min"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"TrainConfig.{name}: expected a finite non-negative number, got {value!r}")
    if cfg.architecture not in SAE_REGISTRY:
        raise ValueError(f"TrainConfig.architecture: expected one of {sorted(SAE_REGISTRY)}, got {cfg.architecture!r}")
    try:  # refused now rather than after the model has run: the SAE's config with these values
        SAEConfig(d_k=1, d_v=1, n_features=cfg.n_features, k=cfg.k, center=cfg.center, **cfg.sae_kwargs)
    except ValueError as e:
        raise ValueError(f"TrainConfig.{e}") from e
    if cfg.buffer_size < cfg.batch_size:
        raise ValueError(f"TrainConfig.buffer_size: expected at least batch_size={cfg.batch_size}, "
                         f"got {cfg.buffer_size}")


def check_tokens(model: nn.Module, tokens: Any) -> torch.Tensor:
    """``tokens`` as a ``[n_seq, pos]`` integer tensor whose ids the model's vocabulary holds."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens: expected non-empty [n_seq, pos] token ids, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
    vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if vocab is not None and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"tokens: ids must lie in [0, {vocab}) (d_vocab), got min {int(tokens.min())} and "
                         f"max {int(tokens.max())}")
    return tokens


def check_cell(model: nn.Module, hook_name: str, head: Any) -> Cell:
    """The cell ``(hook_name, head)``, refusing a hook that holds no per-step matrices, or a head out of
    range, before any work starts (a model without ``matrix_site`` only needs the hook to exist)."""
    if hasattr(model, "matrix_site"):
        return parse_cell(model, hook_name, head)
    if hook_name not in getattr(model, "hook_dict", {}):
        raise ValueError(f"hook_name: {hook_name!r} is not a hook point of the model")
    return Cell(hook_name, check_head(head, None))


class SAETrainer:
    """Trains one SAE on one head of one matrix hook.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import SAETrainer, TrainConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> tokens = torch.randint(0, 50, (16, 12))
        >>> cfg = TrainConfig(n_steps=20, batch_size=32, n_features=64, k=4, buffer_size=128, progress=False)
        >>> sae, log = SAETrainer(model, "blocks.0.mixer.hook_state", 0, tokens, cfg).train()
        >>> len(log.train) > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        hook_name: str,
        head: int,
        tokens: Int[torch.Tensor, "n_seq pos"],
        cfg: TrainConfig,
        sae: SAE | None = None,
    ) -> None:
        check_train_config(cfg)
        check_cell(model, hook_name, head)
        tokens = check_tokens(model, tokens)
        if cfg.val_sequences >= len(tokens):
            raise ValueError(f"val_sequences={cfg.val_sequences} leaves no training sequence out of {len(tokens)}")
        if tokens.shape[1] - cfg.skip_positions < 1:
            raise ValueError(f"tokens: sequences of length {tokens.shape[1]} leave no position after "
                             f"skip_positions={cfg.skip_positions}")
        if cfg.checkpoint_dir is not None:
            check_writable(cfg.checkpoint_dir, "TrainConfig.checkpoint_dir")
        self.model, self.hook_name, self.head, self.cfg = model, hook_name, head, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        n_train = len(tokens) - cfg.val_sequences
        self.stream = _StateStream(model, hook_name, head, tokens[:n_train], cfg, self.gen)
        self.val_tokens = tokens[n_train:]
        self._val_states: torch.Tensor | None = None
        if sae is None:
            probe = self.stream.states_of(tokens[:1])
            sae = build_sae(cfg, *probe.shape[-2:])
            # The probe must not shift the data stream: restart it from the seed.
            self.gen.manual_seed(cfg.seed)
            self.stream = _StateStream(model, hook_name, head, tokens[:n_train], cfg, self.gen)
        sae.cfg.metadata.setdefault("hook_name", hook_name)
        sae.cfg.metadata.setdefault("head", head)
        self.learner = Learner(sae, cfg, self.gen, label=f"{hook_name}.h{head}")
        self._weights: dict[str, Any] | None = None
        self._lock = None
        if cfg.checkpoint_dir is not None:
            # held from here until train() returns: a second trainer on the directory fails before any work
            self._lock = DirectoryLock(cfg.checkpoint_dir, "TrainConfig.checkpoint_dir").acquire()
            weakref.finalize(self, self._lock.release)
            remove_stale_temporaries(cfg.checkpoint_dir)

    @property
    def sae(self) -> SAE:
        return self.learner.sae

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def step(self) -> int:
        return self.learner.step

    @property
    def log(self) -> TrainLog:
        return self.learner.log

    def _clear_moments(self, idx: torch.Tensor) -> None:
        self.learner.clear_moments(idx)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write everything needed to continue bit-identically; returns the file path. Raises
        :class:`~recurrent_lens.integrity.NonFiniteError` instead if training diverged (the checkpoint
        already there, from before, is kept)."""
        directory = path or self.cfg.checkpoint_dir
        if directory is None:
            raise ValueError("save_checkpoint: no path given and TrainConfig.checkpoint_dir is None")
        self.learner.check_finite()
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, CHECKPOINT_NAME)
        if self._weights is None:
            self._weights = weights_fingerprint(self.model)
        payload = {**self.learner.state_dict(), "torch_rng": torch.get_rng_state(),
                   "stream": self.stream.state_dict(), "train_config": asdict(self.cfg), "weights": self._weights,
                   "data": {"shape": list(self.stream.tokens.shape), "val_shape": list(self.val_tokens.shape),
                            "fingerprint": _fingerprint(self.stream.tokens),
                            "val_fingerprint": _fingerprint(self.val_tokens)}}
        atomic_write(target, lambda tmp: torch.save(payload, tmp))
        return target

    @classmethod
    def from_checkpoint(cls, model: nn.Module, tokens: torch.Tensor, path: str, cfg: TrainConfig | None = None) -> "SAETrainer":
        """Rebuild a trainer from ``path`` (a checkpoint directory or file) to continue training.

        The model must read the same states (same hook and head sizes) and ``tokens`` must be the
        sequences the run started with; anything else is refused.

        Example:
            >>> import torch, tempfile
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> from recurrent_lens.sae import SAETrainer, TrainConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
            ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
            >>> tokens = torch.randint(0, 50, (16, 12))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     cfg = TrainConfig(n_steps=10, batch_size=16, n_features=32, k=4, buffer_size=64,
            ...                       progress=False, checkpoint_dir=d)
            ...     _ = SAETrainer(model, "blocks.0.mixer.hook_state", 0, tokens, cfg).train(until_step=5)
            ...     trainer = SAETrainer.from_checkpoint(model, tokens, d)
            ...     trainer.step
            5
        """
        file = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read training checkpoint {file} ({type(e).__name__}: {e})") from e
        cfg = cfg or TrainConfig(**payload["train_config"])
        sae = sae_from_payload(payload)
        tokens = check_tokens(model, tokens)
        if "weights" not in payload or "val_fingerprint" not in payload.get("data", {}):
            raise refuse_unchecked(file, "a training checkpoint", "path")
        data = payload["data"]
        n_train = len(tokens) - cfg.val_sequences
        if list(tokens[:n_train].shape) != data["shape"] or _fingerprint(tokens[:n_train]) != data["fingerprint"]:
            raise ValueError(f"tokens: the checkpoint {file} was trained on other tokens (shape {data['shape']}, "
                             f"got {list(tokens[:n_train].shape)} training sequences with other ids)")
        if _fingerprint(tokens[n_train:]) != data["val_fingerprint"]:
            raise ValueError(f"tokens: the checkpoint {file} was validated on other held-out tokens (the last "
                             f"{cfg.val_sequences} sequences, shape {data['val_shape']}, hold other ids)")
        hook_name, head = sae.cfg.metadata.get("hook_name"), sae.cfg.metadata.get("head")
        check_cell(model, hook_name, head)
        if hasattr(model, "cfg") and (model.cfg.d_k, model.cfg.d_v) != (sae.cfg.d_k, sae.cfg.d_v):
            raise ValueError(f"model: the checkpoint's SAE reads {sae.cfg.d_k}x{sae.cfg.d_v} states, the model has "
                             f"{model.cfg.d_k}x{model.cfg.d_v}")
        check_same("weights", payload["weights"], weights_fingerprint(model), file, "a training checkpoint", "path")
        trainer = cls(model, hook_name, head, tokens, cfg, sae=sae)
        trainer.learner.load_state_dict(payload)
        torch.set_rng_state(payload["torch_rng"])
        trainer.stream.load_state_dict(payload["stream"])
        return trainer

    # ------------------------------------------------------------------ validation

    def _validation_states(self) -> torch.Tensor:
        if self._val_states is None:
            # A separate generator keeps the validation set fixed and the training stream untouched.
            val_stream = _StateStream(self.model, self.hook_name, self.head, self.val_tokens, self.cfg,
                                      torch.Generator().manual_seed(self.cfg.seed + 1))
            chunks = [val_stream.states_of(self.val_tokens[i : i + self.cfg.model_batch_size])
                      for i in range(0, len(self.val_tokens), self.cfg.model_batch_size)]
            states = torch.cat(chunks)
            row = first_nonfinite(states)
            if row is not None:
                raise NonFiniteError(f"held-out states of {self.learner.label}: non-finite state in held-out sequence "
                                     f"{row // (len(states) // len(self.val_tokens))} (of the last "
                                     f"{len(self.val_tokens)} of the tokens)")
            self._val_states = states
        return self._val_states

    @torch.no_grad()
    def validate(self, states: torch.Tensor | None = None) -> dict[str, Any]:
        """MSE, normalised MSE, explained variance, L0 and features never active on the states
        (dead-feature counters are left alone)."""
        states = self._validation_states() if states is None else states
        return {"step": self.step, **evaluate(self.sae, states, self.cfg.batch_size)}

    # ------------------------------------------------------------------ training

    def train(self, until_step: int | None = None) -> tuple[SAE, TrainLog]:
        """Run (or continue) training up to ``cfg.n_steps``, or stop early at ``until_step``.

        With ``checkpoint_dir`` set, a checkpoint is written every ``checkpoint_every`` steps and always
        when the run stops (early or at the end), and the training log goes to ``train_log.json`` at the
        end. The directory's lock (:class:`~recurrent_lens.states.files.DirectoryLock`, taken when the
        trainer was built) is released when this returns or raises, and taken again by a later call.
        Gradients are enabled for the duration even under ``torch.set_grad_enabled(False)`` (as
        notebooks often set).
        """
        if self._lock is not None:
            self._lock.acquire()
        try:
            with torch.enable_grad():
                return self._train(until_step)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _train(self, until_step: int | None) -> tuple[SAE, TrainLog]:
        cfg, sae, learner = self.cfg, self.sae, self.learner
        stop = cfg.n_steps if until_step is None else min(until_step, cfg.n_steps)
        run = wandb_log.open_run(cfg, {**asdict(cfg), **sae.config_dict()})
        if self.step == 0 and sae.cfg.center and not bool(sae.mean.any()):
            with torch.no_grad():
                self.stream._refill()
                sae.mean.copy_(self.stream.buffer.mean(0))
        sae.train()
        bar = tqdm(total=stop, initial=self.step, disable=not cfg.progress, desc="SAE")
        while self.step < stop:
            batch = self.stream.next_batch()
            learner.states_note = self.stream.nonfinite
            row = learner.update(batch)
            if row is not None:
                bar.set_postfix(mse=f"{row['mse']:.3g}", l0=f"{row['l0']:.1f}", dead=row["dead"])
                wandb_log.log_row(run, row, self.step)
            if cfg.val_sequences and (self.step % cfg.val_every == 0 or self.step == cfg.n_steps):
                row = self.validate()
                self.log.val.append(row)
                wandb_log.log_row(run, row, self.step)
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        learner.check_finite()
        if self.step >= cfg.n_steps:
            sae.cfg.metadata.update(train_steps=self.step)
        if cfg.checkpoint_dir:
            self.save_checkpoint()
            if self.step >= cfg.n_steps:
                write_json(os.path.join(cfg.checkpoint_dir, "train_log.json"), asdict(self.log))
        if run is not None:
            run.finish()
        sae.eval()
        return sae, self.log


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def _fingerprint(tokens: torch.Tensor) -> str:
    # ids compared as int64 whatever dtype the caller hands over, so int32 and int64 tokens match
    return tensor_digest(tokens.to(torch.int64))


@torch.no_grad()
def evaluate(sae: SAE, states: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """MSE, normalised MSE, explained variance (per-coordinate centred), L0 and never-active features of
    ``sae`` on ``states``."""
    sq_err = torch.zeros((), dtype=torch.float64)
    l0 = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(sae.cfg.n_features, dtype=torch.bool, device=states.device)
    for i in range(0, len(states), batch_size):
        x = states[i : i + batch_size]
        p = sae.autoencode(x)
        sq_err += (p.reconstruction - x).double().pow(2).sum().cpu()
        l0 += (p.acts > 0).sum().cpu()
        fired |= (p.acts > 0).any(0)
    x = states.double()
    mse = sq_err / x.numel()
    return {
        "val_mse": float(mse),
        "val_nmse": float(mse / x.pow(2).mean().cpu()),
        "val_explained_variance": float(1 - sq_err / (x - x.mean(0)).pow(2).sum().cpu()),
        "val_l0": float(l0 / len(states)),
        "val_dead": int((~fired).sum()),
    }


def train(
    model: nn.Module,
    hook_name: str,
    head: int,
    tokens: Int[torch.Tensor, "n_seq pos"],
    cfg: TrainConfig | None = None,
    sae: SAE | None = None,
) -> tuple[SAE, TrainLog]:
    """Train an SAE on head ``head`` of ``hook_name``; builds ``cfg.architecture`` unless ``sae`` is given.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import train, TrainConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> sae, log = train(model, "blocks.0.mixer.hook_state", 1, torch.randint(0, 50, (16, 12)),
        ...                  TrainConfig(n_steps=10, batch_size=32, n_features=64, k=4, buffer_size=128, progress=False))
        >>> sae
        WriteSAE(d_k=8, d_v=4, n_features=64, encoder=bilinear, decoder=rank-1, sparsity=topk(k=4), centred, hook_name='blocks.0.mixer.hook_state', head=1)
    """
    return SAETrainer(model, hook_name, head, tokens, cfg or TrainConfig(), sae=sae).train()
