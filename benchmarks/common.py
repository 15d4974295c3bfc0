"""What the real-size benchmarks share: the Qwen3.5-shaped random GDN model, best-of timing, and peak-RSS
measurement in a fresh process (so that one measurement's peak cannot hide another's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Qwen3.5-0.8B's layer sizes: 3 GDN layers then 1 attention layer of these widths
QWEN3_5_0_8B = dict(d_model=1024, n_heads=16, d_head=128, d_mlp=3584, n_attn_heads=8, n_kv_heads=2,
                    d_head_attn=256, rotary_dim=64)
# the same layout at sizes a --quick smoke run finishes in seconds
QUICK = dict(d_model=256, n_heads=4, d_head=64, d_mlp=896, n_attn_heads=4, n_kv_heads=2, d_head_attn=64,
             rotary_dim=16)


def qwen3_5_gdn(s: dict, d_vocab: int = 2048, **config):
    """A random ``gated_deltanet`` in Qwen3.5's layout at the sizes ``s``, in eval mode; ``config`` goes to
    ``ModelConfig`` (dtype, device)."""
    from recurrent_lens import HookedRecurrentModel, ModelConfig

    cfg = ModelConfig(
        architecture="gated_deltanet", d_model=s["d_model"], n_layers=4, d_vocab=d_vocab, n_heads=s["n_heads"],
        n_key_heads=s["n_heads"], d_k=s["d_head"], d_v=s["d_head"], d_mlp=s["d_mlp"],
        layer_types=("recurrent", "recurrent", "recurrent", "attention"), n_attn_heads=s["n_attn_heads"],
        n_kv_heads=s["n_kv_heads"], d_head_attn=s["d_head_attn"], rotary_dim=s["rotary_dim"],
        attn_output_gate=True, norm="rms_one_plus", options={"layout": "qwen3_5"}, **config,
    )
    return HookedRecurrentModel.from_config(cfg, seed=0).eval()


def best_of(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Best time of each function after one warm-up, run round-robin so that a change in the machine's load
    (shared cores) hits every function alike instead of whichever happens to be timed then. ``sync`` waits for
    queued device work, so that it is timed with the call that queued it."""
    for fn in fns.values():
        fn()
    sync()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def proc_status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Resets VmHWM to the current RSS, so that the next ``proc_status("VmHWM:")`` is the peak of what runs
    in between; returns that RSS."""
    before = proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if proc_status("VmHWM:") > before + 2**20:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    return before


def measure_in_child(script: str, what: str, flags: list[str]) -> dict:
    """Runs ``script --child what *flags`` in a fresh process and returns the JSON of its last output line."""
    argv = [sys.executable, str(Path(script).resolve()), "--child", what, *flags]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"{what}: the measuring process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
