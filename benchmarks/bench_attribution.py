"""Write attribution: time and memory against a forward up to the attributed layer.

    python benchmarks/bench_attribution.py            # Qwen3.5-0.8B mixer sizes, T=512, batch 1, 1 thread, fp32
    python benchmarks/bench_attribution.py --quick    # small sizes, seconds

The model is a random ``gated_deltanet`` with Qwen3.5-0.8B's layer sizes (d_model 1024, 16 heads of
128 x 128, d_mlp 3584), 3 GDN layers then 1 attention layer, and the attributed layer is the third GDN
layer (index 2). The forward is ``model(tokens, stop_at_layer=3)``: everything up to and including that
layer. The SAE is a random WriteSAE of 16384 features on head 4's states. Prints, each measured in this run:

  (a) ``model.implicit_attention(tokens, 2, heads=4)`` / the forward, in time            (target <= 2)
  (b) ``feature_attribution`` of 64 features at 16 positions / the forward, in time       (target <= 1)
  (c) peak RSS each adds above the forward's own peak, against T² · heads · 4 bytes (one fp32
      ``[head, pos, pos]`` pattern) and the ``[pos, pos, d_k, d_v]`` tensor never formed
      every peak is measured in its own fresh process (VmHWM reset after building the model and a warm-up)
Times are best of ``--repeats`` after one warm-up, the operations taking turns, under ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYER = 2
N_POSITIONS = 16
N_FEATURES = 64


def sizes(quick: bool) -> dict:
    if quick:
        return dict(d_model=256, n_heads=4, d_head=64, d_mlp=896, n_attn_heads=4, n_kv_heads=2, d_head_attn=64,
                    rotary_dim=16, T=128, head=1, sae_features=1024)
    return dict(d_model=1024, n_heads=16, d_head=128, d_mlp=3584, n_attn_heads=8, n_kv_heads=2, d_head_attn=256,
                rotary_dim=64, T=512, head=4, sae_features=16384)


def build(quick: bool):
    from recurrent_lens import HookedRecurrentModel, ModelConfig, WriteSAE

    s = sizes(quick)
    cfg = ModelConfig(
        architecture="gated_deltanet", d_model=s["d_model"], n_layers=4, d_vocab=2048, n_heads=s["n_heads"],
        n_key_heads=s["n_heads"], d_k=s["d_head"], d_v=s["d_head"], d_mlp=s["d_mlp"],
        layer_types=("recurrent", "recurrent", "recurrent", "attention"), n_attn_heads=s["n_attn_heads"],
        n_kv_heads=s["n_kv_heads"], d_head_attn=s["d_head_attn"], rotary_dim=s["rotary_dim"],
        attn_output_gate=True, norm="rms_one_plus", options={"layout": "qwen3_5"},
    )
    model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
    torch.manual_seed(0)
    sae = WriteSAE(s["d_head"], s["d_head"], s["sae_features"], k=32,
                   metadata={"hook_name": f"blocks.{LAYER}.mixer.hook_state", "head": s["head"]})
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 2048, (1, s["T"]), generator=gen)
    positions = torch.randperm(s["T"], generator=gen)[:N_POSITIONS].sort().values
    features = torch.randperm(s["sae_features"], generator=gen)[:N_FEATURES]
    return model, sae, tokens, positions, features, s


def operations(model, sae, tokens, positions, features, s) -> dict:
    from recurrent_lens.analysis import feature_attribution

    return {
        "forward": lambda: model(tokens, return_type=None, stop_at_layer=LAYER + 1),
        "implicit attention": lambda: model.implicit_attention(tokens, LAYER, heads=s["head"]),
        "feature attribution": lambda: feature_attribution(model, sae, tokens, positions, features),
    }


def proc_status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """Runs in a fresh process: one operation's peak resident memory, printed as JSON."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, sae, tokens, positions, features, s = build(args.quick)
    ops = operations(model, sae, tokens[:, :64], positions.clamp(max=63), features, s)
    ops[args.child]()  # warm-up on a short prefix: torch's lazy initialisation is not the operation's memory
    fn = operations(model, sae, tokens, positions, features, s)[args.child]
    before = proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    if proc_status("VmHWM:") > before + 2**20:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    fn()
    print(json.dumps({"before": before, "peak": proc_status("VmHWM:")}))


def measure_in_child(args, what: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", what, "--threads", str(args.threads)]
    argv += ["--quick"] if args.quick else []
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"{what}: the measuring process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function, run round-robin so that a change in the machine's load (shared cores)
    hits every function alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, sae, tokens, positions, features, s = build(args.quick)
    T, H, d = s["T"], s["n_heads"], s["d_head"]
    print(f"setting: gated_deltanet, d_model {s['d_model']}, {H} heads of {d}x{d}, T={T}, batch 1, layer {LAYER}, "
          f"head {s['head']}, WriteSAE of {s['sae_features']} features; {args.threads} thread(s), fp32, CPU, "
          f"torch {torch.__version__}")
    best = best_of(operations(model, sae, tokens, positions, features, s), args.repeats)
    fwd = best["forward"]
    print(f"    forward up to and including layer {LAYER}: {fwd * 1e3:.0f} ms")
    print(f"(a) implicit_attention, one head / forward = {best['implicit attention'] * 1e3:.0f} ms / {fwd * 1e3:.0f} ms"
          f" = {best['implicit attention'] / fwd:.2f}  (target <= 2)")
    print(f"(b) feature_attribution, {N_FEATURES} features x {N_POSITIONS} positions / forward = "
          f"{best['feature attribution'] * 1e3:.0f} ms / {fwd * 1e3:.0f} ms = {best['feature attribution'] / fwd:.2f}"
          "  (target <= 1)")
    peaks = {name: measure_in_child(args, name) for name in ("forward", "implicit attention", "feature attribution")}
    base = peaks["forward"]["peak"]
    pattern = T * T * H * 4
    never = T * T * d * d * 4
    print(f"(c) peak RSS above the forward's peak ({mib(base)}); T²·heads·4 B = {mib(pattern)}, "
          f"the [pos, pos, d_k, d_v] tensor (never formed) would be {mib(never)}:")
    for name in ("implicit attention", "feature attribution"):
        added = peaks[name]["peak"] - base
        print(f"    {name}: {mib(added)} = {added / pattern:.2f} x T²·heads·4 B")


if __name__ == "__main__":
    main()
