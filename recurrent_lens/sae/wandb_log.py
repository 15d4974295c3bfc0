"""Weights & Biases logging for SAE training (both trainers and ``train-sae --wandb``).

A run logs, at every ``log_every`` step, what the progress bar shows (``mse``, ``l0``, ``dead``) together
with the rest of the training row (``explained_variance``, ``nmse``, ``lr``, ...), and every validation row;
the multi-cell trainer prefixes each cell's keys with its name (``blocks.1.mixer.hook_state.h0/mse``).
``wandb`` is imported only when a run is asked for (``TrainConfig.wandb``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_run", "log_row"]


def open_run(cfg: Any, config: dict[str, Any]) -> Any:
    """A started wandb run for ``cfg`` (a ``TrainConfig``), or ``None`` when ``cfg.wandb`` is off.

    Example:
        >>> from recurrent_lens.sae import TrainConfig
        >>> open_run(TrainConfig(), {}) is None
        True
    """
    if not cfg.wandb:
        return None
    import wandb  # optional, and slow to import: only when asked for

    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config)


def log_row(run: Any, row: dict[str, Any], step: int, prefix: str = "") -> None:
    """Log the numeric entries of ``row`` at ``step`` (keys prefixed ``{prefix}/`` when given); no-op without a run.

    Example:
        >>> log_row(None, {"mse": 0.1}, step=3)  # no run: nothing to do
    """
    if run is None:
        return
    values = {(f"{prefix}/{k}" if prefix else k): v for k, v in row.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    run.log(values, step=step)
