"""One SAE's optimisation and the settings of a training run, shared by every trainer.

:class:`TrainConfig` holds a run's settings and :class:`Learner` one SAE's optimisation. The trainer itself,
:class:`~recurrent_lens.sae.trainer.MultiCellTrainer` (one SAE per cell, :class:`~recurrent_lens.sae.
SAETrainer` and :func:`~recurrent_lens.sae.train` being its one-cell case), reads its states from a
:class:`~recurrent_lens.states.feeds.StateFeed`.

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
states, the batch row and where it came from. Nothing computed from it is written. A finite but huge state
(``1e30``) overflows the loss, and is caught as a non-finite loss.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from recurrent_lens.integrity import DivergedError, NonFiniteError, first_nonfinite
from recurrent_lens.sae.base import SAE, SAEPass
from recurrent_lens.sae.config import SAEConfig
from recurrent_lens.sae.distributed import CollectiveError
from recurrent_lens.sae.registry import SAE_REGISTRY
from recurrent_lens.states.files import atomic_write

__all__ = ["TrainConfig", "TrainLog", "Learner", "evaluate", "update_dead_counters"]

_WATCHED = ("training states", "loss", "gradients", "weights", "normalised MSE")
_UNBOUNDED = _WATCHED.index("normalised MSE")  # the one watched value that is finite when it fails


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
    max_nmse: float = 1000.0
    """Stop (:class:`~recurrent_lens.integrity.DivergedError`) once a batch's reconstruction error exceeds this many
    times the batch's mean square: a run that diverged but stayed finite (reconstructing nothing scores 1).
    0 disables the check."""
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
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end / when stopped early)."""
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
    counters and resampling, and the running training log; the trainer holds one per cell.

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
        except CollectiveError:
            raise
        except Exception as e:  # resampling's SVD cannot take a NaN: it may be the first to notice one
            self._raise_first_bad()
            bad = first_nonfinite(x.detach())
            if bad is not None or not all(bool(torch.isfinite(t).all()) for t in self._float_tensors()):
                raise NonFiniteError(f"{self._divergence(step, 3 if bad is None else 0, bad or 0)} "
                                     f"({type(e).__name__})") from e
            raise
        weights_ok = torch.stack([torch.isfinite(t).all() for t in self._float_tensors()]).all()
        mean_sq = x.detach().pow(2).mean()
        bounded = ~(out.mse.detach() > cfg.max_nmse * mean_sq) if cfg.max_nmse else torch.ones_like(weights_ok)
        self._watch(torch.stack([~bad_rows.any(), torch.isfinite(out.loss.detach()), grads_ok, weights_ok, bounded]),
                    bad_rows)
        with torch.no_grad():
            metrics = {"loss": out.loss.detach(), "mse": out.mse.detach(), "aux_loss": out.aux_loss.detach(),
                       "l0": (out.acts > 0).sum(-1).float().mean(), "dead": out.n_dead,
                       "mean_sq": mean_sq, "var": x.var(unbiased=False)}
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
        or the weights held a NaN or an infinity at any step so far, or
        :class:`~recurrent_lens.integrity.DivergedError` if a batch's normalised MSE passed ``max_nmse``, naming
        the first (trainers call this before writing anything, so no checkpoint, SAE or log is computed from
        one)."""
        seen = self._first_bad is not None and int(self._first_bad[0]) >= 0
        # data-parallel, every rank calls this at the same points: all stop together, rather than leave the others
        # waiting at their next collective for a rank that stopped
        if self.sync is not None and self.sync.anywhere(torch.tensor(seen, device=self.sae.mean.device)) and not seen:
            raise NonFiniteError(f"{self.label + ': ' if self.label else ''}training diverged on another rank (its "
                                 f"own message names the step and the value); this rank stops with it")
        self._raise_first_bad()

    def _raise_first_bad(self) -> None:
        """Raise for the first non-finite or unbounded value this rank saw, if any (no collective)."""
        step, kind, row = (-1, 0, 0) if self._first_bad is None else self._first_bad.tolist()
        if step >= 0:
            raise (DivergedError if kind == _UNBOUNDED else NonFiniteError)(self._divergence(step, kind, row))

    def _divergence(self, step: int, kind: int, row: int) -> str:
        where = f" (row {row} of the batch)" if kind == 0 else ""
        note = f"; {self.states_note}" if self.states_note else ""
        what = f"non-finite {_WATCHED[kind]}"
        if kind == _UNBOUNDED:
            bound = self.cfg.max_nmse
            what = (f"normalised MSE above TrainConfig.max_nmse={bound:g} (finite, but the reconstruction error "
                    f"was over {bound:g} times the states' mean square: lower the learning rate, or raise max_nmse; "
                    f"0 disables the check)")
        return f"{self.label + ': ' if self.label else ''}training diverged: {what} at step {step}{where}{note}"

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


# How a run reports and guards itself, not what it computes: a resumed run may change them
REPORTING_FIELDS = frozenset({"progress", "wandb", "wandb_project", "wandb_run_name", "max_nmse"})


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
    for name in ("lr", "lr_min", "max_nmse"):
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


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


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
