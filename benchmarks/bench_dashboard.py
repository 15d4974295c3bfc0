"""Feature dashboards: time against harvesting and encoding the same states, memory against a plain pass.

    python benchmarks/bench_dashboard.py            # Qwen3.5-0.8B mixer sizes, 1 thread, fp32 (a few minutes)
    python benchmarks/bench_dashboard.py --quick    # small sizes, seconds

The model is a random ``gated_deltanet`` with Qwen3.5-0.8B's layer sizes (d_model 1024, 16 heads of 128 x 128,
d_mlp 3584, 3 GDN layers then 1 attention layer, as in bench_harvest.py); the SAEs are random WriteSAEs (k=32) on
``blocks.1.mixer.hook_state`` head 4. Prints, each measured in this run:

  (a) ``build_dashboard`` (with the top writers of every top example, ``n_writers`` 5) of every feature of a
      2,048-feature SAE / the same batches harvested at every position (``model.harvest`` of the SAE's cell)
      and encoded, in time                                                           (target <= 1.5)
      best of ``--repeats`` after a warm-up, the two taking turns
  (b) with 16,384 features: the peak RSS that ``build_dashboard`` adds above the peak of harvesting and encoding
      the same batches / (SAE size + the per-feature buffers and top writers, O(n_features x n_examples))
      (target <= 1)
      every peak measured in its own fresh process (VmHWM reset after building the model and SAE)
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

HOOK, HEAD = "blocks.1.mixer.hook_state", 4
N_EXAMPLES, N_SAMPLES, CONTEXT, N_WRITERS = 20, 12, 24, 5


def sizes(quick: bool) -> dict:
    if quick:
        return dict(QUICK, n_heads=8, d_head=32, T=128, n_seq=8, batch=4, mem_T=64, mem_seq=2)
    return dict(QWEN3_5_0_8B, T=256, n_seq=16, batch=8, mem_T=128, mem_seq=4)


def build(quick: bool, n_features: int):
    from recurrent_lens.sae import WriteSAE

    s = sizes(quick)
    model = qwen3_5_gdn(s)
    torch.manual_seed(0)
    sae = WriteSAE(s["d_head"], s["d_head"], n_features, k=32,
                   metadata={"hook_name": HOOK, "head": HEAD % s["n_heads"]})
    return model, sae, s


def tokens_for(s: dict, n_seq: int, T: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n_seq, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def harvest_and_encode(model, sae, tokens: torch.Tensor, batch: int) -> None:
    head = sae.cfg.metadata["head"]
    positions = torch.arange(tokens.shape[1])
    for rows in tokens.split(batch):
        states = model.harvest(rows, positions, [(HOOK, head)])[HOOK, head]
        sae.encode(states)


def dashboard(model, sae, tokens: torch.Tensor, batch: int):
    from recurrent_lens.dashboard import build_dashboard

    return build_dashboard(model, sae, tokens, n_examples=N_EXAMPLES, n_samples=N_SAMPLES, context=CONTEXT,
                           batch_size=batch, n_writers=N_WRITERS, progress=False)


def child(args) -> None:
    """In a fresh process: the peak RSS of one operation over the memory test's batches, printed as JSON."""
    torch.set_num_threads(args.threads)
    model, sae, s = build(args.quick, args.mem_features)
    tokens = tokens_for(s, s["mem_seq"], s["mem_T"])
    fn = {"harvest+encode": harvest_and_encode, "dashboard": dashboard}[args.child]
    # Lazy initialisation is not the operation's memory. Both warm up the same way: a dashboard's own warm-up
    # would allocate (and the allocator keep) a second set of its per-feature buffers.
    import recurrent_lens.dashboard  # noqa: F401

    harvest_and_encode(model, sae, tokens[:1, :16], 1)
    before = reset_peak_rss()
    fn(model, sae, tokens, s["batch"])
    print(json.dumps({"before": before, "peak": proc_status("VmHWM:")}))


def measure(args, what: str) -> dict:
    return measure_in_child(__file__, what, ["--threads", str(args.threads), "--mem-features", str(args.mem_features)]
                            + (["--quick"] if args.quick else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--features", type=int, default=2048, help="SAE size of the timing (default 2048)")
    parser.add_argument("--mem-features", type=int, default=16384, help="SAE size of the memory test (16384)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    model, sae, s = build(args.quick, args.features)
    tokens = tokens_for(s, s["n_seq"], s["T"])
    print(f"model: random gated_deltanet, d_model {s['d_model']}, {s['n_heads']} heads of {s['d_head']}x{s['d_head']}; "
          f"{HOOK} head {sae.cfg.metadata['head']}; {args.threads} thread(s)")
    print(f"(a) {tokens.shape[0]} sequences x {tokens.shape[1]} tokens, batch {s['batch']}, "
          f"WriteSAE {args.features} features k=32, n_examples {N_EXAMPLES}, context {CONTEXT}, n_writers {N_WRITERS}")
    ops = {"harvest+encode": lambda: harvest_and_encode(model, sae, tokens, s["batch"]),
           "dashboard": lambda: dashboard(model, sae, tokens, s["batch"])}
    best = best_of(ops, args.repeats)
    ratio = best["dashboard"] / best["harvest+encode"]
    print(f"    harvest+encode {best['harvest+encode']:.2f}s, dashboard {best['dashboard']:.2f}s: "
          f"ratio {ratio:.2f} (target <= 1.5)")

    base, dash = measure(args, "harvest+encode"), measure(args, "dashboard")
    sae_bytes = sum(t.numel() * t.element_size() for t in _sae_shapes(args.mem_features, s["d_head"]))
    from recurrent_lens.dashboard.collect import N_BINS

    window = 2 * CONTEXT + 1
    # per feature: for each kept example its window's tokens (int32) and activations (fp32) plus four scalars,
    # the histogram (int64) and three counters; for each top example its writers' positions, tokens (int32) and
    # contributions (fp32) and four scalars (fp32)
    buffers = args.mem_features * ((N_EXAMPLES + N_SAMPLES) * (window * 8 + 4 * 8) + N_BINS * 8 + 3 * 8
                                   + N_EXAMPLES * (N_WRITERS * 12 + 4 * 4))
    extra = dash["peak"] - base["peak"]
    print(f"(b) {s['mem_seq']} sequences x {s['mem_T']} tokens, WriteSAE {args.mem_features} features: peak RSS "
          f"harvest+encode {base['peak'] / 2**20:.0f} MiB, dashboard {dash['peak'] / 2**20:.0f} MiB")
    print(f"    dashboard - harvest+encode = {extra / 2**20:.0f} MiB; SAE {sae_bytes / 2**20:.0f} MiB + buffers "
          f"{buffers / 2**20:.0f} MiB = {(sae_bytes + buffers) / 2**20:.0f} MiB: ratio "
          f"{extra / (sae_bytes + buffers):.2f} (target <= 1)")


def _sae_shapes(n_features: int, d: int):
    """The parameters of a rank-1 WriteSAE without building one (meta tensors: no memory)."""
    from recurrent_lens.sae import WriteSAE

    with torch.device("meta"):
        return list(WriteSAE(d, d, n_features, k=32).state_dict().values())


if __name__ == "__main__":
    main()
