"""Training SAEs on states streamed from a model's hooks (specs/WRITESAE.md §2).

Activations come from ``model.run_with_cache(tokens, names_filter=hook_name)``: for each sequence
``positions_per_seq`` positions are drawn at random (not only the last one), the chosen head's
``d_k x d_v`` matrices go into a shuffling buffer, and the SAE trains on batches drawn from it.

Recipe (the reference's): Adam (default betas); lr linear warm-up from 0 over
``min(warmup_steps, n_steps // 4)`` steps, then cosine to ``lr_min``; per step: forward (updates
dead counters), backward, set lr, Adam step, decoder normalisation when ``step % 100 == 0``,
dead-feature resampling with Adam-moment zeroing when ``step > 0`` and
``step % min(resample_every, n_steps // 4) == 0``. No value is copied to the host except at
logging, validation and checkpoint steps.

Checkpoints (``checkpoint_dir/checkpoint.pt``) hold the SAE, the optimizer, the step, every random
generator, the data order and the shuffling buffer, so a resumed run continues bit for bit like an
uninterrupted one.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import nn
from tqdm.auto import tqdm

from recurrent_lens.sae.base import SAE, SAE_REGISTRY, SAEConfig
from recurrent_lens.sae.io import atomic_write

__all__ = ["TrainConfig", "TrainLog", "SAETrainer", "train"]

CHECKPOINT_NAME = "checkpoint.pt"


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
    wandb_project: str = "recurrent_lens"

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

    @torch.no_grad()
    def states_of(self, toks: torch.Tensor) -> torch.Tensor:
        """``[n_seq * positions_per_seq, d_k, d_v]`` states at random positions of ``toks``."""
        _, cache = self.model.run_with_cache(toks, names_filter=self.hook_name)
        S = cache[self.hook_name][:, :, self.head]  # [b, pos, d_k, d_v]
        b, T = S.shape[:2]
        usable = T - self.cfg.skip_positions
        if usable < 1:
            raise ValueError(f"sequences of length {T} leave no position after skip_positions={self.cfg.skip_positions}")
        p = min(self.cfg.positions_per_seq, usable)
        pos = torch.rand(b, usable, generator=self.gen).argsort(-1)[:, :p] + self.cfg.skip_positions
        return S[torch.arange(b)[:, None], pos].reshape(-1, *S.shape[-2:]).float()

    def _next_sequences(self) -> torch.Tensor:
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.tokens), generator=self.gen)
            self.cursor, self.epoch = 0, self.epoch + 1
        idx = self.order[self.cursor : self.cursor + self.cfg.model_batch_size]
        self.cursor += len(idx)
        return self.tokens[idx]

    def _refill(self) -> None:
        parts = [self.buffer[: self.fill]] if self.buffer is not None else []
        have = self.fill
        while have < self.cfg.buffer_size:
            states = self.states_of(self._next_sequences())
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
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected [n_seq, pos] token ids, got shape {tuple(tokens.shape)}")
        if cfg.val_sequences >= len(tokens):
            raise ValueError(f"val_sequences={cfg.val_sequences} leaves no training sequence out of {len(tokens)}")
        self.model, self.hook_name, self.head, self.cfg = model, hook_name, head, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        n_train = len(tokens) - cfg.val_sequences
        self.stream = _StateStream(model, hook_name, head, tokens[:n_train], cfg, self.gen)
        self.val_tokens = tokens[n_train:]
        self._val_states: torch.Tensor | None = None
        if sae is None:
            probe = self.stream.states_of(tokens[:1])
            d_k, d_v = probe.shape[-2:]
            cls = SAE_REGISTRY[cfg.architecture]
            torch.manual_seed(cfg.seed)
            sae = cls(int(d_k), int(d_v), cfg.n_features, k=cfg.k, center=cfg.center, **cfg.sae_kwargs)
            # The probe must not shift the data stream: restart it from the seed.
            self.gen.manual_seed(cfg.seed)
            self.stream = _StateStream(model, hook_name, head, tokens[:n_train], cfg, self.gen)
        sae.cfg.metadata.setdefault("hook_name", hook_name)
        sae.cfg.metadata.setdefault("head", head)
        self.sae = sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        self.step = 0
        self.log = TrainLog()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write everything needed to continue bit-identically; returns the file path."""
        directory = path or self.cfg.checkpoint_dir
        if directory is None:
            raise ValueError("save_checkpoint: no path given and TrainConfig.checkpoint_dir is None")
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, CHECKPOINT_NAME)
        payload = {
            "sae_config": self.sae.config_dict(),
            "sae_state": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "stream": self.stream.state_dict(),
            "log": asdict(self.log),
            "train_config": asdict(self.cfg),
        }
        atomic_write(target, lambda tmp: torch.save(payload, tmp))
        return target

    @classmethod
    def from_checkpoint(cls, model: nn.Module, tokens: torch.Tensor, path: str, cfg: TrainConfig | None = None) -> "SAETrainer":
        """Rebuild a trainer from ``path`` (a checkpoint directory or file) to continue training.

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
        sae_cfg = payload["sae_config"]
        sae = SAE_REGISTRY[sae_cfg["architecture"]](cfg=SAEConfig.from_dict(sae_cfg))
        sae.load_state_dict(payload["sae_state"])
        trainer = cls(model, sae.cfg.metadata.get("hook_name"), sae.cfg.metadata.get("head"), tokens, cfg, sae=sae)
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.step = payload["step"]
        trainer.gen.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        trainer.stream.load_state_dict(payload["stream"])
        trainer.log = TrainLog(**payload["log"])
        return trainer

    # ------------------------------------------------------------------ validation

    def _validation_states(self) -> torch.Tensor:
        if self._val_states is None:
            # A separate generator keeps the validation set fixed and the training stream untouched.
            val_stream = _StateStream(self.model, self.hook_name, self.head, self.val_tokens, self.cfg,
                                      torch.Generator().manual_seed(self.cfg.seed + 1))
            chunks = [val_stream.states_of(self.val_tokens[i : i + self.cfg.model_batch_size])
                      for i in range(0, len(self.val_tokens), self.cfg.model_batch_size)]
            self._val_states = torch.cat(chunks)
        return self._val_states

    @torch.no_grad()
    def validate(self, states: torch.Tensor | None = None) -> dict[str, Any]:
        """MSE, normalised MSE, explained variance, L0 and features never active on the states.

        Dead-feature counters are left as they were.
        """
        states = self._validation_states() if states is None else states
        saved = self.sae.steps_since_active.clone()
        sq_err = torch.zeros((), dtype=torch.float64)
        l0 = torch.zeros((), dtype=torch.float64)
        fired = torch.zeros(self.sae.cfg.n_features, dtype=torch.bool)
        for i in range(0, len(states), self.cfg.batch_size):
            x = states[i : i + self.cfg.batch_size]
            out = self.sae(x)
            sq_err += (out.reconstruction - x).double().pow(2).sum()
            l0 += (out.acts > 0).sum()
            fired |= (out.acts > 0).any(0)
        self.sae.steps_since_active.copy_(saved)
        x = states.double()
        n_elem = x.numel()
        mse = sq_err / n_elem
        return {
            "step": self.step,
            "val_mse": float(mse),
            "val_nmse": float(mse / x.pow(2).mean()),
            "val_explained_variance": float(1 - sq_err / (x - x.mean(0)).pow(2).sum()),
            "val_l0": float(l0 / len(states)),
            "val_dead": int((~fired).sum()),
        }

    # ------------------------------------------------------------------ training

    def _clear_moments(self, idx: torch.Tensor) -> None:
        for p in self.sae.feature_parameters().values():
            state = self.optimizer.state.get(p)
            if state:
                state["exp_avg"][idx] = 0
                state["exp_avg_sq"][idx] = 0

    def train(self, until_step: int | None = None) -> tuple[SAE, TrainLog]:
        """Run (or continue) training up to ``cfg.n_steps``, or stop early at ``until_step``.

        Stopping early writes a checkpoint when ``checkpoint_dir`` is set. Gradients are enabled for the
        duration even under ``torch.set_grad_enabled(False)`` (as notebooks often set).
        """
        with torch.enable_grad():
            return self._train(until_step)

    def _train(self, until_step: int | None) -> tuple[SAE, TrainLog]:
        cfg, sae = self.cfg, self.sae
        stop = cfg.n_steps if until_step is None else min(until_step, cfg.n_steps)
        run = None
        if cfg.wandb:
            import wandb

            run = wandb.init(project=cfg.wandb_project, config={**asdict(cfg), **sae.config_dict()})
        if self.step == 0 and sae.cfg.center and not bool(sae.mean.any()):
            with torch.no_grad():
                self.stream._refill()
                sae.mean.copy_(self.stream.buffer.mean(0))
        sae.train()
        resample_every = cfg.effective_resample_every
        bar = tqdm(total=stop, initial=self.step, disable=not cfg.progress, desc="SAE")
        sums: dict[str, torch.Tensor] = {}
        n_summed = 0
        while self.step < stop:
            step = self.step
            x = self.stream.next_batch()
            out = sae(x)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            self.optimizer.step()
            if step % cfg.normalize_every == 0:
                sae.normalize_decoder()
            if resample_every and step > 0 and step % resample_every == 0:
                idx = sae.resample_dead_features(x, generator=self.gen)
                self._clear_moments(idx)
                self.log.resampled.append({"step": step, "n": len(idx)})
            with torch.no_grad():
                metrics = {"loss": out.loss.detach(), "mse": out.mse.detach(), "aux_loss": out.aux_loss.detach(),
                           "l0": (out.acts > 0).sum(-1).float().mean(), "dead": out.n_dead,
                           "mean_sq": x.pow(2).mean(), "var": x.var(unbiased=False)}
                for key, value in metrics.items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
            n_summed += 1
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == stop:
                row = {key: float(v) / n_summed for key, v in sums.items()}
                row["dead"] = int(out.n_dead)
                row["nmse"] = row["mse"] / row.pop("mean_sq")
                row["explained_variance"] = 1 - row["mse"] / row.pop("var")
                row.update(step=self.step, lr=cfg.lr_at(step))
                self.log.train.append(row)
                bar.set_postfix(mse=f"{row['mse']:.3g}", l0=f"{row['l0']:.1f}", dead=row["dead"])
                if run is not None:
                    run.log(row, step=self.step)
                sums, n_summed = {}, 0
            if cfg.val_sequences and (self.step % cfg.val_every == 0 or self.step == cfg.n_steps):
                row = self.validate()
                self.log.val.append(row)
                if run is not None:
                    run.log(row, step=self.step)
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if cfg.checkpoint_dir and self.step < cfg.n_steps:
            self.save_checkpoint()
        if self.step >= cfg.n_steps:
            sae.cfg.metadata.update(train_steps=self.step)
            if cfg.checkpoint_dir:
                with open(os.path.join(cfg.checkpoint_dir, "train_log.json"), "w") as f:
                    json.dump(asdict(self.log), f)
        if run is not None:
            run.finish()
        sae.eval()
        return sae, self.log


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
