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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    QUICK, QWEN3_5_0_8B, best_of, measure_in_child, proc_status, qwen3_5_gdn, reset_peak_rss)

LAYER = 2
N_POSITIONS = 16
N_FEATURES = 64


def sizes(quick: bool) -> dict:
    if quick:
        return dict(QUICK, T=128, head=1, sae_features=1024)
    return dict(QWEN3_5_0_8B, T=512, head=4, sae_features=16384)


def build(quick: bool):
    from recurrent_lens import WriteSAE

    s = sizes(quick)
    model = qwen3_5_gdn(s)
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


def child(args) -> None:
    """Runs in a fresh process: one operation's peak resident memory, printed as JSON."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, sae, tokens, positions, features, s = build(args.quick)
    ops = operations(model, sae, tokens[:, :64], positions.clamp(max=63), features, s)
    ops[args.child]()  # warm-up on a short prefix: torch's lazy initialisation is not the operation's memory
    fn = operations(model, sae, tokens, positions, features, s)[args.child]
    before = reset_peak_rss()
    fn()
    print(json.dumps({"before": before, "peak": proc_status("VmHWM:")}))


def measure(args, what: str) -> dict:
    return measure_in_child(__file__, what, ["--threads", str(args.threads)] + (["--quick"] if args.quick else []))


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
    peaks = {name: measure(args, name) for name in ("forward", "implicit attention", "feature attribution")}
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
